"""The secret every instance of a ``--peer`` list shares (``--peer-secret-file``).

A mirror token (``--users``) is sealed with a key, and each user's entry is stamped with
another; both are random per process unless given. Behind a load balancer a client logs in on
one instance and sends its token to any other, which must open it: every instance derives the
same two keys from the one secret in this file. Only the derived keys are kept; the secret is
never logged."""

from __future__ import annotations

import hmac

from .admintoken import read_secret_word

MIN_SECRET_LENGTH = 32  # characters: `openssl rand -hex 32` makes 64


def read_peer_keys(path: str) -> tuple[bytes, bytes]:
    """(the token sealing key, the users' stamp key), each 32 bytes, derived from the secret
    in ``path``; AdminTokenError (its message says what to do) if it cannot be used."""
    secret = read_secret_word(path, MIN_SECRET_LENGTH).encode()
    # distinct labels: neither key tells anything about the other or about the secret
    sealing = hmac.digest(secret, b"hubproxy peers: token sealing", "sha256")
    stamp = hmac.digest(secret, b"hubproxy peers: user stamps", "sha256")
    return sealing, stamp
