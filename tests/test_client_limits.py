"""One client cannot take the connections or the password checks from everyone else (issue 12,
cases 7 and 8): the per-address connection cap, idle connections reclaimed at the global cap
(never an active transfer), the wrong-password throttle per address, and one password check per
address in the scrypt queue.

A second client address is 127.0.0.2 (the whole of 127.0.0.0/8 is loopback on Linux): the
client socket is bound to it before connecting to the proxy on 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import ssl
import urllib.parse
from pathlib import Path

import h11
import pytest
import trio
import trio.testing
import trustme

from hubproxy.net.turns import Turns
from hubproxy.ops.usersfile import add_user, load_users
from hubproxy.policy import passwords
from hubproxy.policy.access import client_key
from hubproxy.policy.credentials import Authenticator
from hubproxy.policy.errors import MirrorBusy
from hubproxy.policy.fairshare import Standing
from hubproxy.proxy import OneEach
from tests.conftest import RunningProxy, StartProxy
from tests.fakehub import FakeHub, make_layer
from tests.registry_client import RegistryClient
from tests.wire import WireClient, read_until_closed

OTHER = "127.0.0.2"
HOST = ("host", "127.0.0.1")


async def connect_from(
    source: str, proxy: RunningProxy, ca: trustme.CA, *, handshake: bool = True
) -> WireClient:
    """A client connection to ``proxy`` whose address, as the proxy sees it, is ``source``."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", proxy.port))
    tcp = trio.SocketStream(sock)
    netloc = urllib.parse.urlsplit(proxy.url).netloc
    if not proxy.url.startswith("https:") or not handshake:
        return WireClient(tcp, netloc)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    stream = trio.SSLStream(tcp, context, server_hostname="127.0.0.1", https_compatible=True)
    await stream.do_handshake()
    return WireClient(stream, netloc)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- case 7: connections ------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True])
async def test_one_address_is_capped_and_others_are_served(
    start_proxy: StartProxy, ca: trustme.CA, tls: bool
) -> None:
    proxy = await start_proxy(tls=tls, max_connections=100, max_connections_per_client=2)
    mine = [await connect_from("127.0.0.1", proxy, ca) for _ in range(2)]
    for client in mine:
        head, _ = await client.request("GET", "/v2/")
        assert head.status_code == 401
    excess = await connect_from("127.0.0.1", proxy, ca, handshake=False)
    with trio.fail_after(10):
        answer = await read_until_closed(excess.stream)
    await excess.aclose()
    if tls:
        assert answer == b""  # closed before any handshake
    else:
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert b'"code":"UNAVAILABLE"' in answer and b"your address" in answer
    other = await connect_from(OTHER, proxy, ca)  # another address is not affected
    head, _ = await other.request("GET", "/v2/")
    assert head.status_code == 401
    for client in mine:  # and the capped address keeps what it has
        head, _ = await client.request("GET", "/v2/")
        assert head.status_code == 401
    figures = proxy.server.figures()
    assert figures.refused == {"max-connections-per-client": 1}
    assert figures.reclaimed == 0
    await mine.pop().aclose()
    with trio.fail_after(10):
        while proxy.server.per_client.get("127.0.0.1", 0) >= 2:
            await proxy.server.wait_connections_changed()
    again = await connect_from("127.0.0.1", proxy, ca)  # a slot of its own is free again
    head, _ = await again.request("GET", "/v2/")
    assert head.status_code == 401
    for client in (*mine, other, again):
        await client.aclose()


async def test_at_the_cap_the_oldest_idle_connection_makes_room_never_a_transfer(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    big = make_layer(5, 24 * 1024 * 1024)
    hub.add_image("library/alpine", "3.20", [big])
    proxy = await start_proxy(max_connections=3)
    token = RegistryClient(proxy.url, ca)
    assert (await token.request("/v2/library/alpine/tags/list")).status == 200
    auth = [("authorization", f"Bearer {token.tokens['']}")]
    busy = await connect_from("127.0.0.1", proxy, ca)
    await busy.send_request("GET", f"/v2/library/alpine/blobs/{digest_of(big)}", auth)
    assert (await busy.receive_head()).status_code == 200
    received = await busy.receive_body(limit=1024 * 1024)  # then it stops reading: mid-transfer
    oldest = await connect_from("127.0.0.1", proxy, ca)
    assert (await oldest.request("GET", "/v2/"))[0].status_code == 401
    newer = await connect_from(OTHER, proxy, ca)
    assert (await newer.request("GET", "/v2/"))[0].status_code == 401
    await trio.testing.wait_all_tasks_blocked()  # both wait for their next request
    figures = proxy.server.figures()
    assert (figures.handshake, figures.idle, figures.active) == (0, 2, 1)

    newcomer = await connect_from(OTHER, proxy, ca)  # full: the oldest idle one makes room
    assert (await newcomer.request("GET", "/v2/"))[0].status_code == 401
    with trio.fail_after(10):
        assert await read_until_closed(oldest.stream) == b""
    assert (await newer.request("GET", "/v2/"))[0].status_code == 401
    received += await busy.receive_body()  # the transfer was never touched
    assert digest_of(received) == digest_of(big)
    assert proxy.server.figures().reclaimed == 1
    assert proxy.server.figures().refused == {}
    for client in (busy, oldest, newer, newcomer):
        await client.aclose()


@pytest.mark.parametrize("tls", [False, True])
async def test_at_the_cap_with_nothing_idle_the_newcomer_is_refused(
    start_proxy: StartProxy, ca: trustme.CA, tls: bool
) -> None:
    """A connection with part of a request head received is not idle: it is not closed."""
    proxy = await start_proxy(tls=tls, max_connections=2)
    first = await connect_from("127.0.0.1", proxy, ca)
    second = await connect_from(OTHER, proxy, ca)
    heads = []
    for client in (first, second):  # each has sent all of a request head but its last CRLF
        data = client.conn.send(h11.Request(method="GET", target="/v2/", headers=[HOST]))
        data += client.conn.send(h11.EndOfMessage())
        heads.append(data)
        await client.stream.send_all(data[:-2])
    await trio.testing.wait_all_tasks_blocked()
    excess = await connect_from(OTHER, proxy, ca, handshake=False)
    with trio.fail_after(10):
        answer = await read_until_closed(excess.stream)
    await excess.aclose()
    if tls:
        assert answer == b""
    else:
        assert answer.startswith(b"HTTP/1.1 503 ") and b"this mirror" in answer
    for client, data in zip((first, second), heads, strict=True):  # both requests go on
        await client.stream.send_all(data[-2:])
        assert (await client.receive_head()).status_code == 401
    assert proxy.server.figures().refused == {"max-connections": 1}
    for client in (first, second):
        await client.aclose()


# -- case 8: logins -----------------------------------------------------------------------------


def basic(user: str, password: str) -> tuple[str, str]:
    return ("authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())


TOKEN = "/token/0?" + urllib.parse.urlencode(
    {"service": "registry.docker.io", "scope": "repository:library/alpine:pull"}
)


async def test_a_flooding_address_is_refused_without_scrypt_and_others_log_in(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    users = tmp_path / "users"
    add_user(users, "alice", "alice-pw")
    proxy = await start_proxy(users_file=str(users), login_failures=3)
    checks: list[str] = []

    def counting(stored: str, password: str) -> bool:
        checks.append(password)
        return passwords.verify_password(stored, password)

    admission = proxy.proxy.admission
    admission.reload_users(
        Authenticator(load_users(str(users)), stamp_key=b"k" * 32, verifier=counting)
    )
    attacker = await connect_from(OTHER, proxy, ca)
    for guess in ("a", "b"):
        head, _ = await attacker.request("GET", TOKEN, [basic("alice", guess)])
        assert head.status_code == 401
    head, _ = await attacker.request("GET", TOKEN, [basic("nobody", "c")])  # unknown: same cost
    assert head.status_code == 401
    assert checks == ["a", "b", "c"]
    for guess in ("d", "alice-pw"):  # out of tokens: refused before any password check
        head, body = await attacker.request("GET", TOKEN, [basic("alice", guess)])
        assert head.status_code == 429
        assert b'"code":"TOOMANYREQUESTS"' in body
        assert dict(head.headers)[b"retry-after"] == b"20"
    assert checks == ["a", "b", "c"]
    user = await connect_from("127.0.0.1", proxy, ca)  # another address logs in at once
    head, _ = await user.request("GET", TOKEN, [basic("alice", "alice-pw")])
    assert head.status_code == 200
    assert proxy.proxy.metrics.denied.get(reason="login") == 2
    for client in (attacker, user):
        await client.aclose()


async def test_one_password_check_per_address_in_the_queue() -> None:
    """Behind a FIFO limiter, OneEach makes the queue round-robin over addresses: a newcomer
    waits behind one check of the flooding address, not behind all of them."""
    turns = OneEach()
    limiter = trio.CapacityLimiter(1)
    order: list[str] = []
    release = trio.Event()

    async def check(address: str) -> None:
        async with turns.turn(address), limiter:
            order.append(address)
            await release.wait()

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(check, "flood")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(check, "newcomer")
        await trio.testing.wait_all_tasks_blocked()
        assert len(turns) == 2
        release.set()
    assert order[:2] == ["flood", "newcomer"]
    assert order == ["flood", "newcomer", "flood", "flood", "flood", "flood"]
    assert len(turns) == 0  # entries live only while held or awaited


# -- bursts: a few requests of one address worked on at once -----------------------------------


async def test_turns_are_per_address_in_arrival_order_and_time_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    turns = Turns(2, wait_timeout=30.0)
    await turns.take("a")
    await turns.take("a")
    got: list[str] = []

    async def take(name: str) -> None:
        await turns.take("a")
        got.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, "first")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(take, "second")
        await trio.testing.wait_all_tasks_blocked()
        assert turns.waiting() == 2 and got == []
        await turns.take("b")  # another address never queues behind "a"
        turns.give_back("b")
        turns.give_back("a")
        await trio.testing.wait_all_tasks_blocked()
        assert got == ["first"]
        turns.give_back("a")
    assert got == ["first", "second"]
    with pytest.raises(MirrorBusy, match="2 requests from this address"):
        await turns.take("a")  # both turns held: 503 after the wait timeout
    assert (turns.waits, turns.wait_timeouts) == (3, 1)
    turns.give_back("a")
    turns.give_back("a")
    assert not turns.active and turns.waiting() == 0


async def test_a_burst_from_one_address_is_worked_on_a_few_at_a_time(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    """With two turns per address, a third request from it waits (it never reaches the
    upstream) while another address is answered; it goes on once an answer starts."""
    layers = [make_layer(60 + i, 10_000) for i in range(3)]
    hub.add_image("library/alpine", "3.20", layers)
    stalls = [hub.stall_blob(digest_of(layer)) for layer in layers]
    proxy = await start_proxy(max_pending_per_client=2)
    client = RegistryClient(proxy.url, ca)
    assert (await client.request("/v2/library/alpine/tags/list")).status == 200
    [token] = client.tokens.values()
    auth = [("authorization", f"Bearer {token}")]
    mine = [await connect_from("127.0.0.1", proxy, ca) for _ in layers]
    turns = proxy.server.turns
    with trio.fail_after(10):
        for conn, layer, stall in zip(mine[:2], layers, stalls, strict=False):
            await conn.send_request("GET", f"/v2/library/alpine/blobs/{digest_of(layer)}", auth)
            await stall.reached.wait()
        await mine[2].send_request("GET", f"/v2/library/alpine/blobs/{digest_of(layers[2])}", auth)
        while turns.waiting() < 1:
            await turns.wait_changed()
        other = await connect_from(OTHER, proxy, ca)
        head, _ = await other.request("GET", "/v2/")  # another address is served meanwhile
        assert head.status_code == 401
        assert not stalls[2].reached.is_set()
        assert not [r for r in hub.requests if digest_of(layers[2])[7:] in r.target]
        stalls[0].release.set()  # its answer starts: the waiting request takes the turn
        await stalls[2].reached.wait()
        for stall in stalls[1:]:
            stall.release.set()
        for conn, layer in zip(mine, layers, strict=True):
            assert (await conn.receive_head()).status_code == 200
            assert await conn.receive_body() == layer
    assert turns.wait_timeouts == 0
    for conn in (*mine, other):
        await conn.aclose()


async def test_the_fair_share_is_told_which_addresses_are_connected(
    start_proxy: StartProxy, ca: trustme.CA
) -> None:
    """An address with the only connections is sole (its units are never held, nobody waits
    behind them); another's connection ends that from its accept, and for ``present_for``
    after it closes."""
    proxy = await start_proxy()
    server = proxy.server
    share = server.fairness.share
    mine, theirs = client_key("127.0.0.1"), client_key(OTHER)
    conn = await connect_from("127.0.0.1", proxy, ca)
    assert share.standing(mine, trio.current_time()) is Standing.SOLE
    other = await connect_from(OTHER, proxy, ca)
    assert theirs in server.per_client
    assert share.standing(mine, trio.current_time()) is not Standing.SOLE
    await other.aclose()
    with trio.fail_after(10):
        while theirs in server.per_client:
            await server.wait_connections_changed()
    left = trio.current_time()
    assert share.standing(mine, left) is not Standing.SOLE
    assert share.standing(mine, left + share.rules.present_for + 0.01) is Standing.SOLE
    await conn.aclose()
    with trio.fail_after(10):
        while mine in server.per_client:
            await server.wait_connections_changed()
    assert share.standing(mine, left + share.rules.present_for + 0.01) is not Standing.SOLE


async def test_connections_waiting_to_be_accepted_are_taken_in_one_round(
    start_proxy: StartProxy,
) -> None:
    """A burst of connections queued in the kernel is accepted in one step of the accept loop,
    not one per scheduler round: a client that connects just after a burst of a hundred is not
    left a hundred rounds in the backlog, where the fair share cannot put it first."""
    proxy = await start_proxy(tls=False)
    server = proxy.server
    before = server.open_sockets
    # connected without a checkpoint in between: all of them wait in the backlog together
    socks = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(40)]
    try:
        first_round = server.fairness.batch
        with trio.fail_after(10):
            while server.open_sockets < before + 40:
                await trio.lowlevel.checkpoint()
        assert server.fairness.batch - first_round <= 3  # one at a time: about 40
    finally:
        for sock in socks:
            sock.close()
