"""Auth challenges: parse the upstream's ``WWW-Authenticate`` and point Bearer realms at us.

A registry answers 401 with ``WWW-Authenticate: Bearer realm="https://auth.docker.io/token",
service="registry.docker.io",scope="repository:library/nginx:pull"`` (distribution's token auth
spec). Clients talk only to the mirror, so every Bearer realm is rewritten to the mirror's own
token endpoint, keeping every other parameter; the original realm is returned so the proxy can
forward token requests to it. Basic challenges pass unchanged. Syntax per RFC 9110 section 11.6.1:
comma-separated challenges, each a scheme followed by ``name=value`` parameters whose values are
tokens or quoted strings (which may contain commas).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN_CHARS = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TOKEN68 = re.compile(r"[A-Za-z0-9._~+/-]+=*")
_HOST = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?"
)


@dataclass(frozen=True)
class Challenge:
    scheme: str  # as sent ("Bearer"); compare with .lower()
    params: tuple[tuple[str, str], ...] = ()
    token68: str | None = None

    def param(self, name: str) -> str | None:
        for key, value in self.params:
            if key.lower() == name:
                return value
        return None


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def skip(self, chars: str = " \t") -> None:
        while self.pos < len(self.text) and self.text[self.pos] in chars:
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def token(self, pattern: re.Pattern[str] = _TOKEN_CHARS) -> str | None:
        match = pattern.match(self.text, self.pos)
        if match is None:
            return None
        self.pos = match.end()
        return match.group()

    def quoted(self) -> str | None:
        if self.peek() != '"':
            return None
        out = []
        self.pos += 1
        while self.pos < len(self.text):
            char = self.text[self.pos]
            self.pos += 1
            if char == "\\" and self.pos < len(self.text):
                out.append(self.text[self.pos])
                self.pos += 1
            elif char == '"':
                return "".join(out)
            else:
                out.append(char)
        return None  # unterminated


def parse_challenges(value: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` value into challenges; raise ValueError if malformed."""
    scan = _Scanner(value)
    challenges: list[Challenge] = []
    while True:
        scan.skip(" \t,")
        if scan.pos >= len(scan.text):
            return challenges
        scheme = scan.token()
        if scheme is None:
            raise ValueError(f"expected an auth scheme at offset {scan.pos}")
        params: list[tuple[str, str]] = []
        token68: str | None = None
        scan.skip()
        # token68 form ("Basic dXNlcjpwYXNz"): a token68 standing alone before "," or the end
        start = scan.pos
        candidate = scan.token(_TOKEN68)
        if candidate is not None:
            scan.skip()
            if scan.peek() in ("", ","):
                token68 = candidate
            else:
                scan.pos = start
        if token68 is None:
            while True:
                mark = scan.pos
                scan.skip(" \t,")
                name = scan.token()
                if name is None:
                    break
                scan.skip()
                if scan.peek() != "=":
                    scan.pos = mark  # the next challenge's scheme
                    break
                scan.pos += 1
                scan.skip()
                param_value = scan.quoted() if scan.peek() == '"' else scan.token()
                if param_value is None:
                    raise ValueError(f"bad value for auth parameter {name!r}")
                params.append((name, param_value))
                scan.skip()
                if scan.peek() not in ("", ","):
                    raise ValueError(f"unexpected {scan.peek()!r} after auth parameter {name!r}")
        challenges.append(Challenge(scheme, tuple(params), token68))


def format_challenges(challenges: list[Challenge]) -> str:
    """Serialise challenges; parameter values are always quoted (as Docker Hub does)."""
    parts = []
    for challenge in challenges:
        if challenge.token68 is not None:
            parts.append(f"{challenge.scheme} {challenge.token68}")
        elif challenge.params:
            params = ",".join(f"{k}={_quote(v)}" for k, v in challenge.params)
            parts.append(f"{challenge.scheme} {params}")
        else:
            parts.append(challenge.scheme)
    return ", ".join(parts)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def rewrite_challenge(value: str, our_realm: str) -> tuple[str, str | None]:
    """Point every Bearer challenge's realm at ``our_realm``.

    Returns the rewritten header value and the upstream's original realm (None when there was no
    Bearer challenge with a realm, and the value is returned unchanged). A header we cannot parse
    is returned unchanged too: the client then sees what the upstream said.
    """
    try:
        challenges = parse_challenges(value)
    except ValueError:
        return value, None
    learned: str | None = None
    rewritten = []
    for challenge in challenges:
        realm = challenge.param("realm")
        if challenge.scheme.lower() == "bearer" and realm is not None:
            learned = learned or realm
            params = tuple(
                (k, our_realm if k.lower() == "realm" else v) for k, v in challenge.params
            )
            challenge = Challenge(challenge.scheme, params)
        rewritten.append(challenge)
    if learned is None:
        return value, None
    return format_challenges(rewritten), learned


def public_base(
    *, configured: str | None, scheme: str, host_header: str | None, fallback: str
) -> str:
    """The base URL clients reach us at: ``--public-url``, else scheme + the ``Host`` they used.

    A ``Host`` that is not a plain host[:port] is ignored in favour of ``fallback`` (the listen
    address), so header injection cannot reach a realm we hand out.
    """
    if configured:
        return configured.rstrip("/")
    if host_header and _HOST.fullmatch(host_header):
        return f"{scheme}://{host_header}"
    return f"{scheme}://{fallback}"


def login_challenge(realm: str, service: str | None, repository: str | None) -> str:
    """The Bearer challenge a mirror that requires its own login sends in the upstream's stead
    (same shape as Docker Hub's: realm, service, and scope for a repository request)."""
    params = [("realm", realm)]
    if service:
        params.append(("service", service))
    if repository:
        params.append(("scope", f"repository:{repository}:pull"))
    return format_challenges([Challenge("Bearer", tuple(params))])
