"""Tests for hubproxy.policy.access: client networks, image globs and the per-client rate limiter.

All pure: tables of addresses and names, and a rate limiter driven by explicit ``now`` values.
"""

from __future__ import annotations

import ipaddress

import pytest

from hubproxy.policy.access import (
    NetworkList,
    RateLimiter,
    parse_image_pattern,
    parse_image_rules,
    parse_network,
    parse_networks,
)
from hubproxy.policy.registries import normalize_image

# --- networks --------------------------------------------------------------------------------

NETWORKS = parse_networks(
    [
        "10.0.0.0/8",
        "192.168.1.5",
        "2001:db8::/32",
        "::1",
        " 172.16.0.0/12 ",
        "::ffff:100.64.0.0/106",
    ]
)


@pytest.mark.parametrize(
    ("client", "allowed"),
    [
        ("10.0.0.1", True),
        ("10.255.255.255", True),
        ("11.0.0.1", False),
        ("9.255.255.255", False),
        ("192.168.1.5", True),  # bare address: a /32
        ("192.168.1.6", False),
        ("172.31.0.1", True),  # entry had surrounding spaces
        ("172.32.0.1", False),
        ("2001:db8::1", True),
        ("2001:db8:ffff::1", True),
        ("2001:db9::1", False),
        ("::1", True),  # bare address: a /128
        ("::2", False),
        ("127.0.0.1", False),
        # IPv4-mapped peers of a dual-stack socket match IPv4 networks
        ("::ffff:10.0.0.1", True),
        ("::FFFF:10.0.0.1", True),
        ("::ffff:192.168.1.5", True),
        ("::ffff:11.0.0.1", False),
        # an IPv4-mapped network in the list is an IPv4 network
        ("100.64.0.1", True),
        ("::ffff:100.127.255.255", True),
        ("100.128.0.1", False),
        # junk is never allowed
        ("", False),
        ("junk", False),
        ("10.0.0.1:5000", False),
        ("[::1]", False),
        ("10.0.0.256", False),
        ("10.0.0.1/32", False),
    ],
)
def test_network_list_allows(client: str, allowed: bool) -> None:
    assert NETWORKS.allows(client) is allowed


@pytest.mark.parametrize("client", ["10.0.0.1", "2001:db8::1", "::ffff:1.2.3.4", "8.8.8.8"])
def test_empty_network_list_allows_everyone(client: str) -> None:
    assert parse_networks([]).allows(client)
    assert NetworkList().allows(client)


@pytest.mark.parametrize("client", ["", "junk", "1.2.3"])
def test_empty_network_list_still_refuses_unparseable_clients(client: str) -> None:
    assert not NetworkList().allows(client)


@pytest.mark.parametrize(
    ("text", "network"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("1.2.3.4", "1.2.3.4/32"),
        ("2001:db8::", "2001:db8::/128"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
        ("::ffff:10.1.2.3", "10.1.2.3/32"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("::/0", "::/0"),
    ],
)
def test_parse_network(text: str, network: str) -> None:
    assert parse_network(text) == ipaddress.ip_network(network)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("junk", "'junk'"),
        ("", "''"),
        ("10.0.0.0/33", "'10.0.0.0/33'"),
        ("10.0.0.1/8", "did you mean 10.0.0.0/8?"),
        ("2001:db8::1/32", "did you mean 2001:db8::/32?"),
        ("10.0.0.0/8,10.1.0.0/16", "'10.0.0.0/8,10.1.0.0/16'"),
        ("fe80::/10%eth0", "fe80::/10%eth0"),
    ],
)
def test_parse_networks_names_the_bad_entry(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="invalid network") as info:
        parse_networks(["10.0.0.0/8", text])
    assert message in str(info.value)


# --- image rules -----------------------------------------------------------------------------

RULES = parse_image_rules(
    allow=[
        "library/*",
        "myorg/**",
        "ghcr.io/myorg/*",
        "localhost:5000/**",
        "*.gcr.io/distroless/*",
        "team/*-base",
        "a/**/z",
    ],
    deny=["library/ubuntu", "myorg/secret/**", "ghcr.io/myorg/private"],
)


@pytest.mark.parametrize(
    ("registry", "repository", "permitted"),
    [
        # "*" stays within one component
        ("docker.io", "library/nginx", True),
        ("docker.io", "library/a/b", False),
        ("docker.io", "nginx", True),  # Docker Hub's implied library/
        ("docker.io", "otheruser/nginx", False),
        # "**" crosses components
        ("docker.io", "myorg/app", True),
        ("docker.io", "myorg/a/b/c", True),
        ("docker.io", "myorgx/app", False),
        ("docker.io", "a/z", True),  # a middle "**" may match nothing
        ("docker.io", "a/b/c/z", True),
        ("docker.io", "a/b/c/zz", False),
        ("docker.io", "team/debian-base", True),
        ("docker.io", "team/debian-base/x", False),
        # deny wins over allow
        ("docker.io", "library/ubuntu", False),
        ("docker.io", "ubuntu", False),
        ("docker.io", "myorg/secret/x", False),
        ("docker.io", "myorg/secret/x/y", False),
        ("docker.io", "myorg/secretive", True),
        # registry-qualified patterns
        ("ghcr.io", "myorg/app", True),
        ("ghcr.io", "myorg/private", False),
        ("ghcr.io", "myorg/a/b", False),
        ("ghcr.io", "otherorg/app", False),
        ("localhost:5000", "any/thing/deep", True),
        ("localhost:5001", "any/thing", False),
        ("gcr.io", "distroless/static", False),  # "*." needs something before the dot
        ("us.gcr.io", "distroless/static", True),
        ("eu.gcr.io", "distroless/static/x", False),
        # unqualified patterns are for Docker Hub only
        ("ghcr.io", "library/nginx", False),
        ("quay.io", "myorg/app", False),
        # Docker Hub aliases and host case
        ("registry-1.docker.io", "library/nginx", True),
        ("index.docker.io", "nginx", True),
        ("Docker.IO", "library/nginx", True),
        ("GHCR.io", "myorg/app", True),
        # repository names are lowercase in the registry grammar: no case folding there
        ("docker.io", "Library/nginx", False),
        ("docker.io", "MyOrg/app", False),
    ],
)
def test_image_rules(registry: str, repository: str, permitted: bool) -> None:
    assert RULES.permits(registry, repository) is permitted


@pytest.mark.parametrize(
    ("registry", "repository"),
    [("docker.io", "library/nginx"), ("docker.io", "anyone/anything"), ("ghcr.io", "x/y/z")],
)
def test_no_rules_permit_everything(registry: str, repository: str) -> None:
    assert parse_image_rules([], []).permits(registry, repository)


@pytest.mark.parametrize(
    ("registry", "repository", "permitted"),
    [
        ("docker.io", "library/nginx", True),
        ("docker.io", "evil/miner", False),
        ("docker.io", "evil/miner/x", True),
        ("ghcr.io", "evil/miner", True),
        ("ghcr.io", "bad/x", False),
        ("ghcr.io", "bad/x/y", False),
    ],
)
def test_deny_only(registry: str, repository: str, permitted: bool) -> None:
    rules = parse_image_rules([], ["evil/*", "ghcr.io/bad/**"])
    assert rules.permits(registry, repository) is permitted


@pytest.mark.parametrize(
    ("allow", "deny", "registry", "repository", "permitted"),
    [
        (["**"], [], "docker.io", "x/y/z", True),
        (["**"], [], "ghcr.io", "x", False),
        (["*"], [], "docker.io", "nginx", True),  # "*" alone: the official images
        (["*"], [], "docker.io", "user/app", False),
        (["nginx"], [], "docker.io", "library/nginx", True),
        (["docker.io/nginx"], [], "docker.io", "nginx", True),
        (["docker.io/library/nginx"], [], "index.docker.io", "nginx", True),
        (["**"], ["**"], "docker.io", "library/nginx", False),
        (["**/nginx"], [], "docker.io", "a/b/nginx", True),
        (["**/nginx"], [], "docker.io", "library/nginx", True),
        (["x/a**"], [], "docker.io", "x/ab/c", True),  # "**" inside a component crosses too
        (["x/a*"], [], "docker.io", "x/ab/c", False),
        # a registry's other name is the same registry, in globs as in requests
        (["k8s.gcr.io/pause"], [], "registry.k8s.io", "pause", True),
        ([], ["k8s.gcr.io/**"], "registry.k8s.io", "pause", False),
        ([], ["k8s.gcr.io/**"], "k8s.gcr.io", "pause", False),
        (["registry.k8s.io/*"], [], "k8s.gcr.io", "pause", True),
        # a first component that is not host-shaped is a Docker Hub namespace, as in a path
        (["../x"], [], "docker.io", "../x", True),
        (["a..b/x"], [], "docker.io", "a..b/x", True),
        (["a..b/x"], [], "a..b", "x", False),
    ],
)
def test_pattern_forms(
    allow: list[str], deny: list[str], registry: str, repository: str, permitted: bool
) -> None:
    assert parse_image_rules(allow, deny).permits(registry, repository) is permitted


@pytest.mark.parametrize(
    "pattern",
    [
        "",
        " ",
        "library/ *",
        "Library/*",
        "library/nginx ",
        "a//b",
        "/a",
        "a/",
        "lib?ary/x",
        "a[b]/c",
        "ghcr.io",
        "ghcr.io/",
        "café/x",
        "a\tb",
    ],
)
def test_bad_patterns_are_named(pattern: str) -> None:
    with pytest.raises(ValueError, match="invalid image pattern") as info:
        parse_image_rules(["library/*"], [pattern])
    assert repr(pattern) in str(info.value)
    with pytest.raises(ValueError, match="invalid image pattern"):
        parse_image_rules([pattern], [])


def test_patterns_are_compiled_once() -> None:
    pattern = parse_image_pattern("ghcr.io/myorg/*")
    assert pattern.registry is not None
    assert pattern.registry.pattern == r"ghcr\.io"
    assert pattern.repository.pattern == r"myorg/[^/]*"
    assert parse_image_pattern("nginx").repository.pattern == r"library/nginx"


@pytest.mark.parametrize(
    ("registry", "repository", "expected"),
    [
        ("docker.io", "nginx", ("docker.io", "library/nginx")),
        ("registry-1.docker.io", "user/app", ("docker.io", "user/app")),
        ("GHCR.IO", "org/app", ("ghcr.io", "org/app")),
        ("ghcr.io", "app", ("ghcr.io", "app")),  # library/ is Docker Hub's convention only
        ("k8s.gcr.io", "pause", ("registry.k8s.io", "pause")),  # a built-in's other name
        ("localhost:5000", "app", ("localhost:5000", "app")),
    ],
)
def test_normalize_image(registry: str, repository: str, expected: tuple[str, str]) -> None:
    assert normalize_image(registry, repository) == expected


# --- rate limiter ----------------------------------------------------------------------------


def test_burst_then_refusal_with_exact_wait() -> None:
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.check("a", 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.check("a", 100.0) == 0.5  # one token takes 1/rate seconds
    assert limiter.check("a", 100.25) == 0.25  # half a token refilled meanwhile
    assert limiter.check("a", 100.5) == 0.0
    assert limiter.check("a", 100.5) == 0.5


def test_clients_have_separate_buckets() -> None:
    limiter = RateLimiter(rate=1.0, burst=1)
    assert limiter.check("a", 0.0) == 0.0
    assert limiter.check("a", 0.0) == 1.0
    assert limiter.check("b", 0.0) == 0.0
    assert limiter.check("b", 0.5) == 0.5


def test_refill_is_capped_at_burst() -> None:
    limiter = RateLimiter(rate=10.0, burst=2)
    assert limiter.check("a", 0.0) == 0.0
    # after an hour idle the bucket holds burst tokens, not 36000
    results = [limiter.check("a", 3600.0) for _ in range(3)]
    assert results[:2] == [0.0, 0.0]
    assert results[2] == pytest.approx(0.1)


def test_refused_requests_do_not_consume() -> None:
    limiter = RateLimiter(rate=1.0, burst=1)
    assert limiter.check("a", 0.0) == 0.0
    for _ in range(100):
        assert limiter.check("a", 0.0) == 1.0
    assert limiter.check("a", 1.0) == 0.0


def test_clock_going_backwards_does_not_drain_or_crash() -> None:
    limiter = RateLimiter(rate=1.0, burst=2)
    assert limiter.check("a", 10.0) == 0.0
    assert limiter.check("a", 5.0) == 0.0
    assert limiter.check("a", 5.0) == 1.0


def test_buckets_full_again_are_forgotten() -> None:
    limiter = RateLimiter(rate=1.0, burst=2)
    assert limiter.check("a", 0.0) == 0.0
    assert limiter.check("b", 0.5) == 0.0
    assert limiter.check("c", 0.9) == 0.0
    assert len(limiter) == 3
    # at 1.6 "a" and "b" have refilled (one token each takes 1 s): they are forgotten
    assert limiter.check("d", 1.6) == 0.0
    assert len(limiter) == 2
    # forgetting is harmless: a forgotten client gets exactly the full bucket it had earned
    assert [limiter.check("a", 1.6) for _ in range(3)] == [0.0, 0.0, 1.0]


def test_forgetting_stops_at_a_bucket_still_refilling() -> None:
    limiter = RateLimiter(rate=1.0, burst=2)
    assert limiter.check("a", 0.0) == 0.0  # one token left, full again at 1.0
    assert limiter.check("b", 0.1) == 0.0
    assert limiter.check("b", 0.1) == 0.0  # none left, full again at 2.1
    assert limiter.check("c", 0.2) == 0.0  # full again at 1.2
    assert limiter.check("d", 1.5) == 0.0
    # "a" is forgotten; the sweep stops at "b", so "c" (full, but newer) is kept for now
    assert len(limiter) == 3
    assert [limiter.check("c", 1.5) for _ in range(3)] == [0.0, 0.0, 1.0]


def test_eviction_bounds_memory_and_drops_least_recently_seen() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, max_clients=3)
    for client in ["a", "b", "c"]:
        assert limiter.check(client, 0.0) == 0.0
    assert limiter.check("a", 0.0) == 1.0  # "a" is now the most recently seen
    assert limiter.check("d", 0.0) == 0.0  # evicts "b", the least recently seen
    assert len(limiter) == 3
    assert limiter.check("a", 0.0) == 1.0  # still remembered
    assert limiter.check("c", 0.0) == 1.0
    assert limiter.check("b", 0.0) == 0.0  # forgotten: a full bucket again
    for index in range(1000):
        limiter.check(f"client-{index}", 0.0)
    assert len(limiter) == 3


@pytest.mark.parametrize("rate", [0.0, -1.0])
def test_rate_zero_or_negative_is_off(rate: float) -> None:
    limiter = RateLimiter(rate=rate, burst=0)
    assert not limiter.enabled
    assert all(limiter.check("a", 0.0) == 0.0 for _ in range(1000))
    assert len(limiter) == 0


@pytest.mark.parametrize(
    ("rate", "burst", "max_clients"),
    [(1.0, 0, 10), (1.0, -1, 10), (1.0, 1, 0), (float("nan"), 1, 10)],
)
def test_bad_limiter_settings(rate: float, burst: int, max_clients: int) -> None:
    with pytest.raises(ValueError, match="rate limit"):
        RateLimiter(rate, burst, max_clients)
