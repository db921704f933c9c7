"""The client side: accept TCP or TLS connections and run one h11 server loop per client.

Each accepted connection gets its own task, once admitted (``admission.admit_connection``): at
most ``max_connections`` in all and ``max_connections_per_client`` per address; at the global
limit the connection idle longest (waiting for a request head, none of it read) is closed to
make room, never one with a request under way. A request head is read under a timeout (the first one
after the handshake, then the keep-alive idle one), handed to the proxy as a
:class:`ClientRequest` with a :class:`ClientResponse` to answer through, and the connection is
kept alive only when h11 says both sides are DONE. Failures before response headers are answered
with a registry JSON error; after them the connection is cut (never ended cleanly), so a client
cannot mistake a truncated body for a whole one.
"""

from __future__ import annotations

import contextlib
import functools
import http
import logging
import math
import operator
import os
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeGuard

import h11
import trio

from ..policy.access import client_key
from ..policy.admission import Connection, admit_connection
from ..policy.balance import sheds
from ..policy.errors import (
    ClientGone,
    ClientProtocolError,
    MirrorBusy,
    ProxyError,
    ResponseAborted,
    error_body,
)
from ..policy.headers import Headers, get_header, lax_framing
from ..policy.values import immutable
from .board import ConnectionBoard
from .fairness import Fairness, Serving, serving
from .ktls import ktls_offered
from .pacing import Pacer, PacingFigures
from .settings import ListenerSettings
from .sockettls import SocketTLSStream
from .streams import HEAD_READ, ByteStream, close_forcefully, server_ssl_context
from .tls import TLSStream
from .turns import Turns
from .watch import Stalls, Watch, Watches

log = logging.getLogger("hubproxy")
access_log = logging.getLogger("hubproxy.access")

LINGER_TIME = 1.0  # seconds an errored connection is drained before it is closed
MAX_DISCARD = 64 * 1024  # unread request body we read and drop to keep a connection alive
EPISODE = 600.0  # seconds: a condition of one client address is logged once in this long
MAX_EPISODES = 4096  # addresses remembered for that; beyond it (a flood) the log stays quiet
ACCEPT_BURST = 256  # connections already waiting that one step of the accept loop takes

# The TLS alerts a client sends when it does not accept our certificate (RFC 8446 section 6.2),
# as OpenSSL names them, with what the operator can do about each. A Go client (dockerd,
# containerd) sends bad_certificate for most verification failures, a wrong name included;
# OpenSSL clients (curl, Python) unknown_ca for an unknown issuer, bad_certificate for a wrong
# name, certificate_expired for an expired certificate.
_UNTRUSTED_CA = (
    "give that client the CA that signed {cert} (certs/README.md: how each client trusts it)"
)
_UNTRUSTED = (
    "it does not trust the CA that signed {cert}, or reached this mirror by a name the "
    "certificate does not list: give that client the CA (certs/README.md: how each client "
    "trusts it), or use a name the certificate lists"
)
TRUST_ALERTS = {
    "TLSV1_ALERT_UNKNOWN_CA": ("unknown_ca", _UNTRUSTED_CA),
    "SSLV3_ALERT_BAD_CERTIFICATE": ("bad_certificate", _UNTRUSTED),
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": ("certificate_unknown", _UNTRUSTED),
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": (
        "certificate_expired",
        "it finds {cert} expired or not valid yet: check its dates, and that client's clock",
    ),
}
# a host name or an address as a Host header may carry it, to name in the 400 to plain HTTP
_HOST = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")
# a response head goes before a first body chunk this large as a TLS record of its own, not
# copied in front of it (256 KiB copied per blob answered); before a smaller one, joined
HEAD_APART = 16 * 1024
# response heads remembered as h11 events: 256 at most, each no larger than an upstream's head
# may be; never one that carries a cookie or a location (a signed CDN address is a credential)
RESPONSE_HEADS = 256
_NEVER_REMEMBERED = frozenset({b"set-cookie", b"location"})
_HEADER_NAME = operator.itemgetter(0)
TAP_LIMIT = 256 * 1024  # the most of a response body ``ClientResponse.tap`` copies (a
# manifest naming 512 layers is about 100 KiB)


_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}


@dataclass
class AccessRecord:
    """What the access log line says about one request."""

    client: str
    method: str
    path: str
    status: int = 0
    bytes_sent: int = 0
    upstream: str = "-"
    hops: int = 0
    started: float = field(default_factory=time.monotonic)
    aborted: bool = False  # the response started but was cut: the client has not all of it
    user: str | None = None  # the mirror user the request was authenticated as (--users)
    length: int | None = None  # the body's Content-Length, once the head is decided

    def log(self) -> None:
        """Write the access log line (formatted only if someone reads it)."""
        if access_log.isEnabledFor(logging.INFO):
            access_log.info("%s", self.line())

    def line(self) -> str:
        ms = (time.monotonic() - self.started) * 1000
        # one token either way, so the line still splits on spaces: "200/aborted"
        status = f"{self.status}/aborted" if self.aborted else str(self.status)
        line = (
            f"{self.client} {self.method} {self.path} {status} {self.bytes_sent}B "
            f"{ms:.0f}ms upstream={self.upstream} hops={self.hops}"
        )
        # the name only (a users-file name: no spaces): never a password or a token
        return f"{line} user={self.user}" if self.user else line


class RequestBody:
    """The client's request body as an async iterator of chunks (framed by h11)."""

    def __init__(self, client: ClientConnection, length: int | None, chunked: bool) -> None:
        self._client = client
        self.length = length
        self.chunked = chunked
        self.started = False

    @property
    def present(self) -> bool:
        return self.chunked or bool(self.length)

    async def read(self) -> bytes | None:
        """Return the next chunk of the body, or None at its end."""
        self.started = True
        return await self._client.receive_body_chunk()


@immutable
class ClientRequest:
    """A request as the client sent it. Never changed: what goes upstream is built beside it
    (``flow.Plan``, ``headers.upstream_request_headers``), so every part can see the original."""

    method: str
    target: str
    headers: Headers
    scheme: str  # how the client reached us: "http" or "https"
    client_ip: str
    body: RequestBody

    @property
    def host(self) -> str | None:
        value = get_header(self.headers, b"host")
        return value.decode("latin-1") if value is not None else None


def _small_immutable(chunk: bytes | bytearray | memoryview) -> TypeGuard[bytes | memoryview]:
    """Whether keeping ``chunk`` holds no more than ``TAP_LIMIT`` bytes that cannot change."""
    if isinstance(chunk, bytes):
        return len(chunk) <= TAP_LIMIT
    if isinstance(chunk, memoryview):
        whole = chunk.obj
        return chunk.readonly and isinstance(whole, bytes) and len(whole) <= TAP_LIMIT
    return False


@functools.lru_cache(maxsize=RESPONSE_HEADS)
def _response_head(
    status: int, headers: tuple[tuple[bytes, bytes], ...], reason: bytes
) -> h11.Response:
    # h11 validates every header of an event it is given (two regular expressions each, 8 µs
    # for a cached manifest's five); the event is only read when sent, so the answers of one
    # manifest, cached or passed on in the same second (its Date), share one
    return h11.Response(status_code=status, headers=list(headers), reason=reason)


class ClientResponse:
    """The one way the proxy answers a client: head, body chunks, end; or an error."""

    def __init__(self, client: ClientConnection, record: AccessRecord) -> None:
        self._client = client
        self.record = record
        self.started = False
        self.finished = False  # the whole answer went out: a client leaving now cancels nothing
        # The head waits for the first body bytes (or the end), so that a small response
        # leaves in one write: one syscall and, over TLS, one record instead of three. Until
        # then it is not even framed, so a failure before any byte left can still become a
        # proper error response instead of a cut connection.
        self._pending_head: h11.Response | None = None
        self.on_start: Callable[[], None] | None = None  # called once, when the head is decided
        # called with each count of body bytes as they leave, not at the end: /metrics and the
        # status page follow a long transfer while it runs
        self.on_sent: Callable[[int], None] | None = None
        # when set, the body sent through ``send``, chunk by chunk (a manifest: the pull tracker
        # reads its layers); dropped (None) once it would pass ``TAP_LIMIT``
        self.tap: list[bytes | memoryview] | None = None
        self.tapped = 0  # body bytes sent while ``tap`` was set
        # the request's watch for a departed client, while it may yet start (net.watch)
        self.watch: tuple[Watches, Watch] | None = None

    def unwatch(self) -> None:
        """The rest of this answer comes from work that goes on whether its client stays or
        not (the cache's file, or a fill shared with other clients): no watch is started for
        it. A client that leaves is seen at the next send, and a send it takes nothing of ends
        at the idle timeout; the watch's task, cancel scope and registration of the socket with
        epoll were a cost of every blob that took longer than ``WATCH_AFTER`` to send."""
        if self.watch is not None:
            watches, watch = self.watch
            watches.forget(watch)
            self.watch = None

    @property
    def committed(self) -> bool:
        """Whether the response head has been framed for sending (no error answer possible)."""
        return self.started and self._pending_head is None

    async def start(self, status: int, headers: Headers, reason: bytes = b"") -> None:
        """Decide the response head (sent with the first body bytes, or at ``finish``)."""
        self.started = True
        started, self.on_start = self.on_start, None
        if started is not None:
            started()
        client = self._client
        if client.shed is not None and not client.shedding and client.shed():
            # this worker holds more than its share of the connections (policy.balance): the
            # client reconnects after this answer, and the kernel hashes it anew
            client.shedding = True
            if get_header(headers, b"connection") is None:
                headers = [*headers, (b"connection", b"close")]
        self.record.status = status
        length = get_header(headers, b"content-length")
        self.record.length = int(length) if length is not None and length.isdigit() else None
        if not reason:
            reason = _REASONS.get(status, b"")
        head: h11.Response | None = None
        if _NEVER_REMEMBERED.isdisjoint(map(_HEADER_NAME, headers)):
            try:
                head = _response_head(status, tuple(headers), reason)
            except TypeError:  # not a key (a pair as a list, a bytearray value): made afresh
                pass
        if head is None:
            head = h11.Response(status_code=status, headers=headers, reason=reason)
        self._pending_head = head

    def _take_head(self) -> bytes:
        head, self._pending_head = self._pending_head, None
        return self._client.frame(head) if head is not None else b""

    async def send(self, chunk: bytes | bytearray | memoryview) -> None:
        head = self._take_head()
        client = self._client
        data = client.frame_body(chunk)
        if client.pacer is None:
            if head and len(data) >= HEAD_APART:
                await client.send_bytes(data, head=head)
            else:
                await client.send_bytes(head + data if head else data)
        else:
            await self._send_paced(client.pacer, head, data)
        self.record.bytes_sent += len(chunk)
        if self.on_sent is not None:
            self.on_sent(len(chunk))
        if self.tap is not None:
            self.tapped += len(chunk)
            length = self.record.length
            if self.tapped > TAP_LIMIT or (length is not None and length > TAP_LIMIT):
                self.tap = None
            elif _small_immutable(chunk):
                # kept by reference, so a hundred clients of one cached manifest share its
                # buffer instead of each holding a copy
                self.tap.append(chunk)
            else:
                # the caller may reuse its buffer, or the view pins a larger one (a big
                # manifest a waiting sender would otherwise let go of)
                self.tap.append(bytes(chunk))

    async def _send_paced(
        self, pacer: Pacer, head: bytes, data: bytes | bytearray | memoryview
    ) -> None:
        """Send ``data`` (the head, if any, along with its first piece) in pieces, each when
        the bandwidth caps let it go (net.pacing): a large chunk does not leave in one burst."""
        key = self._client.key
        view = memoryview(data)
        for start in range(0, len(view), pacer.piece):
            piece = view[start : start + pacer.piece]
            await pacer.take(key, len(piece))
            await self._client.send_bytes(head + piece if head else piece)
            head = b""

    async def flush(self) -> None:
        """Send a head still waiting for body bytes (before a body that bypasses h11)."""
        if head := self._take_head():
            await self._client.send_bytes(head)

    async def finish(self) -> None:
        if not self._client.body_bypassed:  # (sendfile: the connection re-syncs h11 itself)
            head = self._take_head()
            # (with a Content-Length the end is no bytes at all: nothing to send, most answers)
            if ending := head + self._client.frame(h11.EndOfMessage()):
                await self._client.send_bytes(ending)
        self.finished = True

    @property
    def can_sendfile(self) -> bool:
        """Whether body bytes can go from a file straight to the socket: plain TCP, or TLS
        whose sending side the kernel encrypts (kTLS)."""
        stream = self._client.stream
        return isinstance(stream, trio.SocketStream) or (
            isinstance(stream, SocketTLSStream) and stream.kernel_encrypts
        )

    async def sendfile(self, fd: int, offset: int, count: int) -> None:
        """Send ``count`` bytes of file ``fd`` from ``offset`` with ``os.sendfile`` (zero copy).

        Only for a ``Content-Length`` body after ``start``; h11 is bypassed for the body and
        replaced by a fresh one for the next request.
        """
        stream = self._client.stream
        assert isinstance(stream, trio.SocketStream | SocketTLSStream)
        sock = stream.socket
        await self.flush()
        self._client.body_bypassed = True
        end = offset + count
        pacer, key = self._client.pacer, self._client.key
        idle = self._client.settings.timeouts.client_idle
        try:
            with trio.fail_after(idle) as scope:
                while offset < end:
                    stop = end
                    if pacer is not None:  # one piece per wait (net.pacing)
                        stop = min(end, offset + pacer.piece)
                        await pacer.take(key, stop - offset)
                        # the time paced is not the client's: the idle timeout starts again
                        scope.deadline = trio.current_time() + idle
                    while offset < stop:
                        try:
                            sent = os.sendfile(sock.fileno(), fd, offset, stop - offset)
                        except BlockingIOError:
                            push_pending(sock)
                            await trio.lowlevel.wait_writable(sock)
                            continue
                        if sent == 0:
                            raise ResponseAborted("the cached file is shorter than recorded")
                        offset += sent
                        self.record.bytes_sent += sent
                        if self.on_sent is not None:
                            self.on_sent(sent)
                        await trio.lowlevel.checkpoint_if_cancelled()
        except (trio.TooSlowError, OSError) as exc:
            raise ClientGone(f"client stopped receiving: {exc!r}") from exc

    async def send_error(self, error: ProxyError, *, close: bool = False) -> None:
        """Answer with a registry JSON error (only possible before the head was committed)."""
        if self.committed:
            raise ResponseAborted(error.message) from error
        self._pending_head = None
        body = error_body(error.code, error.message)
        headers: Headers = [
            (b"content-type", b"application/json; charset=utf-8"),
            (b"content-length", b"%d" % len(body)),
            (b"docker-distribution-api-version", b"registry/2.0"),
            *error.headers,
        ]
        if close:
            headers.append((b"connection", b"close"))
        await self.start(error.status, headers)
        if self._client.method != "HEAD":
            await self.send(body)
        await self.finish()


Handler = Callable[[ClientRequest, ClientResponse], Awaitable[None]]


@dataclass(frozen=True)
class ConnectionFigures:
    """The server's live figures for ``/metrics``."""

    handshake: int = 0  # accepted, TLS handshake not done yet
    idle: int = 0  # waiting for a request head
    active: int = 0  # a request being served
    refused: dict[str, int] = field(default_factory=dict)  # by reason (Connection values)
    reclaimed: int = 0  # idle connections closed to make room for a new one
    turn_waiting: int = 0  # requests waiting for a turn of their address (net.turns)
    turn_waits: int = 0  # requests that ever had to wait for one
    turn_timeouts: int = 0  # ... and got a 503 instead
    fair_share_waits: int = 0  # units of TLS work that waited for the fair share (net.fairness)
    kernel_tls: int = 0  # TLS connections whose sending side the kernel encrypts (--ktls)
    bandwidth: PacingFigures = field(default_factory=PacingFigures)  # the caps (net.pacing)


class ClientConnection:
    """One client connection: an h11 server loop with timeouts."""

    def __init__(
        self,
        stream: ByteStream,
        *,
        settings: ListenerSettings,
        client_ip: str,
        scheme: str,
        pacer: Pacer | None = None,
        shed: Callable[[], bool] | None = None,
    ) -> None:
        self.stream = stream
        self.settings = settings
        self.client_ip = client_ip
        self.key = client_key(client_ip)  # its address as the per-address limits count it
        self.scheme = scheme
        self.pacer = pacer  # the bandwidth caps, when any is set (net.pacing)
        self.conn = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self.settings.limits.max_head_size
        )
        self.method = "GET"
        self.head_size = 0  # bytes of the last request head read (request line and headers)
        # waiting for a request head: the deadline scope of that wait, for a connection served
        # outside a running server (whose tables watch the wait otherwise; see ``serve``)
        self.idle_scope: trio.CancelScope | None = None
        self.must_close = False  # the last exchange broke: the connection cannot go on
        # --workers: whether this worker holds more than its share of the connections, asked
        # as an answer starts; ``shedding``: it did, and this connection closes after it
        self.shed = shed
        self.shedding = False
        self.body_bypassed = False  # the last response body was sent around h11 (sendfile)
        self.linger = False  # an error answer went out: drain the client's input before closing
        # what is done for this connection (served in ``serve``), cancelled once its client is
        # gone: it closed the connection before its answer was complete (net.watch), or took no
        # byte of it for the client idle timeout (``Stalls``)
        self.scope = trio.CancelScope()
        self._stalls: Stalls | None = None  # the server's watch on sends, while it runs
        # the socket under the stream, for the departure watch (None: a stream of another kind)
        self._socket: trio.socket.SocketType | ssl.SSLSocket | None = None
        if isinstance(stream, trio.SocketStream | SocketTLSStream):
            self._socket = stream.socket
        elif isinstance(stream, TLSStream) and isinstance(
            stream.transport_stream, trio.SocketStream
        ):
            self._socket = stream.transport_stream.socket

    async def serve(self, handler: Handler, server: Server) -> None:
        first = True
        watched = server.stalls.running
        self._stalls = server.stalls if watched else None
        try:
            with self.scope:
                while not server.draining:
                    # the wait for the first head and for each next one: an entry in the
                    # server's table of that timeout, which cancels the connection's scope if
                    # it outlives it (a deadline scope each costs 5% of a cached manifest's
                    # instructions); a deadline scope of its own outside a running server
                    timeouts = self.settings.timeouts
                    wait = timeouts.request_head if first else timeouts.keepalive_idle
                    heads = server.heads if first else server.keepalives
                    first = False
                    server.idle[self] = None  # may be closed to make room while it waits
                    try:
                        if watched:
                            request = await self._receive_watched_request(heads)
                        else:
                            request = await self._receive_request(wait)
                    finally:
                        server.idle.pop(self, None)
                    if request is None:
                        return
                    await self._handle(request, handler, server.turns, server.watches)
                    if self.must_close or self.shedding or not await self._discard_unread_body():
                        return
                    if self.body_bypassed:
                        self._fresh_h11()
                    elif self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                        self.conn.start_next_cycle()
                    else:
                        return
        finally:
            if self.linger:
                await self._linger()
            with trio.CancelScope(shield=True):
                await close_forcefully(self.stream)

    async def _linger(self) -> None:
        """After an error answer, stop sending and read what the client still sends for a
        moment: closing with unread input would reset the connection, and the client could
        lose the answer (RFC 9112 section 9.6)."""
        if not isinstance(self.stream, trio.SocketStream):
            return  # TLS: the close_notify in aclose says "no more" well enough
        with trio.move_on_after(LINGER_TIME):
            try:
                await self.stream.send_eof()
                drained = 0
                while drained < MAX_DISCARD and (data := await self.stream.receive_some(HEAD_READ)):
                    drained += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    async def _receive_watched_request(self, heads: Stalls) -> h11.Request | None:
        """Wait for the next request head, watched by ``heads``; None when the client left.
        Idling out (or being closed to make room, or a shutdown) cancels ``self.scope``."""
        heads.begin(self)
        try:
            return await self._next_head()
        finally:
            heads.end(self)

    async def _receive_request(self, wait: float) -> h11.Request | None:
        """Wait for the next request head; None when the client left or idled out."""
        request = None  # idle or stalled client, or shutdown: just close
        with trio.CancelScope() as scope:
            scope.deadline = trio.current_time() + wait
            self.idle_scope = scope
            try:
                request = await self._next_head()
            finally:
                self.idle_scope = None
        return request

    async def _next_head(self) -> h11.Request | None:
        """The next request head; None when the client left or sent a malformed one (which
        is answered)."""
        try:
            event = await self._next_event(strict_head=True)
        except ClientProtocolError as exc:
            await self._reject(exc)
            return None
        except ClientGone:
            return None
        return event if isinstance(event, h11.Request) else None  # or ConnectionClosed

    @property
    def has_partial_request(self) -> bool:
        """Whether bytes of the next request were received already (it is not idle then)."""
        return bool(self.conn.trailing_data[0])

    def close_idle(self) -> None:
        """Close this connection while it waits for a request head (to make room, or at a
        shutdown): it is in the server's ``idle`` table then."""
        if self.idle_scope is not None:
            self.idle_scope.cancel()
        else:
            self.scope.cancel()

    def _fresh_h11(self) -> None:
        """After a body sent around h11, continue with a new parser fed what the old one held
        (a pipelined request, say)."""
        data, closed = self.conn.trailing_data
        self.conn = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self.settings.limits.max_head_size
        )
        self.body_bypassed = False
        if data:
            self.conn.receive_data(data)
        if closed:
            self.conn.receive_data(b"")

    async def _discard_unread_body(self) -> bool:
        """Read what the handler left of the request (at least h11's EndOfMessage, which a GET
        also has) so the connection can serve the next request; False if it must close."""
        discarded = 0
        try:
            while self.conn.their_state is h11.SEND_BODY and discarded <= MAX_DISCARD:
                chunk = await self.receive_body_chunk()
                if chunk is None:
                    break
                discarded += len(chunk)
        except (ClientGone, ClientProtocolError):
            return False
        return self.conn.their_state is h11.DONE

    async def _handle(
        self, event: h11.Request, handler: Handler, turns: Turns, watches: Watches
    ) -> None:
        method = event.method.decode("ascii", "replace")
        target = event.target.decode("ascii", "replace")
        self.method = method
        headers = list(event.headers)
        # h11 bounds only an incomplete head; one that arrived whole is checked here (its size
        # as read: every request head is read by _next_event's strict_head)
        head_size = self.head_size
        limits = self.settings.limits
        too_long = len(event.target) > limits.max_target
        if too_long or head_size > limits.max_head_size or len(headers) > limits.max_headers:
            record = AccessRecord(self.client_ip, method, "-")
            error = (
                ClientProtocolError("request target too long", status=414)
                if too_long
                else ClientProtocolError("request header fields too large", status=431)
            )
            await self._reject(error, ClientResponse(self, record))
            record.log()
            self.must_close = True
            return
        length_header = get_header(headers, b"content-length")
        chunked = get_header(headers, b"transfer-encoding") is not None
        if chunked and length_header is not None:
            # RFC 9112 section 6.1: the classic smuggling shape; h11 would pick chunked and
            # go on, we refuse it outright (and close) rather than guess what was meant
            record = AccessRecord(self.client_ip, method, "-")
            error = ClientProtocolError("both Content-Length and Transfer-Encoding")
            await self._reject(error, ClientResponse(self, record))
            record.log()
            self.must_close = True
            return
        body = RequestBody(self, int(length_header) if length_header else None, chunked)
        request = ClientRequest(method, target, headers, self.scheme, self.client_ip, body)
        path = target.partition("?")[0] if target.startswith("/token/") else target
        record = AccessRecord(self.client_ip, method, path[:300])
        response = ClientResponse(self, record)
        key = client_key(self.client_ip)

        async def in_turn(request: ClientRequest, response: ClientResponse) -> None:
            try:
                await turns.take(key)
            except MirrorBusy as exc:
                await response.send_error(exc)
                return
            held = True

            def give_back() -> None:
                nonlocal held
                if held:
                    held = False
                    turns.give_back(key)

            response.on_start = give_back
            try:
                await handler(request, response)
            finally:
                give_back()

        try:
            if self._body_complete(body):
                await self._serve_watched(in_turn, request, response, watches)
            else:
                await in_turn(request, response)
        except ClientGone:
            record.aborted = record.status != 0
            record.status = record.status or 499
            self.must_close = True
        except ResponseAborted as exc:
            log.warning("aborted response to %s %s: %s", method, record.path, exc)
            record.aborted = True
            self.must_close = True
        except ClientProtocolError as exc:
            await self._reject(exc, response)
        finally:
            if self.scope.cancel_called and not response.finished:
                # its client is gone (it left, or took nothing for the idle timeout): the
                # connection's scope ends what was done for it, and the connection
                record.aborted = record.status != 0
                record.status = record.status or 499
            record.log()

    def _body_complete(self, body: RequestBody) -> bool:
        """Whether the request has no body, its end then taken from h11 (no read needed): the
        connection's receive side is free while it is served."""
        if body.present:
            return False
        try:
            event = self.conn.next_event()
        except h11.RemoteProtocolError:
            return False
        return isinstance(event, h11.EndOfMessage)

    async def _serve_watched(
        self, handler: Handler, request: ClientRequest, response: ClientResponse, watches: Watches
    ) -> None:
        """Run the handler while watching the connection, once the request has run a while
        (net.watch), as nginx and Go's net/http do: a client that closes or resets it before its
        answer is complete cancels the connection's scope, and with it what is done for it (the
        upstream slot or manifest budget it waits for, the exchange it started), rather than
        holding them for nobody. Bytes it sends meanwhile (a pipelined request) go to h11 for the
        next cycle and end the watch. Work shared with other clients (a cache fill) runs in
        tasks of its own and goes on."""
        watch = watches.begin(functools.partial(self._look_for_departure, response), self.scope)
        response.watch = (watches, watch)
        try:
            await handler(request, response)
        finally:
            # (the watch refers to the response through its look: no cycle left for the
            # garbage collector to find, per request)
            response.watch = None
            await watches.end(watch)

    async def _look_for_departure(self, response: ClientResponse) -> bool:
        """Wait until the client sends something (kept for h11's next cycle: False) or closes
        the connection (True, unless it had its whole answer: what is left then is ours)."""
        sock = self._socket
        try:
            if sock is not None:
                # Wait on the socket itself first: cancelling a bare wait costs a fraction of
                # unwinding a receive through the TLS and socket stream layers. (Bytes the TLS
                # layer already holds wait for the next request's read.)
                await trio.lowlevel.wait_readable(sock)
            data = await self.stream.receive_some(HEAD_READ)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            data = b""
        if data:
            self.conn.receive_data(data)  # type: ignore[arg-type]  # any bytes-like
            return False
        return not response.finished

    async def _reject(self, error: ProxyError, response: ClientResponse | None = None) -> None:
        """Answer 400 (or the error's status) and close, if a response can still be sent."""
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        if response is None:
            response = ClientResponse(self, AccessRecord(self.client_ip, "-", "-"))
        try:
            await response.send_error(error, close=True)
            self.linger = True
        except (ClientGone, ResponseAborted, h11.LocalProtocolError):
            pass

    async def receive_body_chunk(self) -> bytes | None:
        """Return the next request body chunk or None at its end (client idle timeout applies)."""
        if self.conn.their_state is h11.DONE:
            return None  # a request without a body, its end already taken (_body_complete)
        if self.conn.they_are_waiting_for_100_continue:
            await self.send_event(h11.InformationalResponse(status_code=100, headers=[]))
        deadline = trio.current_time() + self.settings.timeouts.client_idle
        with trio.CancelScope(deadline=deadline) as scope:
            event = await self._next_event()
        if scope.cancelled_caught:
            raise ClientGone("client sent no body bytes within the idle timeout")
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            return None
        raise ClientGone("client closed the connection mid-body")

    async def _next_event(
        self, *, strict_head: bool = False
    ) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        """The next h11 event; with ``strict_head`` a request head h11 only accepted leniently
        (bare LF, obsolete folding) is refused."""
        while True:
            before = self.conn.trailing_data[0] if strict_head else b""
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise ClientProtocolError(
                    f"malformed request: {exc}", status=exc.error_status_hint
                ) from exc
            if strict_head and isinstance(event, h11.Request):
                head = before[: len(before) - len(self.conn.trailing_data[0])]
                self.head_size = len(head)
                problem = lax_framing(head)
                if problem is not None:
                    raise ClientProtocolError(f"malformed request: {problem}")
            if event is h11.PAUSED:
                return event
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.stream.receive_some(HEAD_READ)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ClientGone(str(exc)) from exc
            self.conn.receive_data(data)  # type: ignore[arg-type]  # h11 takes any bytes-like

    def frame_body(self, chunk: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
        """The bytes h11 frames a body chunk into: with a Content-Length, ``chunk`` itself,
        not joined into a copy (256 KiB per chunk of a hit, read into the reader's buffer)."""
        pieces = self.conn.send_with_data_passthrough(h11.Data(data=chunk))  # type: ignore[arg-type]
        if pieces is not None and len(pieces) == 1:
            return pieces[0]
        return b"".join(pieces or ())

    def frame(self, event: h11.Event) -> bytes:
        """The bytes h11 frames ``event`` into (h11 is the only framing code)."""
        return self.conn.send(event) or b""

    async def send_event(self, event: h11.Event) -> None:
        await self.send_bytes(self.frame(event))

    async def send_bytes(self, data: bytes | bytearray | memoryview, *, head: bytes = b"") -> None:
        """Send framed bytes to the client (``head`` first, if given: a response head before
        a large first chunk), bounded by the client idle timeout."""
        if not data:
            return
        stalls = self._stalls
        if stalls is None:  # a connection served outside a running server (tests, mostly)
            await self._send_with_deadline(data, head)
            return
        # watched by the server (Stalls), which cancels the connection should this send outlive
        # the client idle timeout: a dict entry per response and body chunk, not a deadline scope
        stalls.begin(self)
        try:
            if head:
                await self._send_after(head, data)
            else:
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.conn.send_failed()
            raise ClientGone(f"client stopped receiving: {exc!r}") from exc
        finally:
            stalls.end(self)

    async def _send_after(self, head: bytes, data: bytes | bytearray | memoryview) -> None:
        stream = self.stream
        if isinstance(stream, TLSStream):
            await stream.send_all(data, head=head)  # no copy of ``data`` to put ``head`` before
        else:
            await stream.send_all(head + data)

    async def _send_with_deadline(self, data: bytes | bytearray | memoryview, head: bytes) -> None:
        deadline = trio.current_time() + self.settings.timeouts.client_idle
        try:
            with trio.CancelScope(deadline=deadline) as scope:
                if head:
                    await self._send_after(head, data)
                else:
                    await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.conn.send_failed()
            raise ClientGone(f"client stopped receiving: {exc!r}") from exc
        if scope.cancelled_caught:
            self.conn.send_failed()
            raise ClientGone("client stopped receiving: TooSlowError()")

    def stalled(self) -> None:
        """A send took no byte for the client idle timeout, or no request head came within
        its timeout (``Stalls``): the client is gone."""
        self.scope.cancel()


def push_pending(sock: trio.socket.SocketType | ssl.SSLSocket) -> None:
    """Send what the kernel holds back on ``sock``. ``sendfile`` tells TCP that more is coming
    (MSG_MORE) for every byte it could not take yet, and the kernel keeps the last segment (with
    kTLS, the last whole record) for it; when that filled a small send buffer (Debian 6.1's
    16 KiB to start with) no room ever opens, and the transfer stalls for good (seen in
    tests/ktls-vm.sh: one record out, then nothing). Setting TCP_NODELAY pushes it out."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _starts_plain_http(tcp: trio.SocketStream) -> bool:
    """Whether the client's first byte is an ASCII capital (an HTTP method), which cannot start
    a TLS record (a ClientHello opens with 22, the handshake content type). Peeked, so the
    TLS handshake or the HTTP parser still gets every byte."""
    first = await tcp.socket.recv(1, socket.MSG_PEEK)
    return first.isupper()


def _https_url(host_header: str | None, local: tuple[str, int]) -> str:
    """``https://HOST:PORT``: the name the client used (its Host header, when it is a plain
    name or address) else the address it reached, and the port it connected to."""
    address, port = local
    if host_header is not None and _HOST.fullmatch(host_header):
        if host_header.startswith("["):
            name = host_header[: host_header.index("]") + 1]
        else:
            name = host_header.partition(":")[0]
    else:
        name = f"[{address}]" if ":" in address else address
    return f"https://{name}" if port == 443 else f"https://{name}:{port}"


LISTEN_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn


def bind_shared(host: str, port: int, *, listen: bool) -> list[socket.socket]:
    """Sockets bound to ``host:port`` (every address the name has) with ``SO_REUSEPORT``, so
    that several processes of one user can listen on the same port and the kernel spreads new
    connections over them (--workers). ``listen=False`` only reserves the port: a socket that
    is bound but not listening gets no connections. Raises OSError (gaierror: no such host)."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in found:
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:  # as trio does: [::] is IPv6 only, 0.0.0.0 apart
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            if listen:
                sock.listen(LISTEN_BACKLOG)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Server:
    """Listeners plus the set of live client connections, with a graceful drain at shutdown."""

    def __init__(self, settings: ListenerSettings) -> None:
        self.settings = settings
        self.handler: Handler | None = None  # what serve() was given
        self.ssl_context: ssl.SSLContext | None = None
        # kTLS asked for and offered: TLS to clients on the socket itself, which the kernel can
        # take over (net.sockettls). Otherwise over memory BIOs (net.tls), cheaper without the
        # kernel: OpenSSL writing the socket makes one write() per 16 KiB record.
        self.ktls = settings.ktls and ktls_offered()
        if settings.cert is not None:
            self.ssl_context = server_ssl_context(
                settings.cert, settings.key or settings.cert, ktls=self.ktls
            )
        self.draining = False
        self.connections: set[ClientConnection] = set()
        self._connections_changed = trio.Event()
        self.bound: list[tuple[str, int]] = []
        self._listen_scope = trio.CancelScope()
        self._listeners: list[trio.SocketListener] = []
        self.open_sockets = 0  # accepted and not yet closed, handshakes included
        self.per_client: dict[str, int] = {}  # open sockets by client_key (only those > 0)
        # connections waiting for a request head, the one waiting longest first
        self.idle: dict[ClientConnection, None] = {}
        self.refused: dict[str, int] = {}  # connections refused, by reason
        self.reclaimed = 0  # idle connections closed to make room
        self.kernel_tls = 0  # handshakes after which the kernel encrypts (--ktls)
        self.turns = Turns(settings.max_pending_per_client, settings.timeouts.pool_wait)
        # --workers: every worker's count of client connections (net.board), None alone
        self.board: ConnectionBoard | None = None
        self._last_shed = -math.inf  # when a connection was last told to close for it
        self.fairness = Fairness()  # the CPU shared between addresses (net.fairness)
        self.watches = Watches()  # for clients that leave before their answer (net.watch)
        self.stalls = Stalls(settings.timeouts.client_idle)  # ... and those that stop reading
        # connections waiting for their first request head, and for a next one
        self.heads = Stalls(settings.timeouts.request_head)
        self.keepalives = Stalls(settings.timeouts.keepalive_idle)
        # --client-bandwidth, --total-bandwidth; None: no cap, and no cost in the send path
        self.pacer = Pacer(settings.bandwidth) if settings.bandwidth.on else None
        self._last_refusal_warning: dict[Connection, float] = {}
        # when each client address was last logged about (see EPISODE), by condition
        self._untrusting: dict[str, float] = {}
        self._plain_http: dict[str, float] = {}

    async def bind(self) -> None:
        """Open the listening sockets (raises OSError, e.g. port in use)."""
        host = self.settings.listen_host
        if self.settings.reuse_port:
            sockets = bind_shared(host, self.settings.listen_port, listen=True)
            self._listeners = [
                trio.SocketListener(trio.socket.from_stdlib_socket(sock)) for sock in sockets
            ]
        else:
            self._listeners = await trio.open_tcp_listeners(self.settings.listen_port, host=host)
        self.bound = [listener.socket.getsockname()[:2] for listener in self._listeners]

    async def serve(
        self,
        handler: Handler,
        *,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept clients and answer each request with ``handler`` until shut down."""
        self.handler = handler
        if not self._listeners:
            await self.bind()
        listeners = self._listeners
        trio.lowlevel.add_instrument(self.fairness)
        try:
            async with trio.open_nursery() as beside:
                beside.start_soon(self.fairness.keep_batches_coming)
                beside.start_soon(self.watches.run)
                beside.start_soon(self.stalls.run)
                beside.start_soon(self.heads.run)
                beside.start_soon(self.keepalives.run)
                if self.pacer is not None:
                    beside.start_soon(self.pacer.dispatch)
                async with trio.open_nursery() as connections:
                    with self._listen_scope:
                        async with trio.open_nursery() as accepting:
                            for listener in listeners:
                                accepting.start_soon(self._accept_loop, listener, connections)
                            task_status.started(self.bound)
                    # listeners closed (shutdown): in-flight transfers get the grace period
                    await self._drain(connections)
                beside.cancel_scope.cancel()
        finally:
            self.fairness.stop_metering()
            trio.lowlevel.remove_instrument(self.fairness)

    async def _drain(self, connections: trio.Nursery) -> None:
        for client in list(self.idle):  # those waiting for a request head close now
            client.close_idle()
        connections.cancel_scope.deadline = (
            trio.current_time() + self.settings.timeouts.shutdown_grace
        )

    def reload_certificate(self) -> None:
        """Load --cert/--key again (SIGHUP): new handshakes use the new files, connections
        already open keep the context they were made with. Raises CertificateError (in words)
        and keeps the old certificate if the files cannot be loaded."""
        if self.settings.cert is None:
            return
        self.ssl_context = server_ssl_context(
            self.settings.cert, self.settings.key or self.settings.cert, ktls=self.ktls
        )

    def shutdown(self) -> None:
        """Stop accepting; idle keep-alive connections close; in-flight ones may finish."""
        self.draining = True
        self._listen_scope.cancel()

    async def _accept_loop(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        # the listening socket again, as a plain socket: every connection already waiting is
        # taken in the step that took the first (trio's accept yields after each one, and a
        # client arriving behind a burst of a hundred would wait a hundred scheduler rounds to
        # be accepted, before the fair share could put its handshake first)
        waiting = socket.socket(fileno=os.dup(listener.socket.fileno()))
        waiting.setblocking(False)
        async with listener:
            try:
                while True:
                    try:
                        stream = await listener.accept()
                    except OSError as exc:  # EMFILE and friends: wait a little, not spin
                        log.error("accept failed: %s (is the file descriptor limit too low?)", exc)
                        await trio.sleep(0.1)
                        continue
                    self._take(stream, connections)
                    for _ in range(ACCEPT_BURST):
                        try:
                            sock, _address = waiting.accept()
                        except OSError:  # none waiting (BlockingIOError), or EMFILE: next step
                            break
                        self._take(
                            trio.SocketStream(trio.socket.from_stdlib_socket(sock)), connections
                        )
            finally:
                waiting.close()

    def _take(self, stream: trio.SocketStream, connections: trio.Nursery) -> None:
        """Admit an accepted connection (a task serves it), or refuse it."""
        try:
            client_ip = str(stream.socket.getpeername()[0])
        except OSError:  # gone already
            connections.start_soon(close_forcefully, stream)
            return
        key = client_key(client_ip)
        verdict = self._admit(key)
        if verdict in (Connection.REFUSE_FULL, Connection.REFUSE_CLIENT):
            self.refused[verdict.value] = self.refused.get(verdict.value, 0) + 1
            connections.start_soon(self._refuse, stream, verdict, client_ip)
            return
        self.open_sockets += 1
        if self.board is not None:
            self.board.publish(self.open_sockets)
        self.per_client[key] = self.per_client.get(key, 0) + 1
        self.fairness.connected(key)
        connections.start_soon(self._serve_client, stream, client_ip, key)

    def _admit(self, key: str) -> Connection:
        """The admission verdict for a new connection from ``key``; a RECLAIM is carried out
        here (the idle connection closes at its next checkpoint, before the new one is read)."""
        settings = self.settings
        verdict = admit_connection(
            open_total=self.open_sockets,
            open_from_client=self.per_client.get(key, 0),
            max_total=settings.max_connections,
            max_per_client=settings.max_connections_per_client,
            idle=len(self.idle),
        )
        if verdict is not Connection.RECLAIM:
            return verdict
        victim = next((c for c in self.idle if not c.has_partial_request), None)
        if victim is None:
            return Connection.REFUSE_FULL
        del self.idle[victim]
        victim.close_idle()
        self.reclaimed += 1
        return verdict

    def figures(self) -> ConnectionFigures:
        """Connections by state, refusals by reason, reclaimed idle connections, and requests
        waiting for a turn of their address."""
        idle = len(self.idle)
        return ConnectionFigures(
            handshake=self.open_sockets - len(self.connections),
            idle=idle,
            active=len(self.connections) - idle,
            refused=dict(self.refused),
            reclaimed=self.reclaimed,
            turn_waiting=self.turns.waiting(),
            fair_share_waits=self.fairness.waits,
            turn_waits=self.turns.waits,
            turn_timeouts=self.turns.wait_timeouts,
            kernel_tls=self.kernel_tls,
            bandwidth=self.pacer.figures() if self.pacer is not None else PacingFigures(),
        )

    async def _refuse(self, tcp: trio.SocketStream, verdict: Connection, client_ip: str) -> None:
        """Over --max-connections(-per-client): a plain client gets a 503, a TLS one a closed
        socket (a handshake just to refuse would cost what the limit protects)."""
        now = trio.current_time()
        if now - self._last_refusal_warning.get(verdict, -1e9) >= 60:
            self._last_refusal_warning[verdict] = now
            if verdict is Connection.REFUSE_CLIENT:
                log.warning(
                    "refusing connections from %s: it holds %d, the "
                    "--max-connections-per-client limit",
                    client_ip,
                    self.per_client.get(client_key(client_ip), 0),
                )
            else:
                log.warning(
                    "refusing connections: %d open, none idle, the --max-connections limit",
                    self.open_sockets,
                )
        if self.ssl_context is None:
            message = (
                "too many connections from your address; close idle ones or retry later"
                if verdict is Connection.REFUSE_CLIENT
                else "too many connections to this mirror; retry later"
            )
            body = error_body("UNAVAILABLE", message)
            head = (
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                b"retry-after: 1\r\nconnection: close\r\ncontent-length: %d\r\n\r\n" % len(body)
            )
            with trio.move_on_after(1), contextlib.suppress(trio.BrokenResourceError, OSError):
                await tcp.send_all(head + body)
        await close_forcefully(tcp)

    async def _serve_client(self, tcp: trio.SocketStream, client_ip: str, key: str) -> None:
        # every unit of TLS work for this client, here and in the tasks started from here,
        # takes its turn in the fair share of the CPU (net.fairness)
        serving.set(Serving(self.fairness, key))
        try:
            await self._handshake_and_serve(tcp, client_ip)
        except Exception:  # a bug must cost one connection, never the process
            log.exception("internal error on a client connection; it was closed")
            await close_forcefully(tcp)
        finally:
            self.fairness.disconnected(key)
            self.open_sockets -= 1
            if self.board is not None:
                self.board.publish(self.open_sockets)
            left = self.per_client[key] - 1
            if left:
                self.per_client[key] = left
            else:
                del self.per_client[key]
            self._connections_changed.set()  # a slot is free (tests wait for it)
            self._connections_changed = trio.Event()

    async def _handshake_and_serve(self, tcp: trio.SocketStream, client_ip: str) -> None:
        stream: ByteStream = tcp
        scheme = "http"
        handler = self.handler
        assert handler is not None  # serve() set it before accepting
        if self.ssl_context is not None:
            scheme = "https"
            try:
                with trio.fail_after(self.settings.timeouts.handshake):
                    if await _starts_plain_http(tcp):
                        # answered in plain HTTP, or the client would only see a closed socket
                        scheme = "http"
                        local = tcp.socket.getsockname()
                        handler = functools.partial(self._answer_plain_http, local[:2])
                    else:
                        wrap = SocketTLSStream.wrap_server if self.ktls else TLSStream.wrap_server
                        stream = await wrap(tcp, self.ssl_context)
                        if isinstance(stream, SocketTLSStream) and stream.kernel_encrypts:
                            self.kernel_tls += 1
            except (trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
                self._handshake_failed(client_ip, exc)
                await close_forcefully(tcp)
                return
        client = ClientConnection(
            stream,
            settings=self.settings,
            client_ip=client_ip,
            scheme=scheme,
            pacer=self.pacer,
            shed=self._shed if self.board is not None else None,
        )
        self._track(client, add=True)
        try:
            await client.serve(handler, self)
        finally:
            self._track(client, add=False)

    def _shed(self) -> bool:
        """Whether a connection should close after the answer that starts now, this worker
        holding more than its share of the workers' connections (policy.balance)."""
        assert self.board is not None  # only asked with a board
        now = trio.current_time()
        if not sheds(self.open_sockets, self.board.counts(), now - self._last_shed):
            return False
        self._last_shed = now
        return True

    def _handshake_failed(self, client_ip: str, exc: Exception) -> None:
        """A client that refused our certificate is the operator's business: one warning per
        address and episode, saying what to do. Other failures (a scanner, a client that gave
        up or speaks an old TLS) are the client's: a debug line in plain words."""
        cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
        reason = cause.reason if isinstance(cause, ssl.SSLError) else None
        if reason in TRUST_ALERTS:
            if self._first_in_episode(self._untrusting, client_ip):
                alert, advice = TRUST_ALERTS[reason]
                log.warning(
                    "TLS: %s refused this mirror's certificate (alert %s): %s",
                    client_ip,
                    alert,
                    advice.format(cert=self.settings.cert),
                )
            return
        if isinstance(exc, trio.TooSlowError):
            why = f"not done within {self.settings.timeouts.handshake:g}s (--handshake-timeout)"
        elif cause is None or isinstance(cause, ssl.SSLEOFError) or "EOF" in (reason or ""):
            why = "the client closed the connection"
        elif reason:
            why = reason.lower().replace("_", " ")
        else:
            why = str(getattr(cause, "strerror", None) or cause)
        log.debug("TLS handshake with %s failed: %s", client_ip, why)

    def _first_in_episode(self, last_logged: dict[str, float], client_ip: str) -> bool:
        """Whether a condition of ``client_ip``'s address is to be logged now (once per
        EPISODE; the table is bounded, and a flood of addresses goes unlogged)."""
        key = client_key(client_ip)
        now = trio.current_time()
        last = last_logged.get(key)
        if last is not None and now - last < EPISODE:
            return False
        if last is None and len(last_logged) >= MAX_EPISODES:
            for stale in [k for k, t in last_logged.items() if now - t >= EPISODE]:
                del last_logged[stale]
            if len(last_logged) >= MAX_EPISODES:
                return False
        last_logged[key] = now
        return True

    async def _answer_plain_http(
        self, local: tuple[str, int], request: ClientRequest, response: ClientResponse
    ) -> None:
        """The handler for plain HTTP sent to the TLS port (``local``: the address it reached):
        a 400 naming the https:// URL to use instead."""
        url = _https_url(request.host, local)
        if self._first_in_episode(self._plain_http, request.client_ip):
            log.warning(
                "%s sent plain HTTP to this TLS port; it was told to use %s (is it set up with "
                "http:// for this mirror?)",
                request.client_ip,
                url,
            )
        error = ClientProtocolError(f"this port speaks TLS: use {url}")
        await response.send_error(error, close=True)

    def _track(self, client: ClientConnection, *, add: bool) -> None:
        if add:
            self.connections.add(client)
        else:
            self.connections.discard(client)
        self._connections_changed.set()
        self._connections_changed = trio.Event()

    async def wait_connections_changed(self) -> None:
        """Wait until a client connection opens or closes."""
        await self._connections_changed.wait()
