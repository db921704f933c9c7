"""Tests for hubproxy.policy.admission: the admission rules, without sockets."""

from __future__ import annotations

import pytest

from hubproxy.policy.access import RateLimiter, parse_image_rules, parse_networks
from hubproxy.policy.admission import Admission, Reason, require_login
from hubproxy.policy.credentials import Authenticator
from hubproxy.policy.errors import AccessDenied, ClientRateLimited, MirrorUnauthorized
from hubproxy.policy.passwords import hash_password

KEY = b"k" * 32


def make(users: dict[str, str] | None = None) -> Admission:
    return Admission(
        networks=parse_networks(["10.0.0.0/8"]),
        ops_networks=parse_networks(["10.0.0.1"]),
        images=parse_image_rules([], ["library/busybox"]),
        limiter=RateLimiter(1.0, 2),
        authenticator=Authenticator(users, stamp_key=KEY) if users is not None else None,
    )


def test_rules_in_order() -> None:
    admission = make()
    refused = admission.admit_client("192.168.1.1", 0.0)
    assert refused is not None and refused.reason is Reason.NETWORK
    assert isinstance(refused.error, AccessDenied)
    assert admission.admit_client("10.1.1.1", 0.0) is None
    assert admission.admit_client("10.1.1.1", 0.0) is None
    refused = admission.admit_client("10.1.1.1", 0.0)
    assert refused is not None and refused.reason is Reason.RATE
    assert isinstance(refused.error, ClientRateLimited)
    assert refused.error.headers == ((b"retry-after", b"1"),)
    assert admission.admit_client("10.1.1.1", 1.0) is None  # refilled
    assert admission.admit_ops("10.0.0.1") is None
    refused = admission.admit_ops("10.0.0.2")
    assert refused is not None and refused.reason is Reason.NETWORK
    assert admission.admit_image("docker.io", "library/nginx") is None
    refused = admission.admit_image("docker.io", "library/busybox")
    assert refused is not None and refused.reason is Reason.IMAGE


def test_an_open_mirror_checks_nothing() -> None:
    admission = Admission(
        networks=parse_networks([]),
        ops_networks=parse_networks([]),
        images=parse_image_rules([], []),
        limiter=RateLimiter(0.0, 1),
        authenticator=None,
    )
    assert not admission.checks_clients
    assert not admission.checks_ops
    assert not admission.checks_images
    assert not admission.requires_login
    assert admission.stamp("alice") is None


def test_reload_changes_stamps_of_changed_users_only() -> None:
    alice, bob = hash_password("pw", n=2**4), hash_password("pw", n=2**4)
    admission = make({"alice": alice, "bob": bob})
    before = admission.stamp("alice"), admission.stamp("bob")
    assert None not in before
    admission.reload_users(
        Authenticator({"alice": alice, "bob": hash_password("new", n=2**4)}, stamp_key=KEY)
    )
    assert admission.stamp("alice") == before[0]
    assert admission.stamp("bob") != before[1]
    admission.reload_users(Authenticator({"bob": bob}, stamp_key=KEY))
    assert admission.stamp("alice") is None


def test_require_login_says_whether_a_login_was_wrong() -> None:
    assert require_login("alice", None) == "alice"
    with pytest.raises(MirrorUnauthorized) as none:
        require_login(None, None)
    with pytest.raises(MirrorUnauthorized) as wrong:
        require_login(None, b"Basic YWxpY2U6bm9wZQ==")
    assert none.value.headers[0][1].startswith(b"Basic ")
    assert "wrong" in wrong.value.message and "wrong" not in none.value.message


def test_refusals_are_logged_once_a_minute_per_client() -> None:
    admission = make()
    assert admission.should_log("1.2.3.4", 0.0)
    assert not admission.should_log("1.2.3.4", 59.0)
    assert admission.should_log("5.6.7.8", 59.0)
    assert admission.should_log("1.2.3.4", 60.0)
