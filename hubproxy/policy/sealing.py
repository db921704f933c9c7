"""Sealed mirror tokens: what the mirror hands a logged-in client instead of the upstream token.

With ``--users`` the mirror's token endpoint checks the client's login, fetches the upstream
token itself, and answers with a sealed token: ``hp1.`` + unpadded url-safe base64 of
``nonce(16) || ciphertext || tag(32)``. The client presents it as ``Authorization: Bearer
hp1.…``; the mirror opens it and sends the :class:`Grant`'s upstream value on.

Construction. One random 32-byte key per process gives two keys, ``enc = HMAC-SHA256(key,
"hubproxy token encryption")`` and ``mac = HMAC-SHA256(key, "hubproxy token authentication")``.
The plaintext is compact JSON of the Grant and the expiry; the ciphertext is the plaintext XOR
``SHAKE-256(enc || nonce)``; the tag is ``HMAC-SHA256(mac, "hp1." || nonce || ciphertext)``.
:meth:`TokenSealer.open` checks the tag (in constant time) before it decrypts or parses
anything, and accepts only the canonical spelling of a token it issued.

Threat model.

- Who holds the key: this process only, in memory. It is never written, logged or sent; pass
  ``key`` to share it between processes (or in tests). Whoever can read the process's memory
  has the key and the upstream tokens anyway.
- An attacker who sees tokens (the client itself; anyone on the path to a plain-HTTP mirror;
  a client's logs) cannot *forge* one nor *extend* one (user, registry, upstream credential,
  operator flag, stamp and expiry all sit under the tag: changing any bit of the token makes
  :meth:`~TokenSealer.open` return None), and cannot *read the upstream token* (the keystream
  is unknown without the key). The length of a token does tell the length of what is inside.
- It *can replay* a token it holds: a sealed token is a bearer credential, honoured for
  whatever lifetime it was sealed with (tokenpolicy caps it at an hour), from any client address.
  That is why an exposed mirror should speak TLS. What the token names limits the damage, and
  the caller enforces it: :attr:`Grant.registry` (not valid for another registry),
  :attr:`Grant.operator` (pulls only), :attr:`Grant.stamp` (compared with
  :meth:`hubproxy.policy.credentials.Authenticator.stamp`, so removing the user or changing the
  password revokes every token sealed before).
- A restart makes a new key: every outstanding token fails to open, the client gets a 401 and
  fetches a new token (docker, containerd, podman and skopeo all do). A SIGHUP keeps the key.

Why a home-made construction is acceptable here. hubproxy depends on trio and h11 only, and
the standard library has no AEAD (no AES-GCM or ChaCha20-Poly1305 outside the ``ssl`` record
layer). It does have SHAKE-256 and HMAC-SHA256, and the generic encrypt-then-MAC composition of
a stream cipher secure against chosen plaintexts with a strongly unforgeable MAC is secure
against chosen ciphertexts (Bellare and Namprempre, 2000). SHAKE-256 is a sponge: keyed by a
secret prefix it has no length extension and is the basis of NIST's KMAC, so ``SHAKE-256(enc
|| nonce)`` with a fresh random 128-bit nonce is a pseudorandom keystream (a repeat needs about
2**64 tokens under one key). The two keys come from one by HMAC with distinct labels (HKDF's
expand step in one block), so neither use can help an attack on the other. The tag covers the
``hp1.`` prefix, so a future format cannot be confused with this one. Known-answer tests
(``tests/test_sealing.py``) pin the construction byte for byte.

Pure: no I/O, and the clock is the caller's (``now``, ``expires_at``).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import math
import re
import secrets
from dataclasses import dataclass, field
from hashlib import shake_256

SEALED_PREFIX = "hp1."
MAX_SEALED = 16384  # upstream tokens are JWTs of a few KB; anything much longer is junk
KEY_BYTES = 32
NONCE_BYTES = 16
_TAG_BYTES = 32
_SEALED_BODY = re.compile(r"[A-Za-z0-9_-]+")
_FIELDS = frozenset({"u", "r", "t", "o", "s", "e"})


@dataclass(frozen=True)
class Grant:
    """What a sealed mirror token carries."""

    user: str  # the mirror user; "" for a client that did not log in to the mirror
    registry: str  # the registry name the token is valid for ("docker.io", "ghcr.io")
    # the Authorization value to send upstream (b"Bearer ..." or b"Basic ..."); None: anonymous
    # upstream. Never in a repr, so a logged Grant does not leak it.
    upstream: bytes | None = field(default=None, repr=False)
    operator: bool = False  # obtained with the operator's login: serves GET/HEAD only
    stamp: bytes = b""  # Authenticator.stamp(user) when sealed; b"" for user ""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _xor(data: bytes, keystream: bytes) -> bytes:
    return (int.from_bytes(data) ^ int.from_bytes(keystream)).to_bytes(len(data))


def _plaintext(grant: Grant, expires_at: float) -> bytes:
    # The upstream value is an HTTP field value: ASCII in practice, bytes 0x80-0xff at most
    # (obs-text, RFC 9110 section 5.5). Latin-1 maps each byte to one code point, so JSON
    # carries an ASCII token one byte per byte where base64 would cost a third more, and a
    # sealed token must fit in the client's Authorization header (credentials.MAX_AUTHORIZATION).
    upstream = None if grant.upstream is None else grant.upstream.decode("latin-1")
    document = {
        "u": grant.user,
        "r": grant.registry,
        "t": upstream,
        "o": grant.operator,
        "s": base64.b64encode(grant.stamp).decode("ascii"),
        "e": expires_at,
    }
    return json.dumps(document, separators=(",", ":")).encode("ascii")


def _grant(plaintext: bytes, now: float) -> Grant | None:
    """The Grant in a decrypted (hence authentic) plaintext, if well formed and unexpired."""
    try:
        payload = json.loads(plaintext)
    except ValueError:
        return None
    if not isinstance(payload, dict) or payload.keys() != _FIELDS:
        return None
    user, registry, upstream, operator, stamp, expires_at = (
        payload[name] for name in ("u", "r", "t", "o", "s", "e")
    )
    if not (isinstance(user, str) and isinstance(registry, str) and isinstance(stamp, str)):
        return None
    if not (upstream is None or isinstance(upstream, str)) or not isinstance(operator, bool):
        return None
    if not isinstance(expires_at, int | float) or isinstance(expires_at, bool):
        return None
    if not math.isfinite(expires_at) or now >= expires_at:
        return None
    try:
        upstream_bytes = None if upstream is None else upstream.encode("latin-1")
        stamp_bytes = base64.b64decode(stamp, validate=True)
    except ValueError:  # UnicodeEncodeError, binascii.Error
        return None
    if base64.b64encode(stamp_bytes).decode("ascii") != stamp:
        return None
    return Grant(user, registry, upstream_bytes, operator, stamp_bytes)


class TokenSealer:
    """Seals a :class:`Grant` with its expiry into an opaque ``hp1.`` token and opens it again
    (the module docstring has the format and the threat model)."""

    def __init__(self, key: bytes | None = None) -> None:
        """``key``: at least 32 secret bytes; None draws a random one for this process."""
        if key is None:
            key = secrets.token_bytes(KEY_BYTES)
        if len(key) < KEY_BYTES:
            raise ValueError(f"a token sealing key needs at least {KEY_BYTES} bytes")
        self._enc_key = hmac.digest(key, b"hubproxy token encryption", "sha256")
        self._mac_key = hmac.digest(key, b"hubproxy token authentication", "sha256")

    def _keystream(self, nonce: bytes, length: int) -> bytes:
        return shake_256(self._enc_key + nonce).digest(length)

    def _tag(self, nonce: bytes, ciphertext: bytes) -> bytes:
        return hmac.digest(self._mac_key, SEALED_PREFIX.encode() + nonce + ciphertext, "sha256")

    def seal(self, grant: Grant, expires_at: float, *, nonce: bytes | None = None) -> str:
        """An ``hp1.`` token carrying ``grant`` until ``expires_at``.

        ``nonce`` is for known-answer tests only: a nonce used twice under one key shows the
        XOR of the two plaintexts. Raise ValueError if ``expires_at`` is not finite or the
        token would be longer than :meth:`open` accepts (:data:`MAX_SEALED`).
        """
        if not math.isfinite(expires_at):
            raise ValueError("a sealed token needs a finite expiry")
        if nonce is None:
            nonce = secrets.token_bytes(NONCE_BYTES)
        elif len(nonce) != NONCE_BYTES:
            raise ValueError(f"a nonce has {NONCE_BYTES} bytes")
        plaintext = _plaintext(grant, expires_at)
        ciphertext = _xor(plaintext, self._keystream(nonce, len(plaintext)))
        token = SEALED_PREFIX + _b64url(nonce + ciphertext + self._tag(nonce, ciphertext))
        if len(token) > MAX_SEALED:
            raise ValueError("upstream token too long to seal")
        return token

    def open(self, token: str, now: float) -> Grant | None:
        """The Grant if ``token`` is ours, intact, canonical, unexpired and well formed, else
        None. Never raises."""
        if len(token) > MAX_SEALED or not token.startswith(SEALED_PREFIX):
            return None
        body = token[len(SEALED_PREFIX) :]
        if not _SEALED_BODY.fullmatch(body):
            return None
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except binascii.Error:
            return None
        # Only the canonical spelling: the last base64 digit can carry unused bits, and a token
        # that differs from what we issued must not be accepted as the same token.
        if _b64url(raw) != body or len(raw) <= NONCE_BYTES + _TAG_BYTES:
            return None
        nonce = raw[:NONCE_BYTES]
        ciphertext = raw[NONCE_BYTES:-_TAG_BYTES]
        if not hmac.compare_digest(raw[-_TAG_BYTES:], self._tag(nonce, ciphertext)):
            return None
        return _grant(_xor(ciphertext, self._keystream(nonce, len(ciphertext))), now)


def is_sealed(token: str) -> bool:
    """Is this a mirror token (to open) rather than an upstream one (to pass through)?"""
    return token.startswith(SEALED_PREFIX)
