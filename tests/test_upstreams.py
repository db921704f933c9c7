"""Tests for hubproxy.policy.upstreams: what is learned from challenges, per upstream."""

from __future__ import annotations

import pytest

from hubproxy.policy.registries import Registry
from hubproxy.policy.upstreams import Learned, UpstreamSet, learn
from hubproxy.policy.urls import parse_url

AUTH = parse_url("https://auth.docker.io/token")
BEARER = 'Bearer realm="https://auth.docker.io/token",service="registry.docker.io"'


@pytest.mark.parametrize(
    ("before", "challenge", "after"),
    [
        (Learned(), BEARER, Learned(AUTH, "registry.docker.io")),
        (Learned(), 'Basic realm="registry"', Learned(basic=True)),
        # a Bearer challenge wins over a Basic one in the same header
        (Learned(), f'Basic realm="r", {BEARER}', Learned(AUTH, "registry.docker.io")),
        # a realm that moves is followed; the service stays if the new one names none
        (
            Learned(AUTH, "registry.docker.io"),
            'Bearer realm="https://auth2.example/token"',
            Learned(parse_url("https://auth2.example/token"), "registry.docker.io"),
        ),
        # nothing usable: nothing learned
        (Learned(AUTH, "s"), "garbage ,,, =", Learned(AUTH, "s")),
        (Learned(AUTH, "s"), 'Bearer realm="not a url"', Learned(AUTH, "s")),
        (Learned(AUTH, "s"), 'Bearer realm="ftp://x/token"', Learned(AUTH, "s")),
        (Learned(), 'Bearer service="x"', Learned()),
        (Learned(), "Negotiate", Learned()),
    ],
)
def test_learn(before: Learned, challenge: str, after: Learned) -> None:
    assert learn(before, challenge, from_redirect=False) == after


@pytest.mark.parametrize("challenge", [BEARER, 'Basic realm="cdn"'])
def test_nothing_is_learned_from_a_redirect_target(challenge: str) -> None:
    known = Learned(parse_url("https://auth.example/token"), "registry.example")
    assert learn(known, challenge, from_redirect=True) == known
    assert learn(Learned(), challenge, from_redirect=True) == Learned()


def test_each_upstream_learns_for_itself() -> None:
    registry = Registry(
        "docker.io",
        (parse_url("https://registry-1.docker.io"), parse_url("https://worker.example")),
    )
    upstreams = UpstreamSet(registry, default=True)
    upstreams.note_challenge(1, 'Basic realm="worker"', from_redirect=False)
    upstreams.note_challenge(1, 'Bearer realm="https://evil.example/token"', from_redirect=False)
    assert upstreams.primary == Learned()  # the fallback changed nothing of the primary's
    assert upstreams.learned[1].realm == parse_url("https://evil.example/token")
    upstreams.note_challenge(0, BEARER, from_redirect=False)
    assert upstreams.primary.realm == AUTH
    assert upstreams.token_prefix == "/token/"
    assert UpstreamSet(registry, default=False).token_prefix == "/token/docker.io/"
