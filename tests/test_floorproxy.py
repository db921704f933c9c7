"""bench.floorproxy, the stack's floor the bench measures hubproxy against: it must do the work it
stands for (follow the 307, verify a miss, keep and serve it), or the floor is too low.

Real TLS to a small origin on 127.0.0.1 (trio + h11 + net.tls); the client side plain HTTP."""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import h11
import pytest
import trio
import trustme

from bench.floorproxy import Floor, Mode
from hubproxy.net.tls import TLSStream

BLOB = b"layer bytes " * 50_000  # 600 kB: several chunks
DIGEST = hashlib.sha256(BLOB).hexdigest()
BLOB_PATH = f"/v2/library/alpine/blobs/sha256:{DIGEST}"


@dataclass
class Origin:
    """A registry answering a blob's GET or HEAD with 307 to its own /cdn/, which serves
    ``body``; ``keep_alive`` False: it closes each connection after one answer while saying
    nothing of it, as a keep-alive timeout does to an idle pooled connection."""

    body: bytes = BLOB
    keep_alive: bool = True
    port: int = 0
    requests: list[str] = field(default_factory=list)

    async def serve(self, tcp: trio.SocketStream, context: ssl.SSLContext) -> None:
        stream = await TLSStream.wrap_server(tcp, context)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    await self._answer(event, conn, stream)
                    if not self.keep_alive:
                        return
                elif isinstance(event, h11.EndOfMessage):
                    conn.start_next_cycle()
                else:
                    return
        except (trio.BrokenResourceError, h11.ProtocolError):
            return
        finally:
            await trio.aclose_forcefully(stream)

    async def _answer(
        self, request: h11.Request, conn: h11.Connection, stream: TLSStream[trio.SocketStream]
    ) -> None:
        target = request.target.decode()
        self.requests.append(f"{request.method.decode()} {target}")
        if target == BLOB_PATH:
            location = f"https://127.0.0.1:{self.port}/cdn/{DIGEST}?sig=x".encode()
            head = h11.Response(
                status_code=307, headers=[(b"location", location), (b"content-length", b"0")]
            )
            body = b""
        else:
            head = h11.Response(
                status_code=200,
                headers=[
                    ("content-type", "application/octet-stream"),
                    ("content-length", str(len(self.body))),
                ],
            )
            body = b"" if request.method == b"HEAD" else self.body
        out = conn.send(head) or b""
        if body:
            out += conn.send(h11.Data(data=body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(out)


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    complete: bool  # the body ended as its Content-Length said, not cut


async def fetch(port: int, method: str = "GET", path: str = BLOB_PATH) -> Answer:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(method=method, target=path, headers=[("host", "mirror")])
    await stream.send_all((conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b""))
    status, headers, body = 0, {}, bytearray()
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status, headers = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return Answer(status, headers, bytes(body), True)
    except h11.RemoteProtocolError:  # closed before the Content-Length was reached
        return Answer(status, headers, bytes(body), False)
    finally:
        await stream.aclose()


@pytest.fixture
def origin_tls(ca: trustme.CA) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(the origin's server context, the floor's context trusting it)."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


@asynccontextmanager
async def floor_before(
    origin: Origin,
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
    mode: Mode,
    directory: Path | None,
) -> AsyncIterator[int]:
    """The origin and a floor in front of it, for the block; yields the floor's port."""
    server, client = tls

    async def serve_origin(tcp: trio.SocketStream) -> None:
        await origin.serve(tcp, server)

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, serve_origin, 0, host="127.0.0.1"))
        origin.port = listener.socket.getsockname()[1]
        floor = Floor(mode, f"https://127.0.0.1:{origin.port}", None, client, directory)
        serve_floor = partial(trio.serve_tcp, floor.serve, 0, host="127.0.0.1")
        [floor_listener] = await nursery.start(serve_floor)
        try:
            yield floor_listener.socket.getsockname()[1]
        finally:
            # nothing may await once the nursery is cancelled: a Cancelled there would replace
            # (and so swallow) a failed assertion of the block
            await floor.aclose()
            nursery.cancel_scope.cancel()


async def test_a_miss_follows_the_redirect_verifies_and_keeps_the_blob(
    origin_tls: tuple[ssl.SSLContext, ssl.SSLContext], tmp_path: Path
) -> None:
    origin = Origin()
    async with floor_before(origin, origin_tls, "miss", tmp_path) as port:
        answer = await fetch(port)
        assert (answer.status, answer.complete, answer.body == BLOB) == (200, True, True)
        assert origin.requests == [f"GET {BLOB_PATH}", f"GET /cdn/{DIGEST}?sig=x"]
        assert (tmp_path / DIGEST).read_bytes() == BLOB  # kept under its digest, nothing else
        assert os.listdir(tmp_path) == [DIGEST]
        head = await fetch(port, "HEAD")
        assert (head.status, head.headers[b"content-length"], head.body) == (
            200,
            str(len(BLOB)).encode(),
            b"",
        )


async def test_a_wrong_blob_is_cut_before_its_last_byte_and_not_kept(
    origin_tls: tuple[ssl.SSLContext, ssl.SSLContext], tmp_path: Path
) -> None:
    """A floor that skipped the check would cost less than any honest mirror."""
    origin = Origin(body=BLOB[:-1] + b"!")
    async with floor_before(origin, origin_tls, "miss", tmp_path) as port:
        answer = await fetch(port)
        assert answer.status == 200 and not answer.complete
        assert len(answer.body) < len(BLOB)
        assert os.listdir(tmp_path) == []


async def test_a_hit_serves_the_kept_file_without_asking_the_origin(
    origin_tls: tuple[ssl.SSLContext, ssl.SSLContext], tmp_path: Path
) -> None:
    origin = Origin()
    async with floor_before(origin, origin_tls, "hit", tmp_path) as port:
        first = await fetch(port)
        asked = len(origin.requests)
        again = await fetch(port)
        assert first.body == again.body == BLOB and again.complete
        assert again.headers[b"docker-content-digest"] == f"sha256:{DIGEST}".encode()
        assert len(origin.requests) == asked == 2


async def test_a_pooled_connection_the_origin_closed_is_retried_on_a_new_one(
    origin_tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """One bench run failed on it before: the origin had closed an idle pooled connection."""
    origin = Origin(keep_alive=False)
    async with floor_before(origin, origin_tls, "pass", None) as port:
        for _ in range(3):
            answer = await fetch(port)
            assert answer.complete and answer.body == BLOB
        assert len(origin.requests) == 6
