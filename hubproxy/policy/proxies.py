"""Upstream proxies: their URLs (``http://`` CONNECT, ``socks5://``, ``socks5h://``) and the
SOCKS5 client handshake as a state machine with no I/O.

Theory of operation
-------------------
:func:`parse_proxy_url` turns ``--upstream-proxy`` / ``--registry-proxy`` text into an
:class:`UpstreamProxy`. A SOCKS5 proxy may carry a username and password (RFC 1929); they are
kept out of ``repr``, ``str`` and every error message, so a log line or a refused flag never
shows them.

:class:`Socks5Handshake` is the client side of RFC 1928, h11's way: the I/O layer sends what
:meth:`~Socks5Handshake.start` returns, then reads at most :attr:`~Socks5Handshake.wanted` bytes
and feeds them to :meth:`~Socks5Handshake.receive_data`, sending whatever it returns, until the
state is ``OPEN``. Reading no more than ``wanted`` means the handshake never swallows a byte of
the tunnelled stream behind it. Every refusal becomes an :class:`UpstreamProxyFailed` naming the
proxy, the target and the reason in words.

``socks5`` and ``socks5h`` differ only in who resolves the target's name (curl's spelling): with
``socks5`` this machine resolves it and the proxy gets an address; with ``socks5h`` the proxy
gets the name (address type 3) and resolves it, which is what a proxy into another network (or
one that keeps DNS private) wants.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from .errors import UpstreamProxyFailed

__all__ = [
    "ProxyKind",
    "Socks5Handshake",
    "SocksState",
    "UpstreamProxy",
    "hide_userinfo",
    "parse_proxy_url",
]

SOCKS_VERSION = 5
AUTH_VERSION = 1  # RFC 1929's sub-negotiation version
METHOD_NONE = 0x00
METHOD_PASSWORD = 0x02
METHOD_REFUSED = 0xFF
COMMAND_CONNECT = 0x01
ADDRESS_IPV4 = 0x01
ADDRESS_NAME = 0x03
ADDRESS_IPV6 = 0x04
MAX_FIELD = 255  # a username, password or host name is sent with a one-byte length

# RFC 1928 section 6: the REP field of a reply
REPLY_REASONS = {
    1: "general SOCKS server failure",
    2: "connection not allowed by the proxy's rules",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused by the target",
    6: "TTL expired",
    7: "command not supported",
    8: "address type not supported",
}


class ProxyKind(enum.Enum):
    HTTP = "http"  # HTTP CONNECT (RFC 9110 section 9.3.6)
    SOCKS5 = "socks5"  # this machine resolves the target
    SOCKS5H = "socks5h"  # the proxy resolves the target

    @property
    def default_port(self) -> int:
        return 80 if self is ProxyKind.HTTP else 1080


@dataclass(frozen=True)
class UpstreamProxy:
    """Where an upstream connection is tunnelled through; ``str`` hides any login."""

    kind: ProxyKind
    host: str  # lowercase; an IPv6 literal without brackets
    port: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        """``host:port`` as it appears in messages (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def is_socks(self) -> bool:
        return self.kind is not ProxyKind.HTTP

    @property
    def label(self) -> str:
        """How messages name it: ``SOCKS5 proxy 10.0.0.1:1080``, ``proxy 10.0.0.1:3128``."""
        return f"SOCKS5 proxy {self.address}" if self.is_socks else f"proxy {self.address}"

    def __str__(self) -> str:
        login = "***@" if self.username is not None else ""
        return f"{self.kind.value}://{login}{self.address}"


def parse_proxy_url(text: str) -> UpstreamProxy:
    """``http://host[:port]``, ``socks5://[user:pass@]host[:port]`` or ``socks5h://...``.

    Raises ValueError, whose message never contains the login."""
    shown = hide_userinfo(text.strip())
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        raise ValueError(f"not a proxy URL: {shown!r}") from None
    try:
        kind = ProxyKind(parts.scheme.lower())
    except ValueError:
        raise ValueError(
            f"not a proxy URL: {shown!r} (use http://HOST:PORT for an HTTP CONNECT proxy, "
            "socks5://HOST:PORT or socks5h://HOST:PORT for a SOCKS5 one)"
        ) from None
    host = (parts.hostname or "").lower()
    if not host:
        raise ValueError(f"the proxy URL {shown!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"a proxy URL is only a scheme, host and port: {shown!r}")
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    if username is not None and kind is ProxyKind.HTTP:
        raise ValueError(
            f"{shown!r}: a login for an HTTP proxy is not supported (a SOCKS5 proxy's is)"
        )
    if username is not None:
        if password is None:
            raise ValueError(f"{shown!r}: give the login as user:password@")
        for what, value in (("username", username), ("password", password)):
            if not 1 <= len(value.encode()) <= MAX_FIELD:
                raise ValueError(f"{shown!r}: the SOCKS5 {what} must be 1 to 255 bytes")
    return UpstreamProxy(kind, host, port or kind.default_port, username, password)


def hide_userinfo(text: str) -> str:
    """``text`` with any ``user:password@`` after ``//`` replaced by ``***@``: safe to print."""
    scheme, sep, rest = text.partition("//")
    if not sep:
        return text
    authority_end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=-1)
    authority = rest if authority_end < 0 else rest[:authority_end]
    if "@" not in authority:
        return text
    return f"{scheme}//***@{rest[authority.rindex('@') + 1 :]}"


class SocksState(enum.Enum):
    GREETING = "greeting"  # the method offer is sent; waiting for the proxy's choice
    LOGIN = "login"  # username and password sent; waiting for the verdict (RFC 1929)
    CONNECT = "connect"  # the CONNECT request sent; waiting for the reply
    OPEN = "open"  # the tunnel is up: the stream now carries the target's bytes
    FAILED = "failed"


class Socks5Handshake:
    """The client side of a SOCKS5 CONNECT (RFC 1928), with RFC 1929's username/password.

    ``target_host`` is what the proxy is asked to connect to: a name (``socks5h``) or the
    address this machine resolved (``socks5``); ``target_name`` is the name for messages.
    """

    def __init__(
        self,
        proxy: UpstreamProxy,
        target_host: str,
        target_port: int,
        *,
        target_name: str | None = None,
    ) -> None:
        self.proxy = proxy
        self.target_host = target_host
        self.target_port = target_port
        name = target_name or target_host
        self._target = f"[{name}]:{target_port}" if ":" in name else f"{name}:{target_port}"
        self.state = SocksState.GREETING
        self._buffer = b""

    def start(self) -> bytes:
        """The method offer: no authentication, and username/password when we have a login."""
        methods = [METHOD_NONE]
        if self.proxy.username is not None:
            methods.append(METHOD_PASSWORD)
        return bytes([SOCKS_VERSION, len(methods), *methods])

    @property
    def wanted(self) -> int:
        """How many more bytes the current answer needs (0 once open or failed): read at most
        this many, so no tunnelled byte is taken for handshake."""
        if self.state in (SocksState.GREETING, SocksState.LOGIN):
            return 2 - len(self._buffer)
        if self.state is SocksState.CONNECT:
            return _reply_length(self._buffer) - len(self._buffer)
        return 0

    def receive_data(self, data: bytes) -> bytes:
        """Feed bytes the proxy sent; return what to send next (``b""``: nothing, read on).

        ``b""`` as input means the proxy closed the connection. Raises UpstreamProxyFailed."""
        if self.state in (SocksState.OPEN, SocksState.FAILED):
            raise self._fail("sent more than its handshake")
        if not data:
            raise self._fail(f"closed the connection during the SOCKS5 {self.state.value}")
        self._buffer += data
        if self.wanted > 0:
            return b""
        if self.wanted < 0:
            raise self._fail("sent more than its handshake")
        answer, self._buffer = self._buffer, b""
        if self.state is SocksState.GREETING:
            return self._chosen(answer)
        if self.state is SocksState.LOGIN:
            return self._logged_in(answer)
        return self._replied(answer)

    def _chosen(self, answer: bytes) -> bytes:
        version, method = answer
        if version != SOCKS_VERSION:
            raise self._fail(f"does not speak SOCKS5 (it answered version {version})")
        if method == METHOD_NONE:
            return self._connect_request()
        if method == METHOD_PASSWORD and self.proxy.username is not None:
            self.state = SocksState.LOGIN
            return self._login_request()
        if method == METHOD_PASSWORD or (method == METHOD_REFUSED and self.proxy.username is None):
            raise self._fail(
                "wants a username and password: give them in the proxy URL, "
                f"socks5://USER:PASSWORD@{self.proxy.address}"
            )
        if method == METHOD_REFUSED:
            raise self._fail("accepts neither no authentication nor username/password")
        raise self._fail(f"chose authentication method {method}, which was not offered")

    def _login_request(self) -> bytes:
        user = (self.proxy.username or "").encode()
        password = (self.proxy.password or "").encode()
        return bytes([AUTH_VERSION, len(user)]) + user + bytes([len(password)]) + password

    def _logged_in(self, answer: bytes) -> bytes:
        # RFC 1929 says version 1, but some servers echo 5 here (as curl and Go accept)
        version, status = answer
        if version not in (AUTH_VERSION, SOCKS_VERSION):
            raise self._fail(f"answered the login with version {version}")
        if status != 0:
            raise self._fail("refused the username and password: check the login in the proxy URL")
        return self._connect_request()

    def _connect_request(self) -> bytes:
        self.state = SocksState.CONNECT
        head = bytes([SOCKS_VERSION, COMMAND_CONNECT, 0])
        return head + _address(self.target_host) + self.target_port.to_bytes(2, "big")

    def _replied(self, answer: bytes) -> bytes:
        version, reply = answer[0], answer[1]
        if version != SOCKS_VERSION:
            raise self._fail(f"answered CONNECT with version {version}")
        if reply != 0:
            reason = REPLY_REASONS.get(reply, "unknown reason")
            self.state = SocksState.FAILED
            raise UpstreamProxyFailed(
                f"{self.proxy.label} refused the connection to {self._target}: "
                f"{reason} (reply {reply})"
            )
        if answer[3] not in (ADDRESS_IPV4, ADDRESS_NAME, ADDRESS_IPV6):
            raise self._fail(f"answered CONNECT with address type {answer[3]}")
        self.state = SocksState.OPEN
        return b""

    def _fail(self, what: str) -> UpstreamProxyFailed:
        self.state = SocksState.FAILED
        return UpstreamProxyFailed(f"{self.proxy.label} {what} (connecting to {self._target})")


def _reply_length(head: bytes) -> int:
    """The length of a CONNECT reply (VER REP RSV ATYP BND.ADDR BND.PORT) as far as ``head``
    tells: 2 bytes say whether it is a refusal, 5 how long it is (a name's first byte is its
    length)."""
    if len(head) < 2:
        return 2
    if head[1] != 0 or head[0] != SOCKS_VERSION:
        # a refusal (or not SOCKS5 at all): its bound address means nothing, and some proxies
        # close before sending it
        return len(head)
    if len(head) < 5:
        return 5
    atyp = head[3]
    if atyp == ADDRESS_IPV4:
        return 4 + 4 + 2
    if atyp == ADDRESS_IPV6:
        return 4 + 16 + 2
    if atyp == ADDRESS_NAME:
        return 4 + 1 + head[4] + 2
    return len(head)  # an unknown address type: _replied refuses it


def _address(host: str) -> bytes:
    """DST.ADDR with its type: an IP literal as such, anything else as a name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            name = host.encode("idna")
        except UnicodeError:
            name = b""
        if not 1 <= len(name) <= MAX_FIELD:
            raise UpstreamProxyFailed(f"{host!r} cannot be sent to a SOCKS5 proxy") from None
        return bytes([ADDRESS_NAME, len(name)]) + name
    if ip.version == 4:
        return bytes([ADDRESS_IPV4]) + ip.packed
    return bytes([ADDRESS_IPV6]) + ip.packed
