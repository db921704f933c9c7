"""Tests for hubproxy.policy.credentials: Authorization parsing, the Basic check with its cache, and
the stamps that let a sealed token be revoked.

Hashes use N=2**4 for speed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hubproxy.ops.usersfile import add_user, load_users, remove_user
from hubproxy.policy import passwords
from hubproxy.policy.credentials import (
    MAX_AUTHORIZATION,
    Authenticator,
    bearer_token,
    decoy_hash,
    parse_basic,
)
from hubproxy.policy.passwords import hash_password
from hubproxy.policy.sealing import Grant, TokenSealer

STAMP_KEY = bytes(range(32))


def fast_hash(password: str, salt: bytes | None = None) -> str:
    return hash_password(password, salt=salt, n=2**4, r=8, p=1)


def basic(credentials: str | bytes, scheme: bytes = b"Basic") -> bytes:
    raw = credentials.encode() if isinstance(credentials, str) else credentials
    return scheme + b" " + base64.b64encode(raw)


@pytest.fixture
def scrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count scrypt runs by wrapping the function the passwords module calls."""
    calls: list[int] = []
    real = hashlib.scrypt

    def counting(*args: Any, **kwargs: Any) -> bytes:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(passwords, "scrypt", counting)
    return calls


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (basic("alice:pw"), ("alice", "pw")),
        (basic("alice:p:w:"), ("alice", "p:w:")),
        (basic("alice:"), ("alice", "")),
        (basic(":pw"), ("", "pw")),
        (basic("alice:pw", b"basic"), ("alice", "pw")),
        (basic("alice:pw", b"BASIC"), ("alice", "pw")),
        (b"  Basic   " + base64.b64encode(b"alice:pw") + b"  ", ("alice", "pw")),
        (basic("jörg:pässword"), ("jörg", "pässword")),
        (b"Basic", None),
        (b"Basic ", None),
        (b"", None),
        (b"Basic !!!!", None),
        (b"Basic YWxpY2U6cHc", None),  # missing padding
        (b"Basic YWxp Y2U6cHc=", None),
        (basic("alicepw"), None),  # no colon
        (basic(b"alice:\xff\xfe"), None),  # not UTF-8
        (basic("alice:pw", b"Bearer"), None),
        (basic("alice:pw", b"Basicx"), None),
        (b"Basic " + b"A" * MAX_AUTHORIZATION, None),  # overlong
    ],
)
def test_parse_basic(header: bytes, expected: tuple[str, str] | None) -> None:
    assert parse_basic(header) == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"Bearer abc.def-ghi_jkl", "abc.def-ghi_jkl"),
        (b"bearer hp1.xyz", "hp1.xyz"),
        (b"Bearer a+b/c==", "a+b/c=="),
        (b"Bearer  token ", "token"),
        (b"Bearer", None),
        (b"Bearer ", None),
        (b"Basic abc", None),
        (b"Bearer a b", None),
        (b"Bearer a=b", None),
        (b"Bearer \xff", None),
        (b"Bearer " + b"A" * MAX_AUTHORIZATION, None),
    ],
)
def test_bearer_token(header: bytes, expected: str | None) -> None:
    assert bearer_token(header) == expected


@pytest.fixture
def authenticator() -> Authenticator:
    return Authenticator(
        {"alice": fast_hash("wonderland"), "bob": fast_hash("builder")}, stamp_key=STAMP_KEY
    )


def test_authenticator_right_and_wrong(authenticator: Authenticator) -> None:
    assert authenticator.check_basic(basic("alice:wonderland")) == "alice"
    assert authenticator.check_basic(basic("bob:builder")) == "bob"
    assert authenticator.check_basic(basic("alice:builder")) is None
    assert authenticator.check_basic(basic("bob:wonderland")) is None
    assert authenticator.check_basic(basic("carol:wonderland")) is None
    assert authenticator.check_basic(basic("Alice:wonderland")) is None
    assert authenticator.names == frozenset({"alice", "bob"})


@given(st.binary(max_size=200))
def test_authenticator_never_raises(header: bytes) -> None:
    auth = Authenticator({"alice": fast_hash("pw")}, stamp_key=STAMP_KEY)
    assert auth.check_basic(header) is None
    assert auth.check_basic(b"Basic " + header) is None


def test_cache_hit_does_not_rerun_scrypt(
    authenticator: Authenticator, scrypt_calls: list[int]
) -> None:
    header = basic("alice:wonderland")
    assert authenticator.cached_user(header) is None
    assert authenticator.check_basic(header) == "alice"
    assert len(scrypt_calls) == 1
    for _ in range(10):
        assert authenticator.check_basic(header) == "alice"
        assert authenticator.cached_user(header) == "alice"
    assert len(scrypt_calls) == 1
    # a different spelling of the same credentials is verified once more, then cached too
    assert authenticator.check_basic(basic("alice:wonderland", b"basic")) == "alice"
    assert len(scrypt_calls) == 2


def test_failures_are_not_cached(authenticator: Authenticator, scrypt_calls: list[int]) -> None:
    for _ in range(3):
        assert authenticator.check_basic(basic("alice:wrong")) is None
    assert len(scrypt_calls) == 3
    # headers that carry no user name at all never reach scrypt
    for header in (b"Basic !!", basic("nocolon"), b"Bearer x"):
        assert authenticator.check_basic(header) is None
    assert len(scrypt_calls) == 3


def test_unknown_names_cost_the_same_check_as_known_ones(scrypt_calls: list[int]) -> None:
    """Timing must not tell which names exist: an unknown name's password is checked (one
    scrypt run, through the same verifier) against a hash with a known user's parameters."""
    checked: list[tuple[str, str]] = []

    def verifier(stored: str, password: str) -> bool:
        checked.append((stored, password))
        return passwords.verify_password(stored, password)

    alice = hash_password("wonderland", n=2**5, r=4, p=1)
    auth = Authenticator({"alice": alice}, stamp_key=STAMP_KEY, verifier=verifier)
    scrypt_calls.clear()
    assert auth.check_basic(basic("alice:wrong")) is None
    assert auth.check_basic(basic("nobody:wrong")) is None
    assert auth.check_basic(basic("nobody:wonderland")) is None
    assert len(scrypt_calls) == 3 and len(checked) == 3
    assert checked[0] == (alice, "wrong")
    known = passwords.parse_hash(alice)
    for stored, _ in checked[1:]:
        decoy = passwords.parse_hash(stored)
        shape = (decoy.n, decoy.r, decoy.p, len(decoy.salt), len(decoy.digest))
        assert shape == (known.n, known.r, known.p, len(known.salt), len(known.digest))
    assert auth.check_basic(basic("alice:wonderland")) == "alice"


def test_decoy_hash_has_the_usual_parameters_and_matches_nothing() -> None:
    users = {
        "a": fast_hash("x"),
        "b": fast_hash("y"),
        "c": hash_password("z", n=2**5, r=1, p=1),
        "broken": "scrypt$junk",
    }
    decoy = passwords.parse_hash(decoy_hash(users))
    assert (decoy.n, decoy.r, decoy.p) == (2**4, 8, 1)  # the most common shape
    assert decoy_hash(users) != decoy_hash(users)  # random salt and digest
    default = passwords.parse_hash(decoy_hash({}))
    assert (default.n, default.r, default.p) == (
        passwords.DEFAULT_N,
        passwords.DEFAULT_R,
        passwords.DEFAULT_P,
    )
    for password in ("", "x", "y", "z"):
        assert not passwords.verify_password(decoy_hash(users), password)


def test_cache_is_bounded(scrypt_calls: list[int]) -> None:
    auth = Authenticator(
        {f"u{i}": fast_hash(f"p{i}") for i in range(3)}, stamp_key=STAMP_KEY, cache_size=2
    )
    headers = [basic(f"u{i}:p{i}") for i in range(3)]
    scrypt_calls.clear()  # the hashes above ran scrypt too
    for header in headers:
        auth.check_basic(header)
    assert len(scrypt_calls) == 3
    assert auth.cached_user(headers[0]) is None  # evicted: least recently used
    assert auth.cached_user(headers[2]) == "u2"
    assert auth.check_basic(headers[0]) == "u0"
    assert len(scrypt_calls) == 4


def test_cache_holds_no_password(authenticator: Authenticator) -> None:
    header = basic("alice:wonderland")
    assert authenticator.check_basic(header) == "alice"
    state = repr(vars(authenticator)).encode()
    for secret in (b"wonderland", header, base64.b64encode(b"alice:wonderland")):
        assert secret not in state


# --- stamps ----------------------------------------------------------------------------------


def test_stamp_is_the_truncated_hmac_of_the_stored_hash() -> None:
    stored = fast_hash("wonderland")
    auth = Authenticator({"alice": stored}, stamp_key=STAMP_KEY)
    stamp = auth.stamp("alice")
    assert stamp == hmac.digest(STAMP_KEY, stored.encode(), "sha256")[:16]
    assert stamp is not None and len(stamp) == 16
    assert auth.stamp("bob") is None
    assert auth.stamp("") is None
    assert auth.stamp("Alice") is None  # names are case-sensitive


def test_stamp_follows_the_users_file(tmp_path: Path) -> None:
    """A SIGHUP builds a new Authenticator from the reloaded file: a token's stamp must still
    match while its user's entry is unchanged, and stop matching when it changes or goes."""
    path = tmp_path / "users"
    add_user(path, "alice", "wonderland")
    add_user(path, "bob", "builder")
    first = Authenticator(load_users(path), stamp_key=STAMP_KEY)
    again = Authenticator(load_users(path), stamp_key=STAMP_KEY)
    alice = first.stamp("alice")
    assert alice is not None and again.stamp("alice") == alice
    assert first.stamp("bob") != alice

    add_user(path, "bob", "new")  # another user's change leaves alice's stamp alone
    assert Authenticator(load_users(path), stamp_key=STAMP_KEY).stamp("alice") == alice

    add_user(path, "alice", "wonderland")  # the same password again: a new salt, a new entry
    changed = Authenticator(load_users(path), stamp_key=STAMP_KEY)
    assert changed.stamp("alice") not in (None, alice)

    remove_user(path, "alice")
    assert Authenticator(load_users(path), stamp_key=STAMP_KEY).stamp("alice") is None


def test_stamp_depends_on_the_key() -> None:
    users = {"alice": fast_hash("wonderland")}
    one = Authenticator(users, stamp_key=STAMP_KEY).stamp("alice")
    other = Authenticator(users, stamp_key=bytes(32)).stamp("alice")
    assert one is not None and other is not None and one != other


def test_short_stamp_key_is_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        Authenticator({}, stamp_key=b"short")


def test_a_sealed_stamp_revokes_the_token_when_the_user_changes() -> None:
    """The check the gate makes with a Grant: its stamp against the current users' stamp."""
    sealer = TokenSealer()
    old = fast_hash("old")
    before = Authenticator({"alice": old}, stamp_key=STAMP_KEY)
    stamp = before.stamp("alice")
    assert stamp is not None
    token = sealer.seal(Grant("alice", "docker.io", b"Bearer up", stamp=stamp), 10.0)
    grant = sealer.open(token, 0.0)
    assert grant is not None

    def current(auth: Authenticator) -> bool:
        assert grant is not None
        return hmac.compare_digest(grant.stamp, auth.stamp(grant.user) or b"")

    assert current(before)
    assert current(Authenticator({"alice": old, "bob": old}, stamp_key=STAMP_KEY))  # reloaded
    assert not current(Authenticator({"alice": fast_hash("new")}, stamp_key=STAMP_KEY))
    assert not current(Authenticator({}, stamp_key=STAMP_KEY))
