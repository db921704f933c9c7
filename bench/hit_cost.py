"""What serving a cache hit costs hubproxy: MB/s and CPU seconds per GiB, TLS and plain HTTP.

    python -m bench.hit_cost [--size 1G] [--hits 3] [--src DIR] [--transport tls|http|both]

One blob of ``--size`` on the bench origin (nginx, :mod:`bench.origin`); hubproxy (run from
``--src``, default this checkout, so that another checkout gives the "before" figures) pulls it
once (the miss that fills the cache), then serves ``--hits`` hits of it, each read whole and
sha256-checked by the client. For each hit: wall time, throughput, and hubproxy's CPU time
(its CPU clock, ``bench.procs.cpu_seconds``) per GiB. On plain HTTP hubproxy sends hits with
``os.sendfile``; since issue 12 it also reads each span back to hash it (a cached blob is
verified while it is served), which is what this measures. Everything runs under /dev/shm, so
the disk is not in the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from bench import procs
from bench.cases import Transport
from bench.contestants import hubproxy_argv
from bench.env import REPO_ROOT, find_tool
from bench.fixtures import make_fixtures
from bench.load import parse_size
from bench.loadclient import Connection, client_context
from bench.nginxconf import BLOB_PATH
from bench.origin import start_origin

GiB = 1 << 30


async def pull(port: int, transport: Transport, ca_pem: Path, digest: str, size: int) -> None:
    context = client_context(ca_pem) if transport == "tls" else None
    conn = await Connection.open(port, context)
    try:
        head, body = await conn.get(BLOB_PATH + digest)
    finally:
        await conn.aclose()
    if head.status != 200 or not body.complete or body.size != size or body.digest_hex != digest:
        raise SystemExit(f"bad transfer: {head.status}, {head.headers}, {body}")


def measure(transport: Transport, args: argparse.Namespace, root: Path) -> None:
    with contextlib.ExitStack() as stack:
        (root / transport).mkdir()
        fixtures = make_fixtures(root / transport, [(1, args.size)])
        [blob] = fixtures.blobs[(1, args.size)]
        origin = start_origin(find_tool("nginx") or "nginx", root / transport, fixtures, stack)
        port = procs.free_port()
        cache = root / transport / "cache"
        argv = hubproxy_argv(port, transport, origin.registry_url("tls"), fixtures, cache)
        hub = procs.start("hubproxy", argv, root / f"{transport}.log", stack, cwd=args.src)
        procs.wait_listening(hub, [port])
        trio.run(pull, port, transport, fixtures.tls.ca_pem, blob.digest_hex, args.size)  # miss
        rates, costs = [], []
        for _ in range(args.hits):
            cpu, began = procs.cpu_seconds([hub.pid]), time.monotonic()
            trio.run(pull, port, transport, fixtures.tls.ca_pem, blob.digest_hex, args.size)
            seconds = time.monotonic() - began
            rates.append(args.size / seconds / 1e6)
            costs.append((procs.cpu_seconds([hub.pid]) - cpu) / (args.size / GiB))
        print(
            f"{transport:5} hit of {args.size / GiB:g} GiB from {args.src}: "
            f"{statistics.median(rates):7.0f} MB/s, "
            f"{statistics.median(costs):.2f} CPU-s/GiB (median of {args.hits}; "
            f"CPU-s/GiB {', '.join(f'{c:.2f}' for c in costs)})",
            flush=True,
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hit_cost", description=__doc__)
    parser.add_argument("--size", type=parse_size, default=GiB, help="blob size (default 1G)")
    parser.add_argument("--hits", type=int, default=3, help="hits measured (default 3)")
    parser.add_argument("--src", type=Path, default=REPO_ROOT, help="hubproxy checkout to run")
    parser.add_argument("--transport", choices=("tls", "http", "both"), default="both")
    args = parser.parse_args(argv)
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="hubproxy-hit-", dir=shm if shm.is_dir() else None))
    root.chmod(0o755)  # nginx workers run as an unprivileged user when we are root
    try:
        transports: list[Transport] = (
            ["tls", "http"] if args.transport == "both" else [args.transport]
        )
        for transport in transports:
            measure(transport, args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
