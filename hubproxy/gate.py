"""Who may use this mirror: the admission decisions made before a request goes anywhere.

For a mirror reachable by strangers, four rules apply, in this order:

1. the client's address must be in ``--allow`` (403 otherwise);
2. the client must be within its ``--client-rate-limit`` (429 with ``Retry-After``);
3. ``/metrics``, ``/healthz``, ``/readyz`` and the status page need ``--ops-allow``;
4. an image must pass ``--images-allow``/``--images-deny`` (403);
5. with ``--users``, the client must be a mirror user (401 with a challenge).

Mirror users and the registry's own Bearer flow: docker, containerd, podman and skopeo send
registry credentials only to the token realm a challenge names (Basic), then present the token
they got (Bearer) to the registry. Our challenges name the mirror's ``/token/N`` as the realm, so
the client's login for the mirror arrives there. The mirror checks it against the users file,
fetches the upstream's token anonymously, and answers with a *sealed* token
(:class:`~hubproxy.sealing.TokenSealer`): opaque to the client, it proves the mirror user and
carries the upstream token, which :meth:`Gate.authenticate` unseals for the upstream request. A
client that sends Basic credentials straight to ``/v2/`` (curl) is accepted the same way and the
request goes upstream anonymously. So with ``--users`` the upstream sees only anonymous pulls;
private upstream repositories need operator credentials instead.

Everything here is decisions over plain values (the clock is passed in); the proxy does the I/O.
"""

from __future__ import annotations

import json
import math
import secrets
from collections import OrderedDict
from dataclasses import dataclass

import trio

from .access import ImageRules, NetworkList, RateLimiter, parse_image_rules, parse_networks
from .config import Config
from .credentials import Authenticator, bearer_token
from .errors import AccessDenied, ClientRateLimited, MirrorUnauthorized, UpstreamUnavailable
from .headers import Headers, get_header
from .sealing import Grant, TokenSealer, is_sealed
from .usersfile import load_users

OPS_PATHS = frozenset({"/", "/healthz", "/readyz", "/metrics"})
MIRROR_REALM = b'Basic realm="hubproxy", charset="UTF-8"'
MAX_TOKEN_RESPONSE = 64 * 1024  # a token answer (a JWT or two in JSON) is a few KB
MAX_TOKEN_LIFETIME = 3600.0  # seconds a sealed token is honoured at most
LOG_EVERY = 60.0  # seconds between two log lines about the same refused client
MAX_LOGGED_CLIENTS = 1024


@dataclass(frozen=True)
class Identity:
    """A request admitted under ``--users``: the mirror user and the Authorization header to
    send upstream instead of the client's (None: none, the upstream sees an anonymous pull)."""

    user: str
    upstream_authorization: bytes | None


class Gate:
    """The admission rules of one running mirror (see the module docstring)."""

    def __init__(self, config: Config, *, users: dict[str, str] | None = None) -> None:
        """``users`` overrides reading ``config.users_file`` (tests)."""
        self.networks: NetworkList = parse_networks(config.allow)
        self.ops_networks: NetworkList = parse_networks(config.ops_allow)
        self.images: ImageRules = parse_image_rules(config.images_allow, config.images_deny)
        self.limiter = RateLimiter(config.client_rate_limit, config.client_burst)
        if users is None and config.users_file is not None:
            users = load_users(config.users_file)
        # One key for the life of the process, so a token keeps its stamp across a SIGHUP
        # that leaves its user's entry as it was.
        self._stamp_key = secrets.token_bytes(32)
        self.authenticator: Authenticator | None = (
            Authenticator(users, stamp_key=self._stamp_key) if users is not None else None
        )
        self.sealer = TokenSealer()
        # what is configured at all: an open mirror skips the checks on every request
        self.checks_clients = bool(self.networks.networks) or self.limiter.enabled
        self.checks_ops = bool(self.ops_networks.networks)
        self.checks_images = bool(self.images.allow or self.images.deny)
        self._scrypt_threads = trio.CapacityLimiter(2)
        self._last_logged: OrderedDict[str, float] = OrderedDict()

    @property
    def requires_login(self) -> bool:
        return self.authenticator is not None

    def reload_users(self, users: dict[str, str]) -> None:
        """New users file contents (SIGHUP). Sealed tokens stay valid until they expire."""
        self.authenticator = Authenticator(users, stamp_key=self._stamp_key)

    def stamp(self, user: str) -> bytes:
        """The stamp to seal into a token for ``user`` (b"" without ``--users`` or for a user
        not in the file)."""
        stamp = self.authenticator.stamp(user) if self.authenticator is not None else None
        return stamp or b""

    def admit_client(self, client_ip: str, now: float) -> None:
        """Rules 1 and 2; raise AccessDenied or ClientRateLimited."""
        if self.networks.networks and not self.networks.allows(client_ip):
            raise AccessDenied(f"{client_ip} may not use this mirror (not in its --allow list)")
        if not self.limiter.enabled:
            return
        wait = self.limiter.check(client_ip, now)
        if wait > 0:
            retry_after = max(1, math.ceil(wait))
            raise ClientRateLimited(
                f"too many requests from {client_ip}; retry in {retry_after}s",
                headers=((b"retry-after", b"%d" % retry_after),),
            )

    def admit_ops(self, client_ip: str) -> None:
        """Rule 3, for the operator paths."""
        if self.ops_networks.networks and not self.ops_networks.allows(client_ip):
            raise AccessDenied(f"{client_ip} may not read this mirror's status (--ops-allow)")

    def admit_image(self, registry: str, repository: str) -> None:
        """Rule 4."""
        if not self.images.permits(registry, repository):
            raise AccessDenied(f"{registry}/{repository} is not served by this mirror")

    async def basic_user(self, headers: Headers) -> str | None:
        """The mirror user named by the request's Basic credentials, else None.

        A first check runs scrypt (tens of milliseconds, 16 MiB), so it runs in a worker thread,
        at most two at a time, instead of stalling every transfer; a repeated header is
        answered from the authenticator's cache without scrypt."""
        authenticator = self.authenticator
        authorization = get_header(headers, b"authorization")
        if authenticator is None or authorization is None:
            return None
        if not authorization[:6].lower().startswith(b"basic "):
            return None
        user = authenticator.cached_user(authorization)
        if user is not None:
            return user
        return await trio.to_thread.run_sync(
            authenticator.check_basic, authorization, limiter=self._scrypt_threads
        )

    def authenticate(
        self, headers: Headers, now: float, *, basic_user: str | None
    ) -> Identity | None:
        """Rule 5 for a registry request: None without ``--users``; else the identity, or
        MirrorUnauthorized (the caller adds the Bearer challenge to log in with).
        ``basic_user`` is what :meth:`basic_user` found."""
        if self.authenticator is None:
            return None
        token = bearer_token(get_header(headers, b"authorization") or b"")
        if token is not None and is_sealed(token):
            grant = self.sealer.open(token, now)
            if grant is not None:
                return Identity(grant.user, grant.upstream)
        if basic_user is not None:
            return Identity(basic_user, None)
        why = "expired or unknown token" if token is not None else "no mirror login"
        raise MirrorUnauthorized(f"this mirror requires a login ({why})")

    @staticmethod
    def require_login(basic_user: str | None) -> str:
        """Rule 5 for a token request: the mirror user, else MirrorUnauthorized asking for a
        Basic login (what ``docker login`` sends to a realm)."""
        if basic_user is None:
            raise MirrorUnauthorized(
                "this mirror requires a login: docker login / podman login to the mirror "
                "with a user of its users file",
                headers=((b"www-authenticate", MIRROR_REALM),),
            )
        return basic_user

    def should_log(self, client_ip: str, now: float) -> bool:
        """One log line per refused client per minute, so a flood cannot flood the log."""
        last = self._last_logged.pop(client_ip, None)
        if last is not None and now - last < LOG_EVERY:
            self._last_logged[client_ip] = last
            return False
        while len(self._last_logged) >= MAX_LOGGED_CLIENTS:
            self._last_logged.popitem(last=False)
        self._last_logged[client_ip] = now
        return True


def without_authorization(headers: Headers, replacement: bytes | None) -> Headers:
    """The client's headers with its Authorization replaced (or dropped when None)."""
    out = [(k, v) for k, v in headers if k != b"authorization"]
    if replacement is not None:
        out.append((b"authorization", replacement))
    return out


def seal_token_response(
    sealer: TokenSealer,
    user: str,
    body: bytes,
    now: float,
    *,
    registry: str,
    stamp: bytes = b"",
) -> bytes:
    """The token service's JSON answer with its token sealed for ``user`` of ``registry``
    (``stamp``: :meth:`Gate.stamp` of the user).

    Docker Hub answers ``{"token": ..., "access_token": ..., "expires_in": 300, "issued_at":
    ...}``; clients read ``token`` or ``access_token`` (the OAuth2 name). Both become the same
    sealed token, valid for ``expires_in`` seconds (60 when absent, as the token spec says).
    An answer that is not such a document is an upstream failure."""
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise UpstreamUnavailable("the token service answered something other than a JSON object")
    token = document.get("token") or document.get("access_token") or ""
    if not isinstance(token, str):
        raise UpstreamUnavailable("the token service's token is not a string")
    lifetime = document.get("expires_in", 60)
    if not isinstance(lifetime, int | float) or isinstance(lifetime, bool) or not lifetime > 0:
        lifetime = 60
    lifetime = min(float(lifetime), MAX_TOKEN_LIFETIME)
    try:
        upstream = b"Bearer " + token.encode("latin-1") if token else None
        grant = Grant(user, registry=registry, upstream=upstream, stamp=stamp)
        sealed = sealer.seal(grant, now + lifetime)
    except ValueError as exc:  # a token too large to carry, or not a header value (UnicodeError)
        raise UpstreamUnavailable(f"the token service's token cannot be sealed: {exc}") from exc
    answer: dict[str, object] = {
        "token": sealed,
        "access_token": sealed,
        "expires_in": int(lifetime),
    }
    if isinstance(document.get("issued_at"), str):
        answer["issued_at"] = document["issued_at"]
    return json.dumps(answer, separators=(",", ":")).encode()
