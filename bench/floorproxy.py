"""The floor under hubproxy's costs: the least a mirror built on its stack spends.

A registry mirror with nothing of hubproxy in it but its stack: trio, h11 on both sides,
hubproxy's ``TLSStream`` (net.tls) on both sides, sha256 and the file system. Each GET goes to
the origin over a kept-alive TLS connection from a pool all clients share, a redirect is followed
to the host it names (the CDN, its connections pooled too), and the body goes to the client as it
comes, in 256 KiB chunks, read past h11 once the head says its length (as net.upstream does).
Nothing else: no routing, no access checks, no limits, no fair share, no timeouts, no logging,
no metrics, and no answer to anything but the bench's GETs and HEADs. Not a mirror anyone
should run; the measure of what any mirror on this stack pays, whatever it decides, which
``python -m bench`` runs beside hubproxy (the ``floor-*`` contestants) so that every figure of
hubproxy's has the stack's own beside it, from the same run.

Modes (``--mode``):

- ``pass``: only that;
- ``miss``: a blob's body is also hashed (sha256, checked against the digest it was asked by:
  a wrong body is cut, never completed) and written chunk by chunk to a new file in ``--dir``,
  kept under its digest once complete: a verified cache fill, every time (what
  ``hubproxy-miss`` pays on an empty cache; the bench restarts it on an empty ``--dir``
  before each run, as hubproxy-miss);
- ``hit``: a blob held in ``--dir`` (a file named by its hex digest, as hubproxy's cache names
  them) is read from that file in 256 KiB chunks; one not held is fetched as a miss and kept.
  Anything else (the manifest) is kept in memory by its path after the first fetch.

    .venv/bin/python -m bench.floorproxy --listen 127.0.0.1:8443 --cert C --key K \\
        --upstream https://127.0.0.1:5443 --upstream-ca CA --mode miss --dir /tmp/floor
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import h11
import trio

from hubproxy.net.tls import TLSStream

Mode = Literal["pass", "miss", "hit"]
MODES: tuple[Mode, ...] = ("pass", "miss", "hit")
CHUNK = 256 * 1024  # hubproxy's largest body chunk (net.buffers)
HEAD_READ = 64 * 1024
_BLOB = re.compile(r"/v2/.+/blobs/sha256:([0-9a-f]{64})")
_HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length"}
_REDIRECTS = {301, 302, 303, 307, 308}


class FloorError(Exception):
    """The origin or the client broke the exchange: the client connection is dropped."""


@dataclass
class Upstream:
    """One kept-alive TLS connection to one origin host, and its h11 state for the next
    response (a fresh one after each body read past h11)."""

    stream: TLSStream[trio.SocketStream]
    host: bytes
    conn: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    _pending: bytes = b""  # body bytes h11 had buffered
    _left: int = 0  # body bytes still to read from the stream

    async def request(
        self, method: bytes, target: str, headers: list[tuple[bytes, bytes]]
    ) -> h11.Response:
        self.conn = h11.Connection(h11.CLIENT)
        out = self.conn.send(
            h11.Request(method=method, target=target, headers=[(b"host", self.host), *headers])
        )
        out = (out or b"") + (self.conn.send(h11.EndOfMessage()) or b"")
        await self.stream.send_all(out)
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(HEAD_READ)
                if not data:
                    raise FloorError("the origin closed the connection")
                self.conn.receive_data(data)
            elif isinstance(event, h11.Response):
                return event
            elif not isinstance(event, h11.InformationalResponse):
                raise FloorError(f"the origin sent {event!r}")

    def begin_body(self, length: int) -> None:
        """The response's body is ``length`` bytes, read past h11 (:meth:`next_chunk`)."""
        self._pending = self.conn.trailing_data[0][:length]
        self._left = length - len(self._pending)

    async def next_chunk(self) -> bytes | None:
        """The body's next bytes (what h11 buffered, then the stream's); None at its end."""
        if self._pending:
            chunk, self._pending = self._pending, b""
            return chunk
        if not self._left:
            return None
        data = await self.stream.receive_some(min(CHUNK, self._left))
        if not data:
            raise FloorError("the origin closed the connection mid-body")
        self._left -= len(data)
        return data


@dataclass
class Floor:
    """One process of the floor: its mode, the origin and TLS settings, the manifests a hit
    keeps, and the idle upstream connections all its clients share."""

    mode: Mode
    origin: str  # https://host:port
    client_tls: ssl.SSLContext | None
    upstream_tls: ssl.SSLContext
    directory: Path | None
    manifests: dict[str, tuple[h11.Response, bytes]] = field(default_factory=dict)
    idle: dict[str, list[Upstream]] = field(default_factory=dict)  # kept alive, per host

    async def aclose(self) -> None:
        """Close the idle upstream connections."""
        idle, self.idle = self.idle, {}
        for upstream in (u for pooled in idle.values() for u in pooled):
            await trio.aclose_forcefully(upstream.stream)

    async def serve(self, tcp: trio.SocketStream) -> None:
        stream: trio.abc.Stream = tcp
        try:
            if self.client_tls is not None:
                stream = await TLSStream.wrap_server(tcp, self.client_tls)
            conn = h11.Connection(h11.SERVER)
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(HEAD_READ)
                    if not data:
                        return
                    conn.receive_data(bytes(data))
                elif isinstance(event, h11.Request):
                    await self.answer(event, conn, stream)
                elif isinstance(event, h11.EndOfMessage):
                    conn.start_next_cycle()
                else:
                    return
        except (FloorError, h11.ProtocolError, trio.BrokenResourceError, OSError):
            return
        finally:
            await trio.aclose_forcefully(stream)

    async def answer(
        self,
        request: h11.Request,
        conn: h11.Connection,
        client: trio.abc.Stream,
    ) -> None:
        target = request.target.decode()
        blob = _BLOB.fullmatch(target)
        method = request.method
        if self.mode == "hit":
            if (
                blob is not None
                and method == b"GET"
                and await self._send_held(blob[1], conn, client)
            ):
                return
            if blob is None and target in self.manifests:
                head, body = self.manifests[target]
                await client.send_all(self._frame(conn, head, body, method))
                return
        headers = [(k, v) for k, v in request.headers if k in (b"accept", b"authorization")]
        url = self.origin + target
        for _ in range(5):
            parts = urlsplit(url)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            upstream, response = await self._exchange(parts.netloc, method, path, headers)
            try:
                length = int(_header(response, b"content-length") or b"0")
                length = 0 if method == b"HEAD" else length
                if response.status_code not in _REDIRECTS:
                    break
                upstream.begin_body(length)
                while await upstream.next_chunk() is not None:  # a redirect's small body
                    pass
            except BaseException:
                await trio.aclose_forcefully(upstream.stream)
                raise
            self.idle[parts.netloc].append(upstream)
            location = _header(response, b"location") or b""
            url = (
                location.decode()
                if location.startswith(b"https://")
                else self.origin + location.decode()
            )
        else:
            raise FloorError("too many redirects")
        try:
            if method == b"HEAD":
                framed = (conn.send(_head(response, None)) or b"") + (
                    conn.send(h11.EndOfMessage()) or b""
                )
                await client.send_all(framed)
            elif blob is None or response.status_code != 200 or self.mode == "pass":
                await self._relay(conn, client, response, upstream, length, target)
            else:
                await self._fill(blob[1], conn, client, response, upstream, length)
        except BaseException:  # the body not read to its end: the connection is no use
            await trio.aclose_forcefully(upstream.stream)
            raise
        self.idle[parts.netloc].append(upstream)

    async def _relay(
        self,
        conn: h11.Connection,
        client: trio.abc.Stream,
        response: h11.Response,
        upstream: Upstream,
        length: int,
        target: str,
    ) -> None:
        if length <= HEAD_READ:  # the manifest: head and body in one send
            upstream.begin_body(length)
            pieces = []
            while (piece := await upstream.next_chunk()) is not None:
                pieces.append(piece)
            body = b"".join(pieces)
            if self.mode == "hit" and response.status_code == 200:
                self.manifests[target] = (response, body)
            await client.send_all(self._frame(conn, response, body, b"GET"))
            return
        await client.send_all(conn.send(_head(response, length)) or b"")
        upstream.begin_body(length)
        while (chunk := await upstream.next_chunk()) is not None:
            await client.send_all(_passthrough(conn, chunk))
        await client.send_all(conn.send(h11.EndOfMessage()) or b"")

    async def _fill(
        self,
        digest: str,
        conn: h11.Connection,
        client: trio.abc.Stream,
        response: h11.Response,
        upstream: Upstream,
        length: int,
    ) -> None:
        assert self.directory is not None
        temp = self.directory / f"{digest}.{id(upstream)}.part"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            hasher = hashlib.sha256()
            await client.send_all(conn.send(_head(response, length)) or b"")
            sent = 0
            upstream.begin_body(length)
            while (chunk := await upstream.next_chunk()) is not None:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                hasher.update(chunk)
                sent += len(chunk)
                if sent == length and hasher.hexdigest() != digest:
                    raise FloorError("the origin sent a blob that does not match its digest")
                await client.send_all(_passthrough(conn, chunk))
            await client.send_all(conn.send(h11.EndOfMessage()) or b"")
            os.replace(temp, self.directory / digest)  # kept, as a cache keeps it
        finally:
            os.close(fd)
            if temp.exists():
                temp.unlink()

    async def _send_held(self, digest: str, conn: h11.Connection, client: trio.abc.Stream) -> bool:
        assert self.directory is not None
        try:
            fd = os.open(self.directory / digest, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            length = os.fstat(fd).st_size
            head = h11.Response(
                status_code=200,
                headers=[
                    (b"content-type", b"application/octet-stream"),
                    (b"docker-content-digest", f"sha256:{digest}".encode()),
                    (b"content-length", str(length).encode()),
                ],
            )
            await client.send_all(conn.send(head) or b"")
            buffer = bytearray(CHUNK)
            while got := os.readv(fd, [buffer]):
                await client.send_all(_passthrough(conn, memoryview(buffer)[:got]))
            await client.send_all(conn.send(h11.EndOfMessage()) or b"")
        finally:
            os.close(fd)
        return True

    async def _exchange(
        self, netloc: str, method: bytes, path: str, headers: list[tuple[bytes, bytes]]
    ) -> tuple[Upstream, h11.Response]:
        """A request's response head, on an idle connection to ``netloc`` (shared by all
        clients, as a mirror's pool; given back once its exchange is over), else a new one: also
        when the idle one turns out closed by the origin before it answered (its keep-alive
        timeout), as every client of a pool retries."""
        idle = self.idle.setdefault(netloc, [])
        while idle:
            upstream = idle.pop()
            try:
                return upstream, await upstream.request(method, path, headers)
            except (FloorError, trio.BrokenResourceError, OSError):
                await trio.aclose_forcefully(upstream.stream)
        upstream = await self._connect(netloc)
        try:
            return upstream, await upstream.request(method, path, headers)
        except BaseException:
            await trio.aclose_forcefully(upstream.stream)
            raise

    async def _connect(self, netloc: str) -> Upstream:
        host, _, port = netloc.rpartition(":")
        tcp = await trio.open_tcp_stream(host, int(port))
        stream = await TLSStream.wrap_client(tcp, self.upstream_tls, server_hostname=host)
        return Upstream(stream, netloc.encode())

    @staticmethod
    def _frame(conn: h11.Connection, response: h11.Response, body: bytes, method: bytes) -> bytes:
        """A whole answer; to a HEAD, its head alone (with the body's length)."""
        out = conn.send(_head(response, len(body))) or b""
        if method != b"HEAD":
            out += conn.send(h11.Data(data=body)) or b""
        return out + (conn.send(h11.EndOfMessage()) or b"")


def _header(response: h11.Response, name: bytes) -> bytes | None:
    for key, value in response.headers:
        if key == name:
            return value
    return None


def _head(response: h11.Response, length: int | None) -> h11.Response:
    """The origin's head for the client, its body ``length`` long (None: the origin's own
    Content-Length, as a HEAD's answer says it)."""
    kept = [(k, v) for k, v in response.headers if k not in _HOP_BY_HOP]
    if length is not None:
        kept.append((b"content-length", str(length).encode()))
    else:
        declared = _header(response, b"content-length")
        if declared is not None:
            kept.append((b"content-length", declared))
    return h11.Response(status_code=response.status_code, headers=kept, reason=response.reason)


def _passthrough(conn: h11.Connection, chunk: bytes | memoryview) -> bytes | memoryview:
    """A body chunk as h11 frames it (with a Content-Length: the chunk itself, not copied)."""
    pieces = conn.send_with_data_passthrough(h11.Data(data=chunk))  # type: ignore[arg-type]
    if pieces is not None and len(pieces) == 1:
        return pieces[0]
    return b"".join(pieces or ())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floorproxy", description=__doc__)
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--cert", help="TLS certificate chain (PEM); none: plain HTTP")
    parser.add_argument("--key", help="its private key (PEM)")
    parser.add_argument("--upstream", required=True, help="https://HOST:PORT of the origin")
    parser.add_argument("--upstream-ca", required=True, help="CA bundle the origin is checked by")
    parser.add_argument("--mode", choices=MODES, default="pass")
    parser.add_argument("--dir", type=Path, help="where miss and hit write blobs")
    parser.add_argument(
        "--processes",
        default="1",
        help="N or auto (one per CPU it may run on): processes on the port, each its own "
        "SO_REUSEPORT listener, as hubproxy's --workers",
    )
    args = parser.parse_args(argv)
    if args.mode != "pass" and args.dir is None:
        parser.error(f"--mode {args.mode} needs --dir")
    client_tls: ssl.SSLContext | None = None
    if args.cert:
        client_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        client_tls.load_cert_chain(args.cert, args.key)
    upstream_tls = ssl.create_default_context(cafile=args.upstream_ca)
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    floor = Floor(args.mode, args.upstream.rstrip("/"), client_tls, upstream_tls, args.dir)
    host, _, port = args.listen.rpartition(":")
    auto = len(os.sched_getaffinity(0))  # as hubproxy's --workers auto counts
    processes = auto if args.processes == "auto" else int(args.processes)
    for _ in range(processes - 1):
        if os.fork() == 0:  # before trio runs: each process its own loop and listener
            trio.run(_serve, floor, host, int(port))
            os._exit(0)
    trio.run(_serve, floor, host, int(port))


async def _serve(floor: Floor, host: str, port: int) -> None:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # the kernel spreads clients
    await sock.bind((host, port))
    sock.listen(256)
    try:
        await trio.serve_listeners(floor.serve, [trio.SocketListener(sock)])
    finally:
        await floor.aclose()


if __name__ == "__main__":
    main()
