"""Tests for hubproxy.gate: the admission rules and token sealing, without sockets."""

from __future__ import annotations

import base64
import json

import pytest

from hubproxy.config import Config
from hubproxy.errors import AccessDenied, ClientRateLimited, MirrorUnauthorized, UpstreamUnavailable
from hubproxy.gate import MAX_TOKEN_LIFETIME, Gate, seal_token_response, without_authorization
from hubproxy.passwords import hash_password
from hubproxy.sealing import Grant, TokenSealer


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


gate_hash = hash_password("pw", n=2**4)


@pytest.fixture
def gate() -> Gate:
    config = Config(
        allow=("10.0.0.0/8",),
        ops_allow=("10.0.0.1",),
        client_rate_limit=1.0,
        client_burst=2,
        images_deny=("library/busybox",),
    )
    return Gate(config, users={"alice": gate_hash})


def test_rules_in_order(gate: Gate) -> None:
    with pytest.raises(AccessDenied):
        gate.admit_client("192.168.1.1", 0.0)
    gate.admit_client("10.1.1.1", 0.0)
    gate.admit_client("10.1.1.1", 0.0)
    with pytest.raises(ClientRateLimited) as caught:
        gate.admit_client("10.1.1.1", 0.0)
    assert caught.value.headers == ((b"retry-after", b"1"),)
    gate.admit_client("10.1.1.1", 1.0)  # refilled
    gate.admit_ops("10.0.0.1")
    with pytest.raises(AccessDenied):
        gate.admit_ops("10.0.0.2")
    gate.admit_image("docker.io", "library/nginx")
    with pytest.raises(AccessDenied):
        gate.admit_image("docker.io", "library/busybox")


def test_authenticate(gate: Gate) -> None:
    sealed = gate.sealer.seal(Grant("alice", "docker.io", b"Bearer upstream-token"), 100.0)
    identity = gate.authenticate(
        [(b"authorization", b"Bearer " + sealed.encode())],
        50.0,
        basic_user=None,
    )
    assert identity is not None and identity.user == "alice"
    assert identity.upstream_authorization == b"Bearer upstream-token"
    anonymous = gate.sealer.seal(Grant("alice", "docker.io"), 100.0)  # no upstream token
    identity = gate.authenticate(
        [(b"authorization", b"Bearer " + anonymous.encode())],
        50.0,
        basic_user=None,
    )
    assert identity is not None and identity.upstream_authorization is None
    identity = gate.authenticate([], 50.0, basic_user="alice")
    assert identity is not None and identity.upstream_authorization is None
    for headers in ([], [(b"authorization", b"Bearer " + sealed.encode())]):
        with pytest.raises(MirrorUnauthorized) as caught:
            gate.authenticate(headers, 200.0, basic_user=None)  # expired
        assert caught.value.status == 401
    with pytest.raises(MirrorUnauthorized):
        gate.authenticate(
            [(b"authorization", b"Bearer upstream-token")],
            50.0,
            basic_user=None,
        )
    assert Gate(Config()).authenticate([], 0.0, basic_user=None) is None


async def test_basic_user_runs_scrypt_off_the_loop_and_remembers(gate: Gate) -> None:
    assert await gate.basic_user([(b"authorization", basic("alice", "pw"))]) == "alice"
    assert await gate.basic_user([(b"authorization", basic("alice", "nope"))]) is None
    assert await gate.basic_user([(b"authorization", b"Bearer x")]) is None
    assert await gate.basic_user([]) is None
    assert gate.require_login("alice") == "alice"
    with pytest.raises(MirrorUnauthorized) as caught:
        gate.require_login(None)
    assert caught.value.headers[0][1].startswith(b"Basic ")


def test_refusals_are_logged_once_a_minute_per_client(gate: Gate) -> None:
    assert gate.should_log("1.2.3.4", 0.0)
    assert not gate.should_log("1.2.3.4", 59.0)
    assert gate.should_log("5.6.7.8", 59.0)
    assert gate.should_log("1.2.3.4", 60.0)


@pytest.mark.parametrize(
    ("document", "lifetime"),
    [
        ({"token": "t", "expires_in": 300, "issued_at": "2026-11-28T10:00:00Z"}, 300),
        ({"access_token": "t"}, 60),  # no expires_in: the token spec's 60 s
        ({"token": "t", "expires_in": True}, 60),
        ({"token": "t", "expires_in": -5}, 60),
        ({"token": "t", "expires_in": 10**9}, MAX_TOKEN_LIFETIME),
        ({"token": ""}, 60),
    ],
)
def test_seal_token_response(document: dict[str, object], lifetime: float) -> None:
    sealer = TokenSealer()
    body = json.dumps(document).encode()
    answer = json.loads(seal_token_response(sealer, "bob", body, 1000.0, registry="ghcr.io"))
    assert answer["token"] == answer["access_token"] and answer["token"].startswith("hp1.")
    assert answer["expires_in"] == int(lifetime)
    assert answer.get("issued_at") == document.get("issued_at")
    upstream = b"Bearer t" if document.get("token", "t") else None
    assert sealer.open(answer["token"], 1000.0 + lifetime - 1) == Grant("bob", "ghcr.io", upstream)
    assert sealer.open(answer["token"], 1000.0 + lifetime) is None


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"token": 5}',
        b'"x"',
        json.dumps({"token": "x" * 20000}).encode(),
        json.dumps({"token": "t\u20ac"}).encode(),  # not a header value: beyond latin-1
    ],
)
def test_unusable_token_answers_are_upstream_failures(body: bytes) -> None:
    with pytest.raises(UpstreamUnavailable):
        seal_token_response(TokenSealer(), "bob", body, 0.0, registry="docker.io")


def test_without_authorization() -> None:
    headers = [(b"host", b"m"), (b"authorization", b"Basic x"), (b"accept", b"*/*")]
    assert without_authorization(headers, None) == [(b"host", b"m"), (b"accept", b"*/*")]
    assert without_authorization(headers, b"Bearer y")[-1] == (b"authorization", b"Bearer y")


def test_sealed_token_carries_the_registry_and_the_users_stamp(gate: Gate) -> None:
    stamp = gate.stamp("alice")
    assert len(stamp) == 16 and gate.stamp("nobody") == b""
    body = json.dumps({"token": "t"}).encode()
    answer = json.loads(
        seal_token_response(gate.sealer, "alice", body, 0.0, registry="ghcr.io", stamp=stamp)
    )
    assert gate.sealer.open(answer["token"], 1.0) == Grant(
        "alice", "ghcr.io", b"Bearer t", stamp=stamp
    )
    # a SIGHUP with the same entry keeps the stamp; a new password changes it
    gate.reload_users({"alice": gate_hash})
    assert gate.stamp("alice") == stamp
    gate.reload_users({"alice": hash_password("new", n=2**4)})
    assert gate.stamp("alice") not in (b"", stamp)
    assert Gate(Config()).stamp("alice") == b""
