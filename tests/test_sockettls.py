"""Tests for hubproxy.net.sockettls.SocketTLSStream: our server side over real 127.0.0.1 sockets,
against trio.SSLStream (and the stdlib's blocking client) as the peer."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import struct
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

from hubproxy.net.ktls import ktls_offered
from hubproxy.net.server import push_pending
from hubproxy.net.sockettls import SocketTLSStream, kernel_encrypts

from .test_tls import (
    VERSIONS,
    MiB,
    Version,
    both,
    check_both_ways,
    check_echo,
    check_refused_handshake,
    client_ctx,
    payload,
    receive_exactly,
    server_ctx,
    tcp_pair,
    trio_client,
)


@pytest.fixture(scope="module")
def cert(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("localhost", "127.0.0.1")


async def connect(
    ca: trustme.CA,
    cert: trustme.LeafCert,
    version: Version | None = None,
    alpn: list[str] | None = None,
    *,
    https_compatible: bool = False,
) -> tuple[trio.SSLStream[trio.SocketStream], SocketTLSStream]:
    """A handshaken (trio client, our server) pair."""
    c_tr, s_tr = await tcp_pair()
    cctx, sctx = client_ctx(ca, version, alpn), server_ctx(cert, version, alpn)

    async def client() -> trio.abc.Stream:
        return await trio_client(c_tr, cctx, https_compatible=https_compatible)

    async def server() -> trio.abc.Stream:
        return await SocketTLSStream.wrap_server(s_tr, sctx)

    ours_client, ours_server = await both(client, server)
    assert isinstance(ours_client, trio.SSLStream)
    assert isinstance(ours_server, SocketTLSStream)
    return ours_client, ours_server


async def fill_until_blocked(stream: SocketTLSStream) -> None:
    """Send until the peer's and our socket buffers are full (the peer never reads)."""
    with trio.move_on_after(60) as scope:  # never reached: the send blocks for good
        await stream.send_all(payload(64 * MiB, seed=9))
    raise AssertionError(f"64 MiB went out to a peer that reads nothing ({scope})")


# ---------------------------------------------------------------- data transfer


@pytest.mark.parametrize("version", VERSIONS)
async def test_echo_5mib_full_duplex(
    version: Version, ca: trustme.CA, cert: trustme.LeafCert
) -> None:
    """The client sends 5 MiB in irregular pieces while reading the echo back."""
    client, server = await connect(ca, cert, version)
    await check_echo(client, server)
    assert server.socket.version() == f"TLSv{version}"
    await client.aclose()
    await server.aclose()


@pytest.mark.parametrize("version", VERSIONS)
async def test_both_sides_send_and_receive_concurrently(
    version: Version, ca: trustme.CA, cert: trustme.LeafCert
) -> None:
    client, server = await connect(ca, cert, version)
    await check_both_ways(client, server)
    await client.aclose()
    await server.aclose()


async def test_receive_respects_max_bytes(ca: trustme.CA, cert: trustme.LeafCert) -> None:
    client, server = await connect(ca, cert)
    data = payload(100_000, seed=7)
    async with trio.open_nursery() as nursery:
        # sent beside the reads: a kernel with smaller socket buffers (Debian 6.1's, in
        # tests/ktls-vm.sh) does not take 100 kB before anyone reads
        nursery.start_soon(client.send_all, data)
        first = await server.receive_some(1000)
        assert first == data[:1000]
        rest = await receive_exactly(server, len(data) - 1000)
    assert rest == hashlib.sha256(data[1000:]).hexdigest()
    with pytest.raises(ValueError, match="max_bytes"):
        await server.receive_some(0)
    await client.aclose()
    await server.aclose()


async def test_alpn_and_the_kernel_keeps_out_here(ca: trustme.CA, cert: trustme.LeafCert) -> None:
    client, server = await connect(ca, cert, alpn=["http/1.1"])
    assert server.selected_alpn_protocol == "http/1.1"
    # no OP_ENABLE_KTLS on the context: OpenSSL encrypts, whatever the kernel offers
    assert not server.kernel_encrypts
    assert not kernel_encrypts(server.socket)
    await client.aclose()
    await server.aclose()


# ---------------------------------------------------------------- handshake


async def test_handshake_failure_is_broken_resource_and_closes(
    ca: trustme.CA, cert: trustme.LeafCert
) -> None:
    """The client insists on TLS 1.3, the server speaks only 1.2: both see the failure."""
    descriptors: list[int] = []

    async def wrap(tcp: trio.SocketStream, context: ssl.SSLContext) -> SocketTLSStream:
        descriptors.append(tcp.socket.fileno())
        return await SocketTLSStream.wrap_server(tcp, context)

    s_tr = await check_refused_handshake(wrap, ca, cert)
    (fd,) = descriptors
    assert s_tr.socket.fileno() == -1
    with pytest.raises(OSError, match="Bad file descriptor"):  # closed, not only detached
        os.fstat(fd)


async def test_a_refused_hello_ends_in_a_close_not_a_reset(cert: trustme.LeafCert) -> None:
    """OpenSSL stops at the first record it refuses; the bytes after it are read and dropped,
    so the client sees the connection close instead of a reset."""
    client, server = await tcp_pair()
    await client.send_all(b"\x00\x01\x02\x03 not a ClientHello\r\n\r\n" + b"x" * 5000)
    with pytest.raises(trio.BrokenResourceError):
        await SocketTLSStream.wrap_server(server, server_ctx(cert))
    assert await client.receive_some() == b""
    await client.aclose()


async def test_handshake_cancellable(
    autojump_clock: trio.testing.MockClock, cert: trustme.LeafCert
) -> None:
    """A client that connects and never sends a ClientHello."""
    client, server = await tcp_pair()
    start = trio.current_time()
    with trio.move_on_after(5) as scope:
        await SocketTLSStream.wrap_server(server, server_ctx(cert))
    assert scope.cancelled_caught
    assert trio.current_time() - start == pytest.approx(5)
    assert server.socket.fileno() == -1
    assert await client.receive_some() == b""  # closed on our side
    await client.aclose()


# ---------------------------------------------------------------- EOF, close, errors


@pytest.mark.parametrize("version", VERSIONS)
async def test_peer_close_notify_reads_as_eof(
    version: Version, ca: trustme.CA, cert: trustme.LeafCert
) -> None:
    client, server = await connect(ca, cert, version)
    await client.send_all(b"last words")
    await client.aclose()  # https_compatible=False: sends close_notify
    received = b""
    while chunk := await server.receive_some():
        received += chunk
    assert received == b"last words"
    assert await server.receive_some() == b""  # EOF is sticky
    await server.aclose()


async def test_ragged_eof_reads_as_eof(ca: trustme.CA, cert: trustme.LeafCert) -> None:
    client, server = await connect(ca, cert)
    # the client reads first, and with it the session tickets sent at the end of the handshake:
    # a socket closed with unread bytes sends a reset, not the FIN this test is about
    await server.send_all(b"hello")
    assert await client.receive_some() == b"hello"
    await client.send_all(b"partial")
    await client.transport_stream.aclose()  # TCP FIN, no close_notify
    received = b""
    while chunk := await server.receive_some():
        received += chunk
    assert received == b"partial"
    await server.aclose()


async def test_after_a_reset_receiving_ends_and_sending_breaks(
    ca: trustme.CA, cert: trustme.LeafCert
) -> None:
    """A reset ends receiving: CPython 3.11 reports OpenSSL's ECONNRESET as a ragged EOF
    (SSLEOFError), so it reads as the end, as a FIN without close_notify does; newer ones
    report the reset itself. Either way no byte is made up, and a send then fails."""
    client, server = await connect(ca, cert)
    sock = client.transport_stream.socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await client.transport_stream.aclose()  # linger 0: close sends RST
    ended: bytes | BaseException | None
    try:
        ended = await server.receive_some()
    except trio.BrokenResourceError as exc:
        ended = exc.__cause__
    assert ended == b"" or isinstance(ended, ConnectionResetError)
    with pytest.raises(trio.BrokenResourceError) as info:
        await server.send_all(b"x")
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(trio.BrokenResourceError):  # stays broken
        await server.send_all(b"x")
    await server.aclose()


@pytest.mark.parametrize("version", VERSIONS)
async def test_aclose_sends_close_notify(
    version: Version, ca: trustme.CA, cert: trustme.LeafCert
) -> None:
    """The trio peer (https_compatible=False) would raise on a ragged EOF; it must see b""."""
    client, server = await connect(ca, cert, version)
    await server.send_all(b"bye")
    await server.aclose()
    assert await client.receive_some() == b"bye"
    assert await client.receive_some() == b""
    await client.aclose()


async def test_aclose_idempotent_and_use_after_close(
    ca: trustme.CA, cert: trustme.LeafCert
) -> None:
    client, server = await connect(ca, cert)
    await server.aclose()
    await server.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await server.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await server.send_all(b"x")
    await client.aclose()


async def test_close_wakes_blocked_receiver_and_sender(
    ca: trustme.CA, cert: trustme.LeafCert
) -> None:
    client, server = await connect(ca, cert)

    async def blocked_reader() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await server.receive_some()

    async def blocked_sender() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await fill_until_blocked(server)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocked_reader)
        nursery.start_soon(blocked_sender)
        await trio.testing.wait_all_tasks_blocked()
        assert server.abort()
    await trio.aclose_forcefully(client)


async def test_cancelled_receive_loses_nothing(ca: trustme.CA, cert: trustme.LeafCert) -> None:
    client, server = await connect(ca, cert)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.receive_some)  # nothing to read yet: waits for the socket
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    await client.send_all(b"still here")
    assert await server.receive_some() == b"still here"
    await client.aclose()
    await server.aclose()


async def test_a_send_cancelled_mid_way_breaks_the_stream(
    ca: trustme.CA, cert: trustme.LeafCert
) -> None:
    """Records half out: nothing valid can follow, and aclose sends no close_notify into them."""
    client, server = await connect(ca, cert)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fill_until_blocked, server)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await server.send_all(b"x")
        nursery.cancel_scope.cancel()
    with pytest.raises(trio.BrokenResourceError):
        await server.send_all(b"x")
    await server.aclose()
    await trio.aclose_forcefully(client)


async def test_aclose_does_not_wait_for_a_peer_that_reads_nothing(
    autojump_clock: trio.testing.MockClock, ca: trustme.CA, cert: trustme.LeafCert
) -> None:
    client, server = await connect(ca, cert)
    with trio.move_on_after(1):
        await server.send_all(payload(64 * MiB, seed=9))  # fills the buffers; cut mid-way
    start = trio.current_time()
    await server.aclose()
    assert trio.current_time() == start
    await trio.aclose_forcefully(client)


# ---------------------------------------------------------------- kTLS


@pytest.mark.skipif(not ktls_offered(), reason="needs Python 3.12+ and the kernel's tls")
async def test_with_ktls_the_kernel_encrypts_and_sendfile_goes_through(
    ca: trustme.CA, cert: trustme.LeafCert, tmp_path: Path
) -> None:
    sctx = server_ctx(cert, "1.3")
    sctx.options |= ssl.OP_ENABLE_KTLS  # type: ignore[attr-defined]  # 3.12+
    sctx.set_ciphers("ECDHE+AESGCM")
    c_tr, s_tr = await tcp_pair()

    async def client() -> trio.abc.Stream:
        return await trio_client(c_tr, client_ctx(ca, "1.3"))

    async def server() -> trio.abc.Stream:
        return await SocketTLSStream.wrap_server(s_tr, sctx)

    peer, ours = await both(client, server)
    assert isinstance(ours, SocketTLSStream)
    assert ours.kernel_encrypts
    data = payload(3 * MiB, seed=11)
    path = tmp_path / "blob"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                offset = 0
                while offset < len(data):
                    try:
                        offset += os.sendfile(ours.socket.fileno(), fd, offset, len(data) - offset)
                    except BlockingIOError:
                        push_pending(ours.socket)  # as the server does (net.server)
                        await trio.lowlevel.wait_writable(ours.socket)

            nursery.start_soon(send)
            assert await receive_exactly(peer, len(data)) == hashlib.sha256(data).hexdigest()
    finally:
        os.close(fd)
    await ours.aclose()
    await peer.aclose()
