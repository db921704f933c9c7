"""The floor under hubproxy's per-request cost: the least a trio + h11 + TLS server spends.

A server with nothing of a mirror in it (no routing, cache, accounting, fair share or logging)
answers every GET with the same 1 KiB body over TLS on keep-alive connections, in one process;
wrk drives it as ``python -m bench``'s small-request cases do (50 connections, 1 KiB). It
reports requests per second and the server's CPU time per request, once with trio's own
``SSLStream`` and once with hubproxy's ``TLSStream`` (net.tls): what any server on this stack
pays per request before doing anything, which the ``small-tls`` figures are measured against.

    .venv/bin/python -m bench.request_floor [--seconds 8] [--rounds 2]

Needs wrk on PATH. The server runs in a child process of its own, so the CPU time counted is
the server's alone.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

import h11
import trio
import trustme

from bench.clients import parse_wrk
from bench.procs import cpu_seconds, free_port

Impl = Literal["trio.SSLStream", "TLSStream"]
IMPLS: tuple[Impl, ...] = ("trio.SSLStream", "TLSStream")
BODY = b"x" * 1024
CONNECTIONS = 50


async def _answer(stream: trio.abc.Stream) -> None:
    """Serve one connection: every request gets the 1 KiB body, until the client leaves."""
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, h11.EndOfMessage):
                head = h11.Response(
                    status_code=200,
                    headers=[("content-type", "application/json"), ("content-length", "1024")],
                )
                await stream.send_all(
                    conn.send(head) + conn.send(h11.Data(data=BODY)) + conn.send(h11.EndOfMessage())
                )
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
        return


def _serve(impl: Impl, port: int, cert: str, key: str) -> None:
    """Child process: the floor server on 127.0.0.1:``port`` until terminated."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from hubproxy.net.malloc import tune_malloc
    from hubproxy.net.tls import TLSStream

    tune_malloc()  # as hubproxy does at start (net.malloc), for both streams

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def main() -> None:
        if impl == "trio.SSLStream":
            await trio.serve_ssl_over_tcp(_answer, port, context, host="127.0.0.1")
            return

        async def wrapped(tcp: trio.SocketStream) -> None:
            try:
                stream = await TLSStream.wrap_server(tcp, context)
            except trio.BrokenResourceError:
                return
            await _answer(stream)

        await trio.serve_tcp(wrapped, port, host="127.0.0.1")

    trio.run(main)


def measure(impl: Impl, wrk: str, seconds: int, cert: str, key: str) -> tuple[float, float]:
    """(requests per second, server CPU µs per request) of one wrk run against ``impl``."""
    port = free_port()
    server = multiprocessing.get_context("spawn").Process(
        target=_serve, args=(impl, port, cert, key), daemon=True
    )
    server.start()
    try:
        url = f"https://127.0.0.1:{port}/"
        for _ in range(100):  # until it listens
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.1)
        assert server.pid is not None
        before = cpu_seconds([server.pid])
        run = subprocess.run(
            [wrk, "-t2", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency", url],
            capture_output=True,
            text=True,
            check=True,
        )
        used = cpu_seconds([server.pid]) - before
    finally:
        server.terminate()
        server.join()
    report = parse_wrk(run.stdout)
    if not report.requests or report.errors:
        raise SystemExit(f"request_floor: wrk saw errors or no requests:\n{run.stdout}")
    return report.rps, used / report.requests * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=8, help="wrk duration per run (whole)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per server, interleaved")
    args = parser.parse_args(argv)
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("request_floor: wrk is not installed (apt-get install wrk)")
    with tempfile.TemporaryDirectory() as tmp:
        ca = trustme.CA()
        issued = ca.issue_cert("127.0.0.1")
        cert, key = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        issued.cert_chain_pems[0].write_to_path(cert)
        issued.private_key_pem.write_to_path(key)
        for round_ in range(1, args.rounds + 1):
            for impl in IMPLS:
                rate, cpu = measure(impl, wrk, args.seconds, str(cert), str(key))
                print(f"[round {round_}] {impl}: {rate:,.0f} req/s, {cpu:.0f} µs CPU per request")


if __name__ == "__main__":
    main()
