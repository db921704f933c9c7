"""Micro-benchmark: trio.SSLStream vs hubproxy.net.tls.TLSStream moving bulk data over loopback.

For each implementation and direction ("download": we receive, like reading a blob from Docker
Hub; "upload": we send, like serving it to a client) this moves ``--mib`` MiB over a TLS 1.3
connection to a peer running in a *separate process* (blocking stdlib ``ssl`` sockets), so the
CPU seconds reported (``time.process_time`` of this process) are the cost of our side alone.

    .venv/bin/python bench/tls_micro.py [--mib 1024] [--chunk 262144]
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Literal

import trio
import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hubproxy.net.tls import TLSStream

Impl = Literal["trio.SSLStream", "TLSStream"]
Direction = Literal["download", "upload"]
PEER_CHUNK = 1024 * 1024


def _peer(
    listener: socket.socket, cert_pem: bytes, key_pem: bytes, direction: Direction, total: int
) -> None:
    """Child process: blocking TLS server that sends (download) or sinks (upload) ``total``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert_file = Path(f"/tmp/tls_micro_{id(listener)}.pem")
    cert_file.write_bytes(cert_pem + key_pem)
    ctx.load_cert_chain(str(cert_file))
    cert_file.unlink()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    conn, _ = listener.accept()
    tls = ctx.wrap_socket(conn, server_side=True)
    if direction == "download":
        block = memoryview(b"\x5a" * PEER_CHUNK)
        sent = 0
        while sent < total:
            n = min(PEER_CHUNK, total - sent)
            tls.sendall(block[:n])
            sent += n
        tls.recv(1)  # wait for the ack so we don't close early
    else:
        buf = bytearray(PEER_CHUNK)
        got = 0
        while got < total:
            n = tls.recv_into(buf)
            if not n:
                raise SystemExit("peer: unexpected EOF")
            got += n
        tls.sendall(b"k")
    tls.close()


async def _run_one(
    impl: Impl, direction: Direction, port: int, ca: trustme.CA, total: int, chunk: int
) -> tuple[float, float, int]:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream: trio.abc.Stream
    if impl == "TLSStream":
        stream = await TLSStream.wrap_client(tcp, ctx, "localhost")
    else:
        ssl_stream = trio.SSLStream(tcp, ctx, server_hostname="localhost", https_compatible=True)
        await ssl_stream.do_handshake()
        stream = ssl_stream
    calls = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    if direction == "download":
        got = 0
        while got < total:
            data = await stream.receive_some(chunk)
            if not data:
                raise RuntimeError("unexpected EOF")
            got += len(data)
            calls += 1
        await stream.send_all(b"k")
    else:
        block = memoryview(b"\xa5" * chunk)
        sent = 0
        while sent < total:
            n = min(chunk, total - sent)
            await stream.send_all(block[:n])
            sent += n
            calls += 1
        if await stream.receive_some(1) != b"k":
            raise RuntimeError("no ack")
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    await stream.aclose()
    return wall, cpu, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="MiB moved per run (default 1024)")
    parser.add_argument("--chunk", type=int, default=256 * 1024, help="receive/send size")
    args = parser.parse_args()
    total = args.mib * 1024 * 1024
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    cert_pem = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    key_pem = leaf.private_key_pem.bytes()
    fork = multiprocessing.get_context("fork")

    print(f"{args.mib} MiB per run, TLS 1.3, chunk {args.chunk}, {ssl.OPENSSL_VERSION}")
    print(f"{'impl':16} {'direction':9} {'MB/s':>8} {'CPU s':>7} {'CPU s/GiB':>10} {'calls':>8}")
    impls: list[Impl] = ["trio.SSLStream", "TLSStream"]
    directions: list[Direction] = ["download", "upload"]
    for direction in directions:
        for impl in impls:
            listener = socket.create_server(("127.0.0.1", 0))
            port = listener.getsockname()[1]
            child = fork.Process(target=_peer, args=(listener, cert_pem, key_pem, direction, total))
            child.start()
            listener.close()
            wall, cpu, calls = trio.run(_run_one, impl, direction, port, ca, total, args.chunk)
            child.join()
            gib = total / 2**30
            print(
                f"{impl:16} {direction:9} {total / wall / 1e6:8.0f} {cpu:7.2f}"
                f" {cpu / gib:10.2f} {calls:8d}"
            )


if __name__ == "__main__":
    main()
