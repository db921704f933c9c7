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


def read_admin_token(path: str) -> bytes:
    """The SHA-256 of the token in ``path`` (its first line, without surrounding spaces)."""
    try:
        with open(path, encoding="utf-8") as file:
            token = file.readline().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AdminTokenError(
            f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise AdminTokenError(
            f"{path}: the token must be one word of at least {MIN_TOKEN_LENGTH} characters "
            f"(make one with: openssl rand -hex 32 > {path})"
        )
    return hashlib.sha256(token.encode()).digest()


def token_matches(expected: bytes, authorization: bytes | None) -> bool:
    """Whether ``Authorization: Bearer <token>`` carries the token whose digest is
    ``expected``."""
    if authorization is None or authorization[:7].lower() != b"bearer ":
        return False
    given = hashlib.sha256(authorization[7:].strip()).digest()
    return hmac.compare_digest(given, expected)
