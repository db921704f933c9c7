"""Connection-level behaviour: the listener (behaviour 1), keep-alive and the upstream pool
(7), malformed requests and faults (9), disconnects, backpressure (5) and shutdown (10)."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import socket
import ssl
import struct
import warnings
from pathlib import Path

import h11
import pytest
import trio
import trio.testing
import trustme

from hubproxy.app import build_proxy
from hubproxy.config import Config, Limits
from hubproxy.net.buffers import LARGEST as CHUNK
from hubproxy.net.server import (
    AccessRecord,
    ClientConnection,
    ClientRequest,
    ClientResponse,
    Server,
)
from hubproxy.net.settings import ListenerSettings
from hubproxy.net.turns import Turns
from hubproxy.net.watch import Watches
from hubproxy.policy.proxies import parse_proxy_url
from hubproxy.policy.urls import Origin, parse_url
from tests.conftest import StartProxy
from tests.fakehub import FakeHub, fetch, make_layer
from tests.fakeproxy import ConnectProxy
from tests.registry_client import RegistryClient
from tests.wire import WireClient, open_stream, read_until_closed


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def _token(proxy_url: str, ca: trustme.CA, repo: str = "library/alpine") -> str:
    client = RegistryClient(proxy_url, ca)
    r = await client.request(f"/v2/{repo}/tags/list")
    assert r.status == 200
    return client.tokens[""]


async def _ask_blob(proxy_url: str, ca: trustme.CA, layer: bytes) -> WireClient:
    """A client on a new connection that sent its GET of ``layer`` (library/alpine's)."""
    token = await _token(proxy_url, ca)
    client = await WireClient.connect(proxy_url, ca)
    await client.send_request(
        "GET",
        f"/v2/library/alpine/blobs/{digest_of(layer)}",
        [("authorization", f"Bearer {token}")],
    )
    return client


# -- listener -----------------------------------------------------------------------------------


async def test_tls_listener_negotiates_http11_and_refuses_old_tls(
    start_proxy: StartProxy, ca: trustme.CA
) -> None:
    proxy = await start_proxy()
    stream = await open_stream(proxy.url, ca, alpn=["h2", "http/1.1"])
    assert isinstance(stream, trio.SSLStream)
    assert stream.selected_alpn_protocol() == "http/1.1"
    await stream.aclose()
    tls12 = ssl.create_default_context()
    ca.configure_trust(tls12)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    tcp = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    ok = trio.SSLStream(tcp, tls12, server_hostname="127.0.0.1")
    await ok.do_handshake()
    await ok.aclose()
    old = ssl.create_default_context()
    ca.configure_trust(old)
    with warnings.catch_warnings():  # TLS 1.0/1.1 are deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    tcp = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    legacy = trio.SSLStream(tcp, old, server_hostname="127.0.0.1")
    with pytest.raises(trio.BrokenResourceError):
        await legacy.do_handshake()
    await trio.aclose_forcefully(legacy)


async def test_ipv6_listener(hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA) -> None:
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    proxy = await start_proxy(listen_host="::1")
    host, port = proxy.server.bound[0][:2]
    assert host == "::1"
    r = await fetch(f"https://[::1]:{port}/v2/", ca)
    assert r.status == 401
    assert f'realm="https://[::1]:{port}/token/0"' in r.headers["www-authenticate"]


async def test_keep_alive_serves_many_requests_on_one_connection(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    layers = [make_layer(i, 50_000 + i) for i in range(6)]
    hub.add_image("library/alpine", "3.20", layers)
    proxy = await start_proxy()
    token = await _token(proxy.url, ca)
    client = await WireClient.connect(proxy.url, ca)
    for layer in layers:
        head, body = await client.request(
            "GET",
            f"/v2/library/alpine/blobs/{digest_of(layer)}",
            [("authorization", f"Bearer {token}")],
        )
        assert head.status_code == 200
        assert body == layer
    await client.aclose()
    assert len(proxy.server.connections) <= 1
    # upstream keep-alive: the registry and the CDN were each reached over very few connections
    assert proxy.proxy.pool.opened <= 3 + 2  # registry, auth, CDN (+ the token client's)


async def test_concurrent_clients(hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA) -> None:
    layers = [make_layer(i, 200_000) for i in range(8)]
    hub.add_image("library/alpine", "3.20", layers)
    proxy = await start_proxy()
    token = await _token(proxy.url, ca)
    results: dict[int, bytes] = {}

    async def pull(i: int) -> None:
        r = await fetch(
            f"{proxy.url}/v2/library/alpine/blobs/{digest_of(layers[i])}",
            ca,
            headers=[("authorization", f"Bearer {token}")],
        )
        results[i] = r.body

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i in range(len(layers)):
                nursery.start_soon(pull, i)
    assert all(results[i] == layers[i] for i in range(len(layers)))


# -- malformed input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET /v2/ HTTP/1.1\r\nhost: x\r\nbad header line\r\n\r\n", b"400"),
        (b"GET /v2/ HTTP/1.1\nhost: x\n\n", b"400"),  # bare LF
        (b"GET /v2/ HTTP/1.1\r\nhost: x\r\nx-a: 1\r\n  folded\r\n\r\n", b"400"),  # obs-fold
        (b"GET /v2/ HTTP/1.1\r\nhost: x\r\nx: " + b"a" * 70_000 + b"\r\n\r\n", b"431"),
        (b"GET http://evil.example/v2/ HTTP/1.1\r\nhost: evil.example\r\n\r\n", b"400"),
        (b"GET /v2/" + b"a" * 9000 + b" HTTP/1.1\r\nhost: x\r\n\r\n", b"414"),
        (b"GET /v2/ HTTP/1.1\r\nhost: x\r\n" + b"x-h: 1\r\n" * 150 + b"\r\n", b"431"),
        (b"CONNECT evil.example:443 HTTP/1.1\r\nhost: evil.example:443\r\n\r\n", b"400"),
        (
            b"PATCH /v2/x/blobs/uploads/u HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n"
            b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            b"400",
        ),
        (
            b"PATCH /v2/x/blobs/uploads/u HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n"
            b"content-length: 4\r\n\r\nabcd",
            b"400",
        ),
        (
            b"PATCH /v2/x/blobs/uploads/u HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked"
            b"\r\n\r\nzz\r\n",
            b"400",
        ),
    ],
)
async def test_malformed_requests_get_an_error_and_close(
    start_proxy: StartProxy, ca: trustme.CA, raw: bytes, status: bytes
) -> None:
    proxy = await start_proxy(tls=False)
    stream = await open_stream(proxy.url, ca)
    await stream.send_all(raw)
    with trio.fail_after(10):
        answer = await read_until_closed(stream)  # the server closes after answering
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:100]
    assert b'"errors"' in answer
    await stream.aclose()
    # the process serves on
    assert (await fetch(proxy.url + "/v2/", ca)).status == 401


async def test_stalled_handshake_and_idle_clients_are_dropped(
    start_proxy: StartProxy, ca: trustme.CA
) -> None:
    proxy = await start_proxy(
        timeouts={"handshake": 0.2, "request_head": 0.2, "keepalive_idle": 0.2}
    )
    tcp = await trio.open_tcp_stream("127.0.0.1", proxy.port)  # never says hello
    with trio.fail_after(10):
        assert await read_until_closed(tcp) == b""
    await tcp.aclose()
    client = await WireClient.connect(proxy.url, ca)  # handshakes, never sends a request
    with trio.fail_after(10):
        assert await read_until_closed(client.stream) == b""
    await client.aclose()
    client = await WireClient.connect(proxy.url, ca)
    head, _ = await client.request("GET", "/v2/")
    assert head.status_code == 401
    with trio.fail_after(10):  # then idles past the keep-alive timeout
        assert await read_until_closed(client.stream) == b""
    await client.aclose()


async def test_a_wait_for_a_request_head_is_an_entry_in_the_servers_table_of_its_timeout(
    start_proxy: StartProxy, ca: trustme.CA
) -> None:
    """The first head's wait and each next one's are watched by the server's tables (their
    expiry closes the connection: the test above), not by a deadline scope per request."""
    proxy = await start_proxy(timeouts={"request_head": 30.0, "keepalive_idle": 40.0})
    server = proxy.server
    client = await WireClient.connect(proxy.url, ca)
    with trio.fail_after(10):
        await trio.testing.wait_all_tasks_blocked()  # the server waits for the first head
    assert (len(server.heads), len(server.keepalives)) == (1, 0)
    head, _ = await client.request("GET", "/v2/")
    assert head.status_code == 401
    with trio.fail_after(10):
        await trio.testing.wait_all_tasks_blocked()  # ... and now for a next one
    assert (len(server.heads), len(server.keepalives)) == (0, 1)
    await client.aclose()
    with trio.fail_after(10):
        while server.connections:
            await server.wait_connections_changed()
    assert len(server.heads) == len(server.keepalives) == 0


@pytest.mark.parametrize("what", ["challenge", "manifest", "blob"])
async def test_a_served_request_leaves_no_cycle_for_the_garbage_collector(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path, what: str
) -> None:
    """Each request's objects go when it ends, by reference counting: a cycle through its
    departure watch (the response held the watch, whose look holds the response) kept every
    request's response, record and head until a collection, 3-5% of a cached manifest's
    instructions (callgrind). Passed on, cached and answered from the cache alike."""
    layer = make_layer(6, 10_000)
    hub.add_image("library/alpine", "3.20", [layer])
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    targets = {
        "challenge": ("/v2/", 401),
        "manifest": ("/v2/library/alpine/manifests/3.20", 200),
        "blob": (f"/v2/library/alpine/blobs/{digest_of(layer)}", 200),
    }
    target, status = targets[what]
    auth = (
        [] if what == "challenge" else [("authorization", f"Bearer {await _token(proxy.url, ca)}")]
    )
    client = await WireClient.connect(proxy.url, ca)
    gc.collect()
    gc.disable()
    try:
        for _ in range(6):  # the first a miss, the others hits
            head, _ = await client.request("GET", target, auth)
            assert head.status_code == status
        alive = sum(isinstance(o, ClientResponse) for o in gc.get_objects())
    finally:
        gc.enable()
    assert alive <= 1  # the last request's (its task may not have quite ended)
    await client.stream.aclose()


async def test_a_client_that_leaves_before_its_answer_frees_the_upstream_at_once(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    """The client closes while its blob waits on a CDN that has not answered yet: the exchange
    done for it is cancelled and its slot freed at once, not when the upstream idle timeout
    (60 s) ends it (it used to hold the slot, and a place in the client's share, till then)."""
    layer = make_layer(4, 200_000)
    hub.add_image("library/alpine", "3.20", [layer])
    stall = hub.stall_blob(digest_of(layer))  # the CDN holds its answer until released
    proxy = await start_proxy()
    client = await _ask_blob(proxy.url, ca, layer)
    cdn = parse_url(hub.cdn_url).origin
    with trio.fail_after(10):
        await stall.reached.wait()
        assert proxy.proxy.pool.in_use(cdn) == 1
        await client.aclose()
        while proxy.proxy.pool.in_use(cdn):
            await proxy.proxy.pool.wait_changed()
        while proxy.server.connections:
            await proxy.server.wait_connections_changed()
    stall.release.set()


async def test_a_request_pipelined_behind_a_waiting_one_is_answered(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    """Bytes a client sends while its request is served (the watch for a departed client reads
    them) are the next request, answered in turn on the same connection."""
    layer = make_layer(5, 50_000)
    hub.add_image("library/alpine", "3.20", [layer])
    stall = hub.stall_blob(digest_of(layer))
    proxy = await start_proxy()
    token = await _token(proxy.url, ca)
    stream = await open_stream(proxy.url, ca)
    host = proxy.url.split("//", 1)[1]
    blob = (
        f"GET /v2/library/alpine/blobs/{digest_of(layer)} HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    )
    with trio.fail_after(10):
        await stream.send_all(blob.encode())
        await stall.reached.wait()
        await stream.send_all(f"GET /v2/ HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        stall.release.set()
        client = WireClient(stream, host)
        assert (await client.receive_head()).status_code == 200
        assert await client.receive_body() == layer
        second = WireClient(stream, host)  # its request went out by hand, above
        second.conn.send(h11.Request(method="GET", target="/v2/", headers=[("host", host)]))
        second.conn.send(h11.EndOfMessage())
        if client.conn.trailing_data[0]:  # (b"" would tell h11 the connection closed)
            second.conn.receive_data(client.conn.trailing_data[0])
        assert (await second.receive_head()).status_code == 401
    await client.aclose()


async def test_client_disconnect_mid_blob_releases_everything(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    big = make_layer(3, 24 * 1024 * 1024)
    hub.add_image("library/alpine", "3.20", [big])
    proxy = await start_proxy()
    token = await _token(proxy.url, ca)
    client = await WireClient.connect(proxy.url, ca)
    await client.send_request(
        "GET", f"/v2/library/alpine/blobs/{digest_of(big)}", [("authorization", f"Bearer {token}")]
    )
    head = await client.receive_head()
    assert head.status_code == 200
    await client.receive_body(limit=1024 * 1024)
    await client.aclose()
    with trio.fail_after(10):
        while proxy.server.connections:
            await proxy.server.wait_connections_changed()
    cdn = parse_url(hub.cdn_url).origin
    assert proxy.proxy.pool.in_use(cdn) == 0
    assert proxy.proxy.pool.idle_count(cdn) == 0  # a half-read connection is never reused
    # and the mirror still serves the blob whole
    r = await fetch(
        f"{proxy.url}/v2/library/alpine/blobs/{digest_of(big)}",
        ca,
        headers=[("authorization", f"Bearer {token}")],
    )
    assert r.complete
    assert digest_of(r.body) == digest_of(big)


async def test_stalled_upstream_hits_the_read_timeout(
    nursery: trio.Nursery, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    """An upstream that accepts the connection and then says nothing: a 504, not a hang."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    accepted: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await trio.sleep_forever()

    nursery.start_soon(trio.serve_listeners, hold, listeners)
    proxy = await start_proxy(upstream=f"http://127.0.0.1:{port}", timeouts={"upstream_idle": 0.3})
    with trio.fail_after(10):
        r = await fetch(proxy.url + "/v2/", ca)
    assert r.status == 504
    assert r.json()["errors"][0]["code"] == "UNAVAILABLE"
    assert "sent nothing" in r.json()["errors"][0]["message"]


async def test_garbage_from_upstream_is_a_502(
    nursery: trio.Nursery, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def garbage(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await stream.aclose()

    nursery.start_soon(trio.serve_listeners, garbage, listeners)
    proxy = await start_proxy(upstream=f"http://127.0.0.1:{port}")
    r = await fetch(proxy.url + "/v2/", ca)
    assert r.status == 502
    assert "malformed response" in r.json()["errors"][0]["message"]


# -- upstream proxy -----------------------------------------------------------------------------


async def test_upstream_proxy_carries_every_upstream_connection(
    nursery: trio.Nursery, hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    layer = make_layer(5, 100_000)
    hub.add_image("library/alpine", "3.20", [layer])
    tunnel = ConnectProxy()
    await nursery.start(tunnel.serve)
    proxy = await start_proxy(upstream_proxy=parse_proxy_url(tunnel.url))
    client = RegistryClient(proxy.url, ca)
    r = await client.request(f"/v2/library/alpine/blobs/{digest_of(layer)}")
    assert r.status == 200
    assert r.body == layer
    wanted = {u.removeprefix("https://") for u in (hub.registry_url, hub.auth_url, hub.cdn_url)}
    assert wanted <= set(tunnel.connects)


# -- backpressure -------------------------------------------------------------------------------


async def test_a_client_that_stops_reading_is_dropped_after_the_idle_timeout(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that takes the head and the first bytes of a blob, then reads nothing more: once
    no byte could leave for ``client_idle``, its connection is closed (it held a connection,
    the chunk it stalled, and its upstream exchange), and its access line says the answer was
    cut."""
    caplog.set_level(logging.INFO, logger="hubproxy.access")
    layer = make_layer(5, 16 * 1024 * 1024)  # far more than the sockets' buffers hold
    hub.add_image("library/alpine", "3.20", [layer])
    proxy = await start_proxy(timeouts={"client_idle": 0.5})
    client = await _ask_blob(proxy.url, ca, layer)
    with trio.fail_after(10):
        assert (await client.receive_head()).status_code == 200
        assert await client.receive_body(limit=1)
        while proxy.server.connections:
            await proxy.server.wait_connections_changed()
    await client.aclose()
    [line] = [r.getMessage() for r in caplog.records if "/blobs/" in r.getMessage()]
    assert " 200/aborted " in line, line


async def test_slow_client_holds_at_most_one_chunk_per_transfer(nursery: trio.Nursery) -> None:
    """Lockstep streams buffer nothing, so whatever the origin got rid of and the client has
    not yet read is exactly what hubproxy holds for this transfer."""
    size = 16 * 1024 * 1024
    body_piece = bytes(range(256)) * 256  # 64 KiB
    origin_side, proxy_upstream = trio.testing.lockstep_stream_pair()
    client_side, proxy_client = trio.testing.lockstep_stream_pair()
    sent = 0

    async def origin() -> None:
        nonlocal sent
        request = b""
        while b"\r\n\r\n" not in request:
            request += await origin_side.receive_some(65536)
        await origin_side.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
            b"content-length: %d\r\n\r\n" % size
        )
        while sent < size:
            await origin_side.send_all(body_piece)
            sent += len(body_piece)

    async def connector(origin: Origin, profile: str) -> trio.abc.Stream:
        return proxy_upstream

    config = Config(upstreams=(parse_url("http://origin.test"),), library_prefix=False)
    proxy = build_proxy(config, connector=connector)
    server = Server(config.listener)
    client = ClientConnection(
        proxy_client, settings=config.listener, client_ip="127.0.0.1", scheme="http"
    )
    nursery.start_soon(origin)
    nursery.start_soon(client.serve, proxy.handle, server)
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="GET", target="/v2/x/blobs/sha256:" + "a" * 64, headers=[("host", "m")]
    )
    await client_side.send_all(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
    received = 0
    most_held = 0
    with trio.fail_after(60):
        while received < size:
            data = await client_side.receive_some(16 * 1024)  # a slow, small reader
            conn.receive_data(bytes(data))
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    break
                if isinstance(event, h11.Data):
                    received += len(event.data)
            most_held = max(most_held, sent - received)
    assert received == size
    assert most_held <= 2 * CHUNK, most_held


# -- small scripted upstreams -------------------------------------------------------------------


async def _scripted_upstream(
    nursery: trio.Nursery,
    answer: dict[str, tuple[int, list[tuple[str, str]], bytes]],
    *,
    close_after_each: bool = False,
    drop_second_request: bool = False,
) -> tuple[str, list[str]]:
    """A plain-HTTP upstream answering by path; optionally closing every connection after one
    response (without saying so: like a server whose keep-alive timeout just fired), or closing
    it when a second request arrives on it (the same timeout firing just as we reuse it)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    seen: list[str] = []

    async def handle(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        requests = 0
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(bytes(data))
                    continue
                if isinstance(event, h11.Request):
                    requests += 1
                    if drop_second_request and requests == 2:
                        return
                    target = event.target.decode()
                    seen.append(target)
                    status, headers, body = answer[target]
                    headers = [*headers, ("content-length", str(len(body)))]
                    out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
                    out += conn.send(h11.Data(data=body)) or b""
                    out += conn.send(h11.EndOfMessage()) or b""
                    await stream.send_all(out)
                elif isinstance(event, h11.EndOfMessage):
                    if close_after_each:
                        return
                    conn.start_next_cycle()
                else:
                    return

    nursery.start_soon(trio.serve_listeners, handle, listeners)
    return f"http://127.0.0.1:{port}", seen


async def test_basic_challenges_pass_through(
    nursery: trio.Nursery, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    challenge = 'Basic realm="private registry"'
    url, _ = await _scripted_upstream(
        nursery, {"/v2/": (401, [("www-authenticate", challenge)], b"{}")}
    )
    proxy = await start_proxy(upstream=url)
    r = await fetch(proxy.url + "/v2/", ca)
    assert r.status == 401
    assert r.headers["www-authenticate"] == challenge


async def test_upstream_closing_idle_connections_is_not_an_error(
    nursery: trio.Nursery, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    body = b'{"name":"library/x","tags":["1"]}'
    url, seen = await _scripted_upstream(
        nursery,
        {"/v2/library/x/tags/list": (200, [("content-type", "application/json")], body)},
        close_after_each=True,
    )
    proxy = await start_proxy(upstream=url)
    client = await WireClient.connect(proxy.url, ca)
    for _ in range(5):
        head, got = await client.request("GET", "/v2/x/tags/list")
        assert head.status_code == 200
        assert got == body
    await client.aclose()
    assert len(seen) == 5


async def test_pooled_connection_dying_on_reuse_is_retried_once(
    nursery: trio.Nursery, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    body = b'{"name":"library/x","tags":["1"]}'
    url, _seen = await _scripted_upstream(
        nursery,
        {"/v2/library/x/tags/list": (200, [("content-type", "application/json")], body)},
        drop_second_request=True,
    )
    proxy = await start_proxy(upstream=url)
    for _ in range(3):
        r = await fetch(proxy.url + "/v2/x/tags/list", ca)
        assert r.status == 200
        assert r.body == body
    assert proxy.proxy.pool.opened == 3  # each reuse failed, and each was retried on a new one


@pytest.mark.parametrize("tls", [False, True])
async def test_max_connections_refuses_the_excess_and_spares_the_rest(
    start_proxy: StartProxy, ca: trustme.CA, tls: bool
) -> None:
    """With every connection busy (here: a request head under way, so none is idle to close;
    see test_client_limits for idle ones making room) the excess is refused."""
    proxy = await start_proxy(tls=tls, max_connections=2)
    first = await WireClient.connect(proxy.url, ca)
    second = await WireClient.connect(proxy.url, ca)
    head, _ = await first.request("GET", "/v2/")  # both are being served
    assert head.status_code == 401
    rests = []
    for client in (first, second):
        if client.conn.our_state is h11.DONE:
            client.conn.start_next_cycle()
        data = client.conn.send(h11.Request(method="GET", target="/v2/", headers=[("host", "x")]))
        data += client.conn.send(h11.EndOfMessage())
        await client.stream.send_all(data[:-2])  # all but the head's last CRLF
        rests.append(data[-2:])
    await trio.testing.wait_all_tasks_blocked()
    excess = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    with trio.fail_after(10):
        answer = await read_until_closed(excess)
    await excess.aclose()
    if tls:
        assert answer == b""  # closed before any handshake
    else:
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert b'"code":"UNAVAILABLE"' in answer
    for client, rest in zip((first, second), rests, strict=True):  # the others are unharmed
        await client.stream.send_all(rest)
        head = await client.receive_head()
        assert head.status_code == 401
        await client.receive_body()
    await first.aclose()
    with trio.fail_after(10):
        while proxy.server.open_sockets >= 2:
            await proxy.server.wait_connections_changed()
    third = await WireClient.connect(proxy.url, ca)  # a slot is free again
    head, _ = await third.request("GET", "/v2/")
    assert head.status_code == 401
    await second.aclose()
    await third.aclose()


async def _raw_upstream(
    nursery: trio.Nursery, answer: bytes, *, close_at: int | None = None
) -> str:
    """A plain-HTTP upstream that reads one request head, sends ``answer`` (cut at ``close_at``
    bytes, then a reset) and closes."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def handle(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            request = b""
            while b"\r\n\r\n" not in request:
                data = await stream.receive_some(65536)
                if not data:
                    return
                request += data
            await stream.send_all(answer if close_at is None else answer[:close_at])
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()  # with SO_LINGER 0: a reset, not a clean close

    nursery.start_soon(trio.serve_listeners, handle, listeners)
    return f"http://127.0.0.1:{port}"


async def test_upstream_reset_during_headers_is_a_502_and_leaks_nothing(
    nursery: trio.Nursery, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-le"
    url = await _raw_upstream(nursery, answer)
    proxy = await start_proxy(upstream=url)
    r = await fetch(proxy.url + "/v2/x/tags/list", ca)
    assert r.status == 502
    assert r.json()["errors"][0]["code"] == "UNAVAILABLE"
    origin = parse_url(url).origin
    assert proxy.proxy.pool.in_use(origin) == 0
    assert proxy.proxy.pool.idle_count(origin) == 0


async def test_upstream_body_longer_than_its_length_is_cut_to_the_length(
    nursery: trio.Nursery, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    body = b'{"name":"x","tags":["1"]}'
    answer = (
        (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
            % len(body)
        )
        + body
        + b"GARBAGE THAT IS NOT A RESPONSE"
    )
    url = await _raw_upstream(nursery, answer)
    proxy = await start_proxy(upstream=url)
    r = await fetch(proxy.url + "/v2/x/tags/list", ca)
    assert r.status == 200
    assert r.body == body
    origin = parse_url(url).origin
    assert proxy.proxy.pool.idle_count(origin) == 0  # a connection with stray bytes is not reused


async def test_upstream_reset_mid_body_aborts_the_client(
    nursery: trio.Nursery, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    body = bytes(range(256)) * 400
    answer = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
        b"content-length: %d\r\n\r\n" % len(body)
    ) + body
    url = await _raw_upstream(nursery, answer, close_at=len(answer) // 2)
    proxy = await start_proxy(upstream=url)
    r = await fetch(proxy.url + "/v2/x/tags/list", ca)
    assert r.status == 200
    assert not r.complete
    assert proxy.proxy.pool.in_use(parse_url(url).origin) == 0


async def test_upstream_certificate_for_another_host_is_refused(
    nursery: trio.Nursery, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("registry.example.org").configure_cert(context)  # not 127.0.0.1
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def handshake_only(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, context, server_side=True)
        with contextlib.suppress(trio.BrokenResourceError):
            await tls.do_handshake()
        await trio.aclose_forcefully(tls)

    nursery.start_soon(trio.serve_listeners, handshake_only, listeners)
    proxy = await start_proxy(upstream=f"https://127.0.0.1:{port}")
    r = await fetch(proxy.url + "/v2/", ca)
    assert r.status == 502
    message = r.json()["errors"][0]["message"].lower()
    assert "certificate" in message or "hostname" in message


async def test_request_limits_are_configurable(start_proxy: StartProxy, ca: trustme.CA) -> None:
    proxy = await start_proxy(tls=False, limits=Limits(max_headers=5, max_target=64))
    headers = b"".join(b"x-%d: 1\r\n" % i for i in range(6))
    answer = await _exchange_raw(
        proxy.url, ca, b"GET /v2/ HTTP/1.1\r\nhost: x\r\n" + headers + b"\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 431 ")
    long_target = b"/v2/" + b"a" * 80
    answer = await _exchange_raw(
        proxy.url, ca, b"GET " + long_target + b" HTTP/1.1\r\nhost: x\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 414 ")
    answer = await _exchange_raw(
        proxy.url, ca, b"GET /v2/ HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 401 ")  # within the limits: served


async def _exchange_raw(url: str, ca: trustme.CA, raw: bytes) -> bytes:
    stream = await open_stream(url, ca)
    try:
        await stream.send_all(raw)
        with trio.fail_after(10):
            return await read_until_closed(stream)
    finally:
        await stream.aclose()


async def test_a_client_that_closes_after_its_whole_answer_cancels_nothing() -> None:
    """A client that reads its whole answer and closes at once (a one-shot client) has not
    left early: what the handler still does after the answer (putting an upstream connection
    back, bookkeeping) runs to its end and the access line says 200, not 200/aborted (a race
    that made tests/test_process.py flaky)."""
    ours, theirs = trio.socket.socketpair()
    peer = trio.SocketStream(theirs)
    client = ClientConnection(
        trio.SocketStream(ours), settings=ListenerSettings(), client_ip="127.0.0.1", scheme="http"
    )
    client.conn.receive_data(b"GET /v2/ HTTP/1.1\r\nhost: x\r\n\r\n")
    request = client.conn.next_event()
    assert isinstance(request, h11.Request)
    peer_closed = trio.Event()
    seen: dict[str, object] = {}

    async def handler(req: ClientRequest, response: ClientResponse) -> None:
        seen["record"] = response.record
        await response.start(200, [(b"content-length", b"2")])
        await response.send(b"ok")
        await response.finish()
        await peer_closed.wait()  # work after the answer, while the client is gone
        seen["after"] = True

    watches = Watches(after=0.0)  # every request watched from its start
    async with trio.open_nursery() as beside:
        beside.start_soon(watches.run)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._handle, request, handler, Turns(16, 30.0), watches)
            answer = await read_until_closed_or(peer, b"ok")
            assert answer.endswith(b"\r\n\r\nok")
            await peer.aclose()
            await trio.testing.wait_all_tasks_blocked()  # the watch has seen the close
            peer_closed.set()
        beside.cancel_scope.cancel()
    record = seen["record"]
    assert isinstance(record, AccessRecord)
    assert seen.get("after") is True
    assert (record.status, record.aborted) == (200, False)
    await client.stream.aclose()


async def read_until_closed_or(stream: trio.SocketStream, end: bytes) -> bytes:
    """Read until the data ends with ``end`` (or the peer closes)."""
    data = b""
    while not data.endswith(end) and (chunk := await stream.receive_some(65536)):
        data += chunk
    return data
