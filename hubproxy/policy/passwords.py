"""Password hashes: scrypt, stored as ``scrypt$N$r$p$<salt b64>$<hash b64>``.

scrypt (RFC 7914) because it is in the standard library (``hashlib.scrypt``, from OpenSSL) and
is memory-hard. The default cost, N=2**14 r=8 p=1, is ~16 MiB and ~50 ms per check: the minimum
OWASP suggests. That cost is why :class:`~hubproxy.policy.credentials.Authenticator` remembers
successful checks and the proxy runs a first check in a worker thread.

Pure: no I/O, no clock. Error messages never quote a stored hash (it would serve an offline
guessing attack) nor a password.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
import secrets
from dataclasses import dataclass, field
from hashlib import scrypt

DEFAULT_N = 2**14  # ~16 MiB and ~50 ms per check with r=8: the cost OWASP suggests as a minimum
DEFAULT_R = 8
DEFAULT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
# A users file is trusted configuration, but a typo like N=2**30 would still try to allocate
# 128 GiB on every login; refuse parameters needing more than this.
MAX_SCRYPT_MEMORY = 256 << 20


@dataclass(frozen=True)
class ScryptHash:
    """A parsed stored hash: the scrypt parameters, the salt and the derived key."""

    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes = field(repr=False)


def _scrypt_memory(n: int, r: int, p: int) -> int:
    # What OpenSSL's scrypt allocates: 128*r*p for B plus 128*r*(N+2) for V (EVP_PBE_scrypt).
    return 128 * r * p + 128 * r * (n + 2)


def _check_params(n: int, r: int, p: int) -> None:
    if n < 2 or n & (n - 1):
        raise ValueError(f"scrypt N must be a power of two above 1, not {n}")
    if r < 1 or p < 1:
        raise ValueError("scrypt r and p must be at least 1")
    if _scrypt_memory(n, r, p) > MAX_SCRYPT_MEMORY:
        raise ValueError(f"scrypt parameters N={n} r={r} p={p} need too much memory")


_PARAM = re.compile(r"[0-9]{1,10}")


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def parse_hash(stored: str) -> ScryptHash:
    """Parse ``scrypt$N$r$p$salt$hash``; raise ValueError (never quoting the hash) if malformed."""
    fields = stored.split("$")
    if len(fields) != 6 or fields[0] != "scrypt":
        raise ValueError("expected scrypt$N$r$p$SALT$HASH")
    if not all(_PARAM.fullmatch(part) for part in fields[1:4]):
        raise ValueError("scrypt N, r and p must be decimal numbers")
    n, r, p = (int(part) for part in fields[1:4])
    _check_params(n, r, p)
    try:
        salt, digest = _b64decode(fields[4]), _b64decode(fields[5])
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("salt and hash must be base64") from None
    if len(salt) < 8 or not 16 <= len(digest) <= 64:
        raise ValueError("salt or hash has the wrong length")
    return ScryptHash(n, r, p, salt, digest)


def _derive(password: str, n: int, r: int, p: int, salt: bytes, dklen: int) -> bytes:
    return scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        maxmem=_scrypt_memory(n, r, p) + (1 << 20),
        dklen=dklen,
    )


def hash_password(
    password: str,
    *,
    salt: bytes | None = None,
    n: int = DEFAULT_N,
    r: int = DEFAULT_R,
    p: int = DEFAULT_P,
) -> str:
    """Return ``scrypt$N$r$p$<salt b64>$<hash b64>`` for ``password`` (random 16-byte salt)."""
    _check_params(n, r, p)
    if salt is None:
        salt = secrets.token_bytes(SALT_BYTES)
    digest = _derive(password, n, r, p, salt, HASH_BYTES)
    encode = base64.b64encode
    return f"scrypt${n}${r}${p}${encode(salt).decode()}${encode(digest).decode()}"


def verify_password(stored: str, password: str) -> bool:
    """Does ``password`` match the stored hash? A malformed hash matches nothing."""
    try:
        parsed = parse_hash(stored)
        derived = _derive(password, parsed.n, parsed.r, parsed.p, parsed.salt, len(parsed.digest))
    except ValueError:  # includes UnicodeEncodeError (a lone surrogate)
        return False
    return hmac.compare_digest(derived, parsed.digest)
