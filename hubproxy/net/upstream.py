"""One HTTP/1.1 exchange with an upstream over a :class:`ByteStream`, framed by h11.

h11 frames the request and the response head. A ``Content-Length`` response body is then read
around h11: we take whatever h11 had already buffered (``trailing_data``) and read the rest
straight from the stream, counting bytes ourselves. Feeding every body chunk through h11 costs a
copy in and a copy out per chunk (measured at up to 1 CPU-second per GiB); chunked and
close-delimited bodies still go through h11, which owns their framing. A fresh ``h11.Connection``
is made per exchange, so a bypassed body leaves no stale parser state behind; the connection is
only reusable when both sides finished cleanly (httpcore's rule).

Every send and receive must end within the upstream idle timeout. On a socket, with the pool's
:class:`~hubproxy.net.watch.Stalls` running, each is an entry in that table, and one that
outlives the timeout has its connection aborted (the blocked call gets ClosedResourceError, read
as UpstreamTimeout); otherwise each runs inside a deadline scope of its own. A deadline scope per
message head and per body chunk is 5% of a passed 1 KiB manifest's instructions (callgrind, 10
connections: 2,921-2,957 thousand a request with them, 2,748-2,780 with none).
"""

from __future__ import annotations

import enum
import functools
import operator
import ssl
from collections.abc import Sequence
from typing import Protocol

import h11
import trio

from ..policy.errors import UpstreamTimeout, UpstreamUnavailable
from ..policy.headers import Headers, connection_tokens, get_header
from ..policy.urls import Origin
from .buffers import BODIES, SMALLEST
from .streams import HEAD_READ, ByteStream, abort, abortable
from .watch import Stalls

NO_BODY_STATUSES = frozenset({204, 304})
# upstream request heads without credentials or a query (a CDN's signed address is one),
# remembered as h11 events: 256 at most, each no larger than a client's request head may be
REQUEST_HEADS = 256
_CREDENTIALS = frozenset({b"authorization", b"proxy-authorization", b"cookie"})
_NAME = operator.itemgetter(0)


class BodySource(Protocol):
    async def read(self) -> bytes | None: ...


class BodyMode(enum.Enum):
    NONE = "none"
    LENGTH = "length"  # Content-Length: bytes read around h11
    H11 = "h11"  # chunked or close-delimited: h11 frames it


@functools.lru_cache(maxsize=REQUEST_HEADS)
def _request_head(
    method: str, target: str, headers: tuple[tuple[bytes, bytes], ...]
) -> h11.Request:
    # h11 validates every header of an event it is given (two regular expressions each, about
    # 10 µs for a passed request's); the event is only read when sent, so the same request
    # (a popular tag's manifest, asked by one client after another) makes it once
    return h11.Request(method=method, target=target, headers=list(headers))


class UpstreamConnection:
    """A connection to one origin that carries one exchange at a time."""

    def __init__(
        self,
        origin: Origin,
        stream: ByteStream,
        *,
        idle_timeout: float,
        stalls: Stalls | None = None,
    ) -> None:
        self.origin = origin
        self.stream = stream
        self.idle_timeout = idle_timeout
        # the table that watches this connection's sends and receives (the module docstring),
        # when ``stalls`` is given and the stream can be aborted from the table's task
        self._stalls = stalls if stalls is not None and abortable(stream) else None
        self._stalled = False  # a send or receive outlived the idle timeout: aborted
        self.exchanges = 0  # completed exchanges: > 0 means this connection came from the pool
        self.idle_since = 0.0
        self._h11 = h11.Connection(h11.CLIENT)
        self._mode = BodyMode.NONE
        self._remaining = 0
        self._pending = b""  # body bytes h11 had buffered when we took over the body
        self._reusable = False
        self._finished = False
        self.received_any = False  # any response byte arrived (a retry is no longer safe)
        self.head_headers: Headers = []  # the last response head's headers, as a list

    @property
    def reusable(self) -> bool:
        """True once the response was read to its end and both sides may go on."""
        return self._finished and self._reusable and not self._stalled

    def stalled(self) -> None:
        """A send or receive took no byte for the idle timeout (``Stalls``): abort the
        connection, so the call waiting on it ends (as UpstreamTimeout)."""
        self._stalled = True
        abort(self.stream)

    async def send_request(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[bytes, bytes]],
        body: BodySource | None = None,
    ) -> None:
        """Send the request head and (streaming, one chunk in flight) its body."""
        self._h11 = h11.Connection(h11.CLIENT)
        self._finished = False
        self.received_any = False
        try:
            request: h11.Request | None = None
            if "?" not in target and _CREDENTIALS.isdisjoint(map(_NAME, headers)):
                try:
                    request = _request_head(method, target, tuple(headers))
                except TypeError:  # not a key (a pair as a list, a bytearray value)
                    pass
            # (a credential, or a signed CDN address, is never kept beyond its request)
            if request is None:
                request = h11.Request(method=method, target=target, headers=list(headers))
        except h11.LocalProtocolError as exc:
            raise UpstreamUnavailable(f"cannot build the upstream request: {exc}") from exc
        await self._send(self._h11.send(request))
        if body is not None:
            while (chunk := await body.read()) is not None:
                if chunk:
                    await self._send(self._h11.send(h11.Data(data=chunk)))
        await self._send(self._h11.send(h11.EndOfMessage()))

    async def receive_head(self, method: str) -> h11.Response:
        """Wait for the final response head (1xx skipped), bounded by the idle timeout."""
        while True:
            event = await self._next_event()
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                # h11's header view iterates in Python, item by item: read it once here
                self.head_headers = list(event.headers)
                self._start_body(method, event)
                return event
            raise UpstreamUnavailable(f"{self.origin} closed the connection without a response")

    def _start_body(self, method: str, response: h11.Response) -> None:
        headers = self.head_headers
        closes = b"close" in connection_tokens(headers) or (response.http_version != b"1.1")
        self._reusable = not closes
        length = get_header(headers, b"content-length")
        if method == "HEAD" or response.status_code in NO_BODY_STATUSES:
            self._mode = BodyMode.H11
            return
        if length is not None and get_header(headers, b"transfer-encoding") is None:
            self._mode = BodyMode.LENGTH
            self._remaining = int(length)  # h11 already validated it
            buffered, _closed = self._h11.trailing_data
            self._pending = buffered[: self._remaining]
            if len(buffered) > self._remaining:
                self._reusable = False  # bytes beyond the body: never reuse this connection
            if self._remaining <= SMALLEST:
                return  # (a small body, a manifest or a token, never holds a chunk of the budget)
        else:
            self._mode = BodyMode.H11
        BODIES.begin(self)  # until the body's end (or this connection is dropped)

    async def receive_body(self) -> bytes | bytearray | None:
        """Return the next body chunk, or None at the end of the body.

        A body that ends early, a broken stream or an idle timeout raise UpstreamUnavailable
        (UpstreamTimeout): the caller must then abort whatever it was sending.
        """
        if self._finished:
            return None
        if self._mode is BodyMode.LENGTH:
            return await self._receive_length_body()
        event = await self._next_event()
        if isinstance(event, h11.Data):
            return event.data
        if isinstance(event, h11.EndOfMessage):
            self._finished = True
            BODIES.end(self)
            self._reusable = (
                self._reusable
                and self._h11.our_state is h11.DONE
                and (self._h11.their_state is h11.DONE)
            )
            return None
        raise UpstreamUnavailable(f"{self.origin} closed the connection mid-body")

    async def discard_body(self, limit: int) -> None:
        """Read and drop a small unwanted body (a redirect's) so the connection can be reused;
        past ``limit`` bytes it is not worth it, and the unfinished connection gets closed."""
        received = 0
        try:
            while (chunk := await self.receive_body()) is not None:
                received += len(chunk)
                if received > limit:
                    return
        except UpstreamUnavailable:
            return

    async def _receive_length_body(self) -> bytes | bytearray | None:
        if self._pending:
            chunk, self._pending = self._pending, b""
            self._remaining -= len(chunk)
            return chunk
        if self._remaining == 0:
            self._finished = True
            BODIES.end(self)
            return None
        data = await self._receive(min(BODIES.chunk(), self._remaining))
        if not data:
            raise UpstreamUnavailable(
                f"{self.origin} closed the connection with {self._remaining} body bytes missing"
            )
        self._remaining -= len(data)
        return data

    async def _next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamUnavailable(
                    f"{self.origin} sent a malformed response: {exc}"
                ) from exc
            if event is not h11.NEED_DATA:
                return event
            data = await self._receive(HEAD_READ)
            self._h11.receive_data(bytes(data) if isinstance(data, bytearray) else data)

    async def _receive(self, max_bytes: int) -> bytes | bytearray:
        stalls = self._stalls
        if stalls is None or not stalls.running:
            return await self._receive_with_deadline(max_bytes)
        stalls.begin(self)
        try:
            data = await self.stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            if self._stalled:
                raise self._silent() from exc
            raise UpstreamUnavailable(f"connection to {self.origin} broke: {exc}") from exc
        finally:
            stalls.end(self)
        if data:
            self.received_any = True
        return data

    async def _receive_with_deadline(self, max_bytes: int) -> bytes | bytearray:
        # a bare cancel scope, not trio.fail_after: this runs for every chunk, and fail_after's
        # two generator-based context managers cost more than the scope itself
        data: bytes | bytearray = b""
        try:
            with trio.CancelScope(deadline=trio.current_time() + self.idle_timeout) as scope:
                data = await self.stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise UpstreamUnavailable(f"connection to {self.origin} broke: {exc}") from exc
        if scope.cancelled_caught:
            raise self._silent()
        if data:
            self.received_any = True
        return data

    def _silent(self) -> UpstreamTimeout:
        return UpstreamTimeout(f"{self.origin} sent nothing for {self.idle_timeout:g}s")

    async def _send(self, data: bytes | None) -> None:
        if not data:
            return
        stalls = self._stalls
        if stalls is None or not stalls.running:
            await self._send_with_deadline(data)
            return
        stalls.begin(self)
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError) as exc:
            self._h11.send_failed()
            if self._stalled:
                raise self._refused() from exc
            raise UpstreamUnavailable(f"connection to {self.origin} broke: {exc}") from exc
        finally:
            stalls.end(self)

    async def _send_with_deadline(self, data: bytes) -> None:
        try:
            with trio.CancelScope(deadline=trio.current_time() + self.idle_timeout) as scope:
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError) as exc:
            self._h11.send_failed()
            raise UpstreamUnavailable(f"connection to {self.origin} broke: {exc}") from exc
        if scope.cancelled_caught:
            self._h11.send_failed()
            raise self._refused()

    def _refused(self) -> UpstreamTimeout:
        return UpstreamTimeout(f"{self.origin} accepted nothing for {self.idle_timeout:g}s")
