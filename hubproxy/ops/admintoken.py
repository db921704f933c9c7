"""The admin API's bearer token (``--admin-token-file``): read once, kept only as its SHA-256.

The token never stays in memory in clear, is never logged, and a presented one is compared by
its digest in constant time (``hmac.compare_digest``), so neither the comparison's time nor a
memory dump gives it away."""

from __future__ import annotations

import hashlib
import hmac

MIN_TOKEN_LENGTH = 16


class AdminTokenError(ValueError):
    """The token file cannot be used: the message says why and what to do."""


def read_secret_word(path: str, min_length: int) -> str:
    """The first line of ``path`` without surrounding spaces: one word of at least
    ``min_length`` characters, or AdminTokenError saying how to make one."""
    try:
        with open(path, encoding="utf-8") as file:
            word = file.readline().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AdminTokenError(
            f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    if len(word) < min_length or any(c.isspace() for c in word):
        raise AdminTokenError(
            f"{path}: the secret must be one word of at least {min_length} characters "
            f"(make one with: openssl rand -hex 32 > {path})"
        )
    return word


def read_admin_token(path: str) -> bytes:
    """The SHA-256 of the token in ``path`` (its first line, without surrounding spaces)."""
    return hashlib.sha256(read_secret_word(path, MIN_TOKEN_LENGTH).encode()).digest()


def token_matches(expected: bytes, authorization: bytes | None) -> bool:
    """Whether ``Authorization: Bearer <token>`` carries the token whose digest is
    ``expected``."""
    if authorization is None or authorization[:7].lower() != b"bearer ":
        return False
    given = hashlib.sha256(authorization[7:].strip()).digest()
    return hmac.compare_digest(given, expected)
