"""Tests for hubproxy.policy.admission: the admission rules, without sockets."""

from __future__ import annotations

import pytest

from hubproxy.policy.access import RateLimiter, client_key, parse_image_rules, parse_networks
from hubproxy.policy.admission import (
    Admission,
    Connection,
    LoginThrottle,
    Reason,
    admit_connection,
    require_login,
)
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


# --- connections -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_ip", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),  # a dual-stack socket's IPv4 peer
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # one host's /64: one key
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("not-an-address", "not-an-address"),
    ],
)
def test_client_key(client_ip: str, key: str) -> None:
    assert client_key(client_ip) == key


@pytest.mark.parametrize(
    ("open_total", "from_client", "idle", "expected"),
    [
        (0, 0, 0, Connection.ACCEPT),
        (9, 3, 0, Connection.ACCEPT),
        (9, 4, 5, Connection.REFUSE_CLIENT),  # the client's cap first, even with room
        (10, 4, 5, Connection.REFUSE_CLIENT),  # and it never closes another's idle one
        (10, 3, 1, Connection.RECLAIM),  # full: an idle connection makes room
        (10, 0, 0, Connection.REFUSE_FULL),  # full and every connection busy
        (12, 0, 3, Connection.RECLAIM),
    ],
)
def test_admit_connection(
    open_total: int, from_client: int, idle: int, expected: Connection
) -> None:
    verdict = admit_connection(
        open_total=open_total,
        open_from_client=from_client,
        max_total=10,
        max_per_client=4,
        idle=idle,
    )
    assert verdict is expected


# --- failed logins -----------------------------------------------------------------------------


def test_login_throttle_table() -> None:
    """10 a minute: ten checks at once, then one every six seconds; right passwords refund."""
    throttle = LoginThrottle(per_minute=10)
    for _ in range(10):
        assert throttle.take("a", 0.0) == 0.0
    assert throttle.take("a", 0.0) == pytest.approx(6.0)  # out: the next token in 6 s
    assert throttle.take("a", 3.0) == pytest.approx(3.0)  # refused takes nothing
    assert throttle.take("b", 3.0) == 0.0  # another address has its own budget
    assert throttle.take("a", 6.0) == 0.0  # one token refilled
    assert throttle.take("a", 6.0) > 0
    throttle.refund("a", 6.0)  # that check found the right password
    assert throttle.take("a", 6.0) == 0.0
    assert throttle.take("a", 66.0) == 0.0  # a minute later: full again
    for _ in range(9):
        assert throttle.take("a", 5.0) == 0.0  # a clock going backwards refills nothing...
    assert throttle.take("a", 5.0) > 0  # ...and drains nothing either


def test_login_throttle_forgets_full_buckets_and_is_bounded() -> None:
    throttle = LoginThrottle(per_minute=6, max_clients=3)
    for client in "abcd":
        assert throttle.take(client, 0.0) == 0.0
    assert len(throttle) == 3  # "a", least recently used, was forgotten: a full bucket again
    throttle.refund("d", 0.0)  # refunded to full: nothing left to remember
    assert len(throttle) == 2
    assert throttle.take("e", 60.0) == 0.0  # the others refilled meanwhile and are forgotten
    assert len(throttle) == 1


def test_login_throttle_off() -> None:
    throttle = LoginThrottle(per_minute=0)
    assert not throttle.enabled
    for _ in range(1000):
        assert throttle.take("a", 0.0) == 0.0
    assert len(throttle) == 0
    with pytest.raises(ValueError, match="0 or more"):
        LoginThrottle(per_minute=-1)


def test_admit_login_answers_429_with_retry_after_per_address() -> None:
    admission = Admission(
        networks=parse_networks([]),
        ops_networks=parse_networks([]),
        images=parse_image_rules([], []),
        limiter=RateLimiter(0.0, 1),
        authenticator=None,
        logins=LoginThrottle(per_minute=2),
    )
    assert admission.admit_login("2001:db8::1", 0.0) is None
    assert admission.admit_login("2001:db8::2", 0.0) is None  # the same /64
    refused = admission.admit_login("2001:db8::3", 0.0)
    assert refused is not None and refused.reason is Reason.LOGIN
    assert isinstance(refused.error, ClientRateLimited)
    assert refused.error.code == "TOOMANYREQUESTS" and refused.error.status == 429
    assert refused.error.headers == ((b"retry-after", b"30"),)
    assert admission.admit_login("192.0.2.1", 0.0) is None  # another address
    admission.login_succeeded("2001:db8::1", 1.0)
    assert admission.admit_login("2001:db8::1", 1.0) is None
