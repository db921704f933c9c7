"""Load, soak and memory budget of hubproxy, measured on 127.0.0.1.

    python -m bench.load                  1,000 idle keep-alive TLS connections, then 100
                                          concurrent 8 MiB blob transfers beside them (half
                                          cache hits, half misses), every one sha256-verified;
                                          idle RSS, per-idle-connection cost, peak RSS, and
                                          open descriptors back to the baseline afterwards
    python -m bench.load --slow-client    one 1 GiB blob (``--size``) to a client reading at
                                          20 MB/s (``--rate``), with the cache (a miss) and with
                                          ``--no-cache``; hubproxy's RSS sampled every 0.5 s
    python -m bench.load --soak [MIN]     MIN minutes (default 10) of mixed pulls from 20
                                          workers with deliberate mid-blob disconnects; RSS and
                                          descriptors sampled every second, their slopes
    python -m bench.load --abuse          cases 1, 2, 3, 7 and 8 of issue 12, each a bounded
                                          attack from 127.0.0.2 on a fresh hubproxy while a
                                          victim on 127.0.0.1 keeps pulling (manifest, a cached
                                          blob, a new blob); the victim's p99 with no attack and
                                          under each attack (``--attacks``, ``--abuse-seconds``),
                                          hubproxy's peak RSS per attack
    python -m bench.load --quick          all four, small (100 idle, 10 x 1 MiB, 64 MiB fast,
                                          a 0.1-minute soak, 0.5 s abuse phases): under a minute

Every mode starts its own origin (one nginx playing Docker Hub: registry 307 -> CDN, see
:mod:`bench.origin`) and hubproxy as users run it (``python -m hubproxy --cert --key --upstream
--upstream-ca --no-library-prefix --log-level warning --cache-dir DIR`` on /dev/shm, plus
``--max-connections 4096``, also per client; the abuse mode keeps the defaults, as users run
it), and records hubproxy's RSS right after start. Reports go to
``bench/results/{load,slow-client,soak,abuse}.{md,json}`` (``--out``; ``--quick`` defaults to a
temporary directory, so it never overwrites the figures the README quotes). The abuse mode's
attacker is a child process (``attacker_main``), so its CPU is not the victim's event loop.

RSS is ``VmRSS`` of the hubproxy process (peak: ``VmHWM``, reset before the measured phase);
descriptors are the entries of ``/proc/PID/fd``, each classified (listener, client socket,
upstream socket, file, ...) by matching socket inodes against ``/proc/PID/net/tcp``. Sizes are
KiB/MiB (1024-based); throughput MB/s is 10^6 bytes per second.

Exit status: 0 when every check passed (every transfer verified, descriptors back to the
baseline, no soak errors; under each attack the victim's p99 within 2x of its p99 alone, none of
its pulls failed, hubproxy's peak RSS under 96 MiB), 1 when one failed (the reports are still
written), 2 for usage errors or a missing nginx.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime
import functools
import importlib.metadata
import itertools
import json
import math
import os
import platform
import random
import re
import resource
import secrets
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import trio

from bench import procs
from bench.contestants import cached_blobs, hubproxy_argv
from bench.env import REPO_ROOT, cpu_model, find_tool, git_revision, loadavg, mem_total_gib
from bench.fixtures import MANIFEST_TYPE, Blob, Fixtures, make_fixtures, write_blob
from bench.loadclient import Body, Connection, RequestFailed, client_context
from bench.nginxconf import BIG_MANIFEST_PATH, BLOB_PATH, MANIFEST_PATH
from bench.origin import Origin, start_origin
from bench.report import scan_log
from hubproxy.config import Config, Timeouts
from hubproxy.ops.usersfile import add_user

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
DEFAULT_OUT = REPO_ROOT / "bench" / "results"
MAX_CONNECTIONS = 4096
# hubproxy's --body-memory here: a small device's (what auto gives a machine of 512 MiB or less),
# the device issue 12's memory targets are for; auto on a server gives up to 64 MiB, and the
# 100-transfer case then peaks about 50 MiB higher at twice the throughput (README)
BODY_MEMORY = "8M"
IDLE_RSS_TARGET_KIB = 40 * 1000 * 1000 // 1024  # "under 40 MB"
PER_CONNECTION_TARGET_KIB = 64.0
# hubproxy keeps up to this many idle upstream connections per origin; it talks to two here
# (the registry and the CDN it redirects to), and closes an idle one only when it next takes a
# connection for that origin and finds it older than ``upstream_keepalive``.
POOL_IDLE_PER_ORIGIN = Config().pool_max_idle_per_origin
UPSTREAM_ORIGINS = 2
UPSTREAM_KEEPALIVE = Timeouts().upstream_keepalive
SETTLE_TIMEOUT = 30.0


def say(text: str) -> None:
    """A progress line, to stderr."""
    print(text, file=sys.stderr, flush=True)


# --- pure helpers ------------------------------------------------------------------------------


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of ``y`` over ``x``; 0 with fewer than two distinct ``x``."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return sxy / sxx


def parse_size(text: str) -> int:
    """``64M``, ``1G``, ``512K``, ``8MiB``, ``1048576`` -> bytes (K/M/G are 1024-based)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 64M, 1G, 512K)")
    number, unit = match.groups()
    scale = {"": 1, "K": KiB, "M": MiB, "G": GiB}[unit.upper()]
    return int(float(number) * scale)


def parse_status_kb(status_text: str, field_name: str) -> int:
    """A ``kB`` field (``VmRSS``, ``VmHWM``) of ``/proc/PID/status``; 0 when absent."""
    prefix = field_name + ":"
    for line in status_text.splitlines():
        if line.startswith(prefix):
            return int(line.split()[1])
    return 0


@dataclass(frozen=True)
class TcpSocket:
    local_port: int
    remote_port: int
    state: int  # 0x01 ESTABLISHED, 0x08 CLOSE_WAIT, 0x0A LISTEN, ...


TCP_LISTEN = 0x0A
TCP_CLOSE_WAIT = 0x08


def parse_tcp_table(text: str) -> dict[int, TcpSocket]:
    """``/proc/net/tcp`` (or ``tcp6``) -> ``inode -> TcpSocket``; the header line is skipped."""
    table: dict[int, TcpSocket] = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        try:
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            state = int(fields[3], 16)
            inode = int(fields[9])
        except (ValueError, IndexError):
            continue
        if inode:
            table[inode] = TcpSocket(local_port, remote_port, state)
    return table


def classify_fd(
    link: str, tcp: Mapping[int, TcpSocket], listen_port: int, upstream_ports: Collection[int]
) -> str:
    """What one ``/proc/PID/fd`` entry (its ``readlink``) is, from the proxy's point of view."""
    if link.startswith("socket:["):
        inode = int(link[len("socket:[") : -1])
        sock = tcp.get(inode)
        if sock is None:
            return "socket-other"  # unix (trio's wakeup socketpair), udp
        if sock.state == TCP_LISTEN:
            return "listener"
        if sock.local_port == listen_port:
            return "client"
        if sock.remote_port in upstream_ports:
            return "upstream"
        return "tcp-other"
    if link.startswith("pipe:["):
        return "pipe"
    if link.startswith("anon_inode:"):
        return "anon_inode"
    if link.startswith("/"):
        return "file"
    return "other"


def breakdown(
    links: Mapping[int, str],
    tcp: Mapping[int, TcpSocket],
    listen_port: int,
    upstream_ports: Collection[int],
) -> dict[str, int]:
    """Descriptor counts by :func:`classify_fd` kind, plus ``total`` and ``close_wait``
    (sockets whose peer closed and that the proxy has not closed yet)."""
    counts: Counter[str] = Counter()
    for link in links.values():
        counts[classify_fd(link, tcp, listen_port, upstream_ports)] += 1
        if link.startswith("socket:["):
            sock = tcp.get(int(link[len("socket:[") : -1]))
            if sock is not None and sock.state == TCP_CLOSE_WAIT:
                counts["close_wait"] += 1
    counts["total"] = len(links)
    return dict(sorted(counts.items()))


def fds_settled(now: Mapping[str, int], baseline_total: int) -> bool:
    """No client sockets left, and everything but idle upstream connections is as at start."""
    return now.get("client", 0) == 0 and now["total"] - now.get("upstream", 0) <= baseline_total


# --- /proc readers ----------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""


def rss_kib(pid: int) -> int:
    return parse_status_kb(_read(f"/proc/{pid}/status"), "VmRSS")


def hwm_kib(pid: int) -> int:
    return parse_status_kb(_read(f"/proc/{pid}/status"), "VmHWM")


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return 0


def fd_links(pid: int) -> dict[int, str]:
    links: dict[int, str] = {}
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError):
        return links
    for name in names:
        try:
            links[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue  # closed meanwhile
    return links


def tcp_table(pid: int) -> dict[int, TcpSocket]:
    table = parse_tcp_table(_read(f"/proc/{pid}/net/tcp"))
    table.update(parse_tcp_table(_read(f"/proc/{pid}/net/tcp6")))
    return table


# --- the processes ------------------------------------------------------------------------------


def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (inherited by the processes we start)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


@dataclass
class Hub:
    """One running hubproxy."""

    process: procs.Started
    port: int
    argv: list[str]
    cache_dir: Path | None
    upstream_ports: frozenset[int]
    idle_rss_kib: int = 0
    baseline: dict[str, int] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.process.poll() is None

    def fds(self) -> dict[str, int]:
        return breakdown(fd_links(self.pid), tcp_table(self.pid), self.port, self.upstream_ports)


@dataclass
class Harness:
    """Fixtures, the origin, the client TLS context, and the hubproxy instances started."""

    root: Path
    fixtures: Fixtures
    origin: Origin
    stack: contextlib.ExitStack
    context: ssl.SSLContext
    body_memory: str = BODY_MEMORY  # every hubproxy's --body-memory
    hubs: list[Hub] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        nginx: str,
        root: Path,
        shapes: list[tuple[int, int]],
        stack: contextlib.ExitStack,
        big_manifest_size: int = 0,
        big_manifest_variants: int = 0,
        body_memory: str = BODY_MEMORY,
    ) -> Harness:
        began = time.monotonic()
        fixtures = make_fixtures(root, shapes, big_manifest_size, big_manifest_variants)
        total = sum(count * size for count, size in shapes)
        say(f"load: {total / MiB:,.0f} MiB of blobs in {time.monotonic() - began:.1f}s")
        origin = start_origin(nginx, root, fixtures, stack)
        return cls(root, fixtures, origin, stack, client_context(fixtures.tls.ca_pem), body_memory)

    def start_hub(
        self,
        label: str,
        *,
        cache: bool,
        extra: Sequence[str] = (),
        max_connections: int | None = MAX_CONNECTIONS,
    ) -> Hub:
        """Start hubproxy; ``max_connections`` None: its default ``--max-connections``."""
        port = procs.free_port()
        cache_dir = self.root / f"cache-{label}" if cache else None
        argv = [
            *hubproxy_argv(port, "tls", self.origin.registry_url("tls"), self.fixtures, cache_dir),
            *(
                [
                    "--max-connections",
                    str(max_connections),
                    # every load client is 127.0.0.1: one address holding a thousand idle
                    # connections is the point of the load mode, not an abuse to refuse
                    "--max-connections-per-client",
                    str(max_connections),
                ]
                if max_connections
                else []
            ),
            *("--body-memory", self.body_memory),
            *extra,
        ]
        started = procs.start(label, argv, self.root / f"{label}.log", self.stack, cwd=REPO_ROOT)
        procs.wait_listening(started, [port])
        ports = self.origin.ports
        hub = Hub(
            started,
            port,
            argv,
            cache_dir,
            frozenset({ports.registry_tls, ports.registry_http, ports.cdn_tls, ports.cdn_http}),
        )
        self.hubs.append(hub)
        # wait_listening's probe connection must be gone before the baseline is taken
        deadline = time.monotonic() + 5.0
        for _ in range(100):
            time.sleep(0.05)
            if hub.fds().get("client", 0) == 0 or time.monotonic() > deadline:
                break
        time.sleep(0.5)
        hub.idle_rss_kib = rss_kib(hub.pid)
        hub.baseline = hub.fds()
        say(
            f"load: {label} up (pid {hub.pid}), idle RSS {hub.idle_rss_kib / KiB:.1f} MiB, "
            f"{hub.baseline['total']} fds"
        )
        return hub


def log_findings(hub: Hub) -> dict[str, Any]:
    scan = scan_log(hub.process.name, hub.process.log, hub.process.log.name)
    return {"warning_or_error_lines": scan.lines, "samples": scan.samples}


# --- client operations --------------------------------------------------------------------------


async def pull_blob(
    conn: Connection,
    blob: Blob,
    *,
    rate: float | None = None,
    stop_after: int | None = None,
    headers: list[tuple[str, str]] | None = None,
) -> Body:
    """GET one blob through the proxy; a complete body must match its length and sha256."""
    head = await conn.start("GET", BLOB_PATH + blob.digest_hex, headers)
    if head.status != 200:
        await conn.read_body()
        raise RequestFailed(f"status {head.status}")
    body = await conn.read_body(rate=rate, stop_after=stop_after)
    if body.complete:
        if body.size != blob.size:
            raise RequestFailed("wrong length", f"{body.size} of {blob.size}")
        if body.digest_hex != blob.digest_hex:
            raise RequestFailed("sha256 mismatch")
    return body


async def pull_manifest(
    conn: Connection, fixtures: Fixtures, headers: list[tuple[str, str]] | None = None
) -> Body:
    head = await conn.start("GET", MANIFEST_PATH, [("accept", MANIFEST_TYPE), *(headers or [])])
    body = await conn.read_body()
    if head.status != 200:
        raise RequestFailed(f"status {head.status}")
    if "sha256:" + body.digest_hex != fixtures.manifest_digest:
        raise RequestFailed("manifest sha256 mismatch")
    return body


async def ping(conn: Connection) -> None:
    head, _ = await conn.get("/v2/")
    if head.status != 200:
        raise RequestFailed(f"status {head.status}")


@dataclass
class Sample:
    t: float  # seconds since the sampler started
    rss_kib: int
    fds: int


async def sampler(
    pid: int, interval: float, stop: trio.Event, out: list[Sample], max_samples: int
) -> None:
    """Append an RSS + descriptor-count sample every ``interval`` until ``stop`` (and once
    more then), at most ``max_samples``."""
    began = trio.current_time()
    for _ in range(max_samples):
        out.append(Sample(trio.current_time() - began, rss_kib(pid), fd_count(pid)))
        if stop.is_set():
            return
        with trio.move_on_after(interval):
            await stop.wait()


async def settle(hub: Hub, limit: float = SETTLE_TIMEOUT) -> tuple[dict[str, int], float]:
    """Poll (bounded) until :func:`fds_settled`; the last breakdown and the seconds it took."""
    began = trio.current_time()
    now = hub.fds()
    for _ in range(int(limit / 0.1) + 1):
        now = hub.fds()
        if fds_settled(now, hub.baseline["total"]) or trio.current_time() - began > limit:
            break
        await trio.sleep(0.1)
    return now, trio.current_time() - began


def fd_verdict(hub: Hub, now: Mapping[str, int], seconds: float) -> dict[str, Any]:
    upstream = now.get("upstream", 0)
    unexplained = now["total"] - upstream - hub.baseline["total"]
    tolerance = POOL_IDLE_PER_ORIGIN * UPSTREAM_ORIGINS
    return {
        "baseline": hub.baseline["total"],
        "after": now["total"],
        "idle_upstream_connections": upstream,
        "tolerance_upstream": tolerance,
        "unexplained": unexplained,
        "matched": unexplained == 0 and upstream <= tolerance and now.get("client", 0) == 0,
        "seconds_to_settle": round(seconds, 2),
        "baseline_breakdown": hub.baseline,
        "after_breakdown": dict(now),
    }


def _err(exc: BaseException) -> str:
    if isinstance(exc, RequestFailed):
        return exc.kind
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    return type(exc).__name__


# --- mode 1: idle connections + concurrent transfers --------------------------------------------


@dataclass(frozen=True)
class LoadParams:
    idle: int = 1000
    transfers: int = 100
    blob_size: int = 8 * MiB
    hit_fraction: float = 0.5
    open_parallel: int = 64
    transfer_timeout: float = 180.0
    pool_wait: bool = True


async def _prime(hub: Hub, h: Harness, blobs: list[Blob]) -> int:
    """Pull ``blobs`` once (8 at a time) so they are cache hits later; how many verified."""
    verified = 0
    limiter = trio.CapacityLimiter(8)

    async def one(blob: Blob) -> None:
        nonlocal verified
        async with limiter:
            conn = await Connection.open(hub.port, h.context)
            try:
                with trio.fail_after(120):
                    await pull_blob(conn, blob)
                verified += 1
            finally:
                await conn.aclose()

    async with trio.open_nursery() as nursery:
        for blob in blobs:
            nursery.start_soon(one, blob)
    if hub.cache_dir is not None:  # renamed into place once verified: wait for it, bounded
        for _ in range(100):
            if cached_blobs(hub.cache_dir, [b.digest_hex for b in blobs]) == len(blobs):
                break
            await trio.sleep(0.1)
    return verified


async def run_load(h: Harness, hub: Hub, p: LoadParams, probe_blob: Blob) -> dict[str, Any]:
    blobs = h.fixtures.blobs[(p.transfers, p.blob_size)]
    hits = blobs[: round(p.transfers * p.hit_fraction)]
    result: dict[str, Any] = {
        "mode": "load",
        "params": asdict(p),
        "hubproxy_argv": hub.argv,
        "idle_rss_kib_at_start": hub.idle_rss_kib,
    }
    say(f"load: priming {len(hits)} blobs into the cache")
    primed = await _prime(hub, h, hits)
    await trio.sleep(0.5)
    rss_before_idle = rss_kib(hub.pid)
    fds_before_idle = hub.fds()
    result["primed"] = {"blobs": len(hits), "verified": primed}
    result["rss_before_idle_kib"] = rss_before_idle

    # idle connections: each does one GET /v2/, then waits; after the transfers each proves it
    # is still alive with another GET /v2/, then closes
    opened = 0
    open_errors: Counter[str] = Counter()
    probe_errors: Counter[str] = Counter()
    survived = 0
    all_open = trio.Event()
    release = trio.Event()
    done_opening = 0
    limiter = trio.CapacityLimiter(p.open_parallel)

    async def idle_one() -> None:
        nonlocal opened, survived, done_opening
        conn: Connection | None = None
        try:
            async with limiter:
                try:
                    with trio.fail_after(30):
                        conn = await Connection.open(hub.port, h.context)
                        await ping(conn)
                    opened += 1
                except (RequestFailed, trio.TooSlowError) as exc:
                    open_errors[_err(exc)] += 1
                    if conn is not None:
                        await conn.abort(reset=False)
                        conn = None
            done_opening += 1
            if done_opening == p.idle:
                all_open.set()
            if conn is None:
                return
            await release.wait()
            try:
                with trio.fail_after(30):
                    await ping(conn)
                survived += 1
            except (RequestFailed, trio.TooSlowError) as exc:
                probe_errors[_err(exc)] += 1
        finally:
            if conn is not None:
                await conn.aclose()

    transfer_errors: Counter[str] = Counter()
    transfer_seconds: list[float] = []
    verified = 0
    transferred = 0

    async def transfer(blob: Blob) -> None:
        nonlocal verified, transferred
        began = trio.current_time()
        conn: Connection | None = None
        try:
            with trio.fail_after(p.transfer_timeout):
                conn = await Connection.open(hub.port, h.context)
                body = await pull_blob(conn, blob)
            verified += 1
            transferred += body.size
            transfer_seconds.append(trio.current_time() - began)
        except (RequestFailed, trio.TooSlowError) as exc:
            transfer_errors[_err(exc)] += 1
        finally:
            if conn is not None:
                await conn.aclose()

    samples: list[Sample] = []
    async with trio.open_nursery() as nursery:
        began = trio.current_time()
        say(f"load: opening {p.idle} idle keep-alive TLS connections")
        for _ in range(p.idle):
            nursery.start_soon(idle_one)
        with trio.move_on_after(300):
            await all_open.wait()
        open_seconds = trio.current_time() - began
        await trio.sleep(1.0)
        rss_idle = rss_kib(hub.pid)
        fds_idle = hub.fds()
        per_conn = (rss_idle - rss_before_idle) / max(opened, 1)
        say(
            f"load: {opened} open in {open_seconds:.1f}s; RSS {rss_idle / KiB:.1f} MiB "
            f"({per_conn:.1f} KiB per connection), {fds_idle['total']} fds"
        )
        result["idle_connections"] = {
            "requested": p.idle,
            "opened": opened,
            "open_errors": dict(open_errors),
            "seconds_to_open": round(open_seconds, 2),
            "rss_kib": rss_idle,
            "per_connection_kib": round(per_conn, 2),
            "fds": fds_idle,
            "fds_before": fds_before_idle,
        }

        say(f"load: {p.transfers} concurrent {p.blob_size / MiB:g} MiB transfers")
        procs.reset_peak_rss([hub.pid])
        stop = trio.Event()
        async with trio.open_nursery() as inner:
            inner.start_soon(sampler, hub.pid, 0.2, stop, samples, 10_000)
            t0 = trio.current_time()
            async with trio.open_nursery() as transfers:
                for blob in blobs:
                    transfers.start_soon(transfer, blob)
            wall = trio.current_time() - t0
            stop.set()
        peak = hwm_kib(hub.pid)
        release.set()  # the idle connections probe and close
    result["idle_connections"]["survived_transfers"] = survived
    result["idle_connections"]["probe_errors"] = dict(probe_errors)
    result["transfers"] = {
        "count": len(blobs),
        "hits": len(hits),
        "misses": len(blobs) - len(hits),
        "blob_bytes": p.blob_size,
        "verified": verified,
        "errors": dict(transfer_errors),
        "bytes": transferred,
        "seconds": round(wall, 3),
        "mb_per_s": round(transferred / wall / 1e6, 1) if wall > 0 else 0.0,
        "slowest_seconds": round(max(transfer_seconds, default=0.0), 3),
        "peak_rss_kib": peak,
        "max_sampled_rss_kib": max((s.rss_kib for s in samples), default=0),
        "max_fds": max((s.fds for s in samples), default=0),
    }
    say(
        f"load: {verified}/{len(blobs)} verified in {wall:.1f}s "
        f"({transferred / wall / 1e6 if wall else 0:.0f} MB/s), peak RSS {peak / KiB:.1f} MiB"
    )

    now, seconds = await settle(hub)
    result["fds_after"] = fd_verdict(hub, now, seconds)
    say(f"load: fds after: {now} (baseline {hub.baseline['total']})")
    result["pool_wait"] = None
    if p.pool_wait:
        wait = UPSTREAM_KEEPALIVE + 2
        say(f"load: waiting {wait:g}s, then one more cache-miss pull, to see the pool shrink")
        await trio.sleep(wait)
        before = hub.fds()
        conn = await Connection.open(hub.port, h.context)
        try:
            with trio.fail_after(60):
                await pull_blob(conn, probe_blob)
        finally:
            await conn.aclose()
        after, seconds = await settle(hub)
        result["pool_wait"] = {
            "waited_seconds": wait,
            "upstream_before_pull": before.get("upstream", 0),
            "after_pull": fd_verdict(hub, after, seconds),
        }
        say(f"load: after the wait and one pull: {after}")
    result["rss_end_kib"] = rss_kib(hub.pid)
    return result


def load_checks(r: Mapping[str, Any]) -> list[str]:
    """The failed checks of a load result (empty: all passed)."""
    failed: list[str] = []
    idle = r["idle_connections"]
    t = r["transfers"]
    if r["primed"]["verified"] != r["primed"]["blobs"]:
        failed.append("priming pulls failed")
    if idle["opened"] != idle["requested"]:
        failed.append(f"only {idle['opened']}/{idle['requested']} idle connections opened")
    if idle["survived_transfers"] != idle["opened"]:
        failed.append(f"only {idle['survived_transfers']} idle connections survived")
    if t["verified"] != t["count"]:
        failed.append(f"only {t['verified']}/{t['count']} transfers verified: {t['errors']}")
    if not r["fds_after"]["matched"]:
        failed.append(f"descriptors not back to the baseline: {r['fds_after']}")
    if r["pool_wait"] is not None and not r["pool_wait"]["after_pull"]["matched"]:
        failed.append("descriptors not back to the baseline after the pool wait")
    return failed


# --- mode 2: one slow client ----------------------------------------------------------------------


@dataclass(frozen=True)
class SlowParams:
    size: int = 1 * GiB
    rate: float = 20e6  # bytes per second
    interval: float = 0.5
    variants: tuple[str, ...] = ("cache-miss", "no-cache")


async def run_slow(h: Harness, hub: Hub, blob: Blob, p: SlowParams) -> dict[str, Any]:
    samples: list[Sample] = []
    stop = trio.Event()
    timeout = p.size / p.rate * 2 + 60
    max_samples = int(timeout / p.interval) + 10
    error = ""
    body: Body | None = None
    conn = await Connection.open(hub.port, h.context)
    began = trio.current_time()
    try:
        with trio.fail_after(timeout):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sampler, hub.pid, p.interval, stop, samples, max_samples)
                try:
                    body = await pull_blob(conn, blob, rate=p.rate)
                finally:
                    stop.set()
    except (RequestFailed, trio.TooSlowError) as exc:
        error = str(exc) or _err(exc)
    finally:
        await conn.aclose()
    seconds = trio.current_time() - began
    now, settle_seconds = await settle(hub)
    rss = [s.rss_kib for s in samples]
    minutes = [(s.t / 60, float(s.rss_kib)) for s in samples]
    return {
        "idle_rss_kib_at_start": hub.idle_rss_kib,
        "hubproxy_argv": hub.argv,
        "bytes": body.size if body else 0,
        "verified": body is not None and body.complete,
        "error": error,
        "seconds": round(seconds, 2),
        "mb_per_s": round((body.size if body else 0) / seconds / 1e6, 1),
        "samples": len(samples),
        "rss_min_kib": min(rss, default=0),
        "rss_max_kib": max(rss, default=0),
        "rss_slope_kib_per_min": round(slope(minutes), 1),
        # without the first tenth: the step from idle to one transfer's buffers is not a trend
        "rss_slope_steady_kib_per_min": round(slope(minutes[len(minutes) // 10 + 1 :]), 1),
        "peak_rss_kib": hwm_kib(hub.pid),
        "fds_after": fd_verdict(hub, now, settle_seconds),
        "rss_series_kib": rss,
    }


# --- mode 3: the soak ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SoakParams:
    minutes: float = 10.0
    workers: int = 20
    small: tuple[tuple[int, int], ...] = ((40, 16 * KiB), (40, 64 * KiB), (40, 256 * KiB))
    medium: tuple[tuple[int, int], ...] = ((10, 2 * MiB), (10, 4 * MiB), (10, 8 * MiB))
    cache_size: str = "96M"
    interval: float = 1.0
    weights: tuple[float, float, float, float] = (0.25, 0.35, 0.3, 0.1)  # manifest, small,
    # medium, deliberate disconnect mid-blob
    request_timeout: float = 120.0
    churn: float = 0.02  # a worker politely closes its connection after this share of requests
    seed: int = 1


KINDS = ("manifest", "small", "medium", "disconnect")
SETTLED_AFTER = 300.0  # seconds: the soak's RSS must not grow after this (issue 12)
SETTLED_SLOPE_LIMIT = 50.0  # KiB per minute
SETTLED_CHECK_MINUTES = 10.0  # shorter soaks report the slope without judging it


@dataclass
class SoakStats:
    completed: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    disconnects_rst: int = 0
    disconnects_fin: int = 0
    bytes: int = 0
    connections: int = 0
    verified_blobs: int = 0


async def soak_worker(
    h: Harness,
    hub: Hub,
    p: SoakParams,
    small: list[Blob],
    medium: list[Blob],
    deadline: float,
    stats: SoakStats,
    rng: random.Random,
) -> None:
    conn: Connection | None = None
    try:
        for _ in range(10_000_000):
            if trio.current_time() >= deadline:
                return
            if conn is None or not conn.reusable:
                if conn is not None:
                    await conn.aclose()
                    conn = None
                try:
                    with trio.fail_after(30):
                        conn = await Connection.open(hub.port, h.context)
                    stats.connections += 1
                except (RequestFailed, trio.TooSlowError) as exc:
                    stats.errors[_err(exc)] += 1
                    await trio.sleep(0.1)
                    continue
            kind = rng.choices(KINDS, weights=p.weights)[0]
            try:
                with trio.fail_after(p.request_timeout):
                    if kind == "manifest":
                        body = await pull_manifest(conn, h.fixtures)
                    elif kind == "disconnect":
                        blob = rng.choice(medium)
                        stop_after = rng.randint(1, blob.size - 1)
                        body = await pull_blob(conn, blob, stop_after=stop_after)
                        reset = rng.random() < 0.5
                        await conn.abort(reset=reset)
                        conn = None
                        if reset:
                            stats.disconnects_rst += 1
                        else:
                            stats.disconnects_fin += 1
                    else:
                        blob = rng.choice(small if kind == "small" else medium)
                        body = await pull_blob(conn, blob)
                        stats.verified_blobs += 1
                stats.completed[kind] += 1
                stats.bytes += body.size
            except (RequestFailed, trio.TooSlowError) as exc:
                stats.errors[f"{kind}: {_err(exc)}"] += 1
                if conn is not None:
                    await conn.abort(reset=False)
                    conn = None
                continue
            if conn is not None and rng.random() < p.churn:
                await conn.aclose()
                conn = None
    finally:
        if conn is not None:
            await conn.aclose()


async def run_soak(h: Harness, hub: Hub, p: SoakParams) -> dict[str, Any]:
    small = [b for shape in p.small for b in h.fixtures.blobs[shape]]
    medium = [b for shape in p.medium for b in h.fixtures.blobs[shape]]
    stats = SoakStats()
    samples: list[Sample] = []
    stop = trio.Event()
    duration = p.minutes * 60
    say(f"load: soak for {p.minutes:g} min, {p.workers} workers")
    began = trio.current_time()
    deadline = began + duration
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            sampler, hub.pid, p.interval, stop, samples, int(duration / p.interval) + 600
        )
        # every worker stops at the deadline (its request in flight bounded by the timeout);
        # the outer bound only guards against a wedged worker
        with trio.move_on_after(duration + p.request_timeout + 30) as scope:
            async with trio.open_nursery() as workers:
                for i in range(p.workers):
                    rng = random.Random(p.seed * 1000 + i)
                    workers.start_soon(soak_worker, h, hub, p, small, medium, deadline, stats, rng)
        stop.set()
    wall = trio.current_time() - began
    now, settle_seconds = await settle(hub)
    half = [s for s in samples if s.t >= samples[-1].t / 2] if samples else []
    settled = [(s.t / 60, float(s.rss_kib)) for s in samples if s.t >= SETTLED_AFTER]
    rss = [(s.t / 60, float(s.rss_kib)) for s in samples]
    fds = [(s.t / 60, float(s.fds)) for s in samples]
    total_requests = sum(stats.completed.values()) + sum(stats.errors.values())
    cache = {}
    if hub.cache_dir is not None:
        digests = [b.digest_hex for b in small + medium]
        cache = {
            "blobs_cached_at_end": cached_blobs(hub.cache_dir, digests),
            "blobs_distinct": len(digests),
            "bytes_distinct": sum(b.size for b in small + medium),
            "cache_size": p.cache_size,
        }
    return {
        "mode": "soak",
        "params": {**asdict(p), "weights": dict(zip(KINDS, p.weights, strict=True))},
        "hubproxy_argv": hub.argv,
        "idle_rss_kib_at_start": hub.idle_rss_kib,
        "wall_seconds": round(wall, 1),
        "wedged_workers_cancelled": scope.cancelled_caught,
        "requests": total_requests,
        "completed": dict(stats.completed),
        "verified_blobs": stats.verified_blobs,
        "deliberate_disconnects": {"rst": stats.disconnects_rst, "fin": stats.disconnects_fin},
        "errors": dict(stats.errors),
        "connections_opened": stats.connections,
        "bytes": stats.bytes,
        "mb_per_s": round(stats.bytes / wall / 1e6, 1) if wall else 0.0,
        "samples": len(samples),
        "rss_first_kib": samples[0].rss_kib if samples else 0,
        "rss_last_kib": samples[-1].rss_kib if samples else 0,
        "rss_min_kib": min((s.rss_kib for s in samples), default=0),
        "rss_max_kib": max((s.rss_kib for s in samples), default=0),
        "rss_slope_kib_per_min": round(slope(rss), 1),
        "rss_slope_second_half_kib_per_min": round(
            slope([(s.t / 60, float(s.rss_kib)) for s in half]), 1
        ),
        # the issue's measure: no growth once the first five minutes warmed everything up
        "rss_slope_settled_kib_per_min": round(slope(settled), 1) if settled else None,
        "fds_min": min((s.fds for s in samples), default=0),
        "fds_max": max((s.fds for s in samples), default=0),
        "fds_slope_per_min": round(slope(fds), 2),
        "fds_slope_second_half_per_min": round(slope([(s.t / 60, float(s.fds)) for s in half]), 2),
        "peak_rss_kib": hwm_kib(hub.pid),
        "fds_after": fd_verdict(hub, now, settle_seconds),
        "cache": cache,
        "series": {
            "t": [round(s.t, 1) for s in samples],
            "rss_kib": [s.rss_kib for s in samples],
            "fds": [s.fds for s in samples],
        },
    }


def soak_checks(r: Mapping[str, Any]) -> list[str]:
    failed: list[str] = []
    if r["errors"]:
        failed.append(f"soak errors: {r['errors']}")
    if r["wedged_workers_cancelled"]:
        failed.append("a soak worker wedged past every timeout")
    if not r["fds_after"]["matched"]:
        failed.append(f"descriptors not back to the baseline after the soak: {r['fds_after']}")
    settled = r.get("rss_slope_settled_kib_per_min")
    if settled is not None and r["params"]["minutes"] >= SETTLED_CHECK_MINUTES:
        if settled >= SETTLED_SLOPE_LIMIT:
            failed.append(
                f"RSS grew {settled:+.1f} KiB/min after minute 5 "
                f"(limit {SETTLED_SLOPE_LIMIT:g} KiB/min)"
            )
    return failed


# --- mode 4: abuse -------------------------------------------------------------------------------
#
# Each attack runs against its own fresh hubproxy (so one attack's leftovers never count against
# the next one's memory), in three steps: a warm-up pull; the victim alone for ``duration`` (the
# baseline); then the attack, from a separate process (its CPU is not the victim's event loop)
# bound to ATTACKER_ADDRESS, while the victim keeps pulling from VICTIM_ADDRESS. The attacker
# process is started before the warm-up and prints "ready"; told "go" (stdin), it prints
# "started", opens its connections (the ramp), prints "attacking", sends its requests and holds
# the attack for ``duration``, resets everything and prints "result {json}". The victim pulls
# from "started" until the process exits; the checks use the pulls started after "attacking"
# (those during the ramp, a burst of TLS handshakes whatever hubproxy's limits, are reported
# apart).

VICTIM_ADDRESS = "127.0.0.1"
ATTACKER_ADDRESS = "127.0.0.2"  # every 127/8 address is loopback on Linux: a second client
P99_FACTOR = 2.0  # the victim's p99 under attack may be at most this times its p99 without
RSS_LIMIT_KIB = 96 * KiB  # peak RSS under every attack: under 96 MiB
TOKEN_SCOPE = "repository:bench/blob:pull"
# case 8's attacker asks where hubproxy's challenges send clients of the default registry
ATTACK_TOKEN_TARGET = "/token/0?" + urllib.parse.urlencode({"scope": TOKEN_SCOPE})
TOP_UP_INTERVAL = 0.05  # case 7: the attacker retries a refused connection this often
LOGIN_DELAY = 0.1  # case 8: the victim logs in this long after the attacker's requests went out
RAMP_LIMIT = 120.0  # the attacker's connections are in place within this, or it goes on without
STARTUP_LIMIT = 60.0  # the attacker process says "started" within this


@dataclass(frozen=True)
class AttackInfo:
    case: int  # the case of issue 12
    title: str


ATTACKS: dict[str, AttackInfo] = {
    "1-miss": AttackInfo(1, "manifest misses (distinct tags) requested, never read"),
    "1-hit": AttackInfo(1, "one cached manifest requested, never read"),
    "2": AttackInfo(2, "slow Range downloads of a large blob (CDN pool slots)"),
    "3": AttackInfo(3, "HEADs and GETs of a blob too large to cache, behind slow GETs of it"),
    "7": AttackInfo(7, "idle keep-alive TLS connections"),
    "8": AttackInfo(8, "wrong-password token requests (Basic) at once"),
}


@dataclass(frozen=True)
class AbuseParams:
    attacks: tuple[str, ...] = tuple(ATTACKS)
    duration: float = 10.0  # seconds of baseline, and of each attack once in place
    victim_interval: float = 0.05  # the victim starts a pull at most this often
    victim_blob_size: int = 100 * KiB  # the victim's cache hit
    fresh_blob_size: int = 32 * KiB  # the victim's miss, a new digest every pull
    manifest_connections: int = 100  # case 1
    manifest_size: int = 4 * MiB - 4 * KiB  # just under hubproxy's 4 MiB manifest limit
    range_connections: int = 120  # case 2: more than the 100 upstream slots per origin
    range_rate: float = 64 * KiB  # bytes/s each
    large_blob_size: int = 64 * MiB  # cases 2 and 3
    small_cache: str = "16M"  # case 3: smaller than the large blob
    fill_readers: int = 4  # case 3: slow GETs of the large blob
    fill_rate: float = 256 * KiB
    idle_connections: int = 1024  # case 7
    logins: int = 300  # case 8
    open_parallel: int = 64
    pull_timeout: float = 60.0


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q``-th percentile (0 < q <= 100); None without values."""
    if not values:
        return None
    data = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(data)))
    return data[min(rank, len(data)) - 1]


def latency_summary(seconds: Sequence[float]) -> dict[str, Any]:
    """Count, p50, p99 and max in milliseconds (None when there are no samples)."""

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 2)

    return {
        "count": len(seconds),
        "p50_ms": ms(percentile(seconds, 50)),
        "p99_ms": ms(percentile(seconds, 99)),
        "max_ms": ms(max(seconds, default=None)),
    }


def fresh_blob_counts(duration: float, interval: float) -> tuple[int, int]:
    """Distinct miss blobs the victim needs for the baseline and for an attack (whose window
    is longer: the attacker's ramp-up comes on top of ``duration``)."""
    base = math.ceil(duration / interval) + 2
    return base, 2 * base + 20


def token_target(challenge: str, scope: str) -> str | None:
    """The token request a registry client makes for ``scope`` after the Bearer ``challenge``
    (``WWW-Authenticate``) of ``/v2/``: the realm's path and query, with service and scope."""
    params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    realm = params.get("realm")
    if not challenge.lower().startswith("bearer ") or not realm:
        return None
    parts = urllib.parse.urlsplit(realm)
    query = [("service", params["service"])] if "service" in params else []
    query.append(("scope", scope))
    joined = "&".join(filter(None, [parts.query, urllib.parse.urlencode(query)]))
    return f"{parts.path or '/'}?{joined}"


def basic_header(user: str, password: str) -> tuple[str, str]:
    return ("authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())


def attack_failures(name: str, a: Mapping[str, Any]) -> list[str]:
    """Why attack ``name``'s result fails the checks (empty: it passed)."""
    if a.get("error"):
        return [f"{name}: could not run: {a['error']}"]
    failed: list[str] = []
    base, under = a["victim"]["baseline"], a["victim"]["attack"]
    if base["errors"]:
        failed.append(f"{name}: victim pulls failed with no attack: {base['errors']}")
    if under["errors"]:
        failed.append(f"{name}: victim pulls failed under attack: {under['errors']}")
    b99, a99 = base["pulls"]["p99_ms"], under["pulls"]["p99_ms"]
    if a99 is None:
        failed.append(f"{name}: the victim completed no pull under attack")
    elif b99 is not None and a99 > P99_FACTOR * b99:
        failed.append(
            f"{name}: victim p99 {a99:.1f} ms under attack, {b99:.1f} ms without "
            f"({a99 / b99:.1f}x > {P99_FACTOR:g}x)"
        )
    b_login, a_login = base.get("first_login_ms"), under.get("first_login_ms")
    if b_login is not None and a_login is not None and a_login > P99_FACTOR * b_login:
        failed.append(
            f"{name}: victim's first login {a_login:.0f} ms under attack, {b_login:.0f} ms "
            f"without ({a_login / b_login:.1f}x > {P99_FACTOR:g}x)"
        )
    if a["peak_rss_kib"] >= RSS_LIMIT_KIB:
        failed.append(f"{name}: peak RSS {_mib(a['peak_rss_kib'])} (limit {_mib(RSS_LIMIT_KIB)})")
    if not a["hubproxy_alive_at_end"]:
        failed.append(f"{name}: hubproxy died")
    return failed


def abuse_checks(r: Mapping[str, Any]) -> list[str]:
    """The failed checks of an abuse result, attack by attack (empty: all passed)."""
    return [f for name, a in r["attacks"].items() for f in attack_failures(name, a)]


# --- the victim (in this process) ---


@dataclass
class VictimLog:
    pulls: list[float] = field(default_factory=list)  # seconds per completed pull
    steps: dict[str, list[float]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    misses: int = 0  # pulls that included a fresh blob
    first_login: float | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "pulls": latency_summary(self.pulls),
            "steps": {k: latency_summary(v) for k, v in self.steps.items()},
            "errors": dict(self.errors),
            "pulls_with_a_miss": self.misses,
            "first_login_ms": (
                None if self.first_login is None else round(self.first_login * 1000, 1)
            ),
        }


@dataclass(frozen=True)
class Victim:
    """What the victim pulls besides the small manifest and a new digest each pull (while its
    list lasts): ``hit``, cached after the warm-up; and who it logs in as first, if anyone."""

    hit: Blob
    login: tuple[str, str] | None = None  # (user, password) of this phase's first login


async def victim_login(h: Harness, hub: Hub, user: str, password: str) -> str:
    """A registry client's first login: ``GET /v2/`` (401, Bearer challenge), then the token
    request the challenge names, with Basic credentials; the token."""
    conn = await Connection.open(hub.port, h.context, source_address=VICTIM_ADDRESS)
    try:
        head, _ = await conn.get("/v2/")
        target = token_target(head.headers.get("www-authenticate", ""), TOKEN_SCOPE)
        if head.status != 401 or target is None:
            raise RequestFailed(f"/v2/ status {head.status} without a Bearer challenge")
        head = await conn.start("GET", target, [basic_header(user, password)])
        body = await conn.read_body(keep=64 * KiB)
        if head.status != 200:
            raise RequestFailed(f"login status {head.status}")
        try:
            token = json.loads(body.content)["token"]
        except (ValueError, KeyError, TypeError) as exc:
            raise RequestFailed("login answer without a token") from exc
        return str(token)
    finally:
        await conn.aclose()


async def victim_pull(
    h: Harness, hub: Hub, v: Victim, fresh: Blob | None, token: str | None, log: VictimLog
) -> None:
    """One pull on a new keep-alive connection: the manifest, the cached blob, a fresh blob;
    timed to its last byte (closing is not counted)."""
    headers = [("authorization", f"Bearer {token}")] if token else []
    marks = [("connect", trio.current_time())]
    conn = await Connection.open(hub.port, h.context, source_address=VICTIM_ADDRESS)
    try:
        marks.append(("manifest", trio.current_time()))
        await pull_manifest(conn, h.fixtures, headers)
        marks.append(("blob hit", trio.current_time()))
        await pull_blob(conn, v.hit, headers=headers)
        if fresh is not None:
            marks.append(("blob miss", trio.current_time()))
            await pull_blob(conn, fresh, headers=headers)
        marks.append(("", trio.current_time()))
    finally:
        await conn.aclose()
    for (step, began), (_, ended) in itertools.pairwise(marks):
        log.steps.setdefault(step, []).append(ended - began)
    log.pulls.append(marks[-1][1] - marks[0][1])
    log.misses += fresh is not None


async def run_victim(
    h: Harness,
    hub: Hub,
    v: Victim,
    fresh: list[Blob],
    p: AbuseParams,
    stop: trio.Event,
    log_for: Callable[[], VictimLog],
    login_after: trio.Event | None = None,
) -> None:
    """Pull every ``victim_interval`` (or back to back when slower) until ``stop``, each pull
    (and its errors) going to the log ``log_for()`` names when it starts; first log in (timed)
    when ``v.login``, after ``login_after`` if given."""
    token: str | None = None
    if v.login is not None:
        if login_after is not None:
            await login_after.wait()
            await trio.sleep(LOGIN_DELAY)
        began = trio.current_time()
        log = log_for()
        try:
            with trio.fail_after(p.pull_timeout):
                token = await victim_login(h, hub, *v.login)
        except (RequestFailed, trio.TooSlowError) as exc:
            log.errors[f"login: {_err(exc)}"] += 1
            return
        log.first_login = trio.current_time() - began
    blobs = iter(fresh)
    while not stop.is_set():
        began = trio.current_time()
        log = log_for()
        try:
            with trio.fail_after(p.pull_timeout):
                await victim_pull(h, hub, v, next(blobs, None), token, log)
        except (RequestFailed, trio.TooSlowError) as exc:
            log.errors[_err(exc)] += 1
        with trio.move_on_at(began + p.victim_interval):
            await stop.wait()


async def victim_alone(
    h: Harness, hub: Hub, v: Victim, fresh: list[Blob], p: AbuseParams
) -> VictimLog:
    log = VictimLog()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_victim, h, hub, v, fresh, p, stop, lambda: log)
        await trio.sleep(p.duration)
        stop.set()
    return log


# --- the attacker (its own process) ---


@dataclass(frozen=True)
class AttackSpec:
    """Everything the attacker process needs (plain values: it travels as JSON)."""

    attack: str
    port: int
    ca_pem: str
    duration: float
    connections: int
    open_parallel: int
    source: str = ATTACKER_ADDRESS
    blob_hex: str = ""  # cases 2 and 3
    blob_size: int = 0
    rate: float = 0.0  # bytes/s per slow reader
    user: str = ""  # case 8: a known user, with wrong passwords
    request_timeout: float = 30.0


@dataclass
class AttackerStats:
    opened: int = 0
    open_errors: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)  # answers by status, or error kind
    requests: int = 0
    bytes_read: int = 0
    timed: list[float] = field(default_factory=list)  # case 3: HEADs; case 8: token requests
    unanswered: list[float] = field(default_factory=list)  # seconds waited, cut at the end
    reconnects: int = 0  # case 3's loops: connections opened during the attack
    topped_up: int = 0  # case 7: connections opened during the attack in place of refused ones
    top_up_refused: Counter[str] = field(default_factory=Counter)
    ramp_seconds: float = 0.0
    held_seconds: float = 0.0

    def report(self) -> dict[str, Any]:
        return {
            "opened": self.opened,
            "open_errors": dict(self.open_errors),
            "statuses": dict(self.statuses),
            "requests": self.requests,
            "bytes_read": self.bytes_read,
            "reconnects": self.reconnects,
            "topped_up": self.topped_up,
            "top_up_refused": dict(self.top_up_refused),
            "timed": latency_summary(self.timed),
            "unanswered_at_end": len(self.unanswered),
            "longest_unanswered_s": round(max(self.unanswered, default=0.0), 2),
            "ramp_seconds": round(self.ramp_seconds, 2),
            "held_seconds": round(self.held_seconds, 2),
        }


def say_to_parent(line: str) -> None:
    print(line, flush=True)


async def _open_all(
    spec: AttackSpec, context: ssl.SSLContext, count: int, stats: AttackerStats
) -> list[Connection]:
    """``count`` connections from the attacker's address, ``open_parallel`` at a time."""
    opened: list[Connection] = []
    limiter = trio.CapacityLimiter(spec.open_parallel)

    async def one() -> None:
        async with limiter:
            try:
                with trio.fail_after(spec.request_timeout):
                    conn = await Connection.open(spec.port, context, source_address=spec.source)
            except (RequestFailed, trio.TooSlowError) as exc:
                stats.open_errors[_err(exc)] += 1
                return
            opened.append(conn)
            stats.opened += 1

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return opened


async def _answer(
    conn: Connection, stats: AttackerStats, method: str, target: str, headers: list[tuple[str, str]]
) -> int | None:
    """One request read to its end; its status (counted), None when it failed."""
    stats.requests += 1
    try:
        head = await conn.start(method, target, headers)
        body = await conn.read_body()
    except RequestFailed as exc:
        stats.statuses[exc.kind] += 1
        return None
    stats.statuses[str(head.status)] += 1
    stats.bytes_read += body.size
    return head.status


async def _get_some(conn: Connection, stats: AttackerStats, target: str) -> None:
    """A GET whose first 64 KiB are read, then the connection is dropped."""
    stats.requests += 1
    try:
        head = await conn.start("GET", target)
        stats.statuses[f"GET {head.status}"] += 1
        stats.bytes_read += (await conn.read_body(stop_after=64 * KiB)).size
    except RequestFailed as exc:
        stats.statuses[f"GET {exc.kind}"] += 1


async def _timed(
    stats: AttackerStats, deadline: float, request: Callable[[], Awaitable[object]]
) -> None:
    """Run ``request`` until ``deadline``: answered, its time goes to ``timed``; still waiting
    then, to ``unanswered``."""
    began = trio.current_time()
    with trio.move_on_at(deadline) as scope:
        await request()
    if scope.cancelled_caught:
        stats.unanswered.append(trio.current_time() - began)
    else:
        stats.timed.append(trio.current_time() - began)


async def run_attacker(spec: AttackSpec) -> dict[str, Any]:
    """One attack, bounded: connections opened (at most ``RAMP_LIMIT``), then ``duration`` of
    attack, then every connection reset."""
    context = client_context(Path(spec.ca_pem))
    stats = AttackerStats()
    say_to_parent("started")
    began = trio.current_time()
    conns: list[Connection] = []
    with trio.move_on_after(RAMP_LIMIT):
        conns = await _open_all(spec, context, spec.connections, stats)
        if spec.attack == "7":
            async with trio.open_nursery() as nursery:  # each connection served once, then idle
                for conn in conns:
                    nursery.start_soon(_answer, conn, stats, "GET", "/v2/", [])
            for conn in [c for c in conns if not c.reusable]:  # refused: not held
                conns.remove(conn)
                await conn.abort(reset=True)
    stats.ramp_seconds = trio.current_time() - began
    say_to_parent("attacking")
    t0 = trio.current_time()
    deadline = t0 + spec.duration
    rng = random.Random(12)
    blob_target = BLOB_PATH + spec.blob_hex

    async def slow_reader(conn: Connection, headers: list[tuple[str, str]]) -> None:
        stats.requests += 1
        with trio.move_on_at(deadline):
            try:
                head = await conn.start("GET", blob_target, headers)
                stats.statuses[str(head.status)] += 1
                await conn.read_body(rate=spec.rate)
            except RequestFailed as exc:
                stats.statuses[exc.kind] += 1
        stats.bytes_read += conn.body_bytes

    async def looping(kind: str) -> None:
        """Case 3: HEADs (timed) or GETs (the first 64 KiB) of the digest until the end."""
        conn: Connection | None = None
        while trio.current_time() < deadline:
            if conn is None or not conn.reusable:
                if conn is not None:
                    await conn.abort(reset=True)
                try:
                    with trio.fail_after(spec.request_timeout):
                        conn = await Connection.open(spec.port, context, source_address=spec.source)
                except (RequestFailed, trio.TooSlowError) as exc:
                    stats.open_errors[_err(exc)] += 1
                    conn = None
                    await trio.sleep(0.05)
                    continue
                stats.reconnects += 1
            if kind == "HEAD":
                request = functools.partial(_answer, conn, stats, "HEAD", blob_target, [])
                await _timed(stats, deadline, request)
            else:
                with trio.move_on_at(deadline):
                    await _get_some(conn, stats, blob_target)
        if conn is not None:
            await conn.abort(reset=True)

    async def top_up() -> None:
        """Case 7: hold ``connections`` open, taking any slot that frees up: one attempt at a
        time, at most every TOP_UP_INTERVAL (refused attempts must not be a flood of their own)."""
        while trio.current_time() < deadline and len(conns) < spec.connections:
            began = trio.current_time()
            conn: Connection | None = None
            with trio.move_on_at(deadline):
                try:
                    conn = await Connection.open(spec.port, context, source_address=spec.source)
                    await ping(conn)
                except RequestFailed as exc:
                    stats.top_up_refused[exc.kind] += 1
                else:
                    conns.append(conn)
                    stats.topped_up += 1
                    conn = None
            if conn is not None:  # refused after connecting, or cut at the end
                await conn.abort(reset=True)
            await trio.sleep_until(min(deadline, began + TOP_UP_INTERVAL))

    async with trio.open_nursery() as nursery:
        if spec.attack == "7":
            nursery.start_soon(top_up)
        if spec.attack in ("1-miss", "1-hit"):
            for i, conn in enumerate(conns):  # the requests go out; no answer is ever read
                tag = f"miss-{i}" if spec.attack == "1-miss" else "hit"
                stats.requests += 1
                with contextlib.suppress(RequestFailed):
                    await conn.send_request(
                        "GET", BIG_MANIFEST_PATH + tag, [("accept", MANIFEST_TYPE)]
                    )
        elif spec.attack == "2":
            for conn in conns:  # each from a random place in the first half
                start = rng.randrange(spec.blob_size // 2)
                nursery.start_soon(slow_reader, conn, [("range", f"bytes={start}-")])
        elif spec.attack == "3":
            for conn in conns:
                nursery.start_soon(slow_reader, conn, [])
            nursery.start_soon(looping, "HEAD")
            nursery.start_soon(looping, "GET")
        elif spec.attack == "8":
            for i, conn in enumerate(conns):
                header = basic_header(spec.user, f"wrong-{i}")
                request = functools.partial(
                    _answer, conn, stats, "GET", ATTACK_TOKEN_TARGET, [header]
                )
                nursery.start_soon(_timed, stats, deadline, request)
        await trio.sleep_until(deadline)
    stats.held_seconds = trio.current_time() - t0
    for conn in conns:
        await conn.abort(reset=True)
    return stats.report()


def attacker_main(spec_json: str) -> int:
    """Entry of the attacker process (``python -c``): say ``ready``, wait for ``go`` on stdin
    (end of input: no attack), run the attack, print its result."""
    spec = AttackSpec(**json.loads(spec_json))
    raise_nofile()
    say_to_parent("ready")
    if sys.stdin.readline().strip() != "go":
        return 0
    result = trio.run(run_attacker, spec)
    say_to_parent("result " + json.dumps(result))
    return 0


ATTACKER_CODE = (
    "import sys; from bench.load import attacker_main; sys.exit(attacker_main(sys.argv[1]))"
)


class AttackerProcess:
    """The attacker, a child process started ahead (so its start-up is not in the window), that
    attacks when told ``go`` on stdin. Its stdout lines set the events: ``ready``, ``started``,
    ``attacking``, and ``done`` once it exited (or was killed); ``report`` is its result."""

    def __init__(self, spec: AttackSpec, log: Path) -> None:
        self.spec = spec
        self.log = log
        self.ready, self.started = trio.Event(), trio.Event()
        self.attacking, self.done = trio.Event(), trio.Event()
        self.report: dict[str, Any] = {}
        self.process: trio.Process | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the process and follow its stdout until it exits; kill it when cancelled."""
        argv = [sys.executable, "-c", ATTACKER_CODE, json.dumps(asdict(self.spec))]
        with self.log.open("wb") as errors:
            proc = await trio.lowlevel.open_process(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, cwd=REPO_ROOT
            )
        self.process = proc
        task_status.started()
        try:
            if proc.stdout is not None:
                await self._follow(proc.stdout)
        finally:
            if proc.returncode is None:
                proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
            self.report["exit_status"] = proc.returncode
            for event in (self.ready, self.started, self.attacking, self.done):
                event.set()

    async def _follow(self, stdout: trio.abc.ReceiveStream) -> None:
        events = {"ready": self.ready, "started": self.started, "attacking": self.attacking}
        buffer = b""
        while True:
            data = await stdout.receive_some(64 * KiB)
            if not data:
                return
            buffer += data
            while b"\n" in buffer:
                line, _, buffer = buffer.partition(b"\n")
                text = line.decode(errors="replace")
                if text in events:
                    events[text].set()
                elif text.startswith("result "):
                    self.report.update(json.loads(text[len("result ") :]))

    async def go(self) -> None:
        if self.process is not None and self.process.stdin is not None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.process.stdin.send_all(b"go\n")

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()


async def attack_phase(
    h: Harness, hub: Hub, v: Victim, fresh: list[Blob], p: AbuseParams, attacker: AttackerProcess
) -> tuple[VictimLog, VictimLog]:
    """Tell the (ready) attacker to go, and pull as the victim for as long as it runs: the
    victim's log while the attacker connects (its ramp), and while the attack holds."""
    ramp, hold = VictimLog(), VictimLog()
    spec = attacker.spec
    limit = STARTUP_LIMIT + RAMP_LIMIT + spec.duration + spec.request_timeout + 30
    await attacker.go()
    async with trio.open_nursery() as nursery:
        with trio.move_on_after(limit) as scope:
            await attacker.started.wait()
            nursery.start_soon(
                run_victim,
                h,
                hub,
                v,
                fresh,
                p,
                attacker.done,
                lambda: hold if attacker.attacking.is_set() else ramp,
                attacker.attacking if v.login is not None else None,
            )
            await attacker.done.wait()
        if scope.cancelled_caught:
            attacker.report["killed_after_s"] = limit
            attacker.kill()
    return ramp, hold


# --- one attack, end to end ---


@dataclass(frozen=True)
class AbuseFixtures:
    victim_hit: Blob
    fresh_warmup: Blob
    fresh_baseline: list[Blob]
    fresh_attack: list[Blob]
    large: Blob
    users_file: Path
    users: Mapping[str, str]  # name -> password: warmup, alice (baseline), carol (attack), bob


def attack_spec(name: str, hub: Hub, h: Harness, f: AbuseFixtures, p: AbuseParams) -> AttackSpec:
    base = AttackSpec(
        attack=name,
        port=hub.port,
        ca_pem=str(h.fixtures.tls.ca_pem),
        duration=p.duration,
        connections=0,
        open_parallel=p.open_parallel,
        blob_hex=f.large.digest_hex,
        blob_size=f.large.size,
    )
    if name in ("1-miss", "1-hit"):
        return dataclasses.replace(base, connections=p.manifest_connections)
    if name == "2":
        return dataclasses.replace(base, connections=p.range_connections, rate=p.range_rate)
    if name == "3":
        return dataclasses.replace(base, connections=p.fill_readers, rate=p.fill_rate)
    if name == "7":
        return dataclasses.replace(base, connections=p.idle_connections)
    return dataclasses.replace(base, connections=p.logins, user="bob")


def hub_flags(name: str, f: AbuseFixtures, p: AbuseParams) -> list[str]:
    if name == "3":
        return ["--cache-size", p.small_cache]
    if name == "8":
        return ["--users", str(f.users_file)]
    return []


async def run_abuse(
    h: Harness, hub: Hub, name: str, f: AbuseFixtures, p: AbuseParams
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "case": ATTACKS[name].case,
        "title": ATTACKS[name].title,
        "hubproxy_argv": hub.argv,
        "idle_rss_kib_at_start": hub.idle_rss_kib,
    }
    spec = attack_spec(name, hub, h, f, p)
    attacker = AttackerProcess(spec, h.root / f"attacker-{name}.log")
    async with trio.open_nursery() as nursery:
        await nursery.start(attacker.run)
        try:
            await _abuse_steps(h, hub, name, f, p, attacker, result)
        finally:
            attacker.kill()  # when it never got to go (a failed warm-up)
    return result


async def _abuse_steps(
    h: Harness,
    hub: Hub,
    name: str,
    f: AbuseFixtures,
    p: AbuseParams,
    attacker: AttackerProcess,
    result: dict[str, Any],
) -> None:
    users = name == "8"
    warm = Victim(f.victim_hit, ("warmup", f.users["warmup"]) if users else None)
    try:
        with trio.fail_after(p.pull_timeout):
            token = await victim_login(h, hub, *warm.login) if warm.login else None
            await victim_pull(h, hub, warm, f.fresh_warmup, token, VictimLog())
            if name == "1-hit":  # the manifest the attacker asks for is cached
                conn = await Connection.open(hub.port, h.context, source_address=VICTIM_ADDRESS)
                try:
                    head, _ = await conn.get(BIG_MANIFEST_PATH + "hit", [("accept", MANIFEST_TYPE)])
                finally:
                    await conn.aclose()
                if head.status != 200:
                    raise RequestFailed(f"big manifest status {head.status}")
    except (RequestFailed, trio.TooSlowError) as exc:
        result["error"] = f"warm-up pull failed: {exc}"
        return
    if hub.cache_dir is not None:  # the hit blob's fill runs in the background: wait for it
        for _ in range(100):
            if cached_blobs(hub.cache_dir, [f.victim_hit.digest_hex]):
                break
            await trio.sleep(0.1)
    with trio.move_on_after(STARTUP_LIMIT):
        await attacker.ready.wait()  # its interpreter start-up is not in the baseline
    say(f"load: abuse {name}: the victim alone for {p.duration:g}s")
    baseline = Victim(f.victim_hit, ("alice", f.users["alice"]) if users else None)
    alone = await victim_alone(h, hub, baseline, f.fresh_baseline, p)
    say(f"load: abuse {name}: {ATTACKS[name].title} ({attacker.spec.connections} connections)")
    rss_before = rss_kib(hub.pid)
    procs.reset_peak_rss([hub.pid])
    under = Victim(f.victim_hit, ("carol", f.users["carol"]) if users else None)
    ramp, attacked = await attack_phase(h, hub, under, f.fresh_attack, p, attacker)
    peak = hwm_kib(hub.pid)
    b, a = alone.summary(), attacked.summary()
    b99, a99 = b["pulls"]["p99_ms"], a["pulls"]["p99_ms"]
    result.update(
        {
            "attack_spec": asdict(attacker.spec),
            "attacker": attacker.report,
            "victim": {"baseline": b, "attacker_connecting": ramp.summary(), "attack": a},
            "p99_ratio": round(a99 / b99, 2) if a99 is not None and b99 else None,
            "rss_before_attack_kib": rss_before,
            "peak_rss_kib": peak,
        }
    )
    say(
        f"load: abuse {name}: victim p99 {b99} ms alone, {a99} ms under attack "
        f"({attacked.errors.total()} errors); peak RSS {peak / KiB:.1f} MiB"
    )


def mode_abuse(
    nginx: str, p: AbuseParams, keep: bool, body_memory: str = BODY_MEMORY
) -> dict[str, Any]:
    base, under = fresh_blob_counts(p.duration, p.victim_interval)
    with workspace(keep) as root, contextlib.ExitStack() as stack:
        shapes = [
            (1, p.victim_blob_size),
            (1 + base + under, p.fresh_blob_size),
            (1, p.large_blob_size),
        ]
        h = Harness.create(
            nginx,
            root,
            shapes,
            stack,
            big_manifest_size=p.manifest_size,
            big_manifest_variants=p.manifest_connections,
            body_memory=body_memory,
        )
        fresh = h.fixtures.blobs[(1 + base + under, p.fresh_blob_size)]
        users = {name: secrets.token_urlsafe(12) for name in ("warmup", "alice", "carol", "bob")}
        users_file = root / "users"
        for name, password in users.items():
            add_user(users_file, name, password)
        f = AbuseFixtures(
            victim_hit=h.fixtures.blobs[(1, p.victim_blob_size)][0],
            fresh_warmup=fresh[0],
            fresh_baseline=fresh[1 : 1 + base],
            fresh_attack=fresh[1 + base :],
            large=h.fixtures.blobs[(1, p.large_blob_size)][0],
            users_file=users_file,
            users=users,
        )
        attacks: dict[str, Any] = {}
        for name in p.attacks:
            # hubproxy as users run it: its default --max-connections, a fresh cache
            hub = h.start_hub(
                f"hubproxy-abuse-{name}",
                cache=True,
                extra=hub_flags(name, f, p),
                max_connections=None,
            )
            a = trio.run(run_abuse, h, hub, name, f, p)
            a["hubproxy_alive_at_end"] = hub.alive()
            procs.stop(hub.process)
            a["log"] = log_findings(hub)
            if hub.cache_dir is not None:
                shutil.rmtree(hub.cache_dir, ignore_errors=True)
            attacks[name] = a
        return {
            "mode": "abuse",
            "params": asdict(p),
            "addresses": {"victim": VICTIM_ADDRESS, "attacker": ATTACKER_ADDRESS},
            "attacks": attacks,
        }


# --- reports -------------------------------------------------------------------------------------


def environment() -> dict[str, str]:
    nginx = find_tool("nginx")
    nginx_version = "missing"
    if nginx:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            proc = subprocess.run([nginx, "-v"], capture_output=True, timeout=10)
            nginx_version = (proc.stderr or proc.stdout).decode(errors="replace").strip()

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "date (UTC)": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "CPU": f"{cpu_model()}, {os.cpu_count()} cores",
        "memory": f"{mem_total_gib():.1f} GiB",
        "kernel": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "trio / h11": f"{version('trio')} / {version('h11')}",
        "OpenSSL": ssl.OPENSSL_VERSION,
        "hubproxy": f"{version('hubproxy')} (git {git_revision()})",
        "nginx (origin)": nginx_version,
        "RLIMIT_NOFILE": "{}/{}".format(*resource.getrlimit(resource.RLIMIT_NOFILE)),
        "load average at start": loadavg(),
    }


Row = tuple[str, str, str]


def _mib(kib: float) -> str:
    return f"{kib / KiB:.1f} MiB"


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def load_rows(r: Mapping[str, Any]) -> list[Row]:
    idle = r["idle_connections"]
    t = r["transfers"]
    f = r["fds_after"]
    rows: list[Row] = [
        (
            "idle RSS right after start",
            _mib(r["idle_rss_kib_at_start"]),
            f"< 40 MB: {_yes(r['idle_rss_kib_at_start'] < IDLE_RSS_TARGET_KIB)}",
        ),
        ("RSS before the idle connections (cache primed)", _mib(r["rss_before_idle_kib"]), ""),
        (
            f"RSS with {idle['opened']} idle keep-alive TLS connections",
            _mib(idle["rss_kib"]),
            f"opened in {idle['seconds_to_open']:.1f} s",
        ),
        (
            "per idle connection",
            f"{idle['per_connection_kib']:.1f} KiB",
            f"< 64 KiB: {_yes(idle['per_connection_kib'] < PER_CONNECTION_TARGET_KIB)}",
        ),
        (
            f"{t['count']} concurrent {t['blob_bytes'] / MiB:g} MiB transfers "
            f"({t['hits']} hits, {t['misses']} misses)",
            f"{t['verified']}/{t['count']} sha256-verified",
            f"{t['seconds']:.1f} s, {t['mb_per_s']:.0f} MB/s aggregate",
        ),
        ("peak RSS under load (VmHWM)", _mib(t["peak_rss_kib"]), f"max fds {t['max_fds']}"),
        (
            "idle connections alive after the transfers",
            f"{idle['survived_transfers']}/{idle['opened']}",
            "",
        ),
        (
            "open fds: baseline / after closing everything",
            f"{f['baseline']} / {f['after']}",
            f"{f['idle_upstream_connections']} idle upstream keep-alive connections, "
            f"{f['unexplained']} unexplained; matched: {_yes(f['matched'])}",
        ),
    ]
    pw = r.get("pool_wait")
    if pw:
        a = pw["after_pull"]
        rows.append(
            (
                f"open fds after {pw['waited_seconds']:g} s idle + one pull",
                f"{a['after']}",
                f"idle upstream connections {pw['upstream_before_pull']} before the pull, "
                f"{a['idle_upstream_connections']} after; matched: {_yes(a['matched'])}",
            )
        )
    rows.append(("hubproxy warning/error log lines", str(r["log"]["warning_or_error_lines"]), ""))
    return rows


def slow_rows(r: Mapping[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for name, v in r["variants"].items():
        rows.append(
            (
                f"{name}: {r['params']['size'] / MiB:g} MiB at {r['params']['rate'] / 1e6:g} MB/s",
                "verified" if v["verified"] else f"**failed** {v['error']}",
                f"{v['seconds']:.1f} s, {v['mb_per_s']:.1f} MB/s",
            )
        )
        rows.append(
            (
                f"{name}: RSS min / max ({v['samples']} samples)",
                f"{_mib(v['rss_min_kib'])} / {_mib(v['rss_max_kib'])}",
                f"slope {v['rss_slope_kib_per_min']:+.1f} KiB/min, "
                f"{v['rss_slope_steady_kib_per_min']:+.1f} without the first tenth; idle at start "
                f"{_mib(v['idle_rss_kib_at_start'])}; fds back: {_yes(v['fds_after']['matched'])}",
            )
        )
        rows.append(
            (
                f"{name}: hubproxy warning/error log lines",
                str(v["log"]["warning_or_error_lines"]),
                "",
            )
        )
    return rows


def soak_rows(r: Mapping[str, Any]) -> list[Row]:
    f = r["fds_after"]
    return [
        ("idle RSS right after start", _mib(r["idle_rss_kib_at_start"]), ""),
        (
            f"requests ({r['params']['workers']} workers, {r['wall_seconds']:.0f} s)",
            f"{r['requests']:,}",
            ", ".join(f"{k} {v:,}" for k, v in sorted(r["completed"].items()))
            + f"; {r['connections_opened']:,} connections, {r['mb_per_s']:.0f} MB/s",
        ),
        (
            "deliberate mid-blob disconnects (not errors)",
            f"{r['deliberate_disconnects']['rst'] + r['deliberate_disconnects']['fin']:,}",
            f"RST {r['deliberate_disconnects']['rst']:,}, "
            f"FIN {r['deliberate_disconnects']['fin']:,}",
        ),
        ("completed blobs sha256-verified", f"{r['verified_blobs']:,}", ""),
        (
            "errors",
            str(sum(r["errors"].values())),
            ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "none",
        ),
        (
            "RSS first / last / min / max",
            f"{_mib(r['rss_first_kib'])} / {_mib(r['rss_last_kib'])}",
            f"min {_mib(r['rss_min_kib'])}, max {_mib(r['rss_max_kib'])}",
        ),
        (
            "RSS slope (whole run / second half)",
            f"{r['rss_slope_kib_per_min']:+.1f} / {r['rss_slope_second_half_kib_per_min']:+.1f} "
            "KiB/min",
            f"{r['samples']} samples",
        ),
        (
            "RSS slope after minute 5 (limit 50 KiB/min)",
            "-"
            if r.get("rss_slope_settled_kib_per_min") is None
            else f"{r['rss_slope_settled_kib_per_min']:+.1f} KiB/min",
            "the least-squares fit of every sample from minute 5 on",
        ),
        (
            "open fds slope (whole run / second half)",
            f"{r['fds_slope_per_min']:+.2f} / {r['fds_slope_second_half_per_min']:+.2f} per min",
            f"min {r['fds_min']}, max {r['fds_max']}",
        ),
        (
            "open fds: baseline / after",
            f"{f['baseline']} / {f['after']}",
            f"{f['idle_upstream_connections']} idle upstream, {f['unexplained']} unexplained; "
            f"matched: {_yes(f['matched'])}",
        ),
        ("hubproxy warning/error log lines", str(r["log"]["warning_or_error_lines"]), ""),
    ]


ABUSE_HEADER = (
    "attack (from 127.0.0.2)",
    "victim p99, no attack",
    "victim p99, under attack",
    f"ratio (limit {P99_FACTOR:g}x)",
    f"peak RSS (limit {RSS_LIMIT_KIB // KiB} MiB)",
    "result",
)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f} ms"


def describe_attack(name: str, spec: Mapping[str, Any], p: Mapping[str, Any]) -> str:
    """One line: case, how many, what."""
    n = spec["connections"]
    large = f"{spec['blob_size'] / MiB:g} MiB"
    what = {
        "1-miss": f"{n} connections ask {p['manifest_size'] / MiB:.1f} MiB manifest misses "
        "(distinct tags), never read",
        "1-hit": f"{n} connections ask one cached {p['manifest_size'] / MiB:.1f} MiB manifest, "
        "never read",
        "2": f"{n} Range GETs of a {large} blob (a miss), read at "
        f"{spec['rate'] / KiB:g} KiB/s each",
        "3": f"{n} GETs of a {large} blob (> --cache-size {p['small_cache']}) read at "
        f"{spec['rate'] / KiB:g} KiB/s, and HEADs and GETs of it in a loop",
        "7": f"{n} idle keep-alive TLS connections, topped up",
        "8": f"{n} wrong-password token requests (Basic) at once",
    }[name]
    return f"case {ATTACKS[name].case}: {what}"


def abuse_rows(r: Mapping[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for name, a in r["attacks"].items():
        failures = attack_failures(name, a)
        verdict = "pass" if not failures else f"**fail** ({len(failures)})"
        if a.get("error"):
            rows.append((f"case {ATTACKS[name].case} ({name})", "", "", "", "", verdict))
            continue
        b, u = a["victim"]["baseline"], a["victim"]["attack"]
        ratio = a["p99_ratio"]
        rows.append(
            (
                describe_attack(name, a["attack_spec"], r["params"]),
                _ms(b["pulls"]["p99_ms"]),
                _ms(u["pulls"]["p99_ms"])
                + (f", {sum(u['errors'].values())} failed" if u["errors"] else ""),
                "n/a" if ratio is None else f"{ratio:.2f}x",
                _mib(a["peak_rss_kib"]),
                verdict,
            )
        )
    return rows


def abuse_details(r: Mapping[str, Any]) -> list[str]:
    """A bullet per attack: what the attacker got, what the victim did, memory."""
    lines: list[str] = []
    for name, a in r["attacks"].items():
        if a.get("error"):
            lines.append(f"**{name}**: {a['error']}")
            continue
        k, b, u = a["attacker"], a["victim"]["baseline"], a["victim"]["attack"]
        c = a["victim"]["attacker_connecting"]
        reopened = f", {k['reconnects']} reopened" if k.get("reconnects") else ""
        if name == "7":
            refused = sum(k.get("top_up_refused", {}).values())
            reopened = (
                f", {k.get('topped_up', 0)} more opened as slots freed up and {refused} attempts "
                f"refused ({k.get('top_up_refused') or 'none'})"
            )
        text = (
            f"**{name}** (case {a['case']}): attacker: {k.get('opened', 0)}/"
            f"{a['attack_spec']['connections']} connections in {k.get('ramp_seconds', 0):g} s"
            f"{', refused ' + str(k['open_errors']) if k.get('open_errors') else ''}, attack held "
            f"{k.get('held_seconds', 0):g} s"
            f"{reopened}"
            f"; {k.get('requests', 0)} requests, answers "
            f"{k.get('statuses') or 'none'}, {k.get('bytes_read', 0) / MiB:.1f} MiB read."
        )
        if k.get("timed", {}).get("count") or k.get("unanswered_at_end"):
            t = k["timed"]
            what = "HEADs" if name == "3" else "requests"
            text += (
                f" Its timed {what}: {t['count']} answered (p50 {_ms(t['p50_ms'])}, p99 "
                f"{_ms(t['p99_ms'])}, max {_ms(t['max_ms'])}), {k['unanswered_at_end']} still "
                f"unanswered at the end (waited up to {k['longest_unanswered_s']:g} s)."
            )
        text += (
            f" Victim: {b['pulls']['count']} pulls alone (p50 {_ms(b['pulls']['p50_ms'])}, max "
            f"{_ms(b['pulls']['max_ms'])}), {u['pulls']['count']} under attack (p50 "
            f"{_ms(u['pulls']['p50_ms'])}, max {_ms(u['pulls']['max_ms'])})"
            f"{', failed: ' + str(u['errors']) if u['errors'] else ''}; "
            f"{c['pulls']['count']} while the attacker connected (p99 {_ms(c['pulls']['p99_ms'])})"
            f"{', failed: ' + str(c['errors']) if c['errors'] else ''}."
        )
        if b.get("first_login_ms") is not None or u.get("first_login_ms") is not None:
            text += (
                f" First login: {_ms(b.get('first_login_ms'))} alone, "
                f"{_ms(u.get('first_login_ms'))} under attack."
            )
        text += (
            f" RSS: {_mib(a['idle_rss_kib_at_start'])} at start, "
            f"{_mib(a['rss_before_attack_kib'])} before the attack, peak "
            f"{_mib(a['peak_rss_kib'])}; hubproxy warning/error lines: "
            f"{a['log']['warning_or_error_lines']}."
        )
        lines.append(text)
    return lines


def render_text(rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell (the last one is not)."""
    if not rows:
        return ""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(
            [*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]]
        ).rstrip()
        for row in rows
    )


FIGURE_HEADER = ("figure", "value", "note")


def render_markdown(
    title: str,
    command: str,
    env: Mapping[str, str],
    rows: Sequence[Sequence[str]],
    method: Sequence[str],
    result: Mapping[str, Any],
    failed: Sequence[str],
    header: Sequence[str] = FIGURE_HEADER,
    sections: Sequence[tuple[str, Sequence[str]]] = (),
) -> str:
    """The report: environment, the table (``header`` over ``rows``; every column but the first
    and the last right-aligned), the method, then each of ``sections`` (a heading and bullets),
    the checks and samples of hubproxy's warning lines."""
    lines = [f"# {title}", "", f"`{command}`", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    align = ["---", *(["---:"] * (len(header) - 2)), "---"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "## Method", ""] + [f"- {m}" for m in method]
    for heading, bullets in sections:
        lines += ["", f"## {heading}", ""] + [f"- {b}" for b in bullets]
    lines += ["", "## Checks", ""]
    lines += [f"- FAILED: {f}" for f in failed] or ["- all passed"]
    logs = _log_samples(result)
    if logs:
        lines += ["", "## hubproxy log (warning/error samples)", "", "```", *logs, "```"]
    return "\n".join(lines) + "\n"


def _log_samples(result: Mapping[str, Any]) -> list[str]:
    found: list[str] = []
    if "log" in result:
        found += result["log"]["samples"]
    for v in result.get("variants", {}).values():
        found += v["log"]["samples"]
    for name, a in result.get("attacks", {}).items():
        found += [f"[{name}] {line}" for line in a.get("log", {}).get("samples", [])]
    return found


LOAD_METHOD = [
    "Origin: one nginx playing Docker Hub (TLS registry answering blob GETs with a 307 to a "
    "TLS CDN endpoint), files on /dev/shm. hubproxy as users run it, TLS listener, cache on "
    "(tmpfs), `--max-connections 4096`, `--body-memory 8M` unless told (a small device's: what "
    "`auto` gives a machine of 512 MiB or less), default timeouts (keep-alive idle 60 s).",
    "Clients: in-process trio + `trio.SSLStream` + h11 (one process, separate from hubproxy); "
    "every body sha256-hashed as it arrives and compared with its digest and length.",
    "Idle connections: each does a TLS handshake and one `GET /v2/` (forwarded upstream), then "
    "stays open; after the transfers each must answer another `GET /v2/`. Per-connection "
    "cost = (RSS with them open, 1 s after the last opened - RSS before) / count.",
    "Transfers: each on its own new connection, all started at once; hits were pulled once "
    "before (untimed), misses go registry -> 307 -> CDN. Peak RSS is VmHWM, reset "
    "(clear_refs 5) just before the transfers.",
    "Descriptors: /proc/PID/fd, sockets classified through /proc/PID/net/tcp. After everything "
    "closed, polled (100 ms, up to 30 s) until no client socket remains; the count must equal "
    "the baseline taken right after start, plus idle upstream keep-alive connections (at most "
    f"{POOL_IDLE_PER_ORIGIN} per origin x {UPSTREAM_ORIGINS} origins), plus nothing else. "
    "hubproxy closes an idle upstream connection only when it next takes one for that origin "
    f"and finds it older than {UPSTREAM_KEEPALIVE:g} s: the pool-wait row shows that.",
]
SLOW_METHOD = [
    "One blob to one client reading with a token-bucket pace (256 KiB reads, sleeping to hold "
    "the rate), sha256-verified. `cache-miss`: hubproxy with its cache (the upstream fill runs "
    "at its own pace into a temporary file, the client is served from it); `no-cache`: "
    "`--no-cache`, the upstream read paced by the client (back-pressure).",
    "RSS = VmRSS of hubproxy sampled from just before the request to the last byte; slope is the "
    "least-squares fit in KiB per minute.",
]
SOAK_METHOD = [
    "Workers, each on a keep-alive TLS connection (reopened after a disconnect, an error, or "
    "politely closed after ~2% of requests), pick at random: the manifest by tag, a small "
    "blob, a medium blob, or a medium blob abandoned at a random byte by a bare FIN or an RST "
    "(deliberate: not errors). hubproxy's `--cache-size` is smaller than the distinct blobs, so "
    "evictions and misses go on all run long. Every completed body is sha256-verified.",
    "RSS (VmRSS) and the descriptor count sampled every second; slopes are least-squares fits "
    "per minute over the whole run, over its second half, and from minute 5 on (the check: under "
    "50 KiB/min for soaks of 10 minutes or more). Errors: anything other than a verified "
    "complete response or a deliberate disconnect, by kind.",
]


ABUSE_METHOD = [
    "Origin: one nginx playing Docker Hub (registry 307 -> CDN, TLS), files on /dev/shm; it also "
    "serves one big manifest under every tag of `bench/big`. Each attack gets a fresh hubproxy "
    "as users run it (TLS listener, cache on tmpfs, default `--max-connections` and limits, "
    "`--body-memory 8M` unless told, a small device's), plus "
    "`--cache-size` below the large blob for case 3 and `--users FILE` for case 8.",
    "The victim (this process, trio + h11) connects from 127.0.0.1; the attacker (a separate "
    "process, so its CPU is not the victim's event loop) from 127.0.0.2: both are loopback, and "
    "hubproxy sees two client addresses. Case 8's victim is a mirror user and logs in first "
    "(`GET /v2/`, then the token request its challenge names, with Basic credentials).",
    "A victim pull: a new keep-alive TLS connection, the small manifest by tag (cached), a cached "
    "100 KiB blob, and a blob never pulled before (a miss: registry -> 307 -> CDN), each "
    "sha256-verified; timed from connecting to the last byte. One pull starts every 50 ms (or "
    "as soon as the previous one ends, if slower). p99 is the nearest-rank 99th percentile.",
    "Per attack: one warm-up pull; the victim alone for the phase duration (the no-attack "
    "figures); VmHWM reset (clear_refs 5); the attack: the attacker opens its connections (64 at a"
    " time; case 7 also sends one `GET /v2/` on each), then sends its requests and holds the "
    "attack for the phase duration (case 7 meanwhile opens another connection whenever it holds "
    "fewer than 1,024, one attempt per 50 ms at most), then resets every connection. The victim "
    "pulls for the attacker's whole lifetime; the under-attack figures are the pulls started once "
    "the attacker's connections were open (the pulls during the connection burst, TLS handshakes "
    "that cost CPU whatever hubproxy's limits, are reported apart, in Attacks). Peak RSS is "
    "hubproxy's VmHWM over the whole attack.",
    f"Checks per attack: victim p99 under attack at most {P99_FACTOR:g}x its p99 alone, no "
    f"victim pull failed, peak RSS under {RSS_LIMIT_KIB // KiB} MiB, hubproxy alive; case 8: "
    f"the first login under attack at most {P99_FACTOR:g}x the first login alone.",
]


def write_report(
    out: Path,
    name: str,
    title: str,
    command: str,
    env: Mapping[str, str],
    rows: Sequence[Sequence[str]],
    method: Sequence[str],
    result: dict[str, Any],
    failed: Sequence[str],
    header: Sequence[str] = FIGURE_HEADER,
    sections: Sequence[tuple[str, Sequence[str]]] = (),
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result = {**result, "environment": dict(env), "command": command, "failed_checks": failed}
    result["ok"] = not failed
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{name}.md").write_text(
        render_markdown(title, command, env, rows, method, result, failed, header, sections)
    )
    say(f"load: wrote {out / (name + '.md')} and {name}.json")


# --- the modes, end to end ---------------------------------------------------------------------


@contextlib.contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="hubproxy-load-", dir=shm if shm.is_dir() else None))
    try:
        yield root
    finally:
        if keep:
            say(f"load: kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def mode_load(
    nginx: str, p: LoadParams, keep: bool, body_memory: str = BODY_MEMORY
) -> dict[str, Any]:
    with workspace(keep) as root, contextlib.ExitStack() as stack:
        h = Harness.create(
            nginx, root, [(p.transfers, p.blob_size)], stack, body_memory=body_memory
        )
        probe = write_blob(h.fixtures.blob_dir, p.blob_size)
        hub = h.start_hub("hubproxy-load", cache=True)
        result = trio.run(run_load, h, hub, p, probe)
        result["hubproxy_alive_at_end"] = hub.alive()
        stack.close()
        result["log"] = log_findings(hub)
        return result


def mode_slow(
    nginx: str, p: SlowParams, keep: bool, body_memory: str = BODY_MEMORY
) -> dict[str, Any]:
    with workspace(keep) as root, contextlib.ExitStack() as stack:
        h = Harness.create(nginx, root, [(1, p.size)], stack, body_memory=body_memory)
        blob = h.fixtures.blobs[(1, p.size)][0]
        variants: dict[str, Any] = {}
        for variant in p.variants:
            hub = h.start_hub(f"hubproxy-slow-{variant}", cache=variant != "no-cache")
            say(f"load: slow client, {variant}: {p.size / MiB:g} MiB at {p.rate / 1e6:g} MB/s")
            v = trio.run(run_slow, h, hub, blob, p)
            v["hubproxy_alive_at_end"] = hub.alive()
            procs.stop(hub.process)
            v["log"] = log_findings(hub)
            if hub.cache_dir is not None:
                shutil.rmtree(hub.cache_dir, ignore_errors=True)
            say(
                f"load: {variant}: verified {v['verified']}, RSS {_mib(v['rss_min_kib'])} - "
                f"{_mib(v['rss_max_kib'])}, slope {v['rss_slope_kib_per_min']:+.1f} KiB/min "
                f"({v['rss_slope_steady_kib_per_min']:+.1f} without the first tenth)"
            )
            variants[variant] = v
        return {"mode": "slow-client", "params": asdict(p), "variants": variants}


def slow_checks(r: Mapping[str, Any]) -> list[str]:
    failed: list[str] = []
    for name, v in r["variants"].items():
        if not v["verified"]:
            failed.append(f"slow client {name}: not verified: {v['error']}")
        if not v["fds_after"]["matched"]:
            failed.append(f"slow client {name}: descriptors not back: {v['fds_after']}")
    return failed


def mode_soak(
    nginx: str, p: SoakParams, keep: bool, body_memory: str = BODY_MEMORY
) -> dict[str, Any]:
    with workspace(keep) as root, contextlib.ExitStack() as stack:
        h = Harness.create(nginx, root, [*p.small, *p.medium], stack, body_memory=body_memory)
        hub = h.start_hub("hubproxy-soak", cache=True, extra=["--cache-size", p.cache_size])
        result = trio.run(run_soak, h, hub, p)
        result["hubproxy_alive_at_end"] = hub.alive()
        stack.close()
        result["log"] = log_findings(hub)
        return result


def parse_attacks(text: str) -> tuple[str, ...]:
    """``1-miss,2,8`` -> the attacks, in the order given; ``1`` means both of case 1's."""
    names: list[str] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        found = [item] if item in ATTACKS else [n for n in ATTACKS if n.split("-")[0] == item]
        if not found:
            raise argparse.ArgumentTypeError(
                f"unknown attack {item!r} (known: {', '.join(ATTACKS)})"
            )
        names += [n for n in found if n not in names]
    if not names:
        raise argparse.ArgumentTypeError("no attack named")
    return tuple(names)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load",
        description="hubproxy under load: idle connections + concurrent transfers (default), "
        "a slow client (--slow-client), a soak (--soak); RSS and descriptors from /proc.",
    )
    add = parser.add_argument
    add("--load", action="store_true", help="the idle-connections + transfers case (default)")
    add("--slow-client", action="store_true", help="one big blob to a slow client")
    add("--soak", type=float, nargs="?", const=10.0, metavar="MINUTES", help="soak (default 10)")
    add(
        "--quick",
        action="store_true",
        help="all four, small: 100 idle, 10 x 1 MiB, 64 MiB at 200 MB/s, 0.1-min soak, "
        "0.5-second abuse phases with small attacks",
    )
    add("--idle", type=int, help="idle connections (default 1000, quick 100)")
    add("--transfers", type=int, help="concurrent transfers (default 100, quick 10)")
    add("--blob-size", type=parse_size, help="size per transfer (default 8M, quick 1M)")
    add("--hit-fraction", type=float, default=0.5, help="share of cache hits (default 0.5)")
    add("--no-pool-wait", action="store_true", help="skip the 32 s upstream-pool wait")
    add("--size", type=parse_size, help="slow-client blob size (default 1G, quick 64M)")
    add("--rate", type=float, help="slow-client rate in MB/s (default 20, quick 200)")
    add("--workers", type=int, help="soak workers (default 20, quick 8)")
    add(
        "--body-memory",
        default=BODY_MEMORY,
        metavar="SIZE|auto",
        help=f"hubproxy's --body-memory (default {BODY_MEMORY}: a small device's, what auto "
        "gives a machine of 512 MiB or less; issue 12's memory targets are for one)",
    )
    add(
        "--abuse",
        action="store_true",
        help="cases 1, 2, 3, 7, 8 of issue 12 as attacks from 127.0.0.2 while a victim pulls "
        "from 127.0.0.1: the victim's p99 and hubproxy's peak RSS per attack",
    )
    add(
        "--attacks",
        type=parse_attacks,
        metavar="LIST",
        help=f"the attacks, comma-separated (default all: {','.join(ATTACKS)})",
    )
    add(
        "--abuse-seconds",
        type=float,
        metavar="S",
        help="each abuse phase: the victim alone, then the attack held (default 10, quick 0.5)",
    )
    add("--out", type=Path, help="output directory (default bench/results; quick: a temp dir)")
    add("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    return parser


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quick: bool = args.quick
    modes = [
        m
        for m, on in (
            ("load", args.load),
            ("slow-client", args.slow_client),
            ("soak", args.soak is not None),
            ("abuse", args.abuse or args.attacks is not None),
        )
        if on
    ]
    if not modes:
        modes = ["load", "slow-client", "soak", "abuse"] if quick else ["load"]
    load_p = LoadParams(
        idle=args.idle or (100 if quick else 1000),
        transfers=args.transfers or (10 if quick else 100),
        blob_size=args.blob_size or (1 * MiB if quick else 8 * MiB),
        hit_fraction=args.hit_fraction,
        pool_wait=not (quick or args.no_pool_wait),
    )
    slow_p = SlowParams(
        size=args.size or (64 * MiB if quick else 1 * GiB),
        rate=(args.rate or (200.0 if quick else 20.0)) * 1e6,
        interval=0.1 if quick else 0.5,
    )
    soak_minutes = args.soak if args.soak is not None else (0.1 if quick else 10.0)
    soak_p = (
        SoakParams(
            minutes=soak_minutes,
            workers=args.workers or 8,
            small=((8, 16 * KiB), (8, 256 * KiB)),
            medium=((4, 1 * MiB), (4, 2 * MiB)),
            cache_size="8M",
            interval=0.5,
        )
        if quick
        else SoakParams(minutes=soak_minutes, workers=args.workers or 20)
    )
    abuse_p = (
        AbuseParams(
            duration=0.5,
            manifest_connections=20,
            manifest_size=1 * MiB,
            range_connections=16,
            large_blob_size=16 * MiB,
            small_cache="4M",
            fill_readers=2,
            idle_connections=64,
            logins=10,
        )
        if quick
        else AbuseParams()
    )
    abuse_p = dataclasses.replace(
        abuse_p,
        attacks=args.attacks or abuse_p.attacks,
        duration=args.abuse_seconds or abuse_p.duration,
    )
    if not 0 <= load_p.hit_fraction <= 1:
        parser.error("--hit-fraction is between 0 and 1")
    if load_p.idle < 1 or load_p.transfers < 1 or slow_p.rate <= 0 or soak_p.minutes <= 0:
        parser.error("counts, the rate and the soak duration must be positive")
    if abuse_p.duration <= 0:
        parser.error("--abuse-seconds must be positive")
    nginx = find_tool("nginx")
    if nginx is None:
        print("bench.load: needs nginx (apt-get install -y nginx-light)", file=sys.stderr)
        return 2
    out: Path = args.out or (
        Path(tempfile.mkdtemp(prefix="hubproxy-load-quick-")) if quick else DEFAULT_OUT
    )
    signal.signal(signal.SIGTERM, _on_sigterm)
    soft, _ = raise_nofile()
    need = load_p.idle + load_p.transfers + 200
    if "abuse" in modes:
        need = max(need, abuse_p.idle_connections + abuse_p.logins + 200)
    if ("load" in modes or "abuse" in modes) and soft < need:
        print(f"bench.load: RLIMIT_NOFILE {soft} is below the {need} needed", file=sys.stderr)
        return 2
    command = shlex.join(["python", "-m", "bench.load", *(sys.argv[1:] if argv is None else argv)])
    env = environment()
    all_failed: list[str] = []
    tables: list[str] = []
    if "load" in modes:
        r = mode_load(nginx, load_p, args.keep, args.body_memory)
        failed = load_checks(r) + ([] if r["hubproxy_alive_at_end"] else ["hubproxy died"])
        rows = load_rows(r)
        title = f"hubproxy: {load_p.idle:,} idle connections + {load_p.transfers} transfers"
        write_report(out, "load", title, command, env, rows, LOAD_METHOD, r, failed)
        tables.append(render_text(rows))
        all_failed += failed
    if "slow-client" in modes:
        r = mode_slow(nginx, slow_p, args.keep, args.body_memory)
        failed = slow_checks(r) + [
            f"hubproxy died ({n})"
            for n, v in r["variants"].items()
            if not v["hubproxy_alive_at_end"]
        ]
        rows = slow_rows(r)
        title = f"hubproxy: a {slow_p.size / MiB:g} MiB blob to a slow client"
        write_report(out, "slow-client", title, command, env, rows, SLOW_METHOD, r, failed)
        tables.append(render_text(rows))
        all_failed += failed
    if "soak" in modes:
        r = mode_soak(nginx, soak_p, args.keep, args.body_memory)
        failed = soak_checks(r) + ([] if r["hubproxy_alive_at_end"] else ["hubproxy died"])
        rows = soak_rows(r)
        title = f"hubproxy: {soak_p.minutes:g}-minute soak"
        write_report(out, "soak", title, command, env, rows, SOAK_METHOD, r, failed)
        tables.append(render_text(rows))
        all_failed += failed
    if "abuse" in modes:
        r = mode_abuse(nginx, abuse_p, args.keep, args.body_memory)
        failed = abuse_checks(r)
        attack_rows = abuse_rows(r)
        title = f"hubproxy under abuse: {len(abuse_p.attacks)} attacks from one address"
        write_report(
            out,
            "abuse",
            title,
            command,
            env,
            attack_rows,
            ABUSE_METHOD,
            r,
            failed,
            ABUSE_HEADER,
            [("Attacks", abuse_details(r))],
        )
        tables.append(render_text([ABUSE_HEADER, *attack_rows]))
        all_failed += failed
    print("\n\n".join(tables), flush=True)
    for failure in all_failed:
        say(f"load: FAILED: {failure}")
    say(f"load: reports in {out}")
    return 1 if all_failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
