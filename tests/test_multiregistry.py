"""Several registries through one mirror, end to end: a fake Docker Hub (token service on another
host), a fake ghcr.io (token service on the registry host at /token) and a fake registry with
Basic auth only, addressed with containerd's ``ns=``, a path prefix (skopeo) and host names."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import trio
import trustme

from hubproxy.ops.usersfile import add_user
from hubproxy.policy.access import parse_image_rules, parse_networks
from hubproxy.policy.registries import Registry
from hubproxy.policy.urls import base_url
from tests.conftest import Canary, RunningProxy, StartProxy, TLSFiles
from tests.fakehub import FakeHub, fetch, make_layer
from tests.registry_client import RegistryClient

MANIFEST_ACCEPT = ("accept", "application/vnd.docker.distribution.manifest.v2+json")


def hexdigest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def registry(name: str, *fakes: FakeHub, **fields: object) -> Registry:
    upstreams = tuple(base_url(fake.registry_url) for fake in fakes)
    return Registry(name, upstreams, **fields)  # type: ignore[arg-type]


async def pull(
    client: RegistryClient, name: str, tag: str, layers: Iterable[bytes], query: str = ""
) -> str:
    """Pull manifest and blobs the way a client does; check every byte; return the digest."""
    scope = f"repository:{name}:pull"  # as docker asks: the name the client sees
    r = await client.request(
        f"/v2/{name}/manifests/{tag}{query}", headers=[MANIFEST_ACCEPT], scope=scope
    )
    assert r.status == 200, r.body
    digest = r.headers["docker-content-digest"]
    assert "sha256:" + hexdigest(r.body) == digest
    for layer in layers:
        r = await client.request(f"/v2/{name}/blobs/sha256:{hexdigest(layer)}{query}", scope=scope)
        assert r.status == 200 and r.body == layer
    return digest


async def test_containerd_ns_reaches_each_registry_and_its_own_token_service(
    hub: FakeHub, ghcr: FakeHub, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    docker_layer, ghcr_layer = make_layer(1, 300_000), make_layer(2, 200_000)
    hub.add_image("library/alpine", "3.20", [docker_layer])
    ghcr_digest = ghcr.add_image("owner/app", "v1", [ghcr_layer])
    proxy = await start_proxy(registries=(registry("ghcr.io", ghcr),))
    client = RegistryClient(proxy.url, ca)
    assert await pull(client, "owner/app", "v1", [ghcr_layer], "?ns=ghcr.io") == ghcr_digest
    assert any(f'realm="{proxy.url}/token/ghcr.io/0"' in c for c in client.challenges)
    await pull(client, "library/alpine", "3.20", [docker_layer], "?ns=docker.io")
    assert any(f'realm="{proxy.url}/token/0"' in c for c in client.challenges)
    ghcr_tokens = [s for s in ghcr.requests if s.server == "auth"]
    assert ghcr_tokens and all("service=ghcr.io" in s.target for s in ghcr_tokens)
    assert all("owner%2Fapp" in s.target or "owner/app" in s.target for s in ghcr_tokens)
    assert not any("owner" in s.target for s in hub.requests)
    assert not any("alpine" in s.target for s in ghcr.requests)
    assert all("ns=" not in s.target for s in (*hub.requests, *ghcr.requests))


async def test_unknown_registries_are_refused_without_any_connection(
    hub: FakeHub, ghcr: FakeHub, start_proxy: StartProxy, ca: trustme.CA, canary: Canary
) -> None:
    proxy = await start_proxy(registries=(registry("ghcr.io", ghcr),))
    seen = len(hub.requests) + len(ghcr.requests)
    evil = f"127.0.0.1:{canary.port}"
    for path in (
        f"/v2/x/y/manifests/1?ns={evil}",
        "/v2/x/y/manifests/1?ns=evil.example.com",
        f"/v2/{evil}/x/y/manifests/1",
        "/v2/?ns=quay.example",
    ):
        r = await fetch(proxy.url + path, ca)
        assert r.status == 404, path
        assert r.json()["errors"][0]["code"] == "NAME_UNKNOWN"
    r = await fetch(proxy.url + f"/token/0?scope=repository:{evil}/x:pull&service=x", ca)
    assert r.status == 404
    assert canary.connections == 0
    assert len(hub.requests) + len(ghcr.requests) == seen


async def test_host_names_map_to_registries(
    hub: FakeHub, ghcr: FakeHub, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    layer = make_layer(3, 50_000)
    digest = ghcr.add_image("owner/app", "v1", [layer])
    proxy = await start_proxy(
        registries=(registry("ghcr.io", ghcr),), host_map=(("ghcr.mirror.test", "ghcr.io"),)
    )
    host = [("host", f"ghcr.mirror.test:{proxy.port}")]
    r = await fetch(proxy.url + "/v2/owner/app/manifests/v1", ca, headers=host)
    assert r.status == 401
    challenge = r.headers["www-authenticate"]
    realm = f"https://ghcr.mirror.test:{proxy.port}/token/ghcr.io/0"
    assert challenge.startswith(f'Bearer realm="{realm}",service="ghcr.io"')
    # the name resolves only in the client's world: send the token request to our address
    token_url = proxy.url + "/token/ghcr.io/0?service=ghcr.io&scope=repository:owner/app:pull"
    r = await fetch(token_url, ca, headers=host)
    assert r.status == 200
    bearer = [("authorization", "Bearer " + r.json()["token"]), MANIFEST_ACCEPT]
    r = await fetch(proxy.url + "/v2/owner/app/manifests/v1", ca, headers=host + bearer)
    assert r.status == 200 and r.headers["docker-content-digest"] == digest
    r = await fetch(
        proxy.url + f"/v2/owner/app/blobs/sha256:{hexdigest(layer)}", ca, headers=host + bearer
    )
    assert r.status == 200 and r.body == layer
    assert not any("owner/app" in s.target for s in hub.requests)


async def test_concurrent_pulls_from_two_registries_keep_their_tokens_apart(
    hub: FakeHub, ghcr: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    docker_layers = [make_layer(10 + i, 150_000) for i in range(4)]
    ghcr_layers = [make_layer(20 + i, 150_000) for i in range(4)]
    hub.add_image("library/redis", "7", docker_layers)
    ghcr.add_image("owner/app", "v2", ghcr_layers)
    proxy = await start_proxy(
        registries=(registry("ghcr.io", ghcr),), cache_dir=str(tmp_path / "cache")
    )
    results: dict[str, str] = {}

    async def docker_side() -> None:
        client = RegistryClient(proxy.url, ca)
        results["docker"] = await pull(client, "library/redis", "7", docker_layers, "?ns=docker.io")

    async def ghcr_side() -> None:
        client = RegistryClient(proxy.url, ca)  # path-prefix style for this one
        results["ghcr"] = await pull(client, "ghcr.io/owner/app", "v2", ghcr_layers)

    with trio.fail_after(60):
        for _ in range(2):  # misses, then hits from the cache
            async with trio.open_nursery() as nursery:
                nursery.start_soon(docker_side)
                nursery.start_soon(ghcr_side)
    assert set(results) == {"docker", "ghcr"}
    hub_tokens = [s.target for s in hub.requests if s.server == "auth"]
    ghcr_tokens = [s.target for s in ghcr.requests if s.server == "auth"]
    assert hub_tokens and all("owner" not in t for t in hub_tokens)
    assert ghcr_tokens and all("redis" not in t and "service=ghcr.io" in t for t in ghcr_tokens)
    # the second round came from the cache: each CDN served each blob once
    for fake, layers in ((hub, docker_layers), (ghcr, ghcr_layers)):
        cdn = [s.target for s in fake.requests if s.server == "cdn"]
        for layer in layers:
            assert sum(hexdigest(layer) in t for t in cdn) == 1


async def test_manifests_and_tags_are_cached_per_registry(
    hub: FakeHub, ghcr: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    """The same name and tag in two registries are two images, cached apart."""
    docker_digest = hub.add_image("owner/app", "v1", [make_layer(30, 1000)])
    ghcr_digest = ghcr.add_image("owner/app", "v1", [make_layer(31, 1000)])
    assert docker_digest != ghcr_digest
    proxy = await start_proxy(
        registries=(registry("ghcr.io", ghcr),), cache_dir=str(tmp_path / "cache")
    )
    for _ in range(2):
        for path, digest in (
            ("/v2/owner/app/manifests/v1", docker_digest),
            ("/v2/owner/app/manifests/v1?ns=ghcr.io", ghcr_digest),
            ("/v2/ghcr.io/owner/app/manifests/v1", ghcr_digest),
            ("/v2/docker.io/owner/app/manifests/v1", docker_digest),
        ):
            client = RegistryClient(proxy.url, ca)  # a token of its own for each
            r = await client.request(path, headers=[MANIFEST_ACCEPT])
            assert r.status == 200 and r.headers["docker-content-digest"] == digest, path


async def test_each_registry_fails_over_to_its_own_fallback(
    nursery: trio.Nursery,
    hub: FakeHub,
    ghcr: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
) -> None:
    worker = FakeHub(ca, service="ghcr.io", auth_layout="same-host")
    worker.ratelimit_limit = None
    await nursery.start(worker.serve)
    layer = make_layer(40, 1000)
    digest = ghcr.add_image("owner/app", "v1", [layer])
    assert worker.add_image("owner/app", "v1", [layer]) == digest
    proxy = await start_proxy(registries=(registry("ghcr.io", ghcr, worker),))
    client = RegistryClient(proxy.url, ca)
    path = "/v2/owner/app/manifests/v1?ns=ghcr.io"
    assert (await client.request(path, headers=[MANIFEST_ACCEPT])).status == 200
    ghcr.force_429(1)
    # ghcr.io answers 429; the fallback challenges with a realm that leads back through the
    # mirror to the fallback's own token service
    r = await client.request(path, headers=[MANIFEST_ACCEPT])
    assert r.status == 200 and r.headers["docker-content-digest"] == digest
    assert f'realm="{proxy.url}/token/ghcr.io/1"' in client.challenges[-1]
    assert any("/manifests/v1" in s.target for s in worker.requests)
    assert not any("/manifests/" in s.target for s in hub.requests)


async def test_a_registry_with_its_own_ca(
    nursery: trio.Nursery, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    """--registry-ca: an internal registry signed by a CA nobody else trusts."""
    internal_ca = trustme.CA()
    internal = FakeHub(internal_ca, service="internal", auth_layout="same-host")
    internal.ratelimit_limit = None
    await nursery.start(internal.serve)
    layer = make_layer(41, 1000)
    internal.add_image("team/tool", "1", [layer])
    ca_file = tmp_path / "internal-ca.pem"
    internal_ca.cert_pem.write_to_path(str(ca_file))
    without = await start_proxy(registries=(registry("registry.internal", internal),))
    r = await RegistryClient(without.url, ca).request("/v2/registry.internal/team/tool/manifests/1")
    assert r.status == 502  # the global trust store does not know it
    proxy = await start_proxy(
        registries=(registry("registry.internal", internal, upstream_ca=str(ca_file)),)
    )
    client = RegistryClient(proxy.url, ca)
    await pull(client, "registry.internal/team/tool", "1", [layer])


async def test_basic_only_registry_with_and_without_an_operator_login(
    htpasswd: FakeHub, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    layer = make_layer(42, 100_000)
    htpasswd.add_image("team/tool", "1", [layer])
    htpasswd.add_user("operator", "op-secret")
    htpasswd.add_user("carol", "carol-secret")
    name = "registry.example.com"

    # without a login the client meets the registry's own Basic challenge, and may answer it
    plain = await start_proxy(registries=(registry(name, htpasswd),))
    r = await fetch(plain.url + f"/v2/{name}/team/tool/manifests/1", ca)
    assert r.status == 401 and r.headers["www-authenticate"].startswith("Basic ")
    carol = base64.b64encode(b"carol:carol-secret").decode()
    r = await fetch(
        plain.url + f"/v2/{name}/team/tool/blobs/sha256:{hexdigest(layer)}",
        ca,
        headers=[("authorization", f"Basic {carol}")],
    )
    assert r.status == 200 and r.body == layer

    # with the operator's login, a client without credentials pulls with it
    proxy = await start_proxy(
        registries=(registry(name, htpasswd, login=("operator", "op-secret")),),
        allow=parse_networks(["127.0.0.0/8"]),
    )
    before = len(htpasswd.requests)
    r = await fetch(proxy.url + f"/v2/{name}/team/tool/blobs/sha256:{hexdigest(layer)}", ca)
    assert r.status == 200 and r.body == layer
    operator = "Basic " + base64.b64encode(b"operator:op-secret").decode()
    sent = [
        s.headers.get("authorization") for s in htpasswd.requests[before:] if "/blobs/" in s.target
    ]
    assert sent == [operator]
    # a client's own credentials are passed on instead
    r = await fetch(
        proxy.url + f"/v2/{name}/team/tool/manifests/1",
        ca,
        headers=[("authorization", f"Basic {carol}"), MANIFEST_ACCEPT],
    )
    assert r.status == 200
    assert htpasswd.requests[-1].headers["authorization"] == f"Basic {carol}"


async def test_operator_login_for_docker_hub_tokens(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    layer = make_layer(43, 1000)
    hub.add_image("acme/private", "v1", [layer])
    hub.add_user("acme-bot", "bot-token")
    hub.make_private("acme/private", "acme-bot")
    proxy = await start_proxy(
        default_login=("acme-bot", "bot-token"), allow=parse_networks(["127.0.0.1/32"])
    )
    client = RegistryClient(proxy.url, ca)  # sends no credentials at all
    await pull(client, "acme/private", "v1", [layer])
    token_requests = [s for s in hub.requests if s.server == "auth"]
    assert all(s.headers.get("authorization", "").startswith("Basic ") for s in token_requests)


# -------------------------------------------------------------------- skopeo, path prefix

needs_skopeo = pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")


async def skopeo(proxy: RunningProxy, tls_files: TLSFiles, home: Path, *args: str) -> bytes:
    policy = home / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "REGISTRY_AUTH_FILE": str(home / "auth.json"),
    }
    with trio.fail_after(120):
        result = await trio.run_process(
            ["skopeo", "--policy", str(policy), *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )
    if result.returncode != 0:
        raise AssertionError(f"skopeo {args} failed:\n{result.stderr.decode()}")
    return bytes(result.stdout)


@needs_skopeo
async def test_path_prefix_pulls_with_skopeo(
    hub: FakeHub,
    ghcr: FakeHub,
    start_proxy: StartProxy,
    tls_files: TLSFiles,
    tmp_path: Path,
) -> None:
    """skopeo pulls mirror/ghcr.io/owner/app: it pings /v2/ (Docker Hub's challenge), asks that
    realm for a ghcr.io scope, and the mirror takes the token request to ghcr.io instead."""
    ghcr_layers = [make_layer(50, 600_000), make_layer(51, 2_000)]
    docker_layers = [make_layer(52, 300_000)]
    ghcr.add_image("owner/app", "v1", ghcr_layers)
    hub.add_image("library/alpine", "3.20", docker_layers)
    proxy = await start_proxy(registries=(registry("ghcr.io", ghcr),))
    host = proxy.url.removeprefix("https://")
    cert_dir = str(tls_files.cert_dir)
    for ref, layers in (
        ("ghcr.io/owner/app:v1", ghcr_layers),
        ("docker.io/library/alpine:3.20", docker_layers),
    ):
        target = tmp_path / ref.replace("/", "_")
        await skopeo(
            proxy,
            tls_files,
            tmp_path,
            "copy",
            "--src-cert-dir",
            cert_dir,
            f"docker://{host}/{ref}",
            f"dir:{target}",
        )
        copied = {p.name for p in target.iterdir()}
        for layer in layers:
            assert hexdigest(layer) in copied
            assert hexdigest((target / hexdigest(layer)).read_bytes()) == hexdigest(layer)
    ghcr_tokens = [s.target for s in ghcr.requests if s.server == "auth"]
    assert ghcr_tokens and all("service=ghcr.io" in t for t in ghcr_tokens)
    assert all("ghcr.io%2F" not in t and "ghcr.io/" not in t for t in ghcr_tokens)
    assert not any("owner" in s.target for s in hub.requests)
    tags = await skopeo(
        proxy,
        tls_files,
        tmp_path,
        "list-tags",
        "--cert-dir",
        cert_dir,
        f"docker://{host}/ghcr.io/owner/app",
    )
    assert json.loads(tags)["Tags"] == ["v1"]


async def test_access_rules_and_mirror_logins_apply_per_registry(
    hub: FakeHub, ghcr: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    layer = make_layer(60, 10_000)
    ghcr.add_image("owner/app", "v1", [layer])
    ghcr.add_image("other/app", "v1", [make_layer(61, 100)])
    hub.add_image("library/alpine", "3.20", [make_layer(62, 100)])
    users = tmp_path / "users"
    add_user(users, "dana", "dana-pass-1")
    proxy = await start_proxy(
        registries=(registry("ghcr.io", ghcr),),
        images=parse_image_rules(["ghcr.io/owner/*"], []),
        users_file=str(users),
    )
    client = RegistryClient(proxy.url, ca, credentials=("dana", "dana-pass-1"))
    # a path-prefix pull: the default realm's token request moves to ghcr.io, sealed for dana
    await pull(client, "ghcr.io/owner/app", "v1", [layer])
    assert all(token.startswith("hp1.") for token in client.tokens.values())
    # each sealed for the registry it was fetched for, with dana's current stamp
    gate = proxy.proxy.admission
    sealer = proxy.proxy.tokens.sealer
    grants = [sealer.open(token, time.time()) for token in client.tokens.values()]
    assert grants and all(
        g is not None and (g.user, g.registry, g.stamp) == ("dana", "ghcr.io", gate.stamp("dana"))
        for g in grants
    )
    assert all("authorization" not in s.headers for s in ghcr.requests if s.server == "auth")
    for path in ("/v2/other/app/manifests/v1?ns=ghcr.io", "/v2/library/alpine/manifests/3.20"):
        r = await client.request(path, headers=[MANIFEST_ACCEPT], scope=path)
        assert r.status == 403 and r.json()["errors"][0]["code"] == "DENIED", path
    assert not any("other/app" in s.target for s in ghcr.requests)
    anonymous = RegistryClient(proxy.url, ca)
    r = await anonymous.request("/v2/owner/app/manifests/v1?ns=ghcr.io", headers=[MANIFEST_ACCEPT])
    assert r.status == 401
    assert f'realm="{proxy.url}/token/ghcr.io/0",service="ghcr.io"' in anonymous.challenges[0]


async def test_the_startup_line_names_each_registry_with_its_upstreams_and_hosts(
    hub: FakeHub,
    ghcr: FakeHub,
    htpasswd: FakeHub,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="hubproxy")
    await start_proxy(
        registries=(
            registry("ghcr.io", ghcr, htpasswd),
            registry("registry.example.com", htpasswd, login=("op", "pw")),
        ),
        host_map=(("ghcr.mirror.example", "ghcr.io"),),
    )
    (line,) = [r.getMessage() for r in caplog.records if "listening on" in r.getMessage()]
    assert (
        f"ghcr.io at {ghcr.registry_url}/ (fallbacks {htpasswd.registry_url}/; "
        "host ghcr.mirror.example)"
    ) in line
    assert f"registry.example.com at {htpasswd.registry_url}/ (operator login)" in line
    assert "op" not in line.split("registry.example.com")[1].replace("operator", "")
