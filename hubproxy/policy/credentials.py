"""Credentials a client presents: ``Authorization`` parsing and the check of a mirror login.

Registry clients (docker, containerd, podman, skopeo) log in one way only: they follow a ``401``
challenge to the token realm and send ``Authorization: Basic`` there, then present the token
they got as ``Authorization: Bearer`` on ``/v2/`` requests. :func:`parse_basic` and
:func:`bearer_token` read those two headers; :class:`Authenticator` checks Basic credentials
against the users (name -> stored scrypt hash, see :mod:`hubproxy.policy.passwords`) and gives each
user's current entry a :meth:`~Authenticator.stamp`, which a sealed token carries so that it
stops being honoured once its user is removed or changes password.

No I/O and no clock. The Authenticator holds a lock because its check runs in worker threads
(scrypt costs tens of milliseconds). Nothing here keeps or logs a password or a header value.
"""

from __future__ import annotations

import base64
import hmac
import re
import secrets
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping

from .passwords import (
    DEFAULT_N,
    DEFAULT_P,
    DEFAULT_R,
    HASH_BYTES,
    SALT_BYTES,
    parse_hash,
    verify_password,
)

# longer Authorization values are refused before decoding anything; a sealed mirror token
# ("Bearer " + up to sealing.MAX_SEALED characters) must fit, or a client would loop on 401s
MAX_AUTHORIZATION = 16384 + 64
STAMP_BYTES = 16  # 128 bits: a collision between two entries of one user is out of reach
MIN_STAMP_KEY = 16


def _credentials(authorization: bytes, scheme: bytes) -> bytes | None:
    """The credentials after ``scheme`` (case-insensitive, RFC 9110 section 11.1), or None."""
    if len(authorization) > MAX_AUTHORIZATION:
        return None
    found, space, rest = authorization.strip(b" \t").partition(b" ")
    if not space or found.lower() != scheme:
        return None
    rest = rest.strip(b" \t")
    return rest or None


def parse_basic(authorization: bytes) -> tuple[str, str] | None:
    """``Basic base64(user:password)`` (RFC 7617) to ``(user, password)``; None if malformed."""
    credentials = _credentials(authorization, b"basic")
    if credentials is None:
        return None
    try:
        decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
    except ValueError:  # binascii.Error (bad base64) and UnicodeDecodeError are both ValueErrors
        return None
    user, colon, password = decoded.partition(":")
    if not colon:
        return None
    return user, password


Verifier = Callable[[str, str], bool]  # (stored hash, password) -> match, as verify_password


def decoy_hash(users: Mapping[str, str]) -> str:
    """A stored hash that no password matches, with the scrypt parameters most users' hashes
    have: checking a password against it costs what checking a known user's costs.

    Its digest is random bytes, not the scrypt of anything, so no password derives it (short
    of a preimage). The salt is random too; nothing about it is secret."""
    shapes: Counter[tuple[int, int, int, int, int]] = Counter()
    for stored in users.values():
        try:
            parsed = parse_hash(stored)
        except ValueError:
            continue
        shapes[parsed.n, parsed.r, parsed.p, len(parsed.salt), len(parsed.digest)] += 1
    default = (DEFAULT_N, DEFAULT_R, DEFAULT_P, SALT_BYTES, HASH_BYTES)
    n, r, p, salt_bytes, digest_bytes = shapes.most_common(1)[0][0] if shapes else default
    salt = base64.b64encode(secrets.token_bytes(salt_bytes)).decode()
    digest = base64.b64encode(secrets.token_bytes(digest_bytes)).decode()
    return f"scrypt${n}${r}${p}${salt}${digest}"


def bearer_token(authorization: bytes) -> str | None:
    """The token of ``Authorization: Bearer <token>`` (RFC 6750 section 2.1), or None."""
    credentials = _credentials(authorization, b"bearer")
    if credentials is None or not re.fullmatch(rb"[A-Za-z0-9._~+/-]+=*", credentials):
        return None
    return credentials.decode("ascii")


class Authenticator:
    """Checks ``Authorization: Basic`` values against the users, remembering recent successes.

    The cache key is an HMAC of the whole header value under a random per-process key: equal
    headers hit, the password is never kept, and a memory dump reveals nothing that could be
    replayed elsewhere. Failures are not cached (a wrong password costs a full scrypt, which
    ``admission.LoginThrottle`` bounds per address). An unknown user's password is checked
    against a :func:`decoy_hash` with the parameters of the known ones, so the answer takes as
    long as for a known user with a wrong password: response times do not tell which names
    exist. Only a header that is no Basic credentials at all is refused without scrypt.

    :meth:`verify` only reads, so it may run in a worker thread (``trio.to_thread.run_sync``)
    and scrypt does not stall the event loop; the cache is touched only by :meth:`cached_user`
    and :meth:`remember`, on the caller's own thread, so it needs no lock. :meth:`check_basic`
    is all three in one, for a caller with no event loop to keep free.

    ``stamp_key`` keys :meth:`stamp`. It is the caller's, not the authenticator's, because a
    SIGHUP builds a new Authenticator from the reloaded file and a token sealed before it must
    keep its stamp when the user's entry did not change.
    """

    def __init__(
        self,
        users: Mapping[str, str],
        *,
        stamp_key: bytes,
        cache_size: int = 1024,
        verifier: Verifier = verify_password,
    ) -> None:
        """``verifier`` checks a password against a stored hash: ``passwords.verify_password``
        except where a test counts the checks."""
        if len(stamp_key) < MIN_STAMP_KEY:
            raise ValueError(f"a stamp key needs at least {MIN_STAMP_KEY} bytes")
        self._users = dict(users)
        self._decoy = decoy_hash(self._users)
        self._verifier = verifier
        self._stamp_key = stamp_key
        self._cache_size = cache_size
        self._key = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, str] = OrderedDict()

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._users)

    def stamp(self, user: str) -> bytes | None:
        """A 16-byte fingerprint of ``user``'s current entry, None for an unknown user.

        HMAC-SHA256 of the stored hash under the stamp key, truncated: equal for the same entry
        in every Authenticator built with the same key, different once the password changed (a
        new hash has a new random salt), and useless to anyone without the key (it is no
        shortcut for guessing the password). Compare stamps with :func:`hmac.compare_digest`.
        """
        stored = self._users.get(user)
        if stored is None:
            return None
        return hmac.digest(self._stamp_key, stored.encode("utf-8"), "sha256")[:STAMP_BYTES]

    def _cache_key(self, authorization: bytes) -> bytes:
        return hmac.digest(self._key, authorization, "sha256")

    def cached_user(self, authorization: bytes) -> str | None:
        """The user if this exact header value was verified recently; never runs scrypt."""
        key = self._cache_key(authorization)
        user = self._cache.get(key)
        if user is not None:
            self._cache.move_to_end(key)
        return user

    def verify(self, authorization: bytes) -> str | None:
        """The user name if the Basic credentials are right, else None (runs scrypt; reads
        nothing mutable, so any thread may call it). Never raises."""
        parsed = parse_basic(authorization)
        if parsed is None:
            return None
        name, password = parsed
        stored = self._users.get(name)
        # the same scrypt work whether or not the name exists (see the class docstring)
        matched = self._verifier(self._decoy if stored is None else stored, password)
        return name if matched and stored is not None else None

    def remember(self, authorization: bytes, user: str) -> None:
        """Cache a successful :meth:`verify` so the same header skips scrypt next time."""
        self._cache[self._cache_key(authorization)] = user
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def check_basic(self, authorization: bytes) -> str | None:
        """The user name if the Basic credentials are right, else None. Never raises."""
        user = self.cached_user(authorization)
        if user is None:
            user = self.verify(authorization)
            if user is not None:
                self.remember(authorization, user)
        return user
