"""The upstreams of one registry and what was learned about each of them.

A registry is served from a primary upstream and, in order, its fallbacks (a Worker, another
mirror). Each of them names its own token realm and service in its ``401`` challenges, or asks for
Basic credentials instead. What a challenge teaches is kept **per upstream** and learned **only from
that upstream's own answers**: a redirect target (the CDN holding blobs) or a fallback can never
change where the primary's token requests, and with them the operator's login, are sent. A Basic
challenge from a fallback marks that fallback as Basic, never the registry.

Plain values and a small mutable holder; no I/O and no clock (times are passed in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .auth import parse_challenges
from .registries import Registry
from .trouble import Health
from .urls import Url, parse_url


@dataclass(frozen=True)
class Learned:
    """What one upstream's own challenges said: its token realm and service, or Basic."""

    realm: Url | None = None
    service: str | None = None
    basic: bool = False  # it asked for Basic credentials (registry:2 with htpasswd, Harbor)

    @property
    def known(self) -> bool:
        return self.realm is not None or self.basic


def learn(state: Learned, challenge: str, *, from_redirect: bool) -> Learned:
    """The knowledge of one upstream after it answered with this ``WWW-Authenticate`` value.

    ``from_redirect``: the answer came from a redirect target (a CDN), not from the upstream
    itself; nothing is learned from it. A Bearer challenge with a usable realm replaces what was
    known (realms move, rarely); a Basic challenge without a Bearer one marks the upstream Basic;
    a value that does not parse, or a realm that is not an http(s) URL, teaches nothing.
    """
    if from_redirect:
        return state
    try:
        challenges = parse_challenges(challenge)
    except ValueError:
        return state
    for item in challenges:
        if item.scheme.lower() != "bearer":
            continue
        realm = item.param("realm")
        if realm is None:
            continue
        try:
            url = parse_url(realm)
        except ValueError:
            return state
        return Learned(realm=url, service=item.param("service") or state.service, basic=False)
    if any(item.scheme.lower() == "basic" for item in challenges):
        return replace(state, basic=True)
    return state


class UpstreamSet:
    """The upstreams of one registry, their rests, and what each one's challenges said."""

    def __init__(self, registry: Registry, *, default: bool) -> None:
        self.registry = registry
        self.urls = registry.upstreams
        self.profile = registry.name  # its connections use its CA and proxy
        # the default registry keeps the short /token/N realms; the others name themselves
        self.token_prefix = "/token/" if default else f"/token/{registry.name}/"
        self.resting_until = [0.0] * len(self.urls)
        self.learned = [Learned() for _ in self.urls]
        self.last_answer = -math.inf  # trio time of the last response head from any of them
        # each upstream's answers, failures and trouble episode (policy.trouble)
        self.health = [Health() for _ in self.urls]

    @property
    def primary(self) -> Learned:
        """What the primary upstream (the registry itself) said: the only one whose realm or
        Basic challenge the operator's login may follow."""
        return self.learned[0]

    def index_of(self, origin: str) -> int:
        """Which of them has this origin (as ``str(Origin)``); the primary if none."""
        for index, url in enumerate(self.urls):
            if str(url.origin) == origin:
                return index
        return 0

    def note_challenge(self, index: int, challenge: str, *, from_redirect: bool) -> None:
        self.learned[index] = learn(self.learned[index], challenge, from_redirect=from_redirect)
