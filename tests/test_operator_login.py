"""The operator's login (``--registry-login``) serves pulls only and goes only to the realm of
the upstream it was configured for: end to end against fake registries, each test a hole found
by attacking a running mirror (issue 11, holes 1 and 2)."""

from __future__ import annotations

import base64
import hashlib
import urllib.parse
from pathlib import Path

import pytest
import trio
import trustme

from hubproxy.ops.usersfile import add_user
from hubproxy.policy.access import parse_image_rules, parse_networks
from hubproxy.policy.registries import Registry
from hubproxy.policy.urls import parse_url
from tests.conftest import Canary, StartProxy
from tests.fakehub import FakeHub, fetch, make_layer
from tests.registry_client import RegistryClient

OPERATOR = ("acme-bot", "bot-token")
OPERATOR_BASIC = "Basic " + base64.b64encode(b"acme-bot:bot-token").decode()
ACCEPT = ("accept", "application/vnd.docker.distribution.manifest.v2+json")


def token_url(proxy_url: str, path: str, **params: str) -> str:
    return f"{proxy_url}{path}?" + urllib.parse.urlencode(params)


def operator_sent(fake: FakeHub) -> list[str]:
    """Every request of ``fake``'s that carried the operator's password."""
    return [
        f"{s.server} {s.method} {s.target}"
        for s in fake.requests
        if s.headers.get("authorization") == OPERATOR_BASIC
    ]


@pytest.fixture
def acme(hub: FakeHub) -> FakeHub:
    """Docker Hub with the operator's account, which may push to acme/app."""
    hub.add_user(*OPERATOR)
    hub.add_image("acme/app", "v1", [make_layer(7, 1000)])
    hub.make_private("acme/app", OPERATOR[0])
    return hub


# -- hole 1: the operator's login gives no write access ---------------------------------------


async def test_an_anonymous_client_cannot_get_a_push_token_on_the_operators_login(
    acme: FakeHub, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    proxy = await start_proxy(default_login=OPERATOR, allow=parse_networks(["127.0.0.1/32"]))
    r = await fetch(
        token_url(
            proxy.url,
            "/token/0",
            service="registry.docker.io",
            scope="repository:acme/app:pull,push",
        ),
        ca,
    )
    assert r.status == 403
    assert r.json()["errors"][0]["code"] == "DENIED"
    assert not [s for s in acme.requests if s.server == "auth"]  # never even asked upstream


async def test_an_operator_backed_token_is_sealed_and_useless_elsewhere(
    acme: FakeHub, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    proxy = await start_proxy(default_login=OPERATOR, allow=parse_networks(["127.0.0.1/32"]))
    client = RegistryClient(proxy.url, ca)
    r = await client.request("/v2/acme/app/manifests/v1", headers=[ACCEPT])
    assert r.status == 200  # the operator's account reads its private repository for anyone
    token = client.tokens[""]
    assert token.startswith("hp1.")
    # at the registry itself the client's token is worth nothing
    direct = await fetch(
        acme.registry_url + "/v2/acme/app/manifests/v1",
        ca,
        headers=[("authorization", f"Bearer {token}"), ACCEPT],
    )
    assert direct.status == 401
    # and through the mirror it serves reads only: an upload is refused before it goes upstream
    before = len(acme.requests)
    r = await fetch(
        proxy.url + "/v2/acme/app/blobs/uploads/",
        ca,
        method="POST",
        headers=[("authorization", f"Bearer {token}")],
    )
    assert r.status == 403 and r.json()["errors"][0]["code"] == "DENIED"
    assert not [s for s in acme.requests[before:] if s.method != "GET"]


async def test_a_mirror_user_cannot_push_on_the_operators_login(
    acme: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    users = tmp_path / "users"
    add_user(users, "alice", "alice-pw")
    proxy = await start_proxy(default_login=OPERATOR, users_file=str(users))
    alice = base64.b64encode(b"alice:alice-pw").decode()
    r = await fetch(
        token_url(
            proxy.url, "/token/0", service="registry.docker.io", scope="repository:acme/app:push"
        ),
        ca,
        headers=[("authorization", f"Basic {alice}")],
    )
    assert r.status == 403 and r.json()["errors"][0]["code"] == "DENIED"


async def test_a_write_to_a_basic_registry_never_carries_the_operators_login(
    htpasswd: FakeHub, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    htpasswd.add_user(*OPERATOR)
    htpasswd.add_image("team/app", "1", [make_layer(3, 100)])
    name = "registry.example.com"
    registry = Registry(name, (parse_url(htpasswd.registry_url),), login=OPERATOR)
    proxy = await start_proxy(registries=(registry,), allow=parse_networks(["127.0.0.0/8"]))
    r = await fetch(proxy.url + f"/v2/{name}/team/app/manifests/1", ca, headers=[ACCEPT])
    assert r.status == 200  # a read does
    for method, path in (
        ("POST", f"/v2/{name}/team/app/blobs/uploads/"),
        ("PUT", f"/v2/{name}/team/app/manifests/2"),
        ("DELETE", f"/v2/{name}/team/app/manifests/1"),
    ):
        r = await fetch(proxy.url + path, ca, method=method, body=b"{}")
        assert r.status == 403, (method, r.body)
        assert r.json()["errors"][0]["code"] == "DENIED"
    assert all(" GET " in line or " HEAD " in line for line in operator_sent(htpasswd))


async def test_image_rules_apply_to_token_scopes(
    acme: FakeHub, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    proxy = await start_proxy(images=parse_image_rules(["library/*"], []))
    r = await fetch(
        token_url(
            proxy.url, "/token/0", service="registry.docker.io", scope="repository:acme/app:pull"
        ),
        ca,
    )
    assert r.status == 403 and r.json()["errors"][0]["code"] == "DENIED"
    assert not [s for s in acme.requests if s.server == "auth"]


# -- hole 2: the login goes only to its own upstream's realm ----------------------------------


async def test_a_fallbacks_realm_never_gets_the_operators_login(
    nursery: trio.Nursery, acme: FakeHub, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    worker = FakeHub(ca)  # someone else's Worker, with a token service of its own
    await nursery.start(worker.serve)
    proxy = await start_proxy(
        default_login=OPERATOR,
        allow=parse_networks(["127.0.0.1/32"]),
        fallbacks=(worker.registry_url,),
    )
    r = await fetch(
        token_url(
            proxy.url, "/token/1", service="registry.docker.io", scope="repository:acme/app:pull"
        ),
        ca,
    )
    assert r.status == 200
    assert [s for s in worker.requests if s.server == "auth"]  # it did go there...
    assert operator_sent(worker) == []  # ...without the operator's password


async def test_a_cdn_challenge_never_moves_the_registrys_realm(
    acme: FakeHub, start_proxy: StartProxy, ca: trustme.CA, canary: Canary
) -> None:
    layer = make_layer(9, 5000)
    acme.add_image("library/alpine", "3", [layer])
    acme.cdn_challenge = f'Bearer realm="https://127.0.0.1:{canary.port}/token",service="cdn"'
    proxy = await start_proxy(default_login=OPERATOR, allow=parse_networks(["127.0.0.1/32"]))
    client = RegistryClient(proxy.url, ca)
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    r = await client.request(f"/v2/library/alpine/blobs/{digest}")
    assert r.status == 401  # the CDN's answer...
    assert f"127.0.0.1:{canary.port}" not in r.headers.get("www-authenticate", "")
    # ...and the next token request (the client asks for a fresh one) still goes to the
    # registry's own realm, with the operator's login
    r = await client.fetch_token(
        proxy.url + "/token/0",
        [("service", "registry.docker.io"), ("scope", "repository:library/alpine:pull")],
    )
    assert r.status == 200
    assert canary.connections == 0


async def test_a_refresh_token_issued_for_the_operator_never_reaches_a_client(
    acme: FakeHub, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    proxy = await start_proxy(default_login=OPERATOR, allow=parse_networks(["127.0.0.1/32"]))
    r = await fetch(
        token_url(
            proxy.url,
            "/token/0",
            service="registry.docker.io",
            scope="repository:acme/app:pull",
            offline_token="true",
            client_id="docker",
        ),
        ca,
    )
    assert r.status == 200
    assert set(r.json()) <= {"token", "access_token", "expires_in", "issued_at"}
    assert acme.refresh_tokens == {}  # not even asked for


async def test_token_answers_keep_only_the_fields_clients_read(
    acme: FakeHub, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    proxy = await start_proxy()
    bot = base64.b64encode(b"acme-bot:bot-token").decode()
    r = await fetch(
        token_url(
            proxy.url,
            "/token/0",
            service="registry.docker.io",
            scope="repository:acme/app:pull",
            offline_token="true",
        ),
        ca,
        headers=[("authorization", f"Basic {bot}")],  # the client's own login: its token
    )
    assert r.status == 200
    assert set(r.json()) == {"token", "access_token", "expires_in", "issued_at"}
    assert not r.json()["token"].startswith("hp1.")


async def test_a_fallbacks_basic_challenge_does_not_make_the_registry_basic(
    nursery: trio.Nursery, acme: FakeHub, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    worker = FakeHub(ca, auth_layout="basic")  # a fallback that wants Basic credentials
    await nursery.start(worker.serve)
    layer = make_layer(11, 2000)
    acme.add_image("library/alpine", "3", [layer])
    proxy = await start_proxy(
        default_login=OPERATOR,
        allow=parse_networks(["127.0.0.1/32"]),
        fallbacks=(worker.registry_url,),
    )
    client = RegistryClient(proxy.url, ca)
    await client.request("/v2/library/alpine/manifests/3", headers=[ACCEPT])  # a token first
    acme.force_429(1)
    r = await client.request("/v2/library/alpine/manifests/3", headers=[ACCEPT])
    assert r.status == 401 and r.headers["www-authenticate"].startswith("Basic ")  # the Worker's
    # the primary rests for a minute; after it, anonymous requests go to it without the login
    for _ in range(3):
        await fetch(proxy.url + "/v2/", ca)
    assert operator_sent(worker) == []
    assert [line for line in operator_sent(acme) if not line.startswith("auth ")] == []
    # nor does an operator-backed token go to the fallback: it is the operator's credential
    assert all(
        not s.headers.get("authorization", "").startswith("Bearer ") for s in worker.requests
    )
