"""Negative caching: an upstream's 404 to a manifest or tag, repeated from memory for a while to
the requests the upstream would give it to, and to no other."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

from hubproxy.cache.negative import NegativeCache
from hubproxy.cache.pullthrough import MAX_NEGATIVE_CHECKS
from hubproxy.policy.cachepolicy import (
    ANYONE,
    NegativeKey,
    Readability,
    remember_negative,
    share_negative,
)
from tests.conftest import RunningProxy, StartProxy
from tests.fakehub import MEDIA_DOCKER_MANIFEST, MEDIA_OCI_MANIFEST, FakeHub, fetch, make_layer
from tests.registry_client import RegistryClient
from tests.test_pullthrough import ACCEPT, pullthrough

NOW = 1_800_000_000.0
PUBLIC = Readability(anonymous=True, learned_at=NOW - 60)
PRIVATE = Readability(anonymous=False, learned_at=NOW - 60)


# -- the rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "primary", "ttl", "kept"),
    [
        (404, True, 30.0, True),
        (404, False, 30.0, False),  # a fallback's 404 may be its own (credentials, lag)
        (404, True, 0.0, False),  # --negative-ttl 0: off
        (401, True, 30.0, False),  # depends on the credentials
        (403, True, 30.0, False),
        (429, True, 30.0, False),  # "not now", not "no"
        (500, True, 30.0, False),
        (502, True, 30.0, False),
        (503, True, 30.0, False),
        (200, True, 30.0, False),
        (410, True, 30.0, False),
    ],
)
def test_which_answers_are_remembered(status: int, primary: bool, ttl: float, kept: bool) -> None:
    assert remember_negative(status, primary=primary, ttl=ttl) is kept


@pytest.mark.parametrize(
    ("readability", "anonymous_status", "shared"),
    [
        (PUBLIC, 404, True),
        (PUBLIC, 200, False),  # an anonymous client gets it: the 404 was the client's own
        (PUBLIC, 401, False),
        (PUBLIC, 0, False),  # the anonymous question got no answer
        (PRIVATE, 404, False),  # a 404 there may hide the repository from strangers
        (None, 404, False),  # never asked: it may be private
        (Readability(anonymous=True, learned_at=NOW - 2 * 86400), 404, False),  # too old
    ],
)
def test_which_404s_are_anyones(
    readability: Readability | None, anonymous_status: int, shared: bool
) -> None:
    assert share_negative(readability, anonymous_status, NOW) is shared


def key(path: str = "/v2/library/alpine/manifests/nope", who: str = "a") -> NegativeKey:
    return NegativeKey("", path, frozenset({MEDIA_DOCKER_MANIFEST}), who)


def test_an_entry_lives_for_the_ttl() -> None:
    counts: list[int] = []
    cache = NegativeCache(30.0, 10, counts.append)
    cache.remember(key(), 100.0)
    assert cache.answers(key(), 129.9)
    assert not cache.answers(key(who="b"), 110.0)  # other credentials
    assert not cache.answers(key(), 130.0)
    assert len(cache) == 0 and counts == [1, 0]


def test_a_200_for_the_path_ends_every_entry_for_it() -> None:
    cache = NegativeCache(30.0, 10)
    for who in ("a", "b", ANYONE):
        cache.remember(key(who=who), 100.0)
    cache.remember(key("/v2/library/alpine/manifests/other"), 100.0)
    cache.forget_path("", "/v2/library/alpine/manifests/nope")
    assert not any(cache.answers(key(who=who), 101.0) for who in ("a", "b", ANYONE))
    assert cache.answers(key("/v2/library/alpine/manifests/other"), 101.0)
    cache.forget_path("ghcr.io", "/v2/library/alpine/manifests/other")  # another registry's
    assert len(cache) == 1


def test_the_entry_count_is_bounded_least_recently_used_first() -> None:
    cache = NegativeCache(30.0, 3)
    for n in range(3):
        cache.remember(key(f"/v2/r/manifests/t{n}"), 100.0)
    assert cache.answers(key("/v2/r/manifests/t0"), 101.0)  # t0 used: t1 is now the oldest
    cache.remember(key("/v2/r/manifests/t3"), 101.0)
    assert len(cache) == 3
    assert not cache.answers(key("/v2/r/manifests/t1"), 102.0)
    assert all(cache.answers(key(f"/v2/r/manifests/t{n}"), 102.0) for n in (0, 2, 3))
    for n in range(4, 1000):
        cache.remember(key(f"/v2/r/manifests/t{n}"), 103.0)
    assert len(cache) == 3
    cache.forget_path("", "/v2/r/manifests/t999")
    assert len(cache) == 2


def test_a_ttl_of_0_remembers_nothing() -> None:
    cache = NegativeCache(0.0, 10)
    cache.remember(key(), 100.0)
    assert len(cache) == 0 and not cache.answers(key(), 100.0)


# -- end to end --------------------------------------------------------------------------------


def asked(hub: FakeHub, path: str, *, with_token: bool = True) -> int:
    """Registry requests for ``path`` (only those with a token: a client's first try without
    one is the token dance's 401)."""
    return sum(
        1
        for s in hub.requests
        if s.server == "registry"
        and s.target.split("?")[0] == path
        and (not with_token or "authorization" in s.headers)
    )


async def metric(proxy: RunningProxy, ca: trustme.CA, name: str) -> float:
    r = await fetch(proxy.url + "/metrics", ca)
    for line in r.body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} missing from /metrics")


async def hits(proxy: RunningProxy, ca: trustme.CA) -> float:
    return await metric(proxy, ca, "hubproxy_negative_cache_hits_total")


async def public_repository(hub: FakeHub, proxy: RunningProxy, ca: trustme.CA) -> None:
    """library/alpine with one tag pulled once, so the mirror knows anyone may read it."""
    hub.add_image("library/alpine", "3.20", [make_layer(1, 1000)])
    r = await RegistryClient(proxy.url, ca).request(
        "/v2/library/alpine/manifests/3.20", headers=ACCEPT
    )
    assert r.status == 200
    await pullthrough(proxy).wait_probes()


MISSING = "/v2/library/alpine/manifests/nope"


async def test_a_missing_tag_of_a_public_repository_is_answered_from_memory(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    await public_repository(hub, proxy, ca)
    r = await RegistryClient(proxy.url, ca).request(MISSING, headers=ACCEPT)
    assert r.status == 404
    assert r.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"  # the upstream's own answer
    await pullthrough(proxy).wait_probes()  # the anonymous re-ask: 404 for anyone too
    seen = asked(hub, MISSING)
    for _ in range(3):  # crash-looping pods: a new token each time
        client = RegistryClient(proxy.url, ca)
        r = await client.request(MISSING, headers=ACCEPT)
        assert r.status == 404
        assert r.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        r = await client.request(MISSING, method="HEAD", headers=ACCEPT)
        assert (r.status, r.body) == (404, b"")
    assert asked(hub, MISSING) == seen  # none of them reached the upstream with a token
    assert await hits(proxy, ca) == 6
    # the first client's own 404 and anyone's
    assert await metric(proxy, ca, "hubproxy_negative_cache_entries") == 2
    # a client that takes other manifest types is another question for the upstream
    r = await client.request(MISSING, headers=[("accept", MEDIA_OCI_MANIFEST)])
    assert r.status == 404
    assert asked(hub, MISSING) == seen + 1


async def test_a_push_is_seen_once_the_ttl_is_over_or_a_200_was_seen(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    tmp_path: Path,
    mock_clock: trio.testing.MockClock,
) -> None:
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"), negative_ttl=30.0)
    await public_repository(hub, proxy, ca)
    client = RegistryClient(proxy.url, ca)
    assert (await client.request(MISSING, headers=ACCEPT)).status == 404
    await pullthrough(proxy).wait_probes()
    pushed = hub.add_image("library/alpine", "nope", [make_layer(2, 1000)])
    mock_clock.jump(29)
    assert (await client.request(MISSING, headers=ACCEPT)).status == 404  # within the TTL
    mock_clock.jump(1)
    r = await client.request(MISSING, headers=ACCEPT)
    assert r.status == 200 and r.headers["docker-content-digest"] == pushed
    # again, and this time another client's 200 ends the remembered 404 at once
    later = "/v2/library/alpine/manifests/later"
    assert (await client.request(later, headers=ACCEPT)).status == 404
    await pullthrough(proxy).wait_probes()
    added = hub.add_image("library/alpine", "later", [make_layer(3, 1000)])
    assert (await client.request(later, headers=ACCEPT)).status == 404  # still remembered
    fewer = [("accept", MEDIA_DOCKER_MANIFEST)]
    r = await RegistryClient(proxy.url, ca).request(later, headers=fewer)  # another Accept: asks
    assert r.status == 200
    r = await client.request(later, headers=ACCEPT)
    assert r.status == 200 and r.headers["docker-content-digest"] == added


async def test_a_404_in_a_repository_not_known_public_is_kept_for_the_same_credentials_only(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    hub.add_image("someone/app", "v1", [make_layer(5, 1000)])
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    path = "/v2/someone/app/manifests/typo"  # nothing of it pulled yet: it may be private
    client = RegistryClient(proxy.url, ca)
    for _ in range(3):
        r = await client.request(path, headers=ACCEPT)
        assert r.status == 404
    assert asked(hub, path) == 1  # the same token: the same answer, from memory
    await pullthrough(proxy).wait_probes()
    r = await RegistryClient(proxy.url, ca).request(path, headers=ACCEPT)
    assert r.status == 404
    assert asked(hub, path) == 2  # other credentials: the upstream is asked


async def test_a_404_that_hides_a_private_repository_is_never_shared(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    hub.hide_private = True
    digest = hub.add_image("team/secret", "v1", [make_layer(4, 1000)])
    hub.add_user("alice", "s3cret")
    hub.make_private("team/secret", "alice")
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    path = "/v2/team/secret/manifests/v1"
    stranger = RegistryClient(proxy.url, ca)
    r = await stranger.request(path, headers=ACCEPT)
    assert r.status == 404 and r.json()["errors"][0]["code"] == "NAME_UNKNOWN"
    await pullthrough(proxy).wait_probes()
    alice = RegistryClient(proxy.url, ca, credentials=("alice", "s3cret"))
    r = await alice.request(path, headers=ACCEPT)
    assert r.status == 200 and r.headers["docker-content-digest"] == digest
    assert (await stranger.request(path, headers=ACCEPT)).status == 404


@pytest.mark.parametrize("status", [401, 403, 429, 500, 503])
async def test_other_refusals_are_never_remembered(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path, status: int
) -> None:
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    await public_repository(hub, proxy, ca)
    client = RegistryClient(proxy.url, ca)
    other = "/v2/library/alpine/manifests/other"
    hub.force_status(other, status, times=2, headers=[("retry-after", "1")])
    for _ in range(2):
        r = await client.request(other, headers=ACCEPT)
        assert r.status != 404  # a remembered answer would be a 404 (MANIFEST_UNKNOWN)
    await pullthrough(proxy).wait_probes()
    assert asked(hub, other, with_token=False) >= 1
    assert len(pullthrough(proxy).negatives) == 0
    assert await hits(proxy, ca) == 0


async def test_negative_ttl_0_turns_it_off(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"), negative_ttl=0.0)
    await public_repository(hub, proxy, ca)
    client = RegistryClient(proxy.url, ca)
    for _ in range(3):
        assert (await client.request(MISSING, headers=ACCEPT)).status == 404
    assert asked(hub, MISSING) == 3
    assert len(pullthrough(proxy).negatives) == 0


async def test_anonymous_re_asks_at_once_are_bounded(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    await public_repository(hub, proxy, ca)
    busy = pullthrough(proxy).negative_checks
    busy.update(key(f"/v2/busy/manifests/{n}", ANYONE) for n in range(MAX_NEGATIVE_CHECKS))
    r = await RegistryClient(proxy.url, ca).request(MISSING, headers=ACCEPT)
    assert r.status == 404
    heads = [s for s in hub.requests if s.method == "HEAD" and s.target == MISSING]
    assert heads == []  # no anonymous re-ask started: one more would pass the bound
    assert len(busy) == MAX_NEGATIVE_CHECKS
    assert len(pullthrough(proxy).negatives) == 1  # this client's own 404 only
    busy.clear()
    r = await RegistryClient(proxy.url, ca).request(MISSING, headers=ACCEPT)
    await pullthrough(proxy).wait_probes()
    assert [s.method for s in hub.requests if s.target == MISSING][-1] == "HEAD"  # now it asks
    assert len(pullthrough(proxy).negatives) == 3  # two clients' own, and anyone's
