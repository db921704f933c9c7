"""In-process HTTP/1.1 clients for :mod:`bench.load`: trio + ``trio.SSLStream`` + h11.

One :class:`Connection` is one keep-alive TCP (+TLS) connection to the proxy on 127.0.0.1, from
127.0.0.1 or from another loopback address (``source_address``: every 127/8 address is loopback on
Linux, so the proxy sees one client address per source, as it would see two machines).
Bodies are never kept: they are counted and sha256-hashed as they arrive, so a thousand
connections and a hundred concurrent transfers cost the client little memory. A body can be read
at a bounded rate (the slow client) or abandoned part-way (a deliberate disconnect, by FIN or by
RST). Every failure surfaces as :class:`RequestFailed` with a short ``kind`` for the error counts.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import struct
from dataclasses import dataclass
from pathlib import Path

import h11
import trio

RECEIVE_BYTES = 256 * 1024
CLOSE_TIMEOUT = 2.0


class RequestFailed(Exception):
    """A request that did not complete; ``kind`` is what the error counts are keyed by."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


@dataclass(frozen=True)
class Head:
    status: int
    headers: dict[str, str]  # lower-case names; the last of repeated ones


@dataclass(frozen=True)
class Body:
    size: int
    digest_hex: str
    complete: bool  # False: stopped on purpose before the end (``stop_after``)
    content: bytes = b""  # the first ``keep`` bytes, when asked for (a token answer)


def client_context(ca_pem: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_pem))
    context.set_alpn_protocols(["http/1.1"])
    return context


class Connection:
    """One keep-alive connection; requests on it are sequential."""

    def __init__(self, stream: trio.abc.Stream, tcp: trio.SocketStream, host: str) -> None:
        self.stream = stream
        self.tcp = tcp
        self.host = host.encode()
        self.h11 = h11.Connection(h11.CLIENT)
        self.requests = 0
        self.body_bytes = 0  # of every response on this connection, as they arrive
        self.closed = False

    @classmethod
    async def open(
        cls, port: int, context: ssl.SSLContext | None, *, source_address: str | None = None
    ) -> Connection:
        """Connect (and handshake) to the proxy on 127.0.0.1, from ``source_address`` if given."""
        try:
            tcp = await trio.open_tcp_stream("127.0.0.1", port, local_address=source_address)
        except OSError as exc:
            raise RequestFailed("connect failed", repr(exc)) from exc
        stream: trio.abc.Stream = tcp
        if context is not None:
            tls = trio.SSLStream(tcp, context, server_hostname="127.0.0.1", https_compatible=True)
            try:
                await tls.do_handshake()
            except (trio.BrokenResourceError, OSError) as exc:
                await trio.aclose_forcefully(tcp)
                raise RequestFailed("TLS handshake failed", repr(exc)) from exc
            stream = tls
        return cls(stream, tcp, f"127.0.0.1:{port}")

    @property
    def reusable(self) -> bool:
        return not self.closed and self.h11.our_state is h11.IDLE

    async def _send(self, data: bytes | None) -> None:
        if not data:
            return
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.closed = True
            raise RequestFailed("connection error", f"sending: {exc!r}") from exc

    async def _event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                self.closed = True
                raise RequestFailed("protocol error", str(exc)) from exc
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]  # NEED_DATA excluded above
            try:
                data = await self.stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self.closed = True
                raise RequestFailed("connection error", f"receiving: {exc!r}") from exc
            self.h11.receive_data(data)  # type: ignore[arg-type]  # h11 takes any bytes-like

    async def send_request(
        self, method: str, target: str, headers: list[tuple[str, str]] | None = None
    ) -> None:
        """Send a request (no body) and nothing else: the caller may never read the answer."""
        if not self.reusable:
            raise RequestFailed("connection not reusable")
        all_headers = [("host", self.host.decode()), *(headers or [])]
        self.requests += 1
        await self._send(
            self.h11.send(h11.Request(method=method, target=target, headers=all_headers))
        )
        await self._send(self.h11.send(h11.EndOfMessage()))

    async def start(
        self, method: str, target: str, headers: list[tuple[str, str]] | None = None
    ) -> Head:
        """Send a request (no body) and return the response head."""
        await self.send_request(method, target, headers)
        while True:
            event = await self._event()
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                return Head(
                    event.status_code,
                    {
                        bytes(k).decode("latin-1"): bytes(v).decode("latin-1")
                        for k, v in event.headers
                    },
                )
            if isinstance(event, h11.ConnectionClosed):
                self.closed = True
                raise RequestFailed("closed before the response head")
            self.closed = True
            raise RequestFailed("protocol error", f"unexpected {event!r}")

    async def read_body(
        self, *, rate: float | None = None, stop_after: int | None = None, keep: int = 0
    ) -> Body:
        """Read the body to its end, hashing it; at most ``rate`` bytes/s if given; stop (the
        connection then unusable) once ``stop_after`` bytes arrived if given; the first ``keep``
        bytes are kept in :attr:`Body.content`."""
        digest = hashlib.sha256()
        size = 0
        kept = bytearray()
        started = trio.current_time()
        while True:
            event = await self._event()
            if isinstance(event, h11.Data):
                digest.update(event.data)
                size += len(event.data)
                self.body_bytes += len(event.data)
                if len(kept) < keep:
                    kept += event.data[: keep - len(kept)]
                if stop_after is not None and size >= stop_after:
                    self.closed = True
                    return Body(size, digest.hexdigest(), complete=False, content=bytes(kept))
                if rate is not None:
                    ahead = size / rate - (trio.current_time() - started)
                    if ahead > 0:
                        await trio.sleep(ahead)
                continue
            if isinstance(event, h11.EndOfMessage):
                if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                    self.h11.start_next_cycle()
                else:
                    self.closed = True
                return Body(size, digest.hexdigest(), complete=True, content=bytes(kept))
            self.closed = True
            if isinstance(event, h11.ConnectionClosed):
                raise RequestFailed("closed mid-body", f"after {size} bytes")
            raise RequestFailed("protocol error", f"unexpected {event!r}")

    async def get(
        self,
        target: str,
        headers: list[tuple[str, str]] | None = None,
        *,
        rate: float | None = None,
    ) -> tuple[Head, Body]:
        head = await self.start("GET", target, headers)
        return head, await self.read_body(rate=rate)

    async def aclose(self) -> None:
        """Close politely (TLS close_notify), bounded; forcefully if that does not finish."""
        self.closed = True
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        if scope.cancelled_caught:
            await trio.aclose_forcefully(self.stream)

    async def abort(self, *, reset: bool) -> None:
        """Go away without a goodbye: a bare FIN, or (``reset``) an RST via ``SO_LINGER 0``."""
        self.closed = True
        if reset:
            try:
                self.tcp.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            except OSError:
                pass
        await trio.aclose_forcefully(self.tcp)
