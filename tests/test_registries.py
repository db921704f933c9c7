"""Tests for hubproxy.registries: which registry a request is for, without sockets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hubproxy.config import Config
from hubproxy.errors import ClientProtocolError, RouteNotFound
from hubproxy.flow import base_url
from hubproxy.registries import (
    BUILTIN_REGISTRIES,
    Registry,
    RegistryTable,
    address,
    looks_like_host,
    token_registry,
)


def table(host_map: tuple[tuple[str, str], ...] = ()) -> RegistryTable:
    registries = tuple(
        Registry(name, (base_url(url),), library_prefix=name == "docker.io", aliases=aliases)
        for name, url, aliases in BUILTIN_REGISTRIES
    )
    return RegistryTable(registries, host_map=host_map)


TABLE = table((("ghcr.mirror.example.com", "ghcr.io"), ("quay.mirror.lan", "quay.io")))


@pytest.mark.parametrize(
    ("target", "host", "registry", "normalised", "how"),
    [
        # containerd's ns= (the rest of the query kept byte-exact, in order)
        (
            "/v2/owner/app/manifests/v1?ns=ghcr.io",
            None,
            "ghcr.io",
            "/v2/owner/app/manifests/v1",
            "ns",
        ),
        (
            "/v2/library/nginx/manifests/1?ns=docker.io",
            None,
            "docker.io",
            "/v2/library/nginx/manifests/1",
            "ns",
        ),
        ("/v2/?ns=quay.io", None, "quay.io", "/v2/", "ns"),
        (
            "/v2/a/b/tags/list?n=10&ns=ghcr.io&last=x",
            None,
            "ghcr.io",
            "/v2/a/b/tags/list?n=10&last=x",
            "ns",
        ),
        (
            "/v2/pause/manifests/3.9?ns=k8s.gcr.io",
            None,
            "registry.k8s.io",
            "/v2/pause/manifests/3.9",
            "ns",
        ),
        ("/v2/x/y/manifests/1?ns=GHCR.IO", None, "ghcr.io", "/v2/x/y/manifests/1", "ns"),
        ("/v2/x/y/manifests/1?ns=index.docker.io", None, "docker.io", "/v2/x/y/manifests/1", "ns"),
        # ns wins over the host name the client used
        (
            "/v2/x/y/blobs/sha256:00?ns=quay.io",
            "ghcr.mirror.example.com",
            "quay.io",
            "/v2/x/y/blobs/sha256:00",
            "ns",
        ),
        # a path prefix: docker pull mirror/ghcr.io/owner/app
        (
            "/v2/ghcr.io/owner/app/manifests/v1",
            None,
            "ghcr.io",
            "/v2/owner/app/manifests/v1",
            "path",
        ),
        (
            "/v2/docker.io/library/nginx/blobs/sha256:ab",
            None,
            "docker.io",
            "/v2/library/nginx/blobs/sha256:ab",
            "path",
        ),
        (
            "/v2/registry.k8s.io/pause/manifests/3.9",
            None,
            "registry.k8s.io",
            "/v2/pause/manifests/3.9",
            "path",
        ),
        (
            "/v2/mcr.microsoft.com/dotnet/runtime/tags/list?n=5",
            None,
            "mcr.microsoft.com",
            "/v2/dotnet/runtime/tags/list?n=5",
            "path",
        ),
        # a path prefix wins over the host name
        (
            "/v2/quay.io/a/b/manifests/1",
            "ghcr.mirror.example.com",
            "quay.io",
            "/v2/a/b/manifests/1",
            "path",
        ),
        # the host name the client used
        (
            "/v2/owner/app/manifests/v1",
            "ghcr.mirror.example.com",
            "ghcr.io",
            "/v2/owner/app/manifests/v1",
            "host",
        ),
        (
            "/v2/owner/app/manifests/v1",
            "GHCR.mirror.example.com:8443",
            "ghcr.io",
            "/v2/owner/app/manifests/v1",
            "host",
        ),
        ("/v2/", "quay.mirror.lan", "quay.io", "/v2/", "host"),
        # none: the default registry
        (
            "/v2/library/nginx/manifests/1",
            None,
            "docker.io",
            "/v2/library/nginx/manifests/1",
            "default",
        ),
        (
            "/v2/library/nginx/manifests/1",
            "mirror.example.com",
            "docker.io",
            "/v2/library/nginx/manifests/1",
            "default",
        ),
        ("/v2/", None, "docker.io", "/v2/", "default"),
        (
            "/v2/nginx/manifests/latest?nsx=1",
            None,
            "docker.io",
            "/v2/nginx/manifests/latest?nsx=1",
            "default",
        ),
        # a hostile first component is not a registry: routing refuses it later
        ("/v2/../etc/passwd", None, "docker.io", "/v2/../etc/passwd", "default"),
        ("/v2/ghcr.io", None, "docker.io", "/v2/ghcr.io", "default"),
    ],
)
def test_address(target: str, host: str | None, registry: str, normalised: str, how: str) -> None:
    addressed = address(TABLE, target, host)
    assert (addressed.registry.name, addressed.target, addressed.how) == (registry, normalised, how)


@pytest.mark.parametrize(
    "target",
    [
        "/v2/x/y/manifests/1?ns=evil.example.com",
        "/v2/x/y/manifests/1?ns=127.0.0.1:8080",
        "/v2/x/y/manifests/1?ns=",
        "/v2/x/y/manifests/1?ns=%2e%2e",
        "/v2/evil.example.com/x/manifests/1",
        "/v2/127.0.0.1:9/x/manifests/1",
        "/v2/localhost/x/manifests/1",
    ],
)
def test_unknown_registries_are_refused(target: str) -> None:
    with pytest.raises(RouteNotFound) as caught:
        address(TABLE, target, None)
    assert caught.value.status == 404 and caught.value.code == "NAME_UNKNOWN"
    assert "not served by this mirror" in caught.value.message


def test_contradictory_ns_is_a_client_error() -> None:
    with pytest.raises(ClientProtocolError):
        address(TABLE, "/v2/x/y/manifests/1?ns=ghcr.io&ns=quay.io", None)
    assert address(TABLE, "/v2/x/y/manifests/1?ns=ghcr.io&ns=ghcr.io", None).how == "ns"


def test_unmapped_host_names_fall_back_to_the_default() -> None:
    for host in ("evil.example.com", "ghcr.io", "[::1]:5000", "", "ghcr.mirror.example.com.evil"):
        assert address(TABLE, "/v2/a/b/manifests/1", host).registry.name == "docker.io"


@pytest.mark.parametrize(
    ("component", "expected"),
    [
        ("ghcr.io", True),
        ("localhost", True),
        ("localhost:5000", True),
        ("127.0.0.1:5000", True),
        ("library", False),
        ("my-org", False),
        ("..", False),
        (".", False),
        ("a..b", False),
        ("-bad.example", False),
        ("host:port", False),
    ],
)
def test_looks_like_host(component: str, expected: bool) -> None:
    assert looks_like_host(component) is expected


@pytest.mark.parametrize(
    ("path_registry", "query", "chosen", "rewritten"),
    [
        # a path-prefix pull asks the default realm for another registry's scope: it moves
        (
            "docker.io",
            "scope=repository%3Aghcr.io%2Fowner%2Fapp%3Apull&service=registry.docker.io",
            "ghcr.io",
            "scope=repository:owner/app:pull",
        ),
        (
            "docker.io",
            "account=bob&scope=repository:quay.io/a/b:pull",
            "quay.io",
            "account=bob&scope=repository:a/b:pull",
        ),
        # docker.io named in the scope: the prefix goes, the registry stays (service kept)
        (
            "docker.io",
            "scope=repository:docker.io/library/nginx:pull&service=registry.docker.io",
            "docker.io",
            "scope=repository:library/nginx:pull&service=registry.docker.io",
        ),
        # no registry in the scope: byte-exact, whatever the spelling
        (
            "ghcr.io",
            "scope=repository%3Aowner%2Fapp%3Apull&service=ghcr.io",
            "ghcr.io",
            "scope=repository%3Aowner%2Fapp%3Apull&service=ghcr.io",
        ),
        ("docker.io", "", "docker.io", ""),
        ("docker.io", "service=registry.docker.io", "docker.io", "service=registry.docker.io"),
        # two scopes of one registry
        (
            "docker.io",
            "scope=repository:ghcr.io/a/b:pull&scope=repository:ghcr.io/c/d:pull,push",
            "ghcr.io",
            "scope=repository:a/b:pull&scope=repository:c/d:pull,push",
        ),
    ],
)
def test_token_registry(path_registry: str, query: str, chosen: str, rewritten: str) -> None:
    registry, out = token_registry(
        TABLE, TABLE.find(path_registry) or TABLE.default_registry, query
    )
    assert (registry.name, out) == (chosen, rewritten)


def test_token_requests_for_two_registries_or_an_unknown_one_are_refused() -> None:
    docker = TABLE.default_registry
    with pytest.raises(ClientProtocolError):
        token_registry(
            TABLE, docker, "scope=repository:ghcr.io/a/b:pull&scope=repository:quay.io/c/d:pull"
        )
    with pytest.raises(RouteNotFound):
        token_registry(TABLE, docker, "scope=repository:evil.example.com/a/b:pull")


@given(st.text(max_size=60), st.one_of(st.none(), st.text(max_size=30)))
def test_address_never_names_a_registry_outside_the_table(target: str, host: str | None) -> None:
    try:
        addressed = address(TABLE, "/v2/" + target, host)
    except (RouteNotFound, ClientProtocolError):
        return
    assert addressed.registry in TABLE.registries


def test_config_builds_the_default_registry_from_its_single_upstream_fields() -> None:
    config = Config(
        upstreams=(base_url("https://hub.example"), base_url("https://worker.example")),
        library_prefix=True,
        registries=(
            Registry("ghcr.io", (base_url("https://ghcr.example"),)),
            Registry("docker.io", (base_url("https://ignored.example"),)),
        ),
    )
    built = config.registry_table()
    assert [r.name for r in built.registries] == ["docker.io", "ghcr.io"]
    default = built.default_registry
    assert [str(u) for u in default.upstreams] == [
        "https://hub.example/",
        "https://worker.example/",
    ]
    assert default.library_prefix and "index.docker.io" in default.aliases
