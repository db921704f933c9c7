"""``/metrics`` for the whole mirror when ``--workers N`` runs several processes.

Theory of operation. Whichever worker the kernel hands a scrape to answers for all of them:
it asks every other worker for a *snapshot* of its metrics over that worker's Unix socket in
the run directory (``worker-N.sock``; a snapshot is every family with its samples, as JSON),
and merges them with its own (:func:`merge`, pure). Counters and histograms are summed; so are
gauges of things each process has (connections, slots, bytes in flight, memory); gauges of the
one shared cache directory or of the configuration are the same in every worker and taken once
(the largest); the hit ratio is computed again from the summed lookups. A few per-worker
families follow (``hubproxy_worker_*{worker="N"}``), for seeing how the kernel spreads the load.

Sums must not go down, or Prometheus reads a counter reset. Every snapshot a worker hands out is
also written to ``worker-N.json``: a worker that does not answer in time is counted from that
file, and when a worker dies the supervisor adds its last one into ``retired.json``
(:func:`retire`), which every merge adds to the counters. The increments a dead worker made
after its last snapshot are lost; nothing else is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import trio

from .metrics import HubMetrics, escape_help, format_sample

log = logging.getLogger("hubproxy")

ASK_TIMEOUT = 1.0  # seconds a scrape waits for another worker's snapshot
RETIRED = "retired.json"

# One value for the whole mirror, the same in every worker: taken once, not summed.
SHARED_GAUGES = frozenset(
    {
        "hubproxy_cache_bytes",
        "hubproxy_cache_blobs",
        "hubproxy_cache_limit_bytes",
        "hubproxy_cache_disk_free_bytes",
        "hubproxy_cache_filling_bytes",
        "hubproxy_manifest_memory_limit_bytes",
        "hubproxy_manifest_cache_bytes",
        "hubproxy_manifest_cache_manifests",
        "hubproxy_manifest_cache_tags",
        "hubproxy_manifest_cache_limit_bytes",
        "hubproxy_manifest_cache_limit_entries",
        "hubproxy_upstream_slot_limit",
        "hubproxy_build_info",
        "hubproxy_ratelimit_limit",
        "hubproxy_ratelimit_low",
        "hubproxy_bandwidth_client_limit_bytes_per_second",  # (the total's: each worker's part)
        "hubproxy_store_bytes",  # the bucket's (each worker's view of it)
        "hubproxy_store_limit_bytes",
    }
)
EARLIEST_GAUGES = frozenset(
    {
        "hubproxy_start_time_seconds",
        "hubproxy_upstream_ratelimit_remaining",
        "hubproxy_ratelimit_remaining",
    }
)
HIT_RATIO = "hubproxy_cache_hit_ratio"

# a snapshot: family name -> {"kind", "help", "samples": [[sample name, [[label, value]...], v]]}
Snapshot = dict[str, dict[str, Any]]
SampleKey = tuple[str, tuple[tuple[str, str], ...]]


def snapshot(metrics: HubMetrics) -> Snapshot:
    """This process's metrics as plain values."""
    return {
        metric.name: {
            "kind": metric.kind,
            "help": metric.help,
            "samples": [[name, list(labels), value] for name, labels, value in metric.samples()],
        }
        for metric in metrics.registry.metrics
    }


def _samples(family: dict[str, Any]) -> Iterable[tuple[SampleKey, float]]:
    for name, labels, value in family["samples"]:
        yield (str(name), tuple((str(k), str(v)) for k, v in labels)), float(value)


def merge(snapshots: Sequence[Snapshot], retired: Snapshot | None = None) -> Snapshot:
    """The whole mirror's metrics from each worker's snapshot (the first one's families and
    order), plus the counters of workers that died (``retired``)."""
    merged: Snapshot = {}
    for name, family in snapshots[0].items():
        kind = family["kind"]
        values: dict[SampleKey, float] = {}
        sources = [s[name] for s in snapshots if name in s]
        if kind in ("counter", "histogram") and retired is not None and name in retired:
            sources.append(retired[name])
        for source in sources:
            for key, value in _samples(source):
                if key not in values:
                    values[key] = value
                elif name in SHARED_GAUGES:
                    values[key] = max(values[key], value)
                elif name in EARLIEST_GAUGES:
                    values[key] = min(values[key], value)
                else:
                    values[key] = values[key] + value
        merged[name] = {
            "kind": kind,
            "help": family["help"],
            "samples": [[n, [list(p) for p in labels], v] for (n, labels), v in values.items()],
        }
    if HIT_RATIO in merged and "hubproxy_cache_requests" in merged:
        hits = misses = 0.0
        for (_, labels), value in _samples(merged["hubproxy_cache_requests"]):
            result = dict(labels).get("result")
            hits += value if result == "hit" else 0.0
            misses += value if result == "miss" else 0.0
        ratio = hits / (hits + misses) if hits + misses else 0.0
        merged[HIT_RATIO]["samples"] = [[HIT_RATIO, [], ratio]]
    return merged


def per_worker(snapshots: Sequence[tuple[int, Snapshot]]) -> Snapshot:
    """The ``hubproxy_worker_*`` families: what each worker answering carries."""

    def total(snap: Snapshot, name: str, skip_ops: bool = False) -> float:
        family = snap.get(name)
        if family is None:
            return 0.0
        return sum(
            value
            for (_, labels), value in _samples(family)
            if not (skip_ops and dict(labels).get("route") == "ops")
        )

    def family(kind: str, help: str, values: Iterable[tuple[int, float]], name: str) -> Any:
        return {
            "kind": kind,
            "help": help,
            "samples": [[name, [["worker", str(i)]], v] for i, v in values],
        }

    ordered = sorted(snapshots, key=lambda pair: pair[0])
    return {
        "hubproxy_workers": {
            "kind": "gauge",
            "help": "Worker processes whose figures this scrape holds (--workers).",
            "samples": [["hubproxy_workers", [], float(len(snapshots))]],
        },
        "hubproxy_worker_requests": family(
            "counter",
            "Requests answered by each worker since it started (the operator's own left out).",
            ((i, total(s, "hubproxy_requests", skip_ops=True)) for i, s in ordered),
            "hubproxy_worker_requests_total",
        ),
        "hubproxy_worker_client_connections": family(
            "gauge",
            "Client connections open now in each worker.",
            ((i, total(s, "hubproxy_client_connections")) for i, s in ordered),
            "hubproxy_worker_client_connections",
        ),
        "hubproxy_worker_resident_memory_bytes": family(
            "gauge",
            "Resident memory of each worker.",
            ((i, total(s, "process_resident_memory_bytes")) for i, s in ordered),
            "hubproxy_worker_resident_memory_bytes",
        ),
    }


def render(families: Snapshot) -> bytes:
    """Families in the text exposition format 0.0.4, as ``Registry.render`` writes them."""
    lines = []
    for name, family in families.items():
        kind = family["kind"]
        header = name + "_total" if kind == "counter" else name
        lines.append(f"# HELP {header} {escape_help(family['help'])}")
        lines.append(f"# TYPE {header} {kind}")
        for (sample, labels), value in _samples(family):
            lines.append(format_sample(sample, labels, value))
    return ("\n".join(lines) + "\n").encode("utf-8")


# -- the run directory ---------------------------------------------------------------------------


def _socket_path(run_dir: Path, index: int) -> Path:
    return run_dir / f"worker-{index}.sock"


def _file_path(run_dir: Path, index: int) -> Path:
    return run_dir / f"worker-{index}.json"


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def _read(path: Path) -> Snapshot | None:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def retire(run_dir: Path, index: int) -> None:
    """Worker ``index`` died: add its last snapshot's counters to the retired ones (the
    supervisor's part; the sums stay monotonic)."""
    last = _read(_file_path(run_dir, index))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_file_path(run_dir, index))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_socket_path(run_dir, index))
    if last is None:
        return
    counters = {n: f for n, f in last.items() if f.get("kind") in ("counter", "histogram")}
    retired = _read(run_dir / RETIRED)
    merged = merge([counters], retired) if retired is not None else counters
    _write_atomically(run_dir / RETIRED, json.dumps(merged).encode())


class WorkerMetrics:
    """This worker's part: answering the others, and asking them for a scrape."""

    def __init__(self, metrics: HubMetrics, run_dir: Path, index: int, count: int) -> None:
        self.metrics = metrics
        self.run_dir = run_dir
        self.index = index
        self.count = count
        self.refresh: Callable[[], None] = lambda: None  # binds the gauges to their sources

    def _snapshot(self) -> bytes:
        self.refresh()
        data = json.dumps(snapshot(self.metrics)).encode()
        # written first: a scrape that cannot reach this worker counts this, never less
        _write_atomically(_file_path(self.run_dir, self.index), data)
        return data

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Answer the other workers' scrapes: each connection gets one snapshot."""
        path = _socket_path(self.run_dir, self.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a dead predecessor's
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(str(path))
        sock.listen(16)

        async def answer(stream: trio.SocketStream) -> None:
            async with stream:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_all(self._snapshot())

        task_status.started()
        await trio.serve_listeners(answer, [trio.SocketListener(sock)])

    async def _ask(self, index: int, found: dict[int, Snapshot]) -> None:
        with trio.move_on_after(ASK_TIMEOUT):
            try:
                stream = await trio.open_unix_socket(str(_socket_path(self.run_dir, index)))
                async with stream:
                    data = bytearray()
                    while chunk := await stream.receive_some(65536):
                        data += chunk
                value = json.loads(data)
            except (OSError, ValueError, trio.BrokenResourceError):
                pass
            else:
                if isinstance(value, dict):
                    found[index] = value
                    return
        # not answering (restarting, or busy): its last snapshot, so no sum goes down
        last = _read(_file_path(self.run_dir, index))
        if last is not None:
            found[index] = last

    async def _collect(self) -> tuple[dict[int, Snapshot], Snapshot]:
        """Every worker's snapshot (by index) and their merge."""
        found: dict[int, Snapshot] = {self.index: json.loads(self._snapshot())}
        async with trio.open_nursery() as nursery:
            for index in range(self.count):
                if index != self.index:
                    nursery.start_soon(self._ask, index, found)
        own = found[self.index]
        others = [snap for i, snap in sorted(found.items()) if i != self.index]
        return found, merge([own, *others], _read(self.run_dir / RETIRED))

    async def gather(self) -> Snapshot:
        """The whole mirror's metrics as plain values (the status page's trends and tables)."""
        return (await self._collect())[1]

    async def render(self) -> bytes:
        """The whole mirror's metrics, then the per-worker families."""
        found, merged = await self._collect()
        merged.update(per_worker(list(found.items())))
        return render(merged)
