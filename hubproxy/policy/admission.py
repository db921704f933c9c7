"""Who may use this mirror: the admission rules applied before a request goes anywhere.

For a mirror reachable by strangers, these rules apply, in this order:

1. the client's address must be in ``--allow`` (403 otherwise);
2. the client must be within its ``--client-rate-limit`` (429 with ``Retry-After``);
3. ``/metrics``, ``/healthz``, ``/readyz`` and the status page need ``--ops-allow``;
4. an image must pass ``--images-allow``/``--images-deny`` (403), on ``/v2/`` paths, in token
   scopes and in search results;
5. with ``--users``, the client must be a mirror user (401 with a challenge): see ``tokenpolicy``
   for what a mirror user's requests carry upstream. An address that sent more than
   ``--login-failures`` wrong passwords in a minute gets 429 for its next Basic logins, without a
   password check (:class:`LoginThrottle`); headers already verified still pass.

Before all of these, a connection is admitted (:func:`admit_connection`): at most
``--max-connections`` in all and ``--max-connections-per-client`` per address, and at the global
limit the oldest idle keep-alive connection is closed to make room rather than the newcomer
refused. An address is keyed by :func:`client_key`: IPv6 clients by their /64, which one host
usually holds whole.

Decisions over plain values: the caller passes the clock, runs the password check (scrypt, in a
worker thread) and reads the users file. Each check returns ``None`` or the error to answer with.
"""

from __future__ import annotations

import enum
import ipaddress
import math
from collections import OrderedDict
from dataclasses import dataclass

from .access import ImageRules, NetworkList, RateLimiter, client_key
from .credentials import Authenticator
from .errors import AccessDenied, ClientRateLimited, MirrorUnauthorized, ProxyError

OPS_PATHS = frozenset({"/", "/healthz", "/readyz", "/metrics"})
ADMIN_PREFIX = "/admin/"  # the admin API (``ops/admin.py``): --ops-allow, or this machine only
_THIS_MACHINE = NetworkList((ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")))
MIRROR_REALM = b'Basic realm="hubproxy", charset="UTF-8"'
LOG_EVERY = 60.0  # seconds between two log lines about the same refused client
MAX_LOGGED_CLIENTS = 1024


class Reason(enum.Enum):
    """Why a request was refused: the ``reason`` label of the denied-requests metric."""

    NETWORK = "network"
    RATE = "rate"
    IMAGE = "image"
    AUTH = "auth"
    LOGIN = "login"  # too many wrong passwords from one address (LoginThrottle)


@dataclass(frozen=True)
class Refused:
    reason: Reason
    error: ProxyError


class Connection(enum.Enum):
    """What to do with a newly accepted client connection (:func:`admit_connection`)."""

    ACCEPT = "accept"
    RECLAIM = "reclaim"  # accept it after closing the oldest idle keep-alive connection
    REFUSE_FULL = "max-connections"  # the values are the refusal reasons /metrics shows
    REFUSE_CLIENT = "max-connections-per-client"


def admit_connection(
    *, open_total: int, open_from_client: int, max_total: int, max_per_client: int, idle: int
) -> Connection:
    """Admit a new connection from a client that has ``open_from_client`` open already, with
    ``open_total`` open in all of which ``idle`` wait for a request with nothing of it read.

    The per-client cap comes first: one address holding many connections must not make
    others' idle ones close. At the global cap an idle connection is closed to make room
    (RFC 9112 section 9.3: a server may close an idle connection at any time; clients retry
    on a new one), never one mid-request; only with none idle is the newcomer refused."""
    if open_from_client >= max_per_client:
        return Connection.REFUSE_CLIENT
    if open_total < max_total:
        return Connection.ACCEPT
    if idle > 0:
        return Connection.RECLAIM
    return Connection.REFUSE_FULL


class LoginThrottle:
    """A budget of wrong passwords per address: ``burst`` at once, refilled at ``rate`` per
    second (``per_minute`` / 60), so that a guesser gets ``per_minute`` guesses a minute and
    costs the mirror as many scrypt runs, however fast it sends.

    A password check takes a token *before* it runs (:meth:`take`) and a right password gives
    it back (:meth:`refund`): so concurrent guesses cannot all pass a check that only counted
    finished failures, and right passwords cost nothing. Buckets that are full again are
    forgotten (least recently used first), and beyond ``max_clients`` the least recently used
    is dropped, which errs on the side of letting a login through. Mutable, for the trio
    thread; ``per_minute`` 0 turns it off."""

    def __init__(self, per_minute: int = 10, max_clients: int = 10000) -> None:
        if per_minute < 0:
            raise ValueError(f"login failures per minute must be 0 or more, not {per_minute}")
        self.burst = per_minute
        self.rate = per_minute / 60.0
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, since

    @property
    def enabled(self) -> bool:
        return self.burst > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, key: str, now: float) -> float:
        entry = self._buckets.pop(key, None)
        if entry is None:
            return float(self.burst)
        left, since = entry
        return min(float(self.burst), left + max(0.0, now - since) * self.rate)

    def _store(self, key: str, tokens: float, now: float) -> None:
        while self._buckets:  # forget full buckets, oldest first: O(1) amortised
            oldest, since = next(iter(self._buckets.values()))
            if oldest + max(0.0, now - since) * self.rate < self.burst:
                break
            self._buckets.popitem(last=False)
        if tokens >= self.burst:
            return
        while len(self._buckets) >= self.max_clients:
            self._buckets.popitem(last=False)
        self._buckets[key] = (tokens, now)

    def take(self, key: str, now: float) -> float:
        """Take one token for a password check from ``key``: 0.0 if it may run, else the
        seconds until a token will be there (nothing taken then)."""
        if not self.enabled:
            return 0.0
        tokens = self._tokens(key, now)
        if tokens >= 1.0:
            self._store(key, tokens - 1.0, now)
            return 0.0
        self._store(key, tokens, now)
        return (1.0 - tokens) / self.rate

    def refund(self, key: str, now: float) -> None:
        """The check that :meth:`take` allowed found the right password: give its token back."""
        if self.enabled:
            self._store(key, min(float(self.burst), self._tokens(key, now) + 1.0), now)


class Admission:
    """The admission rules of one running mirror (see the module docstring)."""

    def __init__(
        self,
        *,
        networks: NetworkList,
        ops_networks: NetworkList,
        images: ImageRules,
        limiter: RateLimiter,
        authenticator: Authenticator | None,
        logins: LoginThrottle | None = None,
    ) -> None:
        self.networks = networks
        self.logins = LoginThrottle() if logins is None else logins
        self.ops_networks = ops_networks
        self.images = images
        self.limiter = limiter
        self.authenticator = authenticator
        # what is configured at all: an open mirror skips the checks on every request
        self.checks_clients = bool(networks.networks) or limiter.enabled
        self.checks_ops = bool(ops_networks.networks)
        self.checks_images = bool(images.allow or images.deny)
        self._last_logged: OrderedDict[str, float] = OrderedDict()

    @property
    def requires_login(self) -> bool:
        return self.authenticator is not None

    def reload_users(self, authenticator: Authenticator) -> None:
        """New users file contents (SIGHUP). Sealed tokens of users removed or whose password
        changed stop working at once (their stamp no longer matches)."""
        self.authenticator = authenticator

    def stamp(self, user: str) -> bytes | None:
        """The current stamp of a mirror user (None: no such user, or no ``--users``)."""
        authenticator = self.authenticator
        return authenticator.stamp(user) if authenticator is not None else None

    def admit_client(self, client_ip: str, now: float) -> Refused | None:
        """Rules 1 and 2."""
        if self.networks.networks and not self.networks.allows(client_ip):
            return Refused(
                Reason.NETWORK,
                AccessDenied(f"{client_ip} may not use this mirror (not in its --allow list)"),
            )
        if not self.limiter.enabled:
            return None
        wait = self.limiter.check(client_ip, now)
        if wait <= 0:
            return None
        retry_after = max(1, math.ceil(wait))
        return Refused(
            Reason.RATE,
            ClientRateLimited(
                f"too many requests from {client_ip}; retry in {retry_after}s",
                headers=((b"retry-after", b"%d" % retry_after),),
            ),
        )

    def admit_login(self, client_ip: str, now: float) -> Refused | None:
        """Rule 5's throttle, before a password check: None (a token is taken; give it back
        with :meth:`login_succeeded`) or a 429 for an address out of wrong-password tokens."""
        wait = self.logins.take(client_key(client_ip), now)
        if wait <= 0:
            return None
        retry_after = max(1, math.ceil(wait))
        return Refused(
            Reason.LOGIN,
            ClientRateLimited(
                f"too many wrong passwords from {client_ip}; retry in {retry_after}s",
                headers=((b"retry-after", b"%d" % retry_after),),
            ),
        )

    def login_succeeded(self, client_ip: str, now: float) -> None:
        """The check :meth:`admit_login` let through found the right password."""
        self.logins.refund(client_key(client_ip), now)

    def admit_ops(self, client_ip: str) -> Refused | None:
        """Rule 3, for the operator paths."""
        if self.ops_networks.networks and not self.ops_networks.allows(client_ip):
            return Refused(
                Reason.NETWORK,
                AccessDenied(f"{client_ip} may not read this mirror's status (--ops-allow)"),
            )
        return None

    def admit_admin(self, client_ip: str) -> Refused | None:
        """The admin API: from ``--ops-allow``, or, with none set, from this machine only (it
        removes what is cached: "everyone --allow lets in" is too many). The token is checked
        after this."""
        networks = self.ops_networks if self.ops_networks.networks else _THIS_MACHINE
        if not networks.allows(client_ip):
            return Refused(
                Reason.NETWORK,
                AccessDenied(f"{client_ip} may not use this mirror's admin API (--ops-allow)"),
            )
        return None

    def admit_image(self, registry: str, repository: str) -> Refused | None:
        """Rule 4."""
        if self.images.permits(registry, repository):
            return None
        return Refused(
            Reason.IMAGE, AccessDenied(f"{registry}/{repository} is not served by this mirror")
        )

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


def require_login(basic_user: str | None, authorization: bytes | None) -> str:
    """Rule 5 at the token endpoint: the mirror user, else MirrorUnauthorized asking for a
    Basic login (what ``docker login`` sends to a realm), saying whether one was wrong."""
    if basic_user is not None:
        return basic_user
    given = authorization is not None and authorization[:6].lower() == b"basic "
    message = (
        "wrong mirror user name or password"
        if given
        else "this mirror requires a login: docker login / podman login to the mirror with a "
        "user of its users file"
    )
    raise MirrorUnauthorized(message, headers=((b"www-authenticate", MIRROR_REALM),))
