"""Tests for hubproxy.net.tls.TLSStream.

Interop is checked against trio.SSLStream over real 127.0.0.1 sockets; memory streams are used
where a test needs exact control over buffering (how much ciphertext is waiting, a peer whose
send blocks).
"""

from __future__ import annotations

import array
import hashlib
import random
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from typing import Literal

import pytest
import trio
import trio.testing
import trustme

from hubproxy.net.tls import (
    CLOSE_NOTIFY_TIMEOUT,
    RECEIVE_SIZE,
    TLSStream,
    _SendLock,
    receive_from_socket,
    send_to_socket,
)

Version = Literal["1.2", "1.3"]
Kind = Literal["ours-client", "ours-server", "ours-both"]
VERSIONS: list[Version] = ["1.2", "1.3"]
KINDS: list[Kind] = ["ours-client", "ours-server", "ours-both"]
MiB = 1024 * 1024
RECORD = 16 * 1024


# ---------------------------------------------------------------- fixtures / helpers


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def cert(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("localhost", "127.0.0.1")


def _pin(ctx: ssl.SSLContext, version: Version | None) -> None:
    if version is not None:
        v = ssl.TLSVersion.TLSv1_2 if version == "1.2" else ssl.TLSVersion.TLSv1_3
        ctx.minimum_version = ctx.maximum_version = v


def client_ctx(
    ca: trustme.CA, version: Version | None = None, alpn: list[str] | None = None
) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    _pin(ctx, version)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def server_ctx(
    cert: trustme.LeafCert, version: Version | None = None, alpn: list[str] | None = None
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    _pin(ctx, version)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected (client, server) pair of real loopback sockets."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    try:
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listener.accept()  # connect() already completed via the backlog
    finally:
        await listener.aclose()
    return client, server


async def both(
    a: Callable[[], Awaitable[trio.abc.Stream]], b: Callable[[], Awaitable[trio.abc.Stream]]
) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """Run two handshakes concurrently, return both streams."""
    out: dict[str, trio.abc.Stream] = {}

    async def run(key: str, fn: Callable[[], Awaitable[trio.abc.Stream]]) -> None:
        out[key] = await fn()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "a", a)
        nursery.start_soon(run, "b", b)
    return out["a"], out["b"]


async def trio_client(
    transport: trio.abc.Stream, ctx: ssl.SSLContext, *, https_compatible: bool = False
) -> trio.SSLStream[trio.abc.Stream]:
    stream = trio.SSLStream(
        transport, ctx, server_hostname="localhost", https_compatible=https_compatible
    )
    await stream.do_handshake()
    return stream


async def trio_server(
    transport: trio.abc.Stream, ctx: ssl.SSLContext, *, https_compatible: bool = False
) -> trio.SSLStream[trio.abc.Stream]:
    stream = trio.SSLStream(transport, ctx, server_side=True, https_compatible=https_compatible)
    await stream.do_handshake()
    return stream


async def connect(
    kind: Kind,
    ca: trustme.CA,
    cert: trustme.LeafCert,
    version: Version | None = None,
    alpn: list[str] | None = None,
    transports: tuple[trio.abc.Stream, trio.abc.Stream] | None = None,
) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """Handshaken (client, server); which side is a TLSStream depends on ``kind``."""
    c_tr, s_tr = transports if transports is not None else await tcp_pair()
    cctx, sctx = client_ctx(ca, version, alpn), server_ctx(cert, version, alpn)

    async def client() -> trio.abc.Stream:
        if kind == "ours-server":
            return await trio_client(c_tr, cctx)
        return await TLSStream.wrap_client(c_tr, cctx, "localhost")

    async def server() -> trio.abc.Stream:
        if kind == "ours-client":
            return await trio_server(s_tr, sctx)
        return await TLSStream.wrap_server(s_tr, sctx)

    return await both(client, server)


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def send_in_pieces(stream: trio.abc.SendStream, data: bytes, seed: int) -> None:
    """Send with irregular piece sizes (tiny, record-sized, multi-chunk) to hit edge cases."""
    rng = random.Random(seed)
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        n = rng.choice([1, 100, RECORD - 1, RECORD + 1, 200_000, 700_000])
        await stream.send_all(view[pos : pos + n])
        pos += n


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> str:
    """Read ``size`` bytes, return their sha256."""
    digest = hashlib.sha256()
    got = 0
    while got < size:
        data = await stream.receive_some()
        assert data, f"unexpected EOF after {got} of {size} bytes"
        digest.update(data)
        got += len(data)
    assert got == size
    return digest.hexdigest()


async def check_echo(client: trio.abc.Stream, server: trio.abc.Stream) -> None:
    """The client sends 5 MiB in irregular pieces while reading the server's echo back; the
    sha256 of what came back must match."""
    data = payload(5 * MiB, seed=1)
    result: dict[str, str] = {}

    async def echo() -> None:
        remaining = len(data)
        while remaining:
            chunk = await server.receive_some()
            assert chunk
            await server.send_all(chunk)
            remaining -= len(chunk)

    async def read_back() -> None:
        result["echo"] = await receive_exactly(client, len(data))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo)
        nursery.start_soon(read_back)
        nursery.start_soon(send_in_pieces, client, data, 2)
    assert result["echo"] == hashlib.sha256(data).hexdigest()


async def check_both_ways(client: trio.abc.Stream, server: trio.abc.Stream) -> None:
    """Each side streams its own 5 MiB while receiving the other's; both arrive whole."""
    up, down = payload(5 * MiB, seed=3), payload(5 * MiB, seed=4)
    got: dict[str, str] = {}

    async def recv(name: str, stream: trio.abc.Stream, size: int) -> None:
        got[name] = await receive_exactly(stream, size)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_in_pieces, client, up, 5)
        nursery.start_soon(send_in_pieces, server, down, 6)
        nursery.start_soon(recv, "up", server, len(up))
        nursery.start_soon(recv, "down", client, len(down))
    assert got == {"up": hashlib.sha256(up).hexdigest(), "down": hashlib.sha256(down).hexdigest()}


# ---------------------------------------------------------------- data transfer


@pytest.mark.trio
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("kind", KINDS)
async def test_echo_5mib_full_duplex(
    kind: Kind, version: Version, ca: trustme.CA, cert: trustme.LeafCert
) -> None:
    """Client sends 5 MiB while concurrently reading the echo back; sha256 must match."""
    client, server = await connect(kind, ca, cert, version)
    await check_echo(client, server)
    if isinstance(client, TLSStream):
        assert client.ssl_object.version() == f"TLSv{version}"
    await client.aclose()
    await server.aclose()


@pytest.mark.trio
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("kind", KINDS)
async def test_both_sides_send_and_receive_concurrently(
    kind: Kind, version: Version, ca: trustme.CA, cert: trustme.LeafCert
) -> None:
    """Each side streams its own 5 MiB while receiving the other's (neither side only echoes)."""
    client, server = await connect(kind, ca, cert, version)
    await check_both_ways(client, server)
    await client.aclose()
    await server.aclose()


@pytest.mark.trio
async def test_send_accepts_bytearray_and_non_byte_memoryview(
    ca: trustme.CA, cert: trustme.LeafCert
) -> None:
    client, server = await connect("ours-client", ca, cert)
    words = array.array("H", range(5000))  # itemsize 2: len(memoryview) != byte length
    await client.send_all(bytearray(b"abc"))
    await client.send_all(memoryview(words))
    await client.send_all(b"")  # no-op
    expected = b"abc" + words.tobytes()
    received = b""
    while len(received) < len(expected):
        received += await server.receive_some()
    assert received == expected
    await client.aclose()
    await server.aclose()


@pytest.mark.trio
async def test_receive_batches_records_and_respects_max_bytes(
    ca: trustme.CA, cert: trustme.LeafCert
) -> None:
    """The point of the module: one receive_some returns many records at once.

    Memory streams make the amount of waiting ciphertext exact: the peer's 1 MiB is fully
    buffered before we start reading.
    """
    client, server = await connect(
        "ours-client", ca, cert, transports=trio.testing.memory_stream_pair()
    )
    data = payload(MiB, seed=7)
    await server.send_all(data)  # unbounded memory stream: completes without a reader

    sizes: list[int] = []
    received = bytearray()
    while len(received) < len(data):
        chunk = await client.receive_some()
        sizes.append(len(chunk))
        received += chunk
    assert bytes(received) == data
    assert max(sizes) <= RECEIVE_SIZE
    # Each transport read takes 256 KiB of ciphertext, all of it decrypted in one call.
    assert len(sizes) <= 6, sizes
    assert max(sizes) > 15 * RECORD

    # Small max_bytes: never exceeded, nothing lost, no leftover delivered out of order.
    await server.send_all(data)
    received.clear()
    for limit in [1, 7, 1000, RECORD + 5, 100_000]:
        chunk = await client.receive_some(limit)
        assert 1 <= len(chunk) <= limit
        received += chunk
    while len(received) < len(data):
        chunk = await client.receive_some(12_345)
        assert 1 <= len(chunk) <= 12_345
        received += chunk
    assert bytes(received) == data

    with pytest.raises(ValueError, match="max_bytes"):
        await client.receive_some(0)
    await client.aclose()
    await server.aclose()


@pytest.mark.trio
async def test_receive_over_real_socket_averages_more_than_one_record(
    ca: trustme.CA, cert: trustme.LeafCert
) -> None:
    client, server = await connect("ours-client", ca, cert, "1.3")
    data = payload(MiB, seed=8)
    sizes: list[int] = []

    async def reader() -> None:
        got = 0
        while got < len(data):
            chunk = await client.receive_some()
            sizes.append(len(chunk))
            got += len(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        nursery.start_soon(server.send_all, data)
    assert sum(sizes) == len(data)
    assert sum(sizes) / len(sizes) > RECORD, sizes
    await client.aclose()
    await server.aclose()


# ---------------------------------------------------------------- handshake details


@pytest.mark.trio
@pytest.mark.parametrize("kind", KINDS)
async def test_alpn(kind: Kind, ca: trustme.CA, cert: trustme.LeafCert) -> None:
    client, server = await connect(kind, ca, cert, alpn=["http/1.1"])
    for stream in (client, server):
        if isinstance(stream, TLSStream):
            assert stream.selected_alpn_protocol == "http/1.1"
    await client.aclose()
    await server.aclose()


@pytest.mark.trio
async def test_no_alpn_is_none(ca: trustme.CA, cert: trustme.LeafCert) -> None:
    client, server = await connect("ours-both", ca, cert)
    assert isinstance(client, TLSStream)
    assert client.selected_alpn_protocol is None
    await client.aclose()
    await server.aclose()


async def _expect_verify_failure(cctx: ssl.SSLContext, sctx: ssl.SSLContext, hostname: str) -> None:
    c_tr, s_tr = await tcp_pair()

    async def peer() -> None:
        # The server sees the client's alert (or EOF): its handshake fails too.
        with pytest.raises(trio.BrokenResourceError):
            await trio_server(s_tr, sctx)
        await s_tr.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer)
        with pytest.raises(trio.BrokenResourceError) as info:
            await TLSStream.wrap_client(c_tr, cctx, hostname)
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    assert c_tr.socket.fileno() == -1  # wrap_* closes the transport on failure


@pytest.mark.trio
async def test_wrong_hostname_fails_verification(ca: trustme.CA, cert: trustme.LeafCert) -> None:
    await _expect_verify_failure(client_ctx(ca), server_ctx(cert), "wrong.example")


@pytest.mark.trio
async def test_untrusted_ca_fails_verification(cert: trustme.LeafCert) -> None:
    await _expect_verify_failure(client_ctx(trustme.CA()), server_ctx(cert), "localhost")


@pytest.mark.trio
async def test_server_handshake_failure_is_broken_resource(
    ca: trustme.CA, cert: trustme.LeafCert
) -> None:
    """Client insists on TLS 1.3, server only speaks 1.2."""
    await check_refused_handshake(TLSStream.wrap_server, ca, cert)


async def check_refused_handshake(
    wrap_server: Callable[[trio.SocketStream, ssl.SSLContext], Awaitable[object]],
    ca: trustme.CA,
    cert: trustme.LeafCert,
) -> trio.SocketStream:
    """A client insisting on TLS 1.3 against ``wrap_server`` speaking only 1.2: both sides
    fail, the server with BrokenResourceError from the ssl error. Returns the server's TCP
    stream."""
    c_tr, s_tr = await tcp_pair()

    async def peer() -> None:
        with pytest.raises(trio.BrokenResourceError):
            await trio_client(c_tr, client_ctx(ca, "1.3"))
        await c_tr.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer)
        with pytest.raises(trio.BrokenResourceError) as info:
            await wrap_server(s_tr, server_ctx(cert, "1.2"))
    assert isinstance(info.value.__cause__, ssl.SSLError)
    return s_tr


@pytest.mark.trio
async def test_client_handshake_cancellable(autojump_clock: trio.testing.MockClock) -> None:
    """A server that accepts TCP (backlog) but never answers: the deadline cancels cleanly."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    tcp = await trio.open_tcp_stream("127.0.0.1", listener.socket.getsockname()[1])
    start = trio.current_time()
    with trio.move_on_after(5) as scope:
        await TLSStream.wrap_client(tcp, ssl.create_default_context(), "localhost")
    assert scope.cancelled_caught
    assert trio.current_time() - start == pytest.approx(5)
    assert tcp.socket.fileno() == -1
    await listener.aclose()


@pytest.mark.trio
async def test_server_handshake_cancellable(
    autojump_clock: trio.testing.MockClock, cert: trustme.LeafCert
) -> None:
    """A client that connects and never sends a ClientHello."""
    client, server = await tcp_pair()
    with trio.move_on_after(5) as scope:
        await TLSStream.wrap_server(server, server_ctx(cert))
    assert scope.cancelled_caught
    assert server.socket.fileno() == -1
    await client.aclose()


@pytest.mark.trio
async def test_handshake_cancellable_on_memory_stream(
    autojump_clock: trio.testing.MockClock, ca: trustme.CA
) -> None:
    ours, _silent = trio.testing.memory_stream_pair()
    with trio.move_on_after(5) as scope:
        await TLSStream.wrap_client(ours, client_ctx(ca), "localhost")
    assert scope.cancelled_caught


# ---------------------------------------------------------------- EOF, close, errors


@pytest.mark.trio
@pytest.mark.parametrize("version", VERSIONS)
async def test_peer_close_notify_reads_as_eof(
    version: Version, ca: trustme.CA, cert: trustme.LeafCert
) -> None:
    client, server = await connect("ours-client", ca, cert, version)
    await server.send_all(b"last words")
    await server.aclose()  # https_compatible=False: sends close_notify
    received = b""
    while chunk := await client.receive_some():
        received += chunk
    assert received == b"last words"
    assert await client.receive_some() == b""  # EOF is sticky
    await client.aclose()


@pytest.mark.trio
@pytest.mark.parametrize("version", VERSIONS)
async def test_ragged_eof_reads_as_eof(
    version: Version, ca: trustme.CA, cert: trustme.LeafCert
) -> None:
    client, server = await connect("ours-client", ca, cert, version)
    assert isinstance(server, trio.SSLStream)
    await server.send_all(b"partial")
    await server.transport_stream.aclose()  # TCP FIN, no close_notify
    received = b""
    while chunk := await client.receive_some():
        received += chunk
    assert received == b"partial"
    await client.aclose()


@pytest.mark.trio
async def test_tcp_reset_is_broken_resource(ca: trustme.CA, cert: trustme.LeafCert) -> None:
    client, server = await connect("ours-client", ca, cert)
    assert isinstance(server, trio.SSLStream)
    sock = server.transport_stream.socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await server.transport_stream.aclose()  # linger 0: close sends RST
    with pytest.raises(trio.BrokenResourceError):
        await client.receive_some()
    with pytest.raises(trio.BrokenResourceError):  # stays broken
        await client.send_all(b"x")
    await client.aclose()


@pytest.mark.trio
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("kind", ["ours-client", "ours-server"])
async def test_aclose_sends_close_notify(
    kind: Kind, version: Version, ca: trustme.CA, cert: trustme.LeafCert
) -> None:
    """The trio peer (https_compatible=False) would raise on a ragged EOF; it must see b"".

    For a TLS 1.3 server that never sent anything, this also proves the held-back session
    tickets go out ahead of close_notify (dropping them would break the record sequence).
    """
    client, server = await connect(kind, ca, cert, version)
    ours, peer = (client, server) if kind == "ours-client" else (server, client)
    await ours.aclose()
    assert await peer.receive_some() == b""
    await peer.aclose()


@pytest.mark.trio
async def test_aclose_idempotent_and_use_after_close(
    ca: trustme.CA, cert: trustme.LeafCert
) -> None:
    client, server = await connect("ours-client", ca, cert, alpn=["http/1.1"])
    assert isinstance(client, TLSStream)
    await client.aclose()
    await client.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await client.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"x")
    assert client.selected_alpn_protocol == "http/1.1"
    await server.aclose()


@pytest.mark.trio
async def test_aclose_wakes_blocked_receiver(ca: trustme.CA, cert: trustme.LeafCert) -> None:
    client, server = await connect("ours-client", ca, cert)

    async def blocked_reader() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await client.receive_some()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocked_reader)
        await trio.testing.wait_all_tasks_blocked()
        await client.aclose()
    await server.aclose()


@pytest.mark.trio
async def test_cancelled_receive_loses_nothing(ca: trustme.CA, cert: trustme.LeafCert) -> None:
    client, server = await connect("ours-client", ca, cert)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.receive_some)  # nothing to read yet: blocks in the transport
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    await server.send_all(b"still here")
    assert await client.receive_some() == b"still here"
    await client.aclose()
    await server.aclose()


@pytest.mark.trio
async def test_concurrent_receive_or_send_is_busy(ca: trustme.CA, cert: trustme.LeafCert) -> None:
    """Lockstep memory streams: a send blocks until the peer reads, so we can catch it mid-way."""
    client, server = await connect(
        "ours-client", ca, cert, transports=trio.testing.lockstep_stream_pair()
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.receive_some)
        nursery.start_soon(client.send_all, b"blocked until the peer reads")
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await client.receive_some()
        with pytest.raises(trio.BusyResourceError):
            await client.send_all(b"x")
        # Unblock both: the peer reads our data and sends some back.
        assert await server.receive_some() == b"blocked until the peer reads"
        await server.send_all(b"reply")
    # Forcefully: nobody reads on lockstep streams any more, so close_notify could never land.
    await trio.aclose_forcefully(server)
    await trio.aclose_forcefully(client)


@pytest.mark.trio
async def test_aclose_does_not_hang_on_unread_peer(
    autojump_clock: trio.testing.MockClock, ca: trustme.CA, cert: trustme.LeafCert
) -> None:
    """The peer never reads, so close_notify can't be delivered: aclose gives up on time."""
    client, server = await connect(
        "ours-client", ca, cert, transports=trio.testing.lockstep_stream_pair()
    )
    start = trio.current_time()
    await client.aclose()
    assert trio.current_time() - start == pytest.approx(CLOSE_NOTIFY_TIMEOUT)
    await trio.aclose_forcefully(server)


@pytest.mark.trio
async def test_transport_can_be_any_stream(ca: trustme.CA, cert: trustme.LeafCert) -> None:
    client, server = await connect(
        "ours-both", ca, cert, transports=trio.testing.memory_stream_pair()
    )
    await client.send_all(b"ping")
    assert await server.receive_some() == b"ping"
    await server.send_all(b"pong")
    assert await client.receive_some() == b"pong"
    await client.aclose()
    assert await server.receive_some() == b""
    await server.aclose()


async def test_the_send_lock_excludes_hands_over_in_order_and_forgets_a_cancelled_waiter() -> None:
    lock = _SendLock()
    lock.acquire_nowait()
    with pytest.raises(trio.WouldBlock):
        lock.acquire_nowait()
    order: list[str] = []

    async def taker(name: str) -> None:
        await lock.acquire()
        order.append(name)
        await trio.lowlevel.checkpoint()  # still held across a schedule point
        lock.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(taker, "first")
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as inner:
            inner.start_soon(taker, "cancelled")
            await trio.testing.wait_all_tasks_blocked()
            inner.cancel_scope.cancel()  # it leaves the queue while parked
        nursery.start_soon(taker, "second")
        await trio.testing.wait_all_tasks_blocked()
        assert order == []  # both wait for the holder
        lock.release()  # handed to "first", then on in arrival order
    assert order == ["first", "second"]
    assert not lock.locked()


async def test_the_socket_is_used_directly_with_socket_streams_checkpoints(
    ca: trustme.CA, cert: trustme.LeafCert
) -> None:
    """A TLSStream writes and reads a SocketStream's socket itself: the same bytes, a full
    socket waited for, and a TLSStream's calls checkpoints (cancellation and schedule point) as
    ``SocketStream``'s own, whether or not they had to wait."""
    client, server = await tcp_pair()
    await send_to_socket(client.socket, b"ping")  # room in the socket: no wait
    assert await receive_from_socket(server.socket, 100) == b"ping"
    tls_client, tls_server = await connect("ours-both", ca, cert)
    with trio.testing.assert_checkpoints():
        await tls_client.send_all(b"pong")
    with trio.testing.assert_checkpoints():
        assert await tls_server.receive_some(100) == b"pong"
    await tls_client.aclose()
    await tls_server.aclose()
    # more than the socket buffers hold: the send waits until the peer reads
    payload = bytes(range(256)) * (64 * 1024)  # 16 MiB
    received = bytearray()

    async def read_all() -> None:
        while len(received) < len(payload):
            received.extend(await receive_from_socket(server.socket, RECEIVE_SIZE))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        await send_to_socket(client.socket, payload)
    assert received == payload
    # a receive with nothing there waits; cancelled, it took nothing
    with trio.move_on_after(0.05) as scope:
        await receive_from_socket(server.socket, 100)
    assert scope.cancelled_caught
    # the end, and a closed socket
    await client.aclose()
    assert await receive_from_socket(server.socket, 100) == b""
    await server.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await receive_from_socket(server.socket, 100)
    with pytest.raises(trio.ClosedResourceError):
        await send_to_socket(server.socket, b"x")


async def test_a_tls_stream_over_a_socket_stream_reads_and_writes_its_socket(
    ca: trustme.CA, cert: trustme.LeafCert
) -> None:
    client, server = await connect("ours-both", ca, cert)
    assert isinstance(client, TLSStream) and isinstance(server, TLSStream)
    assert client._socket is client.transport_stream.socket
    await client.send_all(b"hello")
    assert await server.receive_some(100) == b"hello"
    await client.aclose()
    await server.aclose()


async def test_a_head_goes_first_in_a_record_of_its_own(
    ca: trustme.CA, cert: trustme.LeafCert
) -> None:
    """``send_all(data, head=...)``: the head, then the data (more than one send chunk here),
    in order and whole, a peer's TLS stack reading them as one byte stream; a head alone too."""
    client, server = await connect("ours-client", ca, cert)
    assert isinstance(client, TLSStream)
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 300000\r\n\r\n"
    payload = random.Random(7).randbytes(300_000)
    received = bytearray()

    async def read(count: int) -> None:
        while len(received) < count:
            received.extend(await server.receive_some(RECEIVE_SIZE))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, len(head) + len(payload))
        await client.send_all(payload, head=head)
    assert bytes(received) == head + payload
    received.clear()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, 4)
        await client.send_all(b"", head=b"only")
    assert received == b"only"
    await client.aclose()
    await server.aclose()
