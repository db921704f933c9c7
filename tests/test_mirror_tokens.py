"""Sealed mirror tokens, mirror users and the token endpoint, end to end: each test a hole found
by attacking a running mirror (issue 11, holes 5, 6, 9 and 10)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import urllib.parse
from pathlib import Path

import pytest
import trio
import trustme

from hubproxy.app import reload
from hubproxy.ops.usersfile import add_user, remove_user
from hubproxy.policy.access import parse_image_rules
from hubproxy.policy.registries import Registry
from hubproxy.policy.urls import parse_url
from tests.conftest import StartProxy, TLSFiles
from tests.fakehub import FakeHub, fetch, make_layer
from tests.registry_client import RegistryClient

ACCEPT = ("accept", "application/vnd.docker.distribution.manifest.v2+json")
BASIC_REGISTRY = "registry.example.test"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def token_url(proxy_url: str, path: str, **params: str) -> str:
    return f"{proxy_url}{path}?" + urllib.parse.urlencode(params)


def hexdigest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- hole 5: sealed tokens are bound to a registry and a user, and revoked on reload ----------


async def test_a_token_sealed_for_one_registry_is_refused_on_another(
    hub: FakeHub, ghcr: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    ghcr.add_user("ghcr-bot", "ghcr-pw")
    ghcr.add_image("owner/app", "v1", [make_layer(1, 100)])
    ghcr.make_private("owner/app", "ghcr-bot")
    hub.add_image("library/alpine", "3", [make_layer(2, 100)])
    users = tmp_path / "users"
    add_user(users, "alice", "alice-pw")
    ghcr_registry = Registry(
        "ghcr.io", (parse_url(ghcr.registry_url),), login=("ghcr-bot", "ghcr-pw")
    )
    proxy = await start_proxy(registries=(ghcr_registry,), users_file=str(users))
    r = await fetch(
        token_url(
            proxy.url, "/token/ghcr.io/0", service="ghcr.io", scope="repository:owner/app:pull"
        ),
        ca,
        headers=[("authorization", basic("alice", "alice-pw"))],
    )
    assert r.status == 200
    token = r.json()["token"]
    ok = await fetch(
        proxy.url + "/v2/owner/app/manifests/v1?ns=ghcr.io",
        ca,
        headers=[("authorization", f"Bearer {token}"), ACCEPT],
    )
    assert ok.status == 200  # for ghcr.io it carries the operator-backed ghcr.io token
    before = len(hub.requests)
    r = await fetch(
        proxy.url + "/v2/library/alpine/manifests/3",
        ca,
        headers=[("authorization", f"Bearer {token}"), ACCEPT],
    )
    assert r.status == 401
    assert r.headers["www-authenticate"].startswith("Bearer ")  # fetch a docker.io token
    # the ghcr.io token inside never went to Docker Hub
    assert not [s for s in hub.requests[before:] if "authorization" in s.headers]


async def test_a_removed_users_tokens_stop_working_on_reload(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    hub.add_image("library/alpine", "3", [make_layer(3, 100)])
    users = tmp_path / "users"
    add_user(users, "alice", "alice-pw")
    add_user(users, "bob", "bob-pw")
    proxy = await start_proxy(users_file=str(users))
    alice = RegistryClient(proxy.url, ca, credentials=("alice", "alice-pw"))
    bob = RegistryClient(proxy.url, ca, credentials=("bob", "bob-pw"))
    for client in (alice, bob):
        r = await client.request("/v2/library/alpine/manifests/3", headers=[ACCEPT])
        assert r.status == 200
    remove_user(users, "alice")
    reload(proxy.app.server, proxy.proxy)  # what SIGHUP does
    for client, status in ((alice, 401), (bob, 200)):
        r = await fetch(
            proxy.url + "/v2/library/alpine/manifests/3",
            ca,
            headers=[("authorization", f"Bearer {client.tokens['']}"), ACCEPT],
        )
        assert r.status == status


async def test_a_changed_password_revokes_the_users_tokens(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    hub.add_image("library/alpine", "3", [make_layer(4, 100)])
    users = tmp_path / "users"
    add_user(users, "alice", "alice-pw")
    proxy = await start_proxy(users_file=str(users))
    alice = RegistryClient(proxy.url, ca, credentials=("alice", "alice-pw"))
    assert (await alice.request("/v2/library/alpine/manifests/3", headers=[ACCEPT])).status == 200
    add_user(users, "alice", "new-pw")  # replaces the password
    reload(proxy.app.server, proxy.proxy)
    r = await fetch(
        proxy.url + "/v2/library/alpine/manifests/3",
        ca,
        headers=[("authorization", f"Bearer {alice.tokens['']}"), ACCEPT],
    )
    assert r.status == 401


# -- hole 6: /v1/search is inside --users and the image rules ---------------------------------


async def test_search_needs_a_mirror_login(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    hub.add_image("library/alpine", "3", [make_layer(5, 100)])
    users = tmp_path / "users"
    add_user(users, "alice", "alice-pw")
    proxy = await start_proxy(users_file=str(users))
    r = await fetch(proxy.url + "/v1/search?q=alpine", ca)
    assert r.status == 401
    assert not [s for s in hub.requests if s.target.startswith("/v1/search")]
    r = await fetch(
        proxy.url + "/v1/search?q=alpine",
        ca,
        headers=[("authorization", basic("alice", "alice-pw"))],
    )
    assert r.status == 200
    assert [result["name"] for result in r.json()["results"]] == ["alpine"]


async def test_search_lists_only_the_images_the_rules_serve(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    for name in ("library/alpine", "library/alpine-extra", "evil/alpine-miner"):
        hub.add_image(name, "1", [make_layer(6, 100)])
    proxy = await start_proxy(images=parse_image_rules(["library/*"], ["alpine-extra"]))
    r = await fetch(proxy.url + "/v1/search?q=alpine", ca)
    assert r.status == 200
    document = r.json()
    assert [result["name"] for result in document["results"]] == ["alpine"]
    assert document["num_results"] == 1


# -- hole 9: a Basic-only registry addressed by path prefix -----------------------------------


@pytest.fixture
def carol_registry(htpasswd: FakeHub) -> tuple[FakeHub, bytes]:
    layer = make_layer(7, 50_000)
    htpasswd.add_user("carol", "carol-pw")
    htpasswd.add_image("team/app", "v1", [layer])
    return htpasswd, layer


async def test_a_basic_registry_by_path_prefix_through_the_default_realm(
    carol_registry: tuple[FakeHub, bytes], start_proxy: StartProxy, ca: trustme.CA
) -> None:
    """docker's flow for mirror/registry.example.test/team/app: ping /v2/ (Docker Hub's
    challenge), ask that realm for the other registry's scope with its Basic login, then pull
    with the token. The registry has no token service: the token stands for the login."""
    htpasswd, layer = carol_registry
    registry = Registry(BASIC_REGISTRY, (parse_url(htpasswd.registry_url),))
    proxy = await start_proxy(registries=(registry,))
    client = RegistryClient(proxy.url, ca, credentials=("carol", "carol-pw"))
    r = await fetch(proxy.url + "/v2/", ca)
    assert r.status == 401  # Docker Hub's challenge: its realm is where the token request goes
    assert f'realm="{proxy.url}/token/0"' in r.headers["www-authenticate"]
    r = await client.fetch_token(
        proxy.url + "/token/0",
        [
            ("service", "registry.docker.io"),
            ("scope", f"repository:{BASIC_REGISTRY}/team/app:pull"),
        ],
    )
    assert r.status == 200, r.body
    token = r.json()["token"]
    assert token.startswith("hp1.")
    for path in ("manifests/v1", f"blobs/sha256:{hexdigest(layer)}"):
        r = await fetch(
            f"{proxy.url}/v2/{BASIC_REGISTRY}/team/app/{path}",
            ca,
            headers=[("authorization", f"Bearer {token}"), ACCEPT],
        )
        assert r.status == 200, (path, r.body)
    assert r.body == layer
    sent = {s.headers.get("authorization") for s in htpasswd.requests if "/team/app/" in s.target}
    assert sent == {basic("carol", "carol-pw")}


async def test_an_anonymous_client_of_a_basic_registry_gets_a_login_challenge(
    carol_registry: tuple[FakeHub, bytes], start_proxy: StartProxy, ca: trustme.CA
) -> None:
    htpasswd, _layer = carol_registry
    registry = Registry(BASIC_REGISTRY, (parse_url(htpasswd.registry_url),))
    proxy = await start_proxy(registries=(registry,))
    r = await fetch(
        token_url(
            proxy.url,
            "/token/0",
            service="registry.docker.io",
            scope=f"repository:{BASIC_REGISTRY}/team/app:pull",
        ),
        ca,
    )
    assert r.status == 200, r.body  # an anonymous token, as a Bearer registry would give
    r = await fetch(
        f"{proxy.url}/v2/{BASIC_REGISTRY}/team/app/manifests/v1",
        ca,
        headers=[("authorization", f"Bearer {r.json()['token']}"), ACCEPT],
    )
    assert r.status == 401
    assert r.headers["www-authenticate"].startswith("Basic ")


async def test_a_registry_open_to_anonymous_pulls_by_path_prefix(
    nursery: trio.Nursery, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    """A registry whose /v2/ answers 200 to anyone names no realm at all: the token request a
    path-prefix pull makes through the default realm gets an anonymous token, not a 502."""
    open_registry = FakeHub(ca, auth_layout="basic", basic_anonymous=True)
    await nursery.start(open_registry.serve)
    layer = make_layer(9, 3000)
    open_registry.add_image("team/tool", "1", [layer])
    registry = Registry(BASIC_REGISTRY, (parse_url(open_registry.registry_url),))
    proxy = await start_proxy(registries=(registry,))
    client = RegistryClient(proxy.url, ca)
    scope = f"repository:{BASIC_REGISTRY}/team/tool:pull"
    r = await client.fetch_token(
        proxy.url + "/token/0", [("service", "registry.docker.io"), ("scope", scope)]
    )
    assert r.status == 200, r.body
    r = await fetch(
        f"{proxy.url}/v2/{BASIC_REGISTRY}/team/tool/blobs/sha256:{hexdigest(layer)}",
        ca,
        headers=[("authorization", f"Bearer {r.json()['token']}")],
    )
    assert r.status == 200 and r.body == layer


needs_skopeo = pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")


@needs_skopeo
async def test_skopeo_pulls_a_basic_registry_by_path_prefix(
    carol_registry: tuple[FakeHub, bytes],
    start_proxy: StartProxy,
    tls_files: TLSFiles,
    tmp_path: Path,
) -> None:
    htpasswd, layer = carol_registry
    registry = Registry(BASIC_REGISTRY, (parse_url(htpasswd.registry_url),))
    proxy = await start_proxy(registries=(registry,))
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    target = tmp_path / "app"
    with trio.fail_after(120):
        result = await trio.run_process(
            [
                "skopeo",
                "--policy",
                str(policy),
                "copy",
                "--src-cert-dir",
                str(tls_files.cert_dir),
                "--src-creds",
                "carol:carol-pw",
                f"docker://{proxy.url.removeprefix('https://')}/{BASIC_REGISTRY}/team/app:v1",
                f"dir:{target}",
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "HOME": str(tmp_path),
                "REGISTRY_AUTH_FILE": str(tmp_path / "auth.json"),
            },
        )
    assert result.returncode == 0, result.stderr.decode()
    assert (target / hexdigest(layer)).read_bytes() == layer


# -- hole 10: a wrong password is told apart from no login ------------------------------------


async def test_a_wrong_password_is_told_apart_from_no_login(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    users = tmp_path / "users"
    add_user(users, "alice", "alice-pw")
    proxy = await start_proxy(users_file=str(users))
    url = token_url(proxy.url, "/token/0", service="registry.docker.io")
    none = await fetch(url, ca)
    wrong = await fetch(url, ca, headers=[("authorization", basic("alice", "nope"))])
    assert none.status == wrong.status == 401
    assert "wrong" in wrong.json()["errors"][0]["message"]
    assert "wrong" not in none.json()["errors"][0]["message"]
    direct = await fetch(
        proxy.url + "/v2/library/alpine/manifests/3",
        ca,
        headers=[("authorization", basic("alice", "nope")), ACCEPT],
    )
    assert direct.status == 401 and "wrong" in direct.json()["errors"][0]["message"]


async def test_dockerd_in_mirror_mode_logs_in_with_its_docker_hub_credentials(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    """dockerd with registry-mirrors sends the credentials of its config.json entry for
    https://index.docker.io/v1/ to the realm the mirror's challenge names: a mirror user's login
    stored there (``docker login`` to Docker Hub's name, or written by hand) is what reaches us,
    and Docker Hub never sees it."""
    layer = make_layer(8, 1000)
    hub.add_image("library/alpine", "3", [layer])
    users = tmp_path / "users"
    add_user(users, "alice", "alice-pw")
    config_json = {"auths": {"https://index.docker.io/v1/": {"auth": "YWxpY2U6YWxpY2UtcHc="}}}
    user, _, password = (
        base64.b64decode(config_json["auths"]["https://index.docker.io/v1/"]["auth"])
        .decode()
        .partition(":")
    )
    proxy = await start_proxy(users_file=str(users))
    client = RegistryClient(proxy.url, ca, credentials=(user, password))
    r = await client.request("/v2/library/alpine/manifests/3", headers=[ACCEPT])
    assert r.status == 200
    r = await client.request(f"/v2/library/alpine/blobs/sha256:{hexdigest(layer)}")
    assert r.status == 200 and r.body == layer
    assert all(
        "YWxpY2U6YWxpY2UtcHc=" not in s.headers.get("authorization", "") for s in hub.requests
    )
