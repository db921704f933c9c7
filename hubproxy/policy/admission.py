"""Who may use this mirror: the admission rules applied before a request goes anywhere.

For a mirror reachable by strangers, these rules apply, in this order:

1. the client's address must be in ``--allow`` (403 otherwise);
2. the client must be within its ``--client-rate-limit`` (429 with ``Retry-After``);
3. ``/metrics``, ``/healthz``, ``/readyz`` and the status page need ``--ops-allow``;
4. an image must pass ``--images-allow``/``--images-deny`` (403), on ``/v2/`` paths, in token
   scopes and in search results;
5. with ``--users``, the client must be a mirror user (401 with a challenge): see ``tokenpolicy``
   for what a mirror user's requests carry upstream.

Decisions over plain values: the caller passes the clock, runs the password check (scrypt, in a
worker thread) and reads the users file. Each check returns ``None`` or the error to answer with.
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict
from dataclasses import dataclass

from .access import ImageRules, NetworkList, RateLimiter
from .credentials import Authenticator
from .errors import AccessDenied, ClientRateLimited, MirrorUnauthorized, ProxyError

OPS_PATHS = frozenset({"/", "/healthz", "/readyz", "/metrics"})
MIRROR_REALM = b'Basic realm="hubproxy", charset="UTF-8"'
LOG_EVERY = 60.0  # seconds between two log lines about the same refused client
MAX_LOGGED_CLIENTS = 1024


class Reason(enum.Enum):
    """Why a request was refused: the ``reason`` label of the denied-requests metric."""

    NETWORK = "network"
    RATE = "rate"
    IMAGE = "image"
    AUTH = "auth"


@dataclass(frozen=True)
class Refused:
    reason: Reason
    error: ProxyError


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
    ) -> None:
        self.networks = networks
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

    def admit_ops(self, client_ip: str) -> Refused | None:
        """Rule 3, for the operator paths."""
        if self.ops_networks.networks and not self.ops_networks.allows(client_ip):
            return Refused(
                Reason.NETWORK,
                AccessDenied(f"{client_ip} may not read this mirror's status (--ops-allow)"),
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
