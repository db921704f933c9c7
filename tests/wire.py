"""A persistent HTTP/1.1 test client over one real connection (plain or TLS), framed by h11:
for keep-alive, raw-bytes and half-read tests that the one-shot ``fetch`` cannot express."""

from __future__ import annotations

import ssl
import urllib.parse

import h11
import trio
import trustme


async def open_stream(
    url: str, ca: trustme.CA, *, alpn: list[str] | None = None
) -> trio.abc.Stream:
    split = urllib.parse.urlsplit(url)
    assert split.hostname is not None
    assert split.port is not None
    tcp = await trio.open_tcp_stream(split.hostname, split.port)
    if split.scheme == "http":
        return tcp
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if alpn:
        context.set_alpn_protocols(alpn)
    stream = trio.SSLStream(tcp, context, server_hostname=split.hostname, https_compatible=True)
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return stream


class WireClient:
    def __init__(self, stream: trio.abc.Stream, host: str = "127.0.0.1") -> None:
        self.stream = stream
        self.host = host
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, url: str, ca: trustme.CA) -> WireClient:
        return cls(await open_stream(url, ca), urllib.parse.urlsplit(url).netloc)

    async def send_request(
        self, method: str, target: str, headers: list[tuple[str, str]] | None = None
    ) -> None:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        all_headers = [("host", self.host), *(headers or [])]
        data = self.conn.send(h11.Request(method=method, target=target, headers=all_headers))
        data += self.conn.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(data)

    async def next_event(self) -> h11.Event:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(bytes(await self.stream.receive_some(65536)))
                continue
            assert not isinstance(event, type)
            return event

    async def receive_head(self) -> h11.Response:
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Response):
                return event
            assert isinstance(event, h11.InformationalResponse), event

    async def receive_body(self, limit: int | None = None) -> bytes:
        """Read the body to its end (or at least ``limit`` bytes, then stop)."""
        chunks = bytearray()
        while limit is None or len(chunks) < limit:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                chunks += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"unexpected {event!r}")
        return bytes(chunks)

    async def request(
        self, method: str, target: str, headers: list[tuple[str, str]] | None = None
    ) -> tuple[h11.Response, bytes]:
        await self.send_request(method, target, headers)
        head = await self.receive_head()
        return head, await self.receive_body()

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def read_until_closed(stream: trio.abc.Stream) -> bytes:
    """Everything the peer sends until it closes (a broken connection counts as closed)."""
    data = bytearray()
    while True:
        try:
            chunk = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk
