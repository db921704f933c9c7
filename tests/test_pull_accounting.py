"""Pull accounting end to end against the fake Docker Hub over real sockets: manifest GETs are
pulls and HEADs are not, counted per client address (127.0.0.1 and 127.0.0.2 are two
"machines"); the upstream pulls the mirror made match what the fake hub counted; the per-client
series stop at --accounting-top plus "other"; and the rate-limit warning is logged once per fall
under 10% of the limit, again only after the remaining recovered."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trustme

from hubproxy.ops.usersfile import add_user
from hubproxy.policy.access import parse_networks
from tests.conftest import RunningProxy, StartProxy
from tests.fakehub import FakeHub, fetch, make_layer
from tests.registry_client import RegistryClient
from tests.test_client_limits import connect_from
from tests.test_live_status import bearer
from tests.test_operations import metric_samples
from tests.test_statuspage import _table_rows, parse

MANIFEST = "/v2/library/alpine/manifests/3.20"
ACCEPT = ("accept", "application/vnd.docker.distribution.manifest.v2+json")


async def ask(proxy: RunningProxy, ca: trustme.CA, source: str, method: str, times: int) -> None:
    """``times`` manifest requests from address ``source``, on one connection."""
    client = await connect_from(source, proxy, ca)
    headers = [*await bearer(proxy, ca), ACCEPT]
    try:
        for _ in range(times):
            head, _ = await client.request(method, MANIFEST, headers)
            assert head.status_code == 200
    finally:
        await client.aclose()


def series(text: str, family: str, label: str) -> dict[str, float]:
    return {
        dict(labels)[label]: value
        for (name, labels), value in metric_samples(text).items()
        if name == family
    }


async def test_gets_are_pulls_per_client_and_heads_are_not(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    hub.add_image("library/alpine", "3.20", [make_layer(61, 2_000)])
    proxy = await start_proxy(tls=False, cache_dir=str(tmp_path / "cache"), accounting_top=2)
    before = hub.ratelimit_remaining

    await ask(proxy, ca, "127.0.0.1", "HEAD", 3)
    text = (await fetch(proxy.url + "/metrics", ca)).body.decode()
    assert series(text, "hubproxy_pulls_total", "registry") == {}
    assert series(text, "hubproxy_client_pulls", "client") == {"other": 0}

    await ask(proxy, ca, "127.0.0.1", "GET", 3)
    await ask(proxy, ca, "127.0.0.2", "GET", 2)
    await ask(proxy, ca, "127.0.0.3", "GET", 1)
    await ask(proxy, ca, "127.0.0.3", "HEAD", 4)
    text = (await fetch(proxy.url + "/metrics", ca)).body.decode()
    assert series(text, "hubproxy_pulls_total", "registry") == {"docker.io": 6}
    # --accounting-top 2: the two largest by name, the third in "other"
    assert series(text, "hubproxy_client_pulls", "client") == {
        "127.0.0.1": 3,
        "127.0.0.2": 2,
        "other": 1,
    }
    assert series(text, "hubproxy_image_pulls", "image") == {"library/alpine": 6, "other": 0}
    # the cache answered most GETs: the upstream pulls are the ones the fake hub counted
    spent = before - hub.ratelimit_remaining
    assert 1 <= spent < 6
    upstream = series(text, "hubproxy_upstream_pulls_total", "identity")
    assert upstream == {"client": spent}  # the clients' own (anonymous) tokens went upstream
    assert series(text, "hubproxy_upstream_image_pulls", "image") == {
        "library/alpine": spent,
        "other": 0,
    }
    assert series(text, "hubproxy_ratelimit_remaining", "identity") == {
        "client": hub.ratelimit_remaining
    }
    assert series(text, "hubproxy_ratelimit_limit", "identity") == {"client": 100}

    page = parse((await fetch(proxy.url + "/", ca)).body)
    assert _table_rows(page, "top-clients")[1:] == [
        ["127.0.0.1", "3"],
        ["127.0.0.2", "2"],
        ["others", "1"],
    ]
    assert _table_rows(page, "top-images")[1:] == [["library/alpine", "6"]]
    [_, allowance] = _table_rows(page, "allowances")
    assert allowance[:2] == ["docker.io", "client"]
    assert allowance[2].startswith(f"{hub.ratelimit_remaining} of 100 per 6h, counted as 127.0.0.1")
    assert allowance[3] == str(spent)


async def test_the_rate_limit_warning_is_logged_once_per_fall(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    hub.add_image("library/alpine", "3.20", [make_layer(62, 2_000)])
    proxy = await start_proxy(tls=False)  # no cache: every GET is an upstream pull
    caplog.set_level(logging.INFO, logger="hubproxy")

    def lines(text: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if text in r.getMessage()]

    hub.ratelimit_remaining = 13  # each GET leaves one fewer: 12, 11, 10 (not under 10%)
    await ask(proxy, ca, "127.0.0.1", "GET", 3)
    assert lines("rate limit") == []
    await ask(proxy, ca, "127.0.0.1", "GET", 4)  # 9, 8, 7, 6: warned at 9, once
    [warning] = lines("rate limit nearly spent")
    assert warning.startswith("docker.io rate limit nearly spent: 9 pulls left of 100 per 6 h ")
    assert "counted as 127.0.0.1" in warning
    [record] = [r for r in caplog.records if r.getMessage() == warning]
    assert record.levelno == logging.WARNING

    hub.ratelimit_remaining = 51  # a new window
    await ask(proxy, ca, "127.0.0.1", "GET", 1)
    assert lines("recovered") == [
        "docker.io rate limit for client pulls recovered: 50 pulls left of 100"
    ]
    hub.ratelimit_remaining = 4
    await ask(proxy, ca, "127.0.0.1", "GET", 2)
    assert len(lines("rate limit nearly spent")) == 2  # once again, after the recovery
    text = (await fetch(proxy.url + "/metrics", ca)).body.decode()
    assert series(text, "hubproxy_ratelimit_low", "identity") == {"client": 1}


@pytest.mark.parametrize("login", ["users", "operator"])
async def test_whose_pulls_mirror_users_and_the_operator_login(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path, login: str
) -> None:
    """Under --users a pull is the mirror user's, and its upstream token was fetched
    anonymously; with --registry-login the upstream counted the operator's account."""
    hub.add_image("library/alpine", "3.20", [make_layer(63, 2_000)])
    clients = []
    if login == "users":
        users = tmp_path / "users"
        add_user(users, "alice", "alice-pw")
        proxy = await start_proxy(tls=False, users_file=str(users))
        clients.append(RegistryClient(proxy.url, ca, credentials=("alice", "alice-pw")))
        expected_client, identity = "user:alice", "anonymous"
    else:
        hub.add_user("acme-bot", "bot-token")
        proxy = await start_proxy(
            tls=False,
            default_login=("acme-bot", "bot-token"),
            allow=parse_networks(["127.0.0.1/32"]),
        )
        clients.append(RegistryClient(proxy.url, ca))
        expected_client, identity = "127.0.0.1", "operator"
    for _ in range(2):
        r = await clients[0].request(MANIFEST, headers=[ACCEPT])
        assert r.status == 200
    text = (await fetch(proxy.url + "/metrics", ca)).body.decode()
    assert series(text, "hubproxy_client_pulls", "client") == {expected_client: 2, "other": 0}
    assert series(text, "hubproxy_upstream_pulls_total", "identity") == {identity: 2}
    assert series(text, "hubproxy_ratelimit_remaining", "identity") == {
        identity: hub.ratelimit_remaining
    }
