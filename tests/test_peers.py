"""--peer: one upstream fetch per blob across instances (rendezvous owners, fills from the
owner, a dead or silent owner skipped, no forwarding loops, the instance finding itself)."""

from __future__ import annotations

import hashlib
import logging
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from hubproxy.app import App, StartupError, serve
from hubproxy.cache.pullthrough import PullThrough
from hubproxy.cli import UsageError, load_settings
from hubproxy.ops.usersfile import add_user
from hubproxy.policy.peers import PEER_MARKER, PeerAnswer, owner, peer_answer, self_index
from hubproxy.policy.registries import Registry
from hubproxy.policy.urls import base_url
from tests.conftest import RunningProxy, TLSFiles, make_config
from tests.fakehub import MEDIA_DOCKER_MANIFEST, FakeHub, fetch, make_layer, sha256_digest
from tests.registry_client import RegistryClient
from tests.test_operations import metric_samples, sample
from tests.test_statuspage import _table_rows, parse
from tests.wire import WireClient

ACCEPT = [("accept", MEDIA_DOCKER_MANIFEST)]
DIGESTS = [f"sha256:{hashlib.sha256(b'%d' % n).hexdigest()}" for n in range(2000)]


# -- policy: the owner of a digest --------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 3, 5])
def test_every_peer_owns_a_fair_share_and_the_owner_is_stable(count: int) -> None:
    peers = [f"https://10.0.0.{n}:5000" for n in range(count)]
    owners = Counter(owner(digest, peers) for digest in DIGESTS)
    assert set(owners) == set(range(count))
    fair = len(DIGESTS) / count
    assert all(0.7 * fair < owned < 1.3 * fair for owned in owners.values())
    # the order of the list does not matter: each instance may spell it in its own order
    backwards = peers[::-1]
    assert all(
        peers[owner(digest, peers)] == backwards[owner(digest, backwards)] for digest in DIGESTS
    )


@pytest.mark.parametrize("count", [2, 3, 5])
def test_a_peer_added_or_removed_moves_only_its_share(count: int) -> None:
    peers = [f"https://10.0.0.{n}:5000" for n in range(count)]
    grown = [*peers, "https://10.0.0.99:5000"]
    moved = [d for d in DIGESTS if peers[owner(d, peers)] != grown[owner(d, grown)]]
    # only digests the new peer takes move, about 1/(N+1) of them
    assert all(grown[owner(d, grown)] == "https://10.0.0.99:5000" for d in moved)
    assert 0.7 < len(moved) / (len(DIGESTS) / (count + 1)) < 1.3
    shrunk = peers[1:]
    if shrunk:
        moved = [d for d in DIGESTS if peers[owner(d, peers)] != shrunk[owner(d, shrunk)]]
        assert all(owner(d, peers) == 0 for d in moved)  # only the removed peer's digests


@pytest.mark.parametrize(
    ("status", "answer"),
    [
        (200, PeerAnswer.FILL),
        (401, PeerAnswer.ASK_UPSTREAM),
        (403, PeerAnswer.PASS),
        (404, PeerAnswer.PASS),
        (429, PeerAnswer.SKIP),
        (500, PeerAnswer.SKIP),
        (502, PeerAnswer.SKIP),
        (307, PeerAnswer.SKIP),
    ],
)
def test_a_peers_answer_is_filled_passed_on_or_skipped(status: int, answer: PeerAnswer) -> None:
    assert peer_answer(status) is answer


def test_this_instance_is_in_the_list_exactly_once() -> None:
    peers = ["https://a:5000", "https://b:5000"]
    assert self_index(peers, [False, True], "0.0.0.0:5000") == 1
    with pytest.raises(ValueError, match=r"none of .* is this instance"):
        self_index(peers, [False, False], "0.0.0.0:5000")
    with pytest.raises(ValueError, match="several URLs name this instance"):
        self_index(peers, [True, True], "0.0.0.0:5000")


# -- instances ------------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (each instance must know the others' before they start)."""
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


class Instance:
    def __init__(self, proxy: RunningProxy, scope: trio.CancelScope, stopped: trio.Event) -> None:
        self.proxy = proxy
        self.scope = scope
        self.stopped = stopped

    async def stop(self) -> None:
        self.scope.cancel()
        await self.stopped.wait()


async def start(
    nursery: trio.Nursery,
    hub: FakeHub,
    tls_files: TLSFiles,
    port: int,
    peers: list[str],
    cache_dir: Path,
    **overrides: Any,
) -> Instance:
    config = make_config(
        hub,
        tls_files,
        listen_port=port,
        cache_dir=str(cache_dir),
        peers=tuple(base_url(url) for url in peers),
        peer_ca=str(tls_files.ca_pem),
        **overrides,
    )
    scope, stopped = trio.CancelScope(), trio.Event()

    async def run(*, task_status: trio.TaskStatus[App]) -> None:
        try:
            with scope:
                await serve(config, task_status=task_status)
        finally:
            stopped.set()

    app: App = await nursery.start(run)
    return Instance(RunningProxy(f"https://127.0.0.1:{port}", app, config), scope, stopped)


async def pull(proxy: RunningProxy, ca: trustme.CA, repo: str) -> list[str]:
    """Pull ``repo:latest`` as a client does; every blob verified. Its blobs' digests."""
    client = RegistryClient(proxy.url, ca)
    manifest = await client.request(f"/v2/{repo}/manifests/latest", headers=ACCEPT)
    assert manifest.status == 200, manifest.body
    doc = manifest.json()
    digests = [d["digest"] for d in [doc["config"], *doc["layers"]]]
    for digest in digests:
        answer = await client.request(f"/v2/{repo}/blobs/{digest}")
        assert answer.status == 200 and answer.complete
        assert "sha256:" + hashlib.sha256(answer.body).hexdigest() == digest
    return digests


def pullthrough_of(proxy: RunningProxy) -> PullThrough:
    assert proxy.proxy.pullthrough is not None
    return proxy.proxy.pullthrough


def layers_of_both(urls: list[str], each: int = 3, size: int = 50_000) -> list[bytes]:
    """``each`` layers owned by the first instance of ``urls``, then ``each`` by the second
    (owners follow the URLs, whose ports are random)."""
    candidates = [make_layer(n, size) for n in range(51, 200)]
    return [
        data
        for index in (0, 1)
        for data in [d for d in candidates if owner(hashlib.sha256(d).hexdigest(), urls) == index][
            :each
        ]
    ]


def cdn_gets(hub: FakeHub) -> Counter[str]:
    return Counter(
        seen.target.split("?")[0].rsplit("/", 2)[-2]  # .../sha256/ab/<hex>/data
        for seen in hub.requests
        if seen.server == "cdn" and seen.method == "GET"
    )


def peer_requests(hub: FakeHub) -> list[str]:
    return [s.target for s in hub.requests if PEER_MARKER.decode() in s.headers]


async def test_three_instances_fetch_each_blob_from_the_upstream_once(
    nursery: trio.Nursery, hub: FakeHub, ca: trustme.CA, tls_files: TLSFiles, tmp_path: Path
) -> None:
    layers = [make_layer(n, 200_000) for n in range(1, 5)]
    hub.add_image("library/busybox", "latest", layers)
    ports = free_ports(3)
    urls = [f"https://127.0.0.1:{port}" for port in ports]
    instances = [
        await start(nursery, hub, tls_files, port, urls, tmp_path / str(port)) for port in ports
    ]
    pulled: list[list[str]] = []

    async def client(n: int) -> None:
        pulled.append(await pull(instances[n % 3].proxy, ca, "library/busybox"))

    async with trio.open_nursery() as clients:
        for n in range(6):
            clients.start_soon(client, n)
    digests = pulled[0]
    assert len(pulled) == 6 and all(p == digests for p in pulled)
    gets = cdn_gets(hub)
    assert {d: gets[d.removeprefix("sha256:")] for d in digests} == {d: 1 for d in digests}
    assert peer_requests(hub) == []  # the marker is for peers, never sent upstream


async def test_a_stopped_or_silent_owner_is_skipped_within_the_peer_timeout(
    nursery: trio.Nursery,
    hub: FakeHub,
    ca: trustme.CA,
    tls_files: TLSFiles,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # a peer that accepts connections and never answers (the kernel's backlog accepts them)
    silent = trio.socket.socket()
    await silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    ports = [*free_ports(2), silent.getsockname()[1]]
    urls = [f"https://127.0.0.1:{port}" for port in ports]
    names = [str(base_url(u).origin) for u in urls]
    # a layer owned by each peer: this one, the stopped one and the silent one
    candidates = {n: make_layer(n, 50_000) for n in range(10, 60)}
    seeds = {owner(hashlib.sha256(data).hexdigest(), names): n for n, data in candidates.items()}
    hub.add_image("library/alpine", "latest", [candidates[seeds[i]] for i in range(3)])
    first, second = [
        await start(nursery, hub, tls_files, port, urls, tmp_path / str(port), peer_timeout=0.5)
        for port in ports[:2]
    ]
    await second.stop()  # its port now refuses connections
    caplog.set_level(logging.WARNING, "hubproxy.peers")
    digests = await pull(first.proxy, ca, "library/alpine")
    owners = {
        owner(d.removeprefix("sha256:"), [str(base_url(u).origin) for u in urls]) for d in digests
    }
    assert {1, 2} <= owners  # both kinds of dead peer owned some of these blobs
    gets = cdn_gets(hub)
    assert all(gets[d.removeprefix("sha256:")] == 1 for d in digests)
    lines = [r.getMessage() for r in caplog.records if r.name == "hubproxy.peers"]
    # one line per peer episode, however many of its blobs were asked for
    assert len(lines) == 2, lines
    assert any("did not answer within 0.5s" in line and urls[2] in line for line in lines)
    assert any("could not be reached" in line and urls[1] in line for line in lines)
    # /metrics: both rest now, and what came of asking each
    page = await fetch(first.proxy.url + "/metrics", ca)
    samples = metric_samples(page.body.decode())
    for name in names[1:]:
        assert sample(samples, "hubproxy_peer_resting", peer=name) == 1
        assert sample(samples, "hubproxy_peer_fetches_total", peer=name, result="upstream") >= 1
    assert ("hubproxy_peer_resting", frozenset({("peer", names[0])})) not in samples  # itself
    # the status page: this instance marked, both others resting, what came of asking each
    rows = _table_rows(parse((await fetch(first.proxy.url + "/", ca)).body), "peers")
    assert rows[1][0] == f"{names[0]} (this instance)"
    for row, name in zip(rows[2:], names[1:], strict=True):
        assert row[0] == name and row[1].startswith("resting until ")
        assert int(row[4]) >= 1  # the upstream asked instead
    silent.close()


async def test_a_request_from_a_peer_is_never_passed_on(
    nursery: trio.Nursery, hub: FakeHub, ca: trustme.CA, tls_files: TLSFiles, tmp_path: Path
) -> None:
    """Two instances that disagree about the list (each spells the other differently): for
    some digest each thinks the other owns it; the owner's side still fetches it itself."""
    ports = free_ports(2)
    first_list = [f"https://127.0.0.1:{ports[0]}", f"https://localhost:{ports[1]}"]
    second_list = [f"https://localhost:{ports[0]}", f"https://127.0.0.1:{ports[1]}"]
    names_a = [str(base_url(u).origin) for u in first_list]
    names_b = [str(base_url(u).origin) for u in second_list]
    seed = next(
        n
        for n in range(100, 400)
        if owner(hashlib.sha256(make_layer(n, 1000)).hexdigest(), names_a) == 1
        and owner(hashlib.sha256(make_layer(n, 1000)).hexdigest(), names_b) == 0
    )
    hub.add_image("library/loop", "latest", [make_layer(seed, 1000)])
    a = await start(nursery, hub, tls_files, ports[0], first_list, tmp_path / "a")
    await start(nursery, hub, tls_files, ports[1], second_list, tmp_path / "b")
    with trio.fail_after(10):
        digests = await pull(a.proxy, ca, "library/loop")
    gets = cdn_gets(hub)
    assert all(gets[d.removeprefix("sha256:")] == 1 for d in digests)


async def test_a_peer_list_without_this_instance_is_refused_at_start(
    hub: FakeHub, tls_files: TLSFiles, tmp_path: Path
) -> None:
    (port,) = free_ports(1)
    config = make_config(
        hub,
        tls_files,
        listen_port=port,
        cache_dir=str(tmp_path),
        peers=(base_url(f"https://127.0.0.1:{port + 1}"), base_url("https://192.0.2.1:443")),
    )
    with pytest.raises(StartupError, match=r"none of .* is this instance"):
        await serve(config)
    config = make_config(
        hub,
        tls_files,
        listen_port=port,
        cache_dir=str(tmp_path),
        peers=(base_url(f"https://127.0.0.1:{port}"), base_url(f"https://localhost:{port}")),
    )
    with pytest.raises(StartupError, match="several URLs name this instance"):
        await serve(config)


async def test_a_mirror_users_pull_works_whichever_instance_owns_the_blob(
    nursery: trio.Nursery, hub: FakeHub, ca: trustme.CA, tls_files: TLSFiles, tmp_path: Path
) -> None:
    """--users: a mirror token is sealed by the instance that issued it, and its owner peer
    cannot read it (401). The instance asked fetches from the upstream itself, without putting
    the peer to rest; before, the client got the owner's 401 for every blob the other owned."""
    users = tmp_path / "users"
    add_user(users, "alice", "alice-pw")
    ports = free_ports(2)
    urls = [f"https://127.0.0.1:{port}" for port in ports]
    layers = layers_of_both(urls)  # three owned by the other instance
    hub.add_image("library/busybox", "latest", layers)
    digests = [sha256_digest(layer) for layer in layers]
    first, _second = [
        await start(
            nursery, hub, tls_files, port, urls, tmp_path / str(port), users_file=str(users)
        )
        for port in ports
    ]
    client = RegistryClient(first.proxy.url, ca, credentials=("alice", "alice-pw"))
    for digest in digests:
        answer = await client.request(f"/v2/library/busybox/blobs/{digest}")
        assert answer.status == 200 and answer.complete
        assert "sha256:" + hashlib.sha256(answer.body).hexdigest() == digest
    assert peer_requests(hub) == []  # the marker never reaches the upstream


async def test_the_owner_routes_a_blob_by_the_clients_host_name(
    nursery: trio.Nursery,
    hub: FakeHub,
    ghcr: FakeHub,
    ca: trustme.CA,
    tls_files: TLSFiles,
    tmp_path: Path,
) -> None:
    """--host-map names a registry by the Host a client uses; the owner gets the client's Host,
    so it fetches from that registry too (with its own Host it took the blob for Docker Hub's,
    and the client got Docker Hub's 404 for every blob the other instance owned)."""
    ports = free_ports(2)
    urls = [f"https://127.0.0.1:{port}" for port in ports]
    layers = layers_of_both(urls)
    ghcr.add_image("owner/app", "v1", layers)
    digests = [sha256_digest(layer) for layer in layers]
    ghcr_registry = Registry("ghcr.io", (base_url(ghcr.registry_url),))
    first, _second = [
        await start(
            nursery,
            hub,
            tls_files,
            port,
            urls,
            tmp_path / str(port),
            registries=(ghcr_registry,),
            host_map=(("ghcr.mirror.test", "ghcr.io"),),
        )
        for port in ports
    ]
    host = ("host", f"ghcr.mirror.test:{ports[0]}")
    token_url = f"{first.proxy.url}/token/ghcr.io/0?service=ghcr.io&scope=repository:owner/app:pull"
    token = await fetch(token_url, ca, headers=[host])
    assert token.status == 200
    bearer = ("authorization", "Bearer " + token.json()["token"])
    for digest in digests:
        answer = await fetch(
            f"{first.proxy.url}/v2/owner/app/blobs/{digest}", ca, headers=[host, bearer]
        )
        assert answer.status == 200 and answer.complete
        assert "sha256:" + hashlib.sha256(answer.body).hexdigest() == digest
    assert not any("owner/app" in s.target for s in hub.requests)


async def test_with_the_peer_secret_a_token_one_instance_issued_opens_on_another(
    nursery: trio.Nursery, hub: FakeHub, ca: trustme.CA, tls_files: TLSFiles, tmp_path: Path
) -> None:
    """Behind a load balancer a client logs in on one instance and sends its token to the
    next; with --peer-secret-file both derive the same keys and the token opens there (before,
    each instance sealed with its own random key: a 401 and a new login on every switch), and
    the owner of a blob takes the client's token itself (no fallback to the upstream)."""
    users = tmp_path / "users"
    add_user(users, "alice", "alice-pw")
    secret = tmp_path / "peer-secret"
    secret.write_text("0123456789abcdef" * 4 + "\n")
    ports = free_ports(2)
    urls = [f"https://127.0.0.1:{port}" for port in ports]
    layers = layers_of_both(urls)
    hub.add_image("library/busybox", "latest", layers)
    digests = [sha256_digest(layer) for layer in layers]
    assert [owner(d.removeprefix("sha256:"), urls) for d in digests] == [0, 0, 0, 1, 1, 1]
    first, second = [
        await start(
            nursery,
            hub,
            tls_files,
            port,
            urls,
            tmp_path / str(port),
            users_file=str(users),
            peer_secret_file=str(secret),
        )
        for port in ports
    ]
    on_first = RegistryClient(first.proxy.url, ca, credentials=("alice", "alice-pw"))
    manifest = await on_first.request("/v2/library/busybox/manifests/latest", headers=ACCEPT)
    assert manifest.status == 200 and len(on_first.token_responses) == 1
    on_second = RegistryClient(second.proxy.url, ca)  # no credentials: only the token
    on_second.tokens = dict(on_first.tokens)
    for digest in digests:
        answer = await on_second.request(f"/v2/library/busybox/blobs/{digest}")
        assert answer.status == 200 and answer.complete
        assert "sha256:" + hashlib.sha256(answer.body).hexdigest() == digest
    assert on_second.token_responses == []  # never asked to log in again
    assert all(gets == 1 for gets in cdn_gets(hub).values())  # each blob from the upstream once
    fetched = metric_samples((await fetch(second.proxy.url + "/metrics", ca)).body.decode())
    owned_by_first = sum(owner(d.removeprefix("sha256:"), urls) == 0 for d in digests)
    name = str(first.proxy.config.peers[0].origin)
    assert sample(fetched, "hubproxy_peer_fetches_total", peer=name, result="filled") == (
        owned_by_first
    )


def test_users_with_peers_need_the_peer_secret(tmp_path: Path) -> None:
    users = tmp_path / "users"
    add_user(users, "alice", "alice-pw")
    peers = ["--peer", "https://10.0.0.1:443", "--peer", "https://10.0.0.2:443"]
    with pytest.raises(UsageError, match="--users with --peer needs --peer-secret-file"):
        load_settings(["--users", str(users), *peers])
    secret = tmp_path / "secret"
    secret.write_text("short\n")
    with pytest.raises(UsageError, match="at least 32 characters"):
        load_settings(["--users", str(users), *peers, "--peer-secret-file", str(secret)])
    secret.write_text("f" * 64 + "\n")
    _, config = load_settings(["--users", str(users), *peers, "--peer-secret-file", str(secret)])
    assert config.peer_secret_file == str(secret)


async def test_an_owner_breaking_off_a_blob_leaves_the_transfers_to_the_upstream(
    nursery: trio.Nursery,
    hub: FakeHub,
    ca: trustme.CA,
    tls_files: TLSFiles,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The owner stops while it sends a blob the upstream is half way through: the clients
    following this instance's fill from it finish from the upstream (a Range request), the
    whole blob verified; before, every one of them lost its transfer."""
    ports = free_ports(2)
    urls = [f"https://127.0.0.1:{port}" for port in ports]
    layer = next(
        data
        for data in (make_layer(n, 600_000) for n in range(60, 120))
        if owner(hashlib.sha256(data).hexdigest(), urls) == 1
    )
    hub.add_image("library/cut", "latest", [layer])
    digest = sha256_digest(layer)
    stall = hub.stall_blob(digest, after=200_000)
    first, second = [
        await start(nursery, hub, tls_files, port, urls, tmp_path / str(port)) for port in ports
    ]
    registry = RegistryClient(first.proxy.url, ca)
    assert (await registry.request("/v2/library/cut/tags/list")).status == 200
    bearer = ("authorization", f"Bearer {registry.tokens['']}")
    clients = [await WireClient.connect(first.proxy.url, ca) for _ in range(2)]
    with trio.fail_after(20):
        for client in clients:
            await client.send_request("GET", f"/v2/library/cut/blobs/{digest}", [bearer])
            assert (await client.receive_head()).status_code == 200  # following the fill
        await stall.reached.wait()
        await second.stop()  # its connections close with the blob a third sent
        for client in clients:
            assert sha256_digest(await client.receive_body()) == digest
            await client.aclose()
    stall.release.set()
    resumed = [r.getMessage() for r in caplog.records if "finishing the transfer" in r.getMessage()]
    assert len(resumed) == 2 and all("the peer broke off" in line for line in resumed)
    cdn = [s for s in hub.requests if s.server == "cdn" and s.method == "GET"]
    assert len(cdn) == 3 and sum("range" in s.headers for s in cdn) == 2


def two_peers_and_a_layer_of_the_second(
    size: int, seeds: range
) -> tuple[list[int], list[str], list[str], bytes]:
    """Two free ports, their instances' URLs and peer names, and a layer of ``size`` bytes
    that the second instance owns (rendezvous over the names: which one depends on the ports)."""
    ports = free_ports(2)
    urls = [f"https://127.0.0.1:{port}" for port in ports]
    names = [str(base_url(u).origin) for u in urls]
    layer = next(
        data
        for data in (make_layer(n, size) for n in seeds)
        if owner(hashlib.sha256(data).hexdigest(), names) == 1
    )
    return ports, urls, names, layer


async def test_concurrent_misses_of_a_blob_ask_its_owner_once(
    nursery: trio.Nursery, hub: FakeHub, ca: trustme.CA, tls_files: TLSFiles, tmp_path: Path
) -> None:
    """Five clients miss one blob on an instance that does not own it, while the owner is
    still fetching it: one request goes to the owner, and the other four follow the fill its
    answer starts here (before, each asked the owner, and when the owner was slow each then
    fetched the blob from the upstream itself: 12 more CDN GETs in the 256 MiB bench run)."""
    ports, urls, names, layer = two_peers_and_a_layer_of_the_second(300_000, range(60, 120))
    digest = sha256_digest(layer)
    hub.add_image("library/busybox", "latest", [layer])
    asking, _owner = [
        await start(nursery, hub, tls_files, port, urls, tmp_path / str(port), peer_timeout=20)
        for port in ports
    ]
    # one token for the five (a client's first request, a manifest, fetches it)
    login = RegistryClient(asking.proxy.url, ca)
    assert (
        await login.request("/v2/library/busybox/manifests/latest", headers=ACCEPT)
    ).status == 200
    stall = hub.stall_blob(digest)  # the owner's fetch from the CDN, before its head
    bodies: list[bytes] = []

    async def client() -> None:
        pulling = RegistryClient(asking.proxy.url, ca)
        pulling.tokens = dict(login.tokens)
        answer = await pulling.request(f"/v2/library/busybox/blobs/{digest}")
        assert answer.status == 200 and answer.complete
        bodies.append(answer.body)

    async with trio.open_nursery() as clients:
        for _ in range(5):
            clients.start_soon(client)
        await stall.reached.wait()
        # the four others wait for the first's answer (before the fix: each asked the owner)
        [waiting] = pullthrough_of(asking.proxy).asking.values()
        with trio.fail_after(10):
            while waiting.statistics().tasks_waiting < 4:  # noqa: ASYNC110 (their Event)
                await trio.sleep(0.01)  # a condition polled, not a guess at how long
        stall.release.set()
    assert bodies == [layer] * 5
    assert cdn_gets(hub)[digest.removeprefix("sha256:")] == 1
    samples = metric_samples((await fetch(asking.proxy.url + "/metrics", ca)).body.decode())
    assert sample(samples, "hubproxy_peer_fetches_total", peer=names[1], result="filled") == 1


async def test_a_stalled_ask_for_one_registry_never_holds_a_miss_of_another(
    nursery: trio.Nursery,
    hub: FakeHub,
    ghcr: FakeHub,
    ca: trustme.CA,
    tls_files: TLSFiles,
    tmp_path: Path,
) -> None:
    """The same digest asked through ghcr.io, whose storage never answers, and then through
    Docker Hub: the Docker Hub miss is answered at once (misses waited for any ask of the
    digest, whatever its registry, up to twice --peer-timeout, here 40 s)."""
    ports, urls, _, layer = two_peers_and_a_layer_of_the_second(100_000, range(130, 200))
    digest = sha256_digest(layer)
    hub.add_image("library/busybox", "latest", [layer])
    ghcr.add_image("owner/app", "v1", [layer])
    ghcr_registry = Registry("ghcr.io", (base_url(ghcr.registry_url),))
    asking, _owner = [
        await start(
            nursery,
            hub,
            tls_files,
            port,
            urls,
            tmp_path / str(port),
            peer_timeout=20,
            registries=(ghcr_registry,),
        )
        for port in ports
    ]
    stall = ghcr.stall_blob(digest)  # ghcr's storage holds the owner's fetch
    via_ghcr: list[int] = []

    async def from_ghcr() -> None:
        client = RegistryClient(asking.proxy.url, ca)
        answer = await client.request(f"/v2/owner/app/blobs/{digest}?ns=ghcr.io")
        via_ghcr.append(answer.status)

    async with trio.open_nursery() as clients:
        clients.start_soon(from_ghcr)
        await stall.reached.wait()
        with trio.fail_after(10):  # (40 s before)
            answer = await RegistryClient(asking.proxy.url, ca).request(
                f"/v2/library/busybox/blobs/{digest}"
            )
        assert answer.status == 200 and answer.complete and answer.body == layer
        stall.release.set()
    assert via_ghcr == [200]
