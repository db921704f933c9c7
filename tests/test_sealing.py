"""Tests for hubproxy.policy.sealing: the sealed token format, pinned by known answers, and every
way a token that is not ours, not intact, not canonical, not current or not well formed is refused.

``spec_seal`` rebuilds a token from the construction the module docstring states, with nothing
but hashlib, hmac and json: it checks the implementation against its description, and it lets
the tests seal plaintexts the sealer would never produce (to test that open checks their shape
even behind a valid tag).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hubproxy.policy.credentials import MAX_AUTHORIZATION, bearer_token
from hubproxy.policy.sealing import MAX_SEALED, SEALED_PREFIX, Grant, TokenSealer, is_sealed

UPSTREAM = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSIsImFjY2VzcyI6W119.c2lnbmF0dXJlLWJ5dGVz"
BEARER = b"Bearer " + UPSTREAM.encode()
KEY = bytes(range(32))
NONCE = bytes(range(100, 116))
STAMP = bytes(range(16))


def grant(user: str = "alice", upstream: bytes | None = BEARER, **changes: Any) -> Grant:
    base = Grant(user, registry="docker.io", upstream=upstream, stamp=STAMP if user else b"")
    return dataclasses.replace(base, **changes)


def raw_of(token: str) -> bytes:
    body = token[len(SEALED_PREFIX) :]
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


def spell(raw: bytes) -> str:
    return SEALED_PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def spec_seal(key: bytes, nonce: bytes, plaintext: bytes) -> str:
    """A token sealed the way the module docstring says, independently of the module."""
    enc = hmac.digest(key, b"hubproxy token encryption", "sha256")
    mac = hmac.digest(key, b"hubproxy token authentication", "sha256")
    keystream = hashlib.shake_256(enc + nonce).digest(len(plaintext))
    ciphertext = bytes(a ^ b for a, b in zip(plaintext, keystream, strict=True))
    tag = hmac.digest(mac, b"hp1." + nonce + ciphertext, "sha256")
    return spell(nonce + ciphertext + tag)


def spec_plaintext(**fields: object) -> bytes:
    document: dict[str, object] = {
        "u": "alice",
        "r": "docker.io",
        "t": BEARER.decode(),
        "o": False,
        "s": base64.b64encode(STAMP).decode(),
        "e": 1000.0,
    }
    document.update(fields)
    return json.dumps(document, separators=(",", ":")).encode()


# --- known answers ---------------------------------------------------------------------------

KNOWN_ANSWERS = [
    (
        grant(),
        1_700_000_000.0,
        "hp1.ZGVmZ2hpamtsbW5vcHFycxU3CkAb0taGpPA9NkbXsVIJU3BbFqVjI2LyzPUnL2rIRabnchdnFekEMNWvUIPp"
        "6-SmBu_wHN1tntU9PrsHzuzKTsEH3DGg-i-VGaGYQqTrJhT4rKgTyFTTkKHwGZVfzNCYNwUx9yco_sb4hMYXJyS6"
        "dHWoyylcTkBdkEEUM3UuiAxAjs4LzH58ayU3z64FttALaCO-pKDx1Pj_G6tFRTO4oFwrBCyTThrJQ8CfzLqZoOym"
        "NRZqoGKgqto8--G2QVEEf3vcHQ4SpOfjuSteQNp8bvM",
    ),
    (
        Grant("", registry="ghcr.io", upstream=b"Basic b3A6cHc=", operator=True),
        1.5,
        "hp1.ZGVmZ2hpamtsbW5vcHFycxU3CkAb0pXG7-F6LkiSqxNBX31bV-IkJW6hgZVqfneJX-aWVkB2OPgZd4DHV8OU"
        "_P-cComBOoUejbl4VucLkaSuAdj64frM-J3vXY87qIljww_gH8HQfrOLKHCZYL9S99kN0g",
    ),
]


@pytest.mark.parametrize(("sealed", "expires_at", "expected"), KNOWN_ANSWERS)
def test_known_answer(sealed: Grant, expires_at: float, expected: str) -> None:
    sealer = TokenSealer(KEY)
    token = sealer.seal(sealed, expires_at, nonce=NONCE)
    assert token == expected
    assert sealer.open(expected, expires_at - 1) == sealed
    assert sealer.open(expected, expires_at) is None


@pytest.mark.parametrize(("sealed", "expires_at", "expected"), KNOWN_ANSWERS)
def test_known_answer_follows_the_documented_construction(
    sealed: Grant, expires_at: float, expected: str
) -> None:
    upstream = None if sealed.upstream is None else sealed.upstream.decode("latin-1")
    plaintext = spec_plaintext(
        u=sealed.user,
        r=sealed.registry,
        t=upstream,
        o=sealed.operator,
        s=base64.b64encode(sealed.stamp).decode(),
        e=expires_at,
    )
    assert spec_seal(KEY, NONCE, plaintext) == expected


def test_seal_refuses_a_nonce_of_the_wrong_size() -> None:
    for nonce in (b"", bytes(15), bytes(17)):
        with pytest.raises(ValueError, match="16 bytes"):
            TokenSealer(KEY).seal(grant(), 10.0, nonce=nonce)


# --- round trips -----------------------------------------------------------------------------


def test_seal_round_trip() -> None:
    sealer = TokenSealer()
    token = sealer.seal(grant(), expires_at=1000.0)
    assert token.startswith("hp1.") and is_sealed(token)
    assert bearer_token(b"Bearer " + token.encode()) == token
    assert sealer.open(token, now=999.9) == grant()
    assert sealer.open(token, now=1000.0) is None  # expired
    assert sealer.open(token, now=5000.0) is None


@pytest.mark.parametrize(
    "sealed",
    [
        grant("alice", None),  # anonymous upstream
        grant("alice", b""),  # kept apart from None
        grant("jörg@example.com", b"Bearer " + b"x" * 4000),
        grant("a", b'Bearer {"json": "inside"}'),
        grant("b", "🔑".encode()),
        grant("c", bytes(range(256))),  # any byte survives
        grant("", None),  # a client that did not log in to the mirror
        grant("d", b"Basic b3A6cHc=", operator=True, registry="ghcr.io"),
        grant("e", stamp=b""),
        grant("\udcff", registry="odd\u2028name"),
    ],
)
def test_seal_round_trip_odd_values(sealed: Grant) -> None:
    sealer = TokenSealer()
    assert sealer.open(sealer.seal(sealed, 10.0), 0.0) == sealed


def test_seals_differ_each_time() -> None:
    sealer = TokenSealer()
    assert sealer.seal(grant(), 10.0) != sealer.seal(grant(), 10.0)


def test_registry_operator_and_stamp_are_carried() -> None:
    """What the caller needs to refuse a token for another registry, a push with an operator's
    token, or a revoked user: each field comes back exactly as sealed."""
    sealer = TokenSealer(KEY)
    for changed in (
        grant(registry="ghcr.io"),
        grant(operator=True),
        grant(stamp=bytes(16)),
        grant(upstream=b"Basic b3A6cHc="),
    ):
        opened = sealer.open(sealer.seal(changed, 10.0, nonce=NONCE), 0.0)
        assert opened == changed and opened != grant()


def test_grant_repr_hides_the_upstream_credential() -> None:
    secret = grant(upstream=b"Bearer s3cret-upstream-token")
    for shown in (repr(secret), str(secret), f"{secret}", f"{secret!r}"):
        assert "s3cret" not in shown
        assert "alice" in shown and "docker.io" in shown


# --- refusals --------------------------------------------------------------------------------


def test_any_altered_character_is_refused() -> None:
    sealer = TokenSealer()
    token = sealer.seal(grant(), expires_at=1000.0)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for index, char in enumerate(token):
        for replacement in {alphabet[(alphabet.find(char) + 1) % 64], "A", "_", char.swapcase()}:
            if replacement == char:
                continue
            altered = token[:index] + replacement + token[index + 1 :]
            assert sealer.open(altered, now=0.0) is None, (index, replacement)
    assert sealer.open(token[:-1], now=0.0) is None
    assert sealer.open(token + "A", now=0.0) is None
    assert sealer.open(token + "=", now=0.0) is None
    assert sealer.open(token, now=0.0) == grant()


def test_any_altered_byte_is_refused() -> None:
    sealer = TokenSealer(KEY)
    token = sealer.seal(grant(upstream=b"up"), expires_at=1000.0, nonce=NONCE)
    raw = raw_of(token)
    for index in range(len(raw)):
        for flip in (0x01, 0x80, 0xFF):
            altered = bytearray(raw)
            altered[index] ^= flip
            assert sealer.open(spell(bytes(altered)), now=0.0) is None, (index, flip)
    # cut or lengthened anywhere
    for cut in range(len(raw)):
        assert sealer.open(spell(raw[:cut] + raw[cut + 1 :]), now=0.0) is None
        assert sealer.open(spell(raw[:cut] + b"\0" + raw[cut:]), now=0.0) is None
    assert sealer.open(token, now=0.0) == grant(upstream=b"up")


def test_other_key_is_refused_and_shared_key_works() -> None:
    token = TokenSealer(KEY).seal(grant(), 10.0)
    assert TokenSealer().open(token, 0.0) is None
    assert TokenSealer(bytes(32)).open(token, 0.0) is None
    assert TokenSealer(KEY[:-1] + b"\x00").open(token, 0.0) is None  # one byte off
    assert TokenSealer(KEY).open(token, 0.0) == grant()


@pytest.mark.parametrize("expires_at", [float("nan"), float("inf"), -float("inf")])
def test_seal_refuses_non_finite_expiry(expires_at: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        TokenSealer().seal(grant(), expires_at)


def test_expiry_is_exclusive_and_exact() -> None:
    sealer = TokenSealer(KEY)
    token = sealer.seal(grant(), 1000.5)
    assert sealer.open(token, 1000.4999) == grant()
    assert sealer.open(token, 1000.5) is None
    assert sealer.open(token, 1e300) is None
    # an expiry in the past seals fine and never opens
    assert sealer.open(sealer.seal(grant(), -1.0), -2.0) == grant()
    assert sealer.open(sealer.seal(grant(), 0.0), 0.0) is None


def test_seal_refuses_what_open_would_refuse() -> None:
    sealer = TokenSealer()
    long_upstream = b"Bearer " + b"x" * 11000
    assert sealer.open(sealer.seal(grant(upstream=long_upstream), 10.0), 0.0) == grant(
        upstream=long_upstream
    )
    with pytest.raises(ValueError, match="too long"):
        sealer.seal(grant(upstream=b"Bearer " + b"x" * 13000), 10.0)


def test_a_docker_hub_sized_token_fits_in_an_authorization_header() -> None:
    """A client presents the sealed token as ``Authorization: Bearer``, which is refused above
    MAX_AUTHORIZATION: an upstream JWT of 2.5 KB must still fit once sealed."""
    token = TokenSealer().seal(grant(upstream=b"Bearer " + b"x" * 2500), 10.0)
    assert len(b"Bearer " + token.encode()) <= MAX_AUTHORIZATION
    assert bearer_token(b"Bearer " + token.encode()) == token
    assert len(token) <= MAX_SEALED


def test_short_key_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        TokenSealer(b"short")


def test_non_canonical_base64_is_refused() -> None:
    """The last base64 digit of a body whose length is not a multiple of 3 bytes has unused
    low bits; setting them spells the same bytes differently, and that spelling is refused."""
    sealer = TokenSealer(KEY)
    for user in ("a", "ab", "abc"):  # at least one of these lengths leaves unused bits
        token = sealer.seal(grant(user), 10.0, nonce=NONCE)
        if len(raw_of(token)) % 3 == 0:
            continue
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        last = alphabet.index(token[-1])
        unused = 0b1111 if len(raw_of(token)) % 3 == 1 else 0b11
        assert last & unused == 0
        for bits in range(1, unused + 1):
            odd = token[:-1] + alphabet[last | bits]
            assert raw_of(odd) == raw_of(token)  # the same bytes ...
            assert sealer.open(odd, 0.0) is None  # ... spelled differently: refused
        padded = token + "=" * (-len(token[4:]) % 4)
        assert sealer.open(padded, 0.0) is None
        assert sealer.open(token, 0.0) == grant(user)
        break
    else:
        pytest.fail("no length with unused bits")


def encodings(secret: bytes) -> Iterator[bytes]:
    """The secret as it could show up in a token: raw, hex, and base64 at every alignment."""
    yield secret
    yield secret.hex().encode()
    encoders: list[Callable[[bytes], bytes]] = [base64.b64encode, base64.urlsafe_b64encode]
    for encode in encoders:
        for shift in range(3):
            # Characters fully determined by the secret alone, whatever precedes it.
            encoded = encode(b"\0" * shift + secret).rstrip(b"=")
            yield encoded[shift + 1 : -2]


def test_upstream_token_is_not_readable_in_the_sealed_token() -> None:
    sealer = TokenSealer()
    secret = UPSTREAM.encode()
    for user in ("alice", "x" * 7, "yy"):  # several alignments of the token inside the payload
        token = sealer.seal(grant(user), 10.0).encode()
        for form in encodings(secret):
            assert len(form) > 20
            assert form not in token
        # also not recoverable by decoding the body without the key
        body = token[4:]
        raw = base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4))
        assert secret not in raw and b"alice" not in raw and b"docker.io" not in raw


@pytest.mark.parametrize(
    "token",
    [
        "",
        "hp1.",
        "hp1",
        "HP1.AAAA",
        "hp2." + "A" * 100,
        "hp1.!!!!",
        "hp1.AAAA",
        "hp1." + "A" * 200,
        "hp1.AAAA=",
        "hp1.A",
        "hp1." + "A" * 20000,
        "eyJhbGciOiJIUzI1NiJ9.e30.sig",
    ],
)
def test_malformed_tokens_are_refused(token: str) -> None:
    assert TokenSealer().open(token, 0.0) is None


@given(st.text(max_size=300))
def test_open_never_raises(token: str) -> None:
    sealer = TokenSealer(bytes(32))
    assert sealer.open(token, 0.0) is None
    assert sealer.open("hp1." + token, 0.0) is None


def test_spec_seal_matches_the_sealer() -> None:
    """The helper below is right: a well-formed plaintext it seals opens."""
    token = spec_seal(KEY, NONCE, spec_plaintext())
    assert TokenSealer(KEY).open(token, 0.0) == grant()
    assert TokenSealer(KEY).seal(grant(), 1000.0, nonce=NONCE) == token


@pytest.mark.parametrize(
    "plaintext",
    [
        b"",
        b"not json",
        b"[]",
        b'"alice"',
        b"null",
        json.dumps({"u": "alice", "t": None, "e": 1000.0}).encode(),  # the hp1 format of old
        spec_plaintext()[:-1],  # cut JSON
        spec_plaintext(x=1),  # an unknown field
        *(
            json.dumps(
                {k: v for k, v in json.loads(spec_plaintext()).items() if k != name}
            ).encode()
            for name in ("u", "r", "t", "o", "s", "e")
        ),  # each field missing
        spec_plaintext(u=None),
        spec_plaintext(u=5),
        spec_plaintext(r=None),
        spec_plaintext(r=["docker.io"]),
        spec_plaintext(t=5),
        spec_plaintext(t=["Bearer x"]),
        spec_plaintext(t="Bearer \u20ac"),  # not a byte: beyond latin-1
        spec_plaintext(o=1),
        spec_plaintext(o="true"),
        spec_plaintext(o=None),
        spec_plaintext(s=None),
        spec_plaintext(s="!!"),
        spec_plaintext(s="AAE"),  # unpadded
        spec_plaintext(s="AAF="),  # non-canonical: unused bits set
        spec_plaintext(s="\u00e9AAA"),
        spec_plaintext(e=True),
        spec_plaintext(e="2000"),
        spec_plaintext(e=None),
        spec_plaintext(e=float("nan")),
        spec_plaintext(e=float("inf")),
        spec_plaintext(e=0.0),  # expired
    ],
)
def test_authentic_but_ill_formed_plaintext_is_refused(plaintext: bytes) -> None:
    assert TokenSealer(KEY).open(spec_seal(KEY, NONCE, plaintext), 0.0) is None
