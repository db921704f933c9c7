"""Bulk-friendly TLS over a trio byte stream, driven through ``ssl.MemoryBIO``.

Theory of operation
===================

``trio.SSLStream.receive_some`` hands back at most one TLS record (<= 16 KiB)
per call, so a proxy moving multi-GB blobs pays one socket syscall plus one
scheduler round trip per 16 KiB.  :class:`TLSStream` drives an
``ssl.SSLObject`` over a pair of memory BIOs itself and batches:

* **receive**: read up to 256 KiB of ciphertext per transport read, feed it to
  the incoming BIO, then decrypt *every* complete record available (up to
  ``max_bytes``) and return it as one ``bytes``.  Plaintext that does not fit
  stays where it already is -- the rest of a record inside the SSLObject, later
  records as ciphertext in the incoming BIO -- so nothing is dropped, nothing
  is copied twice, and the transport is only read again once the SSLObject has
  nothing left.  Buffering is therefore bounded by one transport read plus one
  record.
* **send**: encrypt up to 256 KiB of plaintext at a time and hand the whole
  ciphertext to the transport in one ``send_all``.
* Over a ``trio.SocketStream`` (every real connection) the socket itself is
  written and read (``os.write``/``os.read`` on its non-blocking descriptor)
  with the checkpoints ``SocketStream`` makes: a cancellation point before, a
  schedule point after a call that did not have to wait. Its layers of context
  managers and wrappers cost about 5% of the instructions of a small request
  (measured with callgrind on a cached 1 KiB manifest).

Full duplex
-----------
One task may receive while another sends.  trio is cooperative, so every call
into the SSLObject (synchronous, between awaits) is atomic; what needs care is
the *outgoing* BIO, which both directions write to (reads can produce TLS 1.3
KeyUpdate replies, renegotiation messages, ...):

* Ciphertext leaves the outgoing BIO only while ``_send_lock`` is held, and the
  holder drains the BIO until it is empty before releasing.  Draining is FIFO,
  so records hit the wire in exactly the order the SSLObject produced them.
* ``send_all`` holds the lock across encrypt + drain, so application data is
  only ever pushed by the task that owns it.  (If the receiving task could end
  up pushing megabytes of someone else's data it would stop reading, and two
  full-duplex peers would deadlock.)
* After decrypting, the receiving task flushes the protocol bytes it produced:
  if the lock is free it drains them itself, without waiting; if the lock is
  held, the holder is (or is about to be) draining and picks them up.  So the
  receiver never waits for the lock -- waiting could be cancelled after data
  had already been decrypted, which would lose it.

Server-side TLS 1.3 session tickets are held back until the first real send,
as trio does: a client that never reads must not get unread data (and thus a
TCP RST) from us.  They are prepended to the next drain, never dropped, since
later records' sequence numbers depend on them.

EOF and errors
--------------
A ``close_notify`` and a TCP EOF without one ("ragged EOF", as trio's
``https_compatible=True``) both read as ``b""``; HTTP framing catches
truncation.  Every SSL or socket failure surfaces as
``trio.BrokenResourceError`` (with the original exception as ``__cause__``), use
after :meth:`TLSStream.aclose` as ``trio.ClosedResourceError``.  TLS <= 1.2
renegotiation that stalls a *write* is not supported (it breaks the stream);
nobody we talk to renegotiates.
"""

from __future__ import annotations

import operator
import os
import ssl
from collections.abc import Callable
from types import TracebackType
from typing import Generic, TypeVar

import trio

from ..policy.fairshare import HANDSHAKE_COST, RECORD_COST, TEARDOWN_COST
from .fairness import gate

__all__ = [
    "CLOSE_NOTIFY_TIMEOUT",
    "RECEIVE_SIZE",
    "SEND_CHUNK",
    "ConflictDetector",
    "TLSStream",
    "TLSStreamState",
    "is_eof",
    "receive_limit",
]

#: Ciphertext read from the transport per syscall, and default ``max_bytes``.
RECEIVE_SIZE = 256 * 1024
#: Plaintext encrypted per transport ``send_all``; bounds the outgoing BIO.
SEND_CHUNK = 256 * 1024
#: Seconds ``aclose`` may spend getting ``close_notify`` (or a handshake alert)
#: out before it gives up and just closes the socket.
CLOSE_NOTIFY_TIMEOUT = 1.0

# Max plaintext per TLS record.  SSL_read returns at most one record per call,
# so asking for more would only make CPython allocate and then shrink a bigger
# bytes object each time.
_RECORD_SIZE = 16 * 1024
_RECORD_OVERHEAD = 1024  # a few records' headers and tags on top of the plaintext asked for

T_Stream = TypeVar("T_Stream", bound=trio.abc.Stream)


def is_eof(exc: BaseException) -> bool:
    # Some OpenSSL/Python combinations report a ragged EOF as a plain SSLError
    # carrying this reason instead of SSLEOFError (trio checks the same way).
    return isinstance(exc, ssl.SSLEOFError) or "UNEXPECTED_EOF_WHILE_READING" in str(exc)


class ConflictDetector:
    """Raise BusyResourceError if two tasks use the same direction at once.

    Same idea as trio's private ``trio._util.ConflictDetector``; a plain flag is
    enough because entering and leaving happen synchronously.
    """

    def __init__(self, msg: str) -> None:
        self._msg = msg
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(self._msg)
        self._held = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._held = False


def receive_limit(max_bytes: int | None) -> int:
    """``receive_some``'s ``max_bytes``, checked: the default when None, ValueError below 1."""
    if max_bytes is None:
        return RECEIVE_SIZE
    max_bytes = operator.index(max_bytes)
    if max_bytes < 1:
        raise ValueError("max_bytes must be >= 1")
    return max_bytes


class _SendLock:
    """``_send_lock`` (see the module doc): ``trio.Lock``'s exclusion and its hand-over to the
    first waiter, without its record of the owning task (every acquire and release here is
    this module's own, paired in ``try``/``finally``). The lock is taken for every send, and
    trio.Lock asks for the current task on both sides of it."""

    __slots__ = ("_held", "_lot")

    def __init__(self) -> None:
        self._held = False
        self._lot = trio.lowlevel.ParkingLot()

    def locked(self) -> bool:
        return self._held

    def acquire_nowait(self) -> None:
        if self._held:
            raise trio.WouldBlock
        self._held = True

    async def acquire(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._held:
            await self._lot.park()  # woken holding it: release hands it over
            return
        self._held = True
        await trio.lowlevel.cancel_shielded_checkpoint()

    def release(self) -> None:
        if self._lot:
            self._lot.unpark()  # the first waiter now holds it
        else:
            self._held = False


class TLSStreamState:
    """What both of hubproxy's TLS streams keep and do alike: whether the stream was closed by
    this side (``ClosedResourceError``), broken, with the error that broke it if one did
    (``BrokenResourceError``), or at its end; and how plaintext is taken from OpenSSL."""

    def __init__(self) -> None:
        self._closed = False
        self._broken = False
        self._broken_cause: BaseException | None = None
        self._eof = False  # plaintext EOF was returned; stays EOF

    def _read_plaintext(
        self,
        read: Callable[[int], bytes],
        max_bytes: int,
        *,
        ended: bool = False,
        incoming: ssl.MemoryBIO | None = None,
        decrypted: Callable[[], int] | None = None,
    ) -> bytes | None:
        """Up to ``max_bytes`` of what OpenSSL can decrypt now, from ``read``
        (``SSLObject.read``, ``SSLSocket.recv``: one record at most per call); ``b""`` at the
        end (a ``close_notify``, or a ragged EOF as with trio's ``https_compatible``); None
        when more ciphertext must arrive first. ``ended``: the transport already said EOF, so
        a request for more means the end too (defensive: OpenSSL should say EOF itself).

        ``incoming`` and ``decrypted`` (the memory BIO and ``SSLObject.pending``): with
        neither holding a byte, ``read`` is not called, since OpenSSL would only say
        ``SSLWantReadError``, and raising and catching that costs 2.5 µs, twice per small
        request (its message is formatted each time). Nothing is held back that way: without
        read-ahead, which Python never turns on, OpenSSL takes from the BIO only the record
        it is reading, so a whole record is in the BIO, or its plaintext in ``pending``."""
        if self._eof:
            return b""
        chunks: list[bytes] = []
        remaining = max_bytes
        try:
            while remaining:
                if incoming is not None and not ended and not incoming.pending:
                    if decrypted is None or not decrypted():
                        break  # nothing to decrypt: as SSLWantReadError below, not ended
                chunk = read(min(remaining, _RECORD_SIZE))
                if not chunk:  # close_notify, or a TCP EOF without one (SSLSocket)
                    self._eof = True
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
        except ssl.SSLWantReadError:
            if ended and not chunks:
                self._eof = True
        except ssl.SSLZeroReturnError:  # close_notify after we sent ours
            self._eof = True
        except OSError as exc:  # ssl.SSLError is one; a reset of the socket OpenSSL reads
            if isinstance(exc, ssl.SSLError) and is_eof(exc):
                self._eof = True
            else:
                self._broken = True
                self._broken_cause = exc
                if not chunks:
                    raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
                # Hand out the good data first; the next call raises.
        if chunks:
            return b"".join(chunks)  # one copy in all; a lone chunk is returned as it is
        return b"" if self._eof else None

    def _check_usable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("TLS stream was closed")
        if self._broken:
            if self._broken_cause is not None:
                raise trio.BrokenResourceError(
                    f"TLS stream is broken: {self._broken_cause}"
                ) from self._broken_cause
            raise trio.BrokenResourceError("TLS stream is broken")

    def _closed_error(
        self, exc: trio.ClosedResourceError
    ) -> trio.ClosedResourceError | trio.BrokenResourceError:
        # Closed by our own aclose() (another task): report "closed"; closed underneath us
        # by someone else: the TLS stream is broken.
        if self._closed:
            return trio.ClosedResourceError("TLS stream was closed")
        self._broken = True
        return trio.BrokenResourceError(f"transport was closed: {exc}")


class TLSStream(TLSStreamState, trio.abc.Stream, Generic[T_Stream]):
    """A TLS connection over ``transport_stream``; build it with :meth:`wrap_client` /
    :meth:`wrap_server`, which perform the handshake.

    Speaks the ``trio.abc.Stream`` interface, so code written against
    ``trio.SocketStream``/``trio.SSLStream`` works unchanged.
    """

    transport_stream: T_Stream

    def __init__(
        self,
        transport_stream: T_Stream,
        ssl_object: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
    ) -> None:
        # Private: a TLSStream is only useful after the handshake, which the
        # wrap_* classmethods do.
        super().__init__()
        self.transport_stream = transport_stream
        # written and read directly (see the module doc); None: through the stream's methods
        self._socket = (
            transport_stream.socket if isinstance(transport_stream, trio.SocketStream) else None
        )
        self._ssl = ssl_object
        self._incoming = incoming
        self._outgoing = outgoing
        self._send_lock = _SendLock()
        self._recv_guard = ConflictDetector("another task is already receiving on this TLSStream")
        self._send_guard = ConflictDetector("another task is already sending on this TLSStream")
        self._delayed = b""  # held-back TLS 1.3 session tickets, see module doc
        self._handshake_done = False
        self._transport_eof = False  # transport returned b""; never read it again

    # ------------------------------------------------------------------ setup

    @classmethod
    async def wrap_client(
        cls,
        transport: T_Stream,
        context: ssl.SSLContext,
        server_hostname: str | None,
    ) -> TLSStream[T_Stream]:
        """Handshake as a client (certificate and hostname checks per ``context``).

        Cancellable (wrap it in ``trio.fail_after``).  On any failure the
        transport is closed before the exception propagates, so the caller has
        nothing to clean up; handshake/verification failures raise
        ``trio.BrokenResourceError`` with the ``ssl`` error as ``__cause__``.
        """
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        ssl_object = context.wrap_bio(
            incoming, outgoing, server_side=False, server_hostname=server_hostname
        )
        return await cls._wrap(transport, ssl_object, incoming, outgoing)

    @classmethod
    async def wrap_server(cls, transport: T_Stream, context: ssl.SSLContext) -> TLSStream[T_Stream]:
        """Handshake as a server.  Same failure/cancellation behaviour as :meth:`wrap_client`."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        ssl_object = context.wrap_bio(incoming, outgoing, server_side=True)
        return await cls._wrap(transport, ssl_object, incoming, outgoing)

    @classmethod
    async def _wrap(
        cls,
        transport: T_Stream,
        ssl_object: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
    ) -> TLSStream[T_Stream]:
        stream = cls(transport, ssl_object, incoming, outgoing)
        try:
            await stream._handshake()
        except BaseException:
            # The caller never gets a stream object to close, so don't leak the
            # socket (closing a trio stream twice is harmless if they do too).
            stream._closed = True
            await trio.aclose_forcefully(transport)
            raise
        return stream

    async def _handshake(self) -> None:
        while True:
            await gate(HANDSHAKE_COST)
            try:
                self._ssl.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except ssl.SSLError as exc:  # includes SSLCertVerificationError
                self._broken = True
                await self._send_alert()
                raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
            if done and self._ssl.server_side and self._ssl.version() == "TLSv1.3":
                # What the final server step produced is session tickets only.
                self._delayed = self._outgoing.read()
            if self._outgoing.pending:
                await self._transport_send(self._outgoing.read())
            if done:
                self._handshake_done = True
                return
            await self._fill_incoming()

    async def _send_alert(self) -> None:
        # Best effort: tell the peer *why* (e.g. bad_certificate) instead of
        # just hanging up, but never let that delay or mask the real error.
        alert = self._outgoing.read()
        if not alert:
            return
        with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT):
            try:
                await self.transport_stream.send_all(alert)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    # ----------------------------------------------------------- properties

    @property
    def selected_alpn_protocol(self) -> str | None:
        """Protocol chosen via ALPN (e.g. ``"http/1.1"``), or None."""
        return self._ssl.selected_alpn_protocol()

    @property
    def ssl_object(self) -> ssl.SSLObject:
        """The underlying SSLObject (for ``version()``, ``getpeercert()``, ...)."""
        return self._ssl

    # -------------------------------------------------------------- receive

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return 1..max_bytes decrypted bytes (default 256 KiB), ``b""`` at EOF.

        Returns everything already decryptable; only if there is nothing does it
        wait for (at least) one more transport read.
        """
        with self._recv_guard:
            max_bytes = receive_limit(max_bytes)
            self._check_usable()
            # Cancellation must hit before we consume anything from the
            # SSLObject; afterwards only an unshielded transport op may raise.
            await trio.lowlevel.checkpoint_if_cancelled()
            yielded = False
            while True:
                data = self._decrypt(max_bytes)
                if self._outgoing.pending and not self._send_lock.locked():
                    # Lock free: push our protocol bytes now.  Lock held: the
                    # holder drains before releasing (module doc).
                    self._send_lock.acquire_nowait()
                    try:
                        yielded = True
                        await self._drain_locked()
                    finally:
                        self._send_lock.release()
                if data is not None:
                    if not yielded:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    return data
                await self._fill_incoming(max_bytes)
                # before decrypting it (a reset, raised above, took its turn there)
                await gate(self._incoming.pending + RECORD_COST)
                yielded = True
                if self._closed:
                    raise trio.ClosedResourceError("TLS stream was closed")

    def _decrypt(self, max_bytes: int) -> bytes | None:
        """Decrypt up to max_bytes of what is available; None = need ciphertext."""
        ssl_object = self._ssl
        return self._read_plaintext(
            ssl_object.read,
            max_bytes,
            ended=self._transport_eof,
            incoming=self._incoming,
            decrypted=ssl_object.pending,
        )

    async def _fill_incoming(self, want: int = RECEIVE_SIZE) -> None:
        """One transport read into the incoming BIO (receiving task/handshake only): about as
        much ciphertext as the ``want`` bytes of plaintext asked for (a record's framing more),
        so a caller taking small chunks (many transfers at once) keeps small buffers too."""
        size = min(RECEIVE_SIZE, max(want, _RECORD_SIZE) + _RECORD_OVERHEAD)
        data: bytes | bytearray
        try:
            if self._socket is not None:
                data = await receive_from_socket(self._socket, size)
            else:
                data = await self.transport_stream.receive_some(size)
        except trio.ClosedResourceError as exc:
            raise self._closed_error(exc) from exc
        except trio.BrokenResourceError:
            await self._broke()
            raise
        except OSError as exc:  # non-trio transports
            await self._broke()
            raise trio.BrokenResourceError(f"transport error: {exc}") from exc
        if data:
            self._incoming.write(data)
        else:
            self._transport_eof = True
            self._incoming.write_eof()

    # ----------------------------------------------------------------- send

    async def send_all(self, data: bytes | bytearray | memoryview, *, head: bytes = b"") -> None:
        """Encrypt and send all of ``data``, after ``head`` if given: a response head in a
        record of its own, in the same transport write as the first chunk, instead of a copy
        of a large first chunk to put the head in front of it.

        Cancelling it mid-way breaks the stream (an unknown amount went out),
        like every trio stream.
        """
        with self._send_guard:
            self._check_usable()
            view = memoryview(data).cast("B")  # byte-wise length and slicing
            if not view:
                if head:
                    view = memoryview(head)
                    head = b""
                else:
                    await trio.lowlevel.checkpoint()
                    return
            await trio.lowlevel.checkpoint_if_cancelled()
            # Only the receiving task's (short) protocol-byte drain can hold
            # the lock; skip trio.Lock.acquire's extra scheduler yield when free.
            if self._send_lock.locked():
                await self._send_lock.acquire()
            else:
                self._send_lock.acquire_nowait()
            try:
                self._check_usable()  # may have changed while we waited
                for start in range(0, len(view), SEND_CHUNK):
                    await gate(min(SEND_CHUNK, len(view) - start) + len(head) + RECORD_COST)
                    if head:
                        self._encrypt(memoryview(head))
                        head = b""
                    self._encrypt(view[start : start + SEND_CHUNK])
                    await self._drain_locked()
            finally:
                self._send_lock.release()

    def _encrypt(self, chunk: memoryview) -> None:
        written = 0
        while written < len(chunk):
            # With a memory BIO SSL_write normally takes everything (as a
            # series of records); loop in case partial writes are enabled.
            try:
                written += self._ssl.write(chunk[written:])
            except ssl.SSLWantReadError as exc:
                # Only a TLS <= 1.2 renegotiation makes a write wait for reads.
                self._broken = True
                raise trio.BrokenResourceError("TLS renegotiation is not supported") from exc
            except ssl.SSLError as exc:
                self._broken = True
                raise trio.BrokenResourceError(f"TLS error: {exc}") from exc

    async def _drain_locked(self) -> None:
        """Send the outgoing BIO until empty.  Caller holds ``_send_lock``."""
        while self._outgoing.pending:
            data = self._outgoing.read()
            if self._delayed:
                data = self._delayed + data
                self._delayed = b""
            await self._transport_send(data)

    async def _transport_send(self, data: bytes) -> None:
        try:
            if self._socket is not None:
                await send_to_socket(self._socket, data)
            else:
                await self.transport_stream.send_all(data)
        except trio.ClosedResourceError as exc:
            raise self._closed_error(exc) from exc
        except trio.BrokenResourceError:
            await self._broke()
            raise
        except OSError as exc:
            await self._broke()
            raise trio.BrokenResourceError(f"transport error: {exc}") from exc
        except BaseException:
            # Cancelled with an unknown part of a record on the wire: nothing
            # valid can follow.
            self._broken = True
            raise

    async def _broke(self) -> None:
        """The transport failed (a reset, mostly). What follows is tearing down: the request's
        tasks unwinding, its connections closing, about 0.3 ms of the loop's time each; a
        hundred connections reset at once would put all of it in one batch ahead of every
        other client's next step. So it waits its turn in the fair share like any other unit
        of this client's work (Cancelled instead, if what it would cancel is cancelled)."""
        self._broken = True
        await gate(TEARDOWN_COST)

    async def wait_send_all_might_not_block(self) -> None:
        """See ``trio.abc.SendStream.wait_send_all_might_not_block``."""
        with self._send_guard:
            self._check_usable()
            await self._send_lock.acquire()
            try:
                await self.transport_stream.wait_send_all_might_not_block()
                # The receiver may have skipped its flush because we held the
                # lock; honour the "holder drains" rule.
                await self._drain_locked()
            finally:
                self._send_lock.release()

    # ---------------------------------------------------------------- close

    async def aclose(self) -> None:
        """Send ``close_notify`` (best effort, bounded time), close the transport.

        Idempotent.  Tasks blocked in receive/send get ClosedResourceError.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            # Skip close_notify if a send is in flight: we can't interleave with
            # its records, and waiting for it could take forever.
            if self._handshake_done and not self._broken and not self._send_lock.locked():
                self._send_lock.acquire_nowait()
                try:
                    await self._send_close_notify()
                finally:
                    self._send_lock.release()
        finally:
            await self.transport_stream.aclose()

    def abort(self) -> bool:
        """Close at once, sending nothing (no ``close_notify``), if the transport is a socket
        stream (then True; else False, and nothing is done). Tasks blocked in receive/send
        get ClosedResourceError, as after ``aclose``."""
        transport = self.transport_stream
        if not isinstance(transport, trio.SocketStream):
            return False
        self._closed = True
        transport.socket.close()  # trio notifies the tasks waiting on it
        return True

    async def _send_close_notify(self) -> None:
        try:
            self._ssl.unwrap()
        except ssl.SSLWantReadError:
            pass  # expected: we don't wait for the peer's close_notify
        except ssl.SSLError:
            return
        # Delayed tickets precede close_notify: record sequence numbers.
        data = self._delayed + self._outgoing.read()
        self._delayed = b""
        if not data:
            return
        with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT):
            try:
                await self.transport_stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # peer already gone; closing anyway


# -- the socket under a trio.SocketStream, without its layers ------------------------------------


async def send_to_socket(sock: trio.socket.SocketType, data: bytes | memoryview) -> None:
    """``trio.SocketStream.send_all`` on its socket: waits while the socket is full, a schedule
    point after a send that did not wait (the cancellation point before it is the caller's:
    ``TLSStream.send_all`` makes one). Closed: ``trio.ClosedResourceError``; a failed write
    raises its ``OSError``."""
    view = memoryview(data)
    waited = False
    while view:
        try:
            sent = os.write(_descriptor(sock), view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            waited = True
            continue
        view = view[sent:]
    if not waited:
        await trio.lowlevel.cancel_shielded_checkpoint()


async def receive_from_socket(sock: trio.socket.SocketType, size: int) -> bytes:
    """``trio.SocketStream.receive_some`` on its socket: up to ``size`` bytes (``b""`` at the
    end), with the same checkpoints as :func:`send_to_socket` (the cancellation point is
    ``TLSStream.receive_some``'s)."""
    try:
        data = os.read(_descriptor(sock), size)
    except BlockingIOError:
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                return os.read(_descriptor(sock), size)
            except BlockingIOError:
                pass
    await trio.lowlevel.cancel_shielded_checkpoint()
    return data


def _descriptor(sock: trio.socket.SocketType) -> int:
    fd = sock.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("the socket was already closed")
    return fd
