"""How long the event loop stalls while the manifest store takes N new tags (issue 12, case 4).

    python -m bench.manifest_state [N] [--entries E] [--rate R]
        N: new tags, each naming its own ~1 KiB manifest (default 100000)
        E: --manifest-cache-entries (default N: everything kept; less measures evictions too)
        R: new tags per second (default: as fast as the loop goes; the writer may fall behind,
           and then manifests are served uncached, which is counted)

Opens a ``ManifestStore`` in a temporary directory under /var/tmp and, on a running trio loop,
calls ``put`` N times through the public API (yielding to the loop between calls, as requests
would), while a heartbeat task sleeps 1 ms at a time and records how late it wakes. Prints the
longest ``put``, the heartbeat's worst lateness (the longest stall of the whole loop, the writer
thread's GIL share included), the manifests served uncached because the writer was behind, the
time for ``flush`` at the end, and the time to open the store again with N tags (at start, off
the request path).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio
import trio.lowlevel

from hubproxy.cache.manifests import DEFAULT_MAX_BYTES, ManifestStore

DOCKER = "application/vnd.docker.distribution.manifest.v2+json"
ACCEPTED = frozenset({DOCKER})
HEARTBEAT = 0.001


def body_for(i: int) -> bytes:
    layers = ",".join(
        '{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip",'
        f'"size":{i + n},"digest":"sha256:{hashlib.sha256(f"{i}-{n}".encode()).hexdigest()}"}}'
        for n in range(4)
    )
    return b'{"schemaVersion":2,"mediaType":"%s","layers":[%s]}' % (
        DOCKER.encode(),
        layers.encode(),
    )


async def idle(seconds: float) -> float:
    """The worst lateness of a heartbeat on an idle loop: the machine's noise floor."""
    worst = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        before = time.perf_counter()
        await trio.sleep(HEARTBEAT)
        worst = max(worst, time.perf_counter() - before - HEARTBEAT)
    return worst


async def run(store: ManifestStore, count: int, rate: float | None) -> dict[str, float]:
    lateness: list[float] = []
    put_times: list[float] = []
    put_cpu = 0.0
    gc_pauses: list[float] = [0.0]
    gc_started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_started[0] = time.perf_counter()
        else:
            gc_pauses.append(time.perf_counter() - gc_started[0])

    gc.callbacks.append(on_gc)
    done = trio.Event()

    async def heartbeat() -> None:
        while not done.is_set():
            before = time.perf_counter()
            await trio.sleep(HEARTBEAT)
            lateness.append(time.perf_counter() - before - HEARTBEAT)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(heartbeat)
        started = time.perf_counter()
        for i in range(count):
            body = body_for(i)
            if rate is not None:
                await trio.sleep_until(
                    trio.current_time() + max(0.0, started + i / rate - time.perf_counter())
                )
            cpu = time.thread_time()
            before = time.perf_counter()
            store.put(
                f"library/image{i % 1000}",
                f"tag{i}",
                accepted=ACCEPTED,
                media_type=DOCKER,
                body=body,
                claimed=None,
            )
            put_times.append(time.perf_counter() - before)
            put_cpu = max(put_cpu, time.thread_time() - cpu)
            await trio.lowlevel.checkpoint()
        elapsed = time.perf_counter() - started
        done.set()
    gc.callbacks.remove(on_gc)
    noise = await idle(min(elapsed, 10.0))
    flush_started = time.perf_counter()
    await trio.to_thread.run_sync(store.flush)
    return {
        "elapsed": elapsed,
        "put_max": max(put_times),
        "put_p999": statistics.quantiles(put_times, n=1000)[-1],
        "stall_max": max(lateness),
        "stall_p999": statistics.quantiles(lateness, n=1000)[-1],
        "beats": len(lateness),
        "put_cpu": put_cpu,
        "gc_max": max(gc_pauses),
        "noise": noise,
        "flush": time.perf_counter() - flush_started,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.manifest_state")
    parser.add_argument("count", nargs="?", type=int, default=100_000)
    parser.add_argument("--entries", type=int, default=None)
    parser.add_argument("--rate", type=float, default=None)
    args = parser.parse_args(argv)
    entries = args.entries or args.count
    root = Path(tempfile.mkdtemp(prefix="hubproxy-manifests-", dir="/var/tmp"))
    try:
        store = ManifestStore(
            root, max_bytes=max(DEFAULT_MAX_BYTES, 2 * 1024 * args.count), max_entries=entries
        )
        store.open()
        gc.freeze()  # as hubproxy does once started (app.serve): start-up objects are not rescanned
        figures = trio.run(run, store, args.count, args.rate)
        kept, tags, uncached = len(store.sizes), store.tag_count, store.stats.uncached
        evictions = store.stats.evictions
        store.close()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        db = sum(p.stat().st_size for p in root.glob("state.db*"))
        opened = time.perf_counter()
        again = ManifestStore(root, max_bytes=store.max_bytes, max_entries=entries)
        again.open()
        reopen = time.perf_counter() - opened
        again.close()
        paced = f" at {args.rate:g}/s" if args.rate else ""
        print(
            f"{args.count} new tags{paced} (bound {entries} entries) in "
            f"{figures['elapsed']:.1f} s: "
            f"longest put {figures['put_max'] * 1000:.2f} ms (p99.9 "
            f"{figures['put_p999'] * 1000:.3f} ms); longest event-loop stall "
            f"{figures['stall_max'] * 1000:.2f} ms (p99.9 {figures['stall_p999'] * 1000:.2f} ms,"
            f" {figures['beats']:.0f} heartbeats of {HEARTBEAT * 1000:.0f} ms; idle loop's worst"
            f" {figures['noise'] * 1000:.2f} ms); longest put's CPU on the loop thread "
            f"{figures['put_cpu'] * 1000:.2f} ms; longest GC pause {figures['gc_max'] * 1000:.2f}"
            f" ms; kept {kept} "
            f"manifests, {tags} tags, {evictions} evicted, {uncached} served uncached; final "
            f"flush {figures['flush'] * 1000:.0f} ms; state.db {db / 2**20:.1f} MiB; open "
            f"again {reopen * 1000:.0f} ms; peak RSS {rss:.0f} MiB"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
