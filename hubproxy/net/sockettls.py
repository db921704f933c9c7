"""TLS on the socket itself, for clients when the kernel may encrypt (``--ktls``).

Theory of operation
===================

:class:`~hubproxy.net.tls.TLSStream` drives an ``ssl.SSLObject`` over memory BIOs, and the
kernel cannot take that over. :class:`SocketTLSStream` lets OpenSSL read and write a
non-blocking socket itself, and waits for the socket with trio when OpenSSL says it would block.
With kTLS (Python 3.12's ``OP_ENABLE_KTLS`` and the kernel's ``tls`` module) OpenSSL then hands
the session keys to the kernel after the handshake and writes plaintext to the socket, and a cache
hit goes out with ``os.sendfile`` (:attr:`SocketTLSStream.kernel_encrypts`).

Without kTLS it is no cheaper: it saves the copy out of the memory BIO, but OpenSSL writes each
16 KiB record with its own ``write()``, 16 system calls where ``TLSStream`` makes one per 256 KiB
(measured: 1 GiB hits over TLS 1.3 about even in the proxy's CPU, slower, and the client's CPU
doubled, waking up for every record's segment). So the server uses it only where kTLS is asked
for and offered. Corking the socket around a send (``TCP_CORK``) gave the client its large
segments back, but stalled transfers on the peer's delayed ACK (40 ms) whenever the send
buffer filled with one corked segment unacknowledged; so no cork.

Full duplex: one task may receive while another sends. Each call into the SSL object is
synchronous, so atomic under trio; what OpenSSL needs is that a write it answered "would block"
is retried with the same bytes, which only the sending task does. A write that would block has
already put records into OpenSSL's buffer, so cancelling the send from then on breaks the stream
(like every trio stream: an unknown part went out).

EOF: a ``close_notify`` and a TCP EOF without one both read as ``b""`` (``suppress_ragged_eofs``);
HTTP framing catches truncation. Failures surface as ``trio.BrokenResourceError`` with the
``ssl`` or ``OSError`` as ``__cause__``; use after :meth:`~SocketTLSStream.aclose` as
``trio.ClosedResourceError``. TLS 1.3 session tickets go out at the end of the handshake (a
memory-BIO stream can hold them back; OpenSSL writing the socket cannot), which is harmless for
HTTP clients: they read the answer anyway.
"""

from __future__ import annotations

import os
import socket
import ssl

import trio

from ..policy.fairshare import HANDSHAKE_COST, RECORD_COST, TEARDOWN_COST
from .fairness import gate
from .tls import RECEIVE_SIZE, SEND_CHUNK, ConflictDetector, TLSStreamState, receive_limit

__all__ = ["SocketTLSStream", "kernel_encrypts"]

# Linux's SOL_TLS and its TLS_TX option (linux/tls.h): set on a socket whose sending side the
# kernel encrypts. Python names neither.
_SOL_TLS = 282
_TLS_TX = 1
_CRYPTO_INFO_SIZE = 4  # struct tls_crypto_info: __u16 version, __u16 cipher_type


def kernel_encrypts(sock: socket.socket) -> bool:
    """Whether the kernel encrypts what is written to ``sock`` (kTLS sending side is on)."""
    try:
        # exactly struct tls_crypto_info (version, cipher type): the kernel answers EINVAL to
        # any other length that is not the whole of the cipher's own struct
        sock.getsockopt(_SOL_TLS, _TLS_TX, _CRYPTO_INFO_SIZE)
    except OSError:  # no tls upper-layer protocol on it (ENOPROTOOPT), no keys for sending (EBUSY)
        return False
    return True


class SocketTLSStream(TLSStreamState, trio.abc.Stream):
    """A server-side TLS connection on a socket; build it with :meth:`wrap_server`, which
    performs the handshake. Speaks ``trio.abc.Stream``, like ``TLSStream``."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        # Private: only useful after the handshake, which wrap_server does.
        super().__init__()
        self.socket = sock
        self._recv_guard = ConflictDetector("another task is already receiving on this stream")
        self._send_guard = ConflictDetector("another task is already sending on this stream")
        self._sending = False  # a send is in flight: no close_notify may cut into its records
        self._handshake_done = False
        self.kernel_encrypts = False  # kTLS took over the sending side (see kernel_encrypts)

    @classmethod
    async def wrap_server(cls, tcp: trio.SocketStream, context: ssl.SSLContext) -> SocketTLSStream:
        """Take ``tcp``'s socket over and handshake as a server. Cancellable (wrap it in
        ``trio.fail_after``); on any failure the socket is closed before the exception
        propagates, and handshake failures raise ``trio.BrokenResourceError`` from the ``ssl``
        error. ``tcp`` is left closed either way: the stream owns the descriptor now."""
        plain = socket.socket(fileno=tcp.socket.detach())
        plain.setblocking(False)
        try:
            sock = context.wrap_socket(plain, server_side=True, do_handshake_on_connect=False)
        except BaseException:
            plain.close()
            raise
        stream = cls(sock)
        try:
            await stream._handshake()
        except BaseException:
            stream._discard_input()
            stream.abort()
            raise
        stream.kernel_encrypts = kernel_encrypts(sock)
        return stream

    async def _handshake(self) -> None:
        while True:
            await gate(HANDSHAKE_COST)
            try:
                self.socket.do_handshake()
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self.socket)
                continue
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self.socket)
                continue
            except (ssl.SSLError, OSError) as exc:  # includes SSLCertVerificationError
                # OpenSSL already wrote the alert saying why, if the socket took it
                self._broken = True
                raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
            self._handshake_done = True
            return

    def _discard_input(self) -> None:
        # OpenSSL stops reading at the record it refused; closing with the rest unread would
        # make the kernel reset the connection, and the client would not see the alert or the
        # close (a memory-BIO stream read it all already). What has arrived, at most one
        # receive's worth, is read and dropped.
        try:
            os.read(self.socket.fileno(), RECEIVE_SIZE)
        except OSError:  # nothing there (would block), or the socket is gone
            pass

    # ----------------------------------------------------------- properties

    @property
    def selected_alpn_protocol(self) -> str | None:
        """Protocol chosen via ALPN (e.g. ``"http/1.1"``), or None."""
        return self.socket.selected_alpn_protocol()

    # -------------------------------------------------------------- receive

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return 1..max_bytes decrypted bytes (default 256 KiB), ``b""`` at EOF: everything
        already decryptable, waiting for the socket only when there is nothing."""
        with self._recv_guard:
            max_bytes = receive_limit(max_bytes)
            self._check_usable()
            # Cancellation must hit before anything is taken from OpenSSL.
            await trio.lowlevel.checkpoint_if_cancelled()
            waited = False
            while True:
                data = self._decrypt(max_bytes)
                if data is not None:
                    if not waited:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    return data
                try:
                    await trio.lowlevel.wait_readable(self.socket)
                except trio.ClosedResourceError as exc:  # closed by another task
                    raise self._closed_error(exc) from exc
                await gate(RECORD_COST)
                waited = True

    def _decrypt(self, max_bytes: int) -> bytes | None:
        """Decrypt up to max_bytes of what is available; None = wait for the socket. (A reset
        reads as the end where CPython reports it as a ragged EOF, 3.11 does: HTTP framing
        catches the truncation.)"""
        return self._read_plaintext(self.socket.recv, max_bytes)

    # ----------------------------------------------------------------- send

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send all of ``data``. Cancelling it once OpenSSL took some of it breaks
        the stream (an unknown amount went out), like every trio stream."""
        with self._send_guard:
            self._check_usable()
            view = memoryview(data).cast("B")  # byte-wise length and slicing
            if not view:
                await trio.lowlevel.checkpoint()
                return
            await trio.lowlevel.checkpoint_if_cancelled()
            self._sending = True
            try:
                for start in range(0, len(view), SEND_CHUNK):
                    chunk = view[start : start + SEND_CHUNK]
                    await gate(len(chunk) + RECORD_COST)
                    await self._write(chunk)
                # A schedule point even when the socket took everything at once, as every trio
                # stream's send: a sender whose socket never fills (a fast client, a hit read
                # from the page cache) must not run step after step without the others.
                await trio.lowlevel.cancel_shielded_checkpoint()
            finally:
                self._sending = False

    async def _write(self, chunk: memoryview) -> None:
        # Without SSL_MODE_ENABLE_PARTIAL_WRITE (CPython leaves it off) SSL_write returns only
        # once the whole chunk is out, or "would block" with its records part sent and part
        # buffered: then it must be called again with the same bytes.
        while chunk:
            try:
                written = self.socket.send(chunk)
            except (ssl.SSLWantWriteError, BlockingIOError):
                try:
                    await trio.lowlevel.wait_writable(self.socket)
                except trio.ClosedResourceError as exc:
                    raise self._closed_error(exc) from exc
                except BaseException:
                    self._broken = True  # records half out: nothing valid can follow
                    raise
                continue
            except ssl.SSLWantReadError as exc:
                # Only a TLS <= 1.2 renegotiation makes a write wait for reads.
                self._broken = True
                raise trio.BrokenResourceError("TLS renegotiation is not supported") from exc
            except (ssl.SSLError, OSError) as exc:
                self._broken = True
                await gate(TEARDOWN_COST)  # what follows is tearing down (see TLSStream._broke)
                raise trio.BrokenResourceError(f"TLS send failed: {exc}") from exc
            chunk = chunk[written:]

    async def wait_send_all_might_not_block(self) -> None:
        """See ``trio.abc.SendStream.wait_send_all_might_not_block``."""
        with self._send_guard:
            self._check_usable()
            await trio.lowlevel.wait_writable(self.socket)

    # ---------------------------------------------------------------- close

    async def aclose(self) -> None:
        """Send ``close_notify`` if the socket takes it at once, then close. Idempotent; tasks
        blocked in receive or send get ``ClosedResourceError``."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        if self._handshake_done and not self._broken and not self._sending:
            # One SSL_shutdown writes our close_notify; not waiting for the peer's, nor for a
            # socket that would block (a client that stopped reading gets no more time).
            try:
                self.socket.unwrap()
            except (ssl.SSLError, OSError, ValueError):
                pass
        self.abort()
        await trio.lowlevel.checkpoint()

    def abort(self) -> bool:
        """Close at once, sending nothing; tasks blocked in receive or send get
        ``ClosedResourceError``. Always True (the transport is always a socket)."""
        self._closed = True
        if self.socket.fileno() != -1:
            trio.lowlevel.notify_closing(self.socket)
        self.socket.close()
        return True
