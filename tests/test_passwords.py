"""Tests for hubproxy.policy.passwords: scrypt hashes, their format and their parameter limits.

Hashes use N=2**4 for speed except where the default cost is the point.
"""

from __future__ import annotations

import base64
import hashlib

import pytest

from hubproxy.policy.passwords import hash_password, parse_hash, verify_password


def fast_hash(password: str, salt: bytes | None = None) -> str:
    return hash_password(password, salt=salt, n=2**4, r=8, p=1)


def test_hash_format_and_verify() -> None:
    stored = fast_hash("correct horse")
    scheme, n, r, p, salt, digest = stored.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16", "8", "1")
    assert len(base64.b64decode(salt)) == 16
    assert len(base64.b64decode(digest)) == 32
    assert verify_password(stored, "correct horse")
    assert not verify_password(stored, "correct horse ")
    assert not verify_password(stored, "")
    assert "correct horse" not in stored


def test_default_cost() -> None:
    stored = hash_password("s3cret")
    assert stored.startswith("scrypt$16384$8$1$")
    assert verify_password(stored, "s3cret")
    assert not verify_password(stored, "s3creT")


def test_salt_is_random_and_explicit_salt_is_deterministic() -> None:
    assert fast_hash("pw") != fast_hash("pw")
    salt = bytes(range(16))
    one = fast_hash("pw", salt)
    assert one == fast_hash("pw", salt)
    expected = hashlib.scrypt(b"pw", salt=salt, n=16, r=8, p=1, dklen=32)
    assert one.endswith("$" + base64.b64encode(expected).decode())


@pytest.mark.parametrize("password", ["päss wörd", "🔑", "a:b:c", " leading", "x" * 1000])
def test_unicode_and_odd_passwords(password: str) -> None:
    stored = fast_hash(password)
    assert verify_password(stored, password)
    assert not verify_password(stored, password + "x")


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "scrypt",
        "plain$16$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$16$8$1$AAAAAAAAAAAAAAAAAAAAAA==",
        "scrypt$15$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$1$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$16$0$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$-16$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$x$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$1073741824$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$16$8$1$not base64!$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$16$8$1$AAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",  # 3-byte salt
        "scrypt$16$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAA",  # 3-byte hash
        "scrypt$16$8$1$AAAAAAAAAAAAAAAAAAAAAA==$ÄÄÄÄ",
    ],
)
def test_malformed_hash_matches_nothing(stored: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        parse_hash(stored)
    assert not verify_password(stored, "")
    assert not verify_password(stored, "anything")


@pytest.mark.parametrize(("n", "r", "p"), [(15, 8, 1), (1, 8, 1), (16, 0, 1), (2**30, 8, 1)])
def test_hash_password_refuses_bad_parameters(n: int, r: int, p: int) -> None:
    with pytest.raises(ValueError, match="scrypt"):
        hash_password("pw", n=n, r=r, p=p)


def test_verify_with_lone_surrogate_is_false() -> None:
    assert not verify_password(fast_hash("pw"), "\udcff")
