"""policy.proxies: proxy URLs and the SOCKS5 client handshake, as packet traces (RFC 1928,
RFC 1929), each fed whole and one byte at a time."""

from __future__ import annotations

import pytest

from hubproxy.policy.errors import UpstreamProxyFailed
from hubproxy.policy.proxies import (
    REPLY_REASONS,
    ProxyKind,
    Socks5Handshake,
    SocksState,
    UpstreamProxy,
    hide_userinfo,
    parse_proxy_url,
)

PLAIN = UpstreamProxy(ProxyKind.SOCKS5H, "10.0.0.1", 1080)
LOGIN = UpstreamProxy(ProxyKind.SOCKS5, "10.0.0.1", 1080, "bot", "s3cret")
OK_IPV4 = b"\x05\x00\x00\x01\x0a\x00\x00\x01\x04\x38"  # bound to 10.0.0.1:1080
OK_NAME = b"\x05\x00\x00\x03\x05proxy\x04\x38"
OK_IPV6 = b"\x05\x00\x00\x04" + bytes(15) + b"\x01\x04\x38"


def feed(handshake: Socks5Handshake, data: bytes, *, bytewise: bool) -> list[bytes]:
    """Feed ``data`` as the proxy's answers, never more than ``wanted`` at once (as the I/O
    layer reads); return everything the handshake asked to send, the greeting first."""
    sent = [handshake.start()]
    pos = 0
    while pos < len(data):
        size = 1 if bytewise else handshake.wanted
        assert 0 < size <= handshake.wanted
        out = handshake.receive_data(data[pos : pos + size])
        pos += size
        if out:
            sent.append(out)
    return sent


BYTEWISE = pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])


@BYTEWISE
@pytest.mark.parametrize("reply", [OK_IPV4, OK_NAME, OK_IPV6], ids=["ipv4", "name", "ipv6"])
def test_no_authentication_name_sent_to_the_proxy(reply: bytes, bytewise: bool) -> None:
    handshake = Socks5Handshake(PLAIN, "registry-1.docker.io", 443)
    sent = feed(handshake, b"\x05\x00" + reply, bytewise=bytewise)
    assert sent == [
        b"\x05\x01\x00",
        b"\x05\x01\x00\x03\x14registry-1.docker.io\x01\xbb",
    ]
    assert handshake.state is SocksState.OPEN
    assert handshake.wanted == 0


@BYTEWISE
def test_username_and_password(bytewise: bool) -> None:
    handshake = Socks5Handshake(LOGIN, "3.94.224.37", 443, target_name="registry-1.docker.io")
    sent = feed(handshake, b"\x05\x02" + b"\x01\x00" + OK_IPV4, bytewise=bytewise)
    assert sent == [
        b"\x05\x02\x00\x02",
        b"\x01\x03bot\x06s3cret",
        b"\x05\x01\x00\x01\x03\x5e\xe0\x25\x01\xbb",  # the address this machine resolved
    ]
    assert handshake.state is SocksState.OPEN


def test_ipv6_target_and_a_proxy_that_skips_the_login() -> None:
    handshake = Socks5Handshake(LOGIN, "2001:db8::1", 5000)
    sent = feed(handshake, b"\x05\x00" + OK_IPV4, bytewise=False)
    assert (
        sent[1] == b"\x05\x01\x00\x04" + bytes.fromhex("20010db8" + "0" * 22 + "01") + b"\x13\x88"
    )


def test_login_answer_with_version_5_is_accepted() -> None:
    # some servers echo the SOCKS version in RFC 1929's reply; curl and Go accept it
    handshake = Socks5Handshake(LOGIN, "h", 443)
    feed(handshake, b"\x05\x02\x05\x00" + OK_IPV4, bytewise=False)
    assert handshake.state is SocksState.OPEN


@BYTEWISE
@pytest.mark.parametrize("code", [*sorted(REPLY_REASONS), 42])
def test_every_reply_code_is_a_clear_error(code: int, bytewise: bool) -> None:
    handshake = Socks5Handshake(PLAIN, "registry-1.docker.io", 443)
    reply = bytes([5, code]) + OK_IPV4[2:]
    with pytest.raises(UpstreamProxyFailed) as caught:
        feed(handshake, b"\x05\x00" + reply, bytewise=bytewise)
    reason = REPLY_REASONS.get(code, "unknown reason")
    assert str(caught.value) == (
        "SOCKS5 proxy 10.0.0.1:1080 refused the connection to registry-1.docker.io:443: "
        f"{reason} (reply {code})"
    )
    assert caught.value.status == 502
    assert handshake.state is SocksState.FAILED


def test_refusal_is_read_from_its_first_two_bytes() -> None:
    # a proxy may close right after VER REP: the reason must not be lost waiting for the rest
    handshake = Socks5Handshake(PLAIN, "h", 443)
    feed(handshake, b"\x05\x00", bytewise=False)
    assert handshake.wanted == 2
    with pytest.raises(UpstreamProxyFailed, match=r"host unreachable \(reply 4\)"):
        handshake.receive_data(b"\x05\x04")


@pytest.mark.parametrize(
    ("proxy", "answers", "message"),
    [
        (PLAIN, b"\x05\x02", "wants a username and password: give them in the proxy URL"),
        (PLAIN, b"\x05\xff", "wants a username and password"),
        (LOGIN, b"\x05\xff", "accepts neither no authentication nor username/password"),
        (PLAIN, b"\x05\x01", "chose authentication method 1, which was not offered"),
        (PLAIN, b"\x04\x00", "does not speak SOCKS5 (it answered version 4)"),
        (PLAIN, b"HTTP/1.1 400", "does not speak SOCKS5 (it answered version 72)"),
        (LOGIN, b"\x05\x02\x01\x01", "refused the username and password"),
        (LOGIN, b"\x05\x02\x09\x00", "answered the login with version 9"),
        (PLAIN, b"\x05\x00\x04\x00\x00\x01", "answered CONNECT with version 4"),
        (PLAIN, b"\x05\x00\x05\x00\x00\x07\x00", "answered CONNECT with address type 7"),
    ],
)
def test_protocol_failures(proxy: UpstreamProxy, answers: bytes, message: str) -> None:
    handshake = Socks5Handshake(proxy, "registry-1.docker.io", 443)
    with pytest.raises(UpstreamProxyFailed) as caught:
        feed(handshake, answers, bytewise=True)
    assert message in str(caught.value)
    assert str(caught.value).startswith("SOCKS5 proxy 10.0.0.1:1080 ")
    assert "s3cret" not in str(caught.value) and "bot" not in str(caught.value)


@pytest.mark.parametrize("answers", [b"", b"\x05\x00", b"\x05\x00\x05\x00\x00"])
def test_proxy_closing_mid_handshake(answers: bytes) -> None:
    handshake = Socks5Handshake(PLAIN, "h", 443)
    feed(handshake, answers, bytewise=False)
    with pytest.raises(UpstreamProxyFailed, match="closed the connection during the SOCKS5"):
        handshake.receive_data(b"")


def test_bytes_after_the_handshake_are_refused() -> None:
    handshake = Socks5Handshake(PLAIN, "h", 443)
    feed(handshake, b"\x05\x00" + OK_IPV4, bytewise=False)
    with pytest.raises(UpstreamProxyFailed, match="sent more than its handshake"):
        handshake.receive_data(b"x")


def test_a_name_too_long_for_socks() -> None:
    handshake = Socks5Handshake(PLAIN, "a" * 256, 443)
    handshake.start()
    with pytest.raises(UpstreamProxyFailed, match="cannot be sent to a SOCKS5 proxy"):
        handshake.receive_data(b"\x05\x00")


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("socks5://u:p@h:1", "socks5://***@h:1"),
        ("socks5://u:p@x@h:1/path", "socks5://***@h:1/path"),
        ("http://h:3128", "http://h:3128"),
        ("no scheme u:p@h", "no scheme u:p@h"),
        ("http://h/a@b", "http://h/a@b"),
    ],
)
def test_hide_userinfo(text: str, shown: str) -> None:
    assert hide_userinfo(text) == shown


def test_proxy_str_and_repr_hide_the_login() -> None:
    proxy = parse_proxy_url("socks5h://bot:s3cret@[2001:db8::2]")
    assert str(proxy) == "socks5h://***@[2001:db8::2]:1080"
    assert proxy.label == "SOCKS5 proxy [2001:db8::2]:1080"
    assert "s3cret" not in repr(proxy) and "bot" not in repr(proxy)
    assert str(parse_proxy_url("http://proxy:3128")) == "http://proxy:3128"
    assert parse_proxy_url("http://proxy").port == 80
