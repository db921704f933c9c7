"""Tests for hubproxy.policy.registries: registry facts, which registry a request is for, and token
scopes, without sockets."""

from __future__ import annotations

from urllib.parse import parse_qsl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hubproxy.config import Config
from hubproxy.policy.access import parse_image_pattern, parse_image_rules
from hubproxy.policy.errors import ClientProtocolError, RouteNotFound
from hubproxy.policy.registries import (
    BUILTIN_REGISTRIES,
    DEFAULT_REGISTRY,
    DOCKER_HUB_HOSTS,
    DOCKER_HUB_UPSTREAM,
    Registry,
    RegistryTable,
    Scope,
    address,
    build_table,
    format_scope,
    is_docker_hub,
    looks_like_host,
    looks_like_host_pattern,
    parse_scope,
    query_scopes,
    replace_query_scopes,
    rewrite_scope,
    rewrite_token_query,
    token_registry,
    upstream_name,
)
from hubproxy.policy.urls import base_url


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
        ("UPPER.io", True),
        ("LOCALHOST", True),
        ("Upper", False),  # docker would say yes; here names are case-insensitive (docstring)
        ("a.", False),
        (".a", False),
        ("host:123456", False),
        ("host:", False),
        (":5000", False),
        ("[::1]:5000", False),
        ("*.gcr.io", False),  # a glob, not a host
        ("", False),
    ],
)
def test_looks_like_host(component: str, expected: bool) -> None:
    assert looks_like_host(component) is expected
    if "*" not in component:
        # one rule for request paths and image globs: a concrete name gets the same answer
        assert looks_like_host_pattern(component) is expected


@pytest.mark.parametrize(
    ("component", "expected"),
    [
        ("*.gcr.io", True),
        ("**.example.com", True),
        ("localhost:*", True),
        ("*:5000", True),
        ("registry-*.corp.lan:50*", True),
        ("*", False),
        ("**", False),
        ("my-*", False),
        ("*..b", False),
        ("*.", False),
        ("*:port", False),
    ],
)
def test_looks_like_host_pattern(component: str, expected: bool) -> None:
    assert looks_like_host_pattern(component) is expected


@given(st.text(alphabet="aZ09.-:_[]/", max_size=16))
def test_property_host_rule_is_one_rule_and_ignores_case(component: str) -> None:
    assert looks_like_host_pattern(component) is looks_like_host(component)
    assert looks_like_host(component.lower()) is looks_like_host(component)


# The names a request path, a token scope and an image glob must agree on: the registry each
# attributes "<name>/app" to. Every name below is also a registry in the table (when it is
# host-shaped at all), so a rule that wrongly took one for a host would pick it, not fail.
AGREEMENT = [
    ("ghcr.io", "ghcr.io"),
    ("GHCR.io", "ghcr.io"),
    ("UPPER.io", "upper.io"),
    ("localhost", "localhost"),
    ("localhost:5000", "localhost:5000"),
    ("host:5000", "host:5000"),
    ("127.0.0.1:5000", "127.0.0.1:5000"),
    ("docker.io", "docker.io"),
    ("index.docker.io", "docker.io"),
    ("k8s.gcr.io", "registry.k8s.io"),
    ("library", "docker.io"),
    ("my-org", "docker.io"),
    ("..", "docker.io"),
    (".", "docker.io"),
    ("a..b", "docker.io"),
    ("a.", "docker.io"),
    ("-bad.example", "docker.io"),
    ("host:port", "docker.io"),
    ("host:123456", "docker.io"),
]
WIDE = RegistryTable(
    (
        *TABLE.registries,
        *(Registry(name.lower(), ()) for name, _ in AGREEMENT if TABLE.find(name) is None),
    )
)


@pytest.mark.parametrize(("name", "registry"), AGREEMENT)
def test_a_request_path_a_token_scope_and_an_image_glob_name_the_same_registry(
    name: str, registry: str
) -> None:
    addressed = address(WIDE, f"/v2/{name}/app/manifests/latest", None)
    repository = addressed.target.removeprefix("/v2/").removesuffix("/manifests/latest")
    assert addressed.registry.name == registry
    chosen, _ = token_registry(WIDE, WIDE.default_registry, f"scope=repository:{name}/app:pull")
    assert chosen.name == registry
    glob = f"{name.lower()}/app"  # image globs are written in lower case
    pattern = parse_image_pattern(glob)
    assert (pattern.registry is None) is (registry == DEFAULT_REGISTRY)
    assert parse_image_rules([glob], []).permits(registry, repository)
    assert not parse_image_rules([], [glob]).permits(registry, repository)
    elsewhere = "quay.io" if registry != "quay.io" else "ghcr.io"
    assert not parse_image_rules([glob], []).permits(elsewhere, repository)


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


def test_build_table_puts_the_default_first_and_it_wins_over_a_namesake() -> None:
    default = Registry("docker.io", (base_url("https://hub.example"),), library_prefix=True)
    others = [
        Registry("ghcr.io", ()),
        Registry("docker.io", (base_url("https://ignored.example"),)),
        Registry("quay.io", ()),
    ]
    built = build_table(default, iter(others), [("ghcr.mirror.lan", "ghcr.io")])
    assert [r.name for r in built.registries] == ["docker.io", "ghcr.io", "quay.io"]
    assert built.default_registry is default
    assert built.host_map == (("ghcr.mirror.lan", "ghcr.io"),)
    assert address(built, "/v2/x/manifests/1", "ghcr.mirror.lan").registry.name == "ghcr.io"
    other = build_table(Registry("quay.io", ()), others, ())
    assert other.default == "quay.io"
    assert address(other, "/v2/x/manifests/1", None).registry.name == "quay.io"


def test_docker_hub_facts_are_one_set() -> None:
    [(name, url, aliases)] = [entry for entry in BUILTIN_REGISTRIES if entry[0] == "docker.io"]
    assert name == DEFAULT_REGISTRY and url == DOCKER_HUB_UPSTREAM
    assert {name, *aliases} == DOCKER_HUB_HOSTS
    assert set(Config().registry_table().default_registry.aliases) == set(aliases)
    assert is_docker_hub(base_url(DOCKER_HUB_UPSTREAM))
    assert is_docker_hub(base_url("https://index.docker.io"))
    assert not is_docker_hub(base_url("https://ghcr.io"))
    assert not is_docker_hub(base_url("https://docker.io.evil.example"))


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


# ---------------------------------------------------------------- library/


def test_upstream_name() -> None:
    assert upstream_name("nginx", library_prefix=True) == "library/nginx"
    assert upstream_name("nginx", library_prefix=False) == "nginx"
    assert upstream_name("library/nginx", library_prefix=True) == "library/nginx"
    assert upstream_name("samalba/app", library_prefix=True) == "samalba/app"


# ---------------------------------------------------------------- token scopes

_COMPONENT = st.from_regex(r"[a-z0-9]{1,8}(?:[._-][a-z0-9]{1,4}){0,2}", fullmatch=True)
_NAMES = st.lists(_COMPONENT, min_size=1, max_size=4).map("/".join)


@pytest.mark.parametrize(
    ("item", "scope"),
    [
        ("repository:library/nginx:pull", Scope("repository", "library/nginx", ("pull",))),
        (
            "repository:host:5000/a/b:pull,push",
            Scope("repository", "host:5000/a/b", ("pull", "push")),
        ),
        ("registry:catalog:*", Scope("registry", "catalog", ("*",))),
        ("repository(plugin):x:pull", Scope("repository(plugin)", "x", ("pull",))),
        ("repository:x:", Scope("repository", "x", ())),
        ("repository:x:pull,,push", Scope("repository", "x", ("pull", "", "push"))),
        ("repository:x:,", Scope("repository", "x", ("", ""))),
        ("a:b:c:d", Scope("a", "b:c", ("d",))),
        ("Repository:x:pull", Scope("Repository", "x", ("pull",))),
        ("repository:ghcr.io/:pull", Scope("repository", "ghcr.io/", ("pull",))),
        # not type:name:actions with a type and a name
        ("", None),
        ("garbage", None),
        ("repository", None),
        ("repository:", None),
        ("repository:nginx", None),
        ("repository::pull", None),
        (":nginx:pull", None),
        ("::", None),
        (":::", None),
    ],
)
def test_parse_scope(item: str, scope: Scope | None) -> None:
    assert parse_scope(item) == scope
    if scope is not None:
        assert format_scope(scope) == item


def test_scope_resource_type_drops_the_class() -> None:
    assert Scope("repository(plugin)", "x", ("pull",)).resource_type == "repository"
    assert Scope("registry", "catalog", ("*",)).resource_type == "registry"


@given(st.text(alphabet="ab:/,()*5 .%", max_size=20))
def test_property_parse_then_format_gives_the_item_back(item: str) -> None:
    scope = parse_scope(item)
    assert scope is None or format_scope(scope) == item


_KINDS = st.text(alphabet="abz()._-", min_size=1, max_size=12)
_SCOPE_NAMES = st.text(alphabet="ab/:.5-_()", min_size=1, max_size=20)
_ACTIONS = st.lists(st.text(alphabet="pulsh*d", min_size=1, max_size=6), max_size=3)


@given(_KINDS, _SCOPE_NAMES, _ACTIONS)
def test_property_format_then_parse_gives_the_scope_back(
    kind: str, name: str, actions: list[str]
) -> None:
    scope = Scope(kind, name, tuple(actions))
    assert parse_scope(format_scope(scope)) == scope


def test_query_scopes_reads_every_scope_parameter() -> None:
    query = (
        "service=registry.docker.io&scope=repository:a:pull"
        "&scope=repository%3Ab%3Apull+registry:catalog:*&x=scope%3Dc:d:e"
        "&scope=garbage%20repository(plugin):p:pull&scope&scope=&Scope=repository:z:pull"
    )
    assert query_scopes(query) == [
        Scope("repository", "a", ("pull",)),
        Scope("repository", "b", ("pull",)),
        Scope("registry", "catalog", ("*",)),
        Scope("repository(plugin)", "p", ("pull",)),
    ]
    assert query_scopes("") == []


def _rename_a_drop_catalog(scope: Scope) -> Scope | None:
    if scope.resource_type == "registry":
        return None
    return Scope(scope.kind, "renamed", scope.actions) if scope.name == "a" else scope


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        # the other parameters, empty pairs included, stay byte-exact and in place
        (
            "service=a%20b+c&scope=repository:a:pull&x=%2F%2e&&scope=repository%3Ab%3Apull&last",
            "service=a%20b+c&scope=repository:renamed:pull&x=%2F%2e&&"
            "scope=repository%3Ab%3Apull&last",
        ),
        # repeated scope= parameters, each rewritten on its own
        (
            "scope=repository:a:pull&scope=repository:a:push",
            "scope=repository:renamed:pull&scope=repository:renamed:push",
        ),
        # one item dropped from a parameter, an item that does not parse kept as it came
        (
            "scope=garbage+registry:catalog:*+repository:a:pull",
            "scope=garbage%20repository:renamed:pull",
        ),
        ("scope=registry:catalog:*+repository:b:pull", "scope=repository:b:pull"),
        # a scope parameter left empty is dropped
        ("scope=registry:catalog:*&service=x", "service=x"),
        ("service=x&scope=registry%3Acatalog%3A%2A", "service=x"),
        ("scope=registry:catalog:*", ""),
        # nothing to change: byte-exact, whatever the spelling
        ("scope=repository%3ab%3apull", "scope=repository%3ab%3apull"),
        ("scope=&scope&Scope=registry:catalog:*", "scope=&scope&Scope=registry:catalog:*"),
        ("", ""),
        # a smuggled '&' or '=' stays inside the scope value
        (
            "scope=repository%3Aa%3Apull%26service%3Devil",
            "scope=repository:renamed:pull%26service%3Devil",
        ),
    ],
)
def test_replace_query_scopes(query: str, expected: str) -> None:
    assert replace_query_scopes(query, _rename_a_drop_catalog) == expected


_RAW_QUERIES = st.lists(
    st.one_of(
        st.text(alphabet="abc=%+/:, ()*", max_size=12),
        st.text(alphabet="abc%+/:,()*2A3", max_size=16).map(lambda v: "scope=" + v),
    ),
    max_size=5,
).map("&".join)


@given(_RAW_QUERIES)
def test_property_replacing_scopes_by_themselves_changes_no_byte(query: str) -> None:
    assert replace_query_scopes(query, lambda scope: scope) == query


@given(_RAW_QUERIES)
def test_property_dropping_every_scope_leaves_no_scope(query: str) -> None:
    dropped = replace_query_scopes(query, lambda scope: None)
    assert query_scopes(dropped) == []
    # empty parameters ("&&", a leading "&") carry nothing: a query left with only one of them
    # joins to "", which cannot say it held one, so they are left out of the comparison
    kept = [p for p in query.split("&") if p and p.partition("=")[0] != "scope"]
    assert [p for p in dropped.split("&") if p and p.partition("=")[0] != "scope"] == kept


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        ("repository:nginx:pull", "repository:library/nginx:pull"),
        ("repository:nginx:pull,push", "repository:library/nginx:pull,push"),
        ("repository:nginx:*", "repository:library/nginx:*"),
        ("repository:library/nginx:pull", "repository:library/nginx:pull"),
        ("repository:samalba/app:pull,push", "repository:samalba/app:pull,push"),
        ("registry:catalog:*", "registry:catalog:*"),
        ("repository(plugin):x:pull", "repository(plugin):library/x:pull"),
        ("repository(plugin):vieux/sshfs:pull", "repository(plugin):vieux/sshfs:pull"),
        # a name with a registry host and port: the colon is part of the name
        ("repository:localhost:5000/foo:pull", "repository:localhost:5000/foo:pull"),
        (
            "repository:nginx:pull repository:samalba/app:push",
            "repository:library/nginx:pull repository:samalba/app:push",
        ),
        (
            "repository:nginx:pull registry:catalog:* repository:redis:pull",
            "repository:library/nginx:pull registry:catalog:* repository:library/redis:pull",
        ),
        ("", ""),
        ("repository", "repository"),
        ("repository:nginx", "repository:nginx"),
        ("repository::pull", "repository::pull"),
        ("Repository:nginx:pull", "Repository:nginx:pull"),
        ("garbage", "garbage"),
    ],
)
def test_rewrite_scope(scope: str, expected: str) -> None:
    assert rewrite_scope(scope, library_prefix=True) == expected
    assert rewrite_scope(scope, library_prefix=False) == scope


def scopes_of(query: str) -> list[str]:
    return [v for k, v in parse_qsl(query, keep_blank_values=True) if k == "scope"]


@pytest.mark.parametrize(
    ("query", "expected_scopes"),
    [
        (
            "service=registry.docker.io&scope=repository:nginx:pull",
            ["repository:library/nginx:pull"],
        ),
        (
            # containerd sends several scope parameters in one request
            "scope=repository:nginx:pull&scope=repository:samalba/app:pull&service=x",
            ["repository:library/nginx:pull", "repository:samalba/app:pull"],
        ),
        (
            "scope=repository:nginx:pull+repository:redis:pull",
            ["repository:library/nginx:pull repository:library/redis:pull"],
        ),
        (
            "scope=repository:nginx:pull%20repository:redis:pull",
            ["repository:library/nginx:pull repository:library/redis:pull"],
        ),
        ("scope=repository%3Anginx%3Apull", ["repository:library/nginx:pull"]),
        ("scope=repository%3anginx%3apull%2Cpush", ["repository:library/nginx:pull,push"]),
        ("scope=registry:catalog:*", ["registry:catalog:*"]),
        ("scope=repository(plugin):x:pull", ["repository(plugin):library/x:pull"]),
        # a smuggled '&' or '=' stays inside the scope value
        (
            "scope=repository%3Anginx%3Apull%26service%3Devil",
            ["repository:library/nginx:pull&service=evil"],
        ),
    ],
)
def test_rewrite_token_query(query: str, expected_scopes: list[str]) -> None:
    rewritten = rewrite_token_query(query, library_prefix=True)
    assert scopes_of(rewritten) == expected_scopes
    # the other parameters are byte-exact and in place
    before = query.split("&")
    after = rewritten.split("&")
    assert len(before) == len(after)
    for old, new in zip(before, after, strict=True):
        if not old.startswith("scope="):
            assert old == new
    assert rewrite_token_query(query, library_prefix=False) == query


@pytest.mark.parametrize(
    "query",
    [
        "",
        "service=registry.docker.io",
        "service=registry.docker.io&scope=repository:samalba/app:pull",
        "scope=repository%3Asamalba%2Fapp%3Apull",  # no rewrite needed: byte-exact
        "scope=registry%3Acatalog%3A%2A",
        "scope",
        "scope=",
        "&&scope=&&",
        "Scope=repository:nginx:pull",
        "xscope=repository:nginx:pull",
        "service=a%20b+c&offline_token=true&client_id=docker",
    ],
)
def test_rewrite_token_query_unchanged(query: str) -> None:
    assert rewrite_token_query(query, library_prefix=True) == query


_SCOPE_ITEMS = st.one_of(
    st.builds(
        lambda kind, name, actions: f"{kind}:{name}:{actions}",
        st.sampled_from(["repository", "registry", "repository(plugin)", "Repository"]),
        st.one_of(_NAMES, st.just("localhost:5000/x"), st.just("")),
        st.sampled_from(["pull", "pull,push", "*", "", "delete"]),
    ),
    st.text(alphabet="ab:/ ,*()", max_size=12),
)
_SCOPES = st.lists(_SCOPE_ITEMS, min_size=1, max_size=4).map(" ".join)


@given(_SCOPES)
def test_property_rewrite_scope_idempotent(scope: str) -> None:
    once = rewrite_scope(scope, library_prefix=True)
    assert rewrite_scope(once, library_prefix=True) == once
    assert rewrite_scope(scope, library_prefix=False) == scope
    assert once.count(" ") == scope.count(" ")


_QUERY_PAIRS = st.lists(
    st.one_of(
        _SCOPES.map(lambda s: "scope=" + s.replace(" ", "+")),
        st.text(alphabet="abc=%+/:", max_size=10),
        st.sampled_from(["service=registry.docker.io", "scope", "scope=", "offline_token=true"]),
    ),
    max_size=5,
)


@given(_QUERY_PAIRS)
def test_property_rewrite_token_query(pairs: list[str]) -> None:
    query = "&".join(pairs)
    once = rewrite_token_query(query, library_prefix=True)
    assert rewrite_token_query(once, library_prefix=True) == once
    assert rewrite_token_query(query, library_prefix=False) == query
    before, after = query.split("&"), once.split("&")
    assert len(before) == len(after)
    for old, new in zip(before, after, strict=True):
        if not old.startswith("scope="):
            assert old == new
        else:
            assert new.startswith("scope=")
