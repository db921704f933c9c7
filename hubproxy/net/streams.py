"""Byte streams: the one small interface the HTTP code needs, and how streams are opened.

Everything above this module sees a :class:`ByteStream` (receive_some / send_all / aclose), so the
transport can be swapped without touching HTTP code: plain TCP is trio's ``SocketStream``; TLS to
upstreams and clients is our own :class:`hubproxy.net.tls.TLSStream`, which hands back every
decrypted byte available per read instead of one 16 KiB record (see its module docstring); with
``--ktls`` where the kernel offers it, TLS to clients is
:class:`hubproxy.net.sockettls.SocketTLSStream`, on the socket itself, which the kernel can take
over. Foreign errors are translated into the proxy's error family here, at the edge.
"""

from __future__ import annotations

import base64
import datetime
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import h11
import trio

from ..policy.errors import UpstreamProxyFailed, UpstreamTimeout, UpstreamUnavailable
from ..policy.proxies import ProxyKind, Socks5Handshake, SocksState, UpstreamProxy
from ..policy.urls import Origin, is_ip_literal
from .sockettls import SocketTLSStream
from .tls import TLSStream

HEAD_READ = 64 * 1024  # read size while waiting for a message head


class ByteStream(Protocol):
    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray: ...

    async def send_all(self, data: bytes | bytearray | memoryview) -> None: ...

    async def aclose(self) -> None: ...


def upstream_ssl_context(extra_ca: str | None) -> ssl.SSLContext:
    """Verify upstreams against the system store plus ``--upstream-ca``."""
    context = ssl.create_default_context()
    if extra_ca:
        context.load_verify_locations(cafile=extra_ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


class CertificateError(Exception):
    """The server certificate or key cannot be used; the message is one line for the operator
    that names the file and says what is wrong in words (OpenSSL only says ``PEM lib``)."""


def server_ssl_context(cert: str, key: str, *, ktls: bool = False) -> ssl.SSLContext:
    """TLS 1.2+ with ALPN ``http/1.1`` for the client-facing listener; with ``ktls`` OpenSSL
    offers each connection's keys to the kernel, where this Python can ask it to (net.ktls).

    Raises CertificateError: a file that cannot be read, is not PEM, holds the other kind of
    object (--cert and --key swapped), is encrypted, or a key that does not match."""
    cert_text = _read_pem(cert, "certificate")
    key_text = cert_text if key == cert else _read_pem(key, "key")
    if _PEM_CERTIFICATE not in cert_text:
        raise CertificateError(_not_a(cert, "certificate", cert_text))
    if "PRIVATE KEY-----" not in key_text:
        if key == cert:
            raise CertificateError(f"{cert} holds no private key: give the key file with --key")
        raise CertificateError(_not_a(key, "private key", key_text))
    if "ENCRYPTED" in key_text:
        raise CertificateError(
            f"the key {key} is protected by a passphrase, which hubproxy cannot ask for: "
            f"store it without one (openssl pkey -in {key} -out key.pem)"
        )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key, password=lambda: _no_passphrase(key))
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise CertificateError(
                f"the key {key} does not match the certificate {cert}: give the key that was "
                "made together with that certificate"
            ) from exc
        # OpenSSL's reason, in words; none at all ("PEM lib") for a block that does not decode
        reason = (exc.reason or "").lower().replace("_", " ") or "damaged or truncated PEM data"
        raise CertificateError(
            f"cannot use the certificate {cert} with the key {key}: {reason}"
        ) from exc
    except OSError as exc:  # changed between the read above and this one
        raise CertificateError(f"cannot read {exc.filename or cert}: {exc.strerror}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    if ktls and hasattr(ssl, "OP_ENABLE_KTLS"):  # Python 3.12 and later
        context.options |= ssl.OP_ENABLE_KTLS
    return context


_PEM_CERTIFICATE = "-----BEGIN CERTIFICATE-----"


def _no_passphrase(key: str) -> bytes:
    # without a callback OpenSSL would prompt on the terminal (and hang a service)
    raise CertificateError(f"the key {key} is protected by a passphrase: store it without one")


def _read_pem(path: str, what: str) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CertificateError(f"cannot read the {what} file {path}: {exc.strerror}") from exc
    return data.decode("latin-1")


def _not_a(path: str, what: str, text: str) -> str:
    """Why ``path`` is not a PEM ``what``, in words."""
    if what == "certificate" and "PRIVATE KEY-----" in text:
        return f"{path} holds a private key, not a certificate (are --cert and --key swapped?)"
    if what == "private key" and _PEM_CERTIFICATE in text:
        return f"{path} holds a certificate, not a private key (are --cert and --key swapped?)"
    if text[:2] in ("\x30\x81", "\x30\x82", "\x30\x83"):  # a DER SEQUENCE: binary, not PEM
        return (
            f"{path} is a binary (DER) {what}, not PEM: convert it with "
            f"openssl {'x509' if what == 'certificate' else 'pkey'} -inform der -in {path} "
            f"-out {'cert' if what == 'certificate' else 'key'}.pem"
        )
    marker = _PEM_CERTIFICATE if what == "certificate" else "-----BEGIN PRIVATE KEY-----"
    return f"{path} is not a PEM {what} (no {marker} line)"


@dataclass(frozen=True)
class Validity:
    """When a certificate may be used, in seconds since the epoch (``time.time()``)."""

    not_before: float
    not_after: float

    def problem(self, now: float, path: str) -> str | None:
        """Why the certificate at ``path`` is refused by clients at ``now``, or None."""
        if now > self.not_after:
            return (
                f"the certificate {path} expired on {_utc(self.not_after)}: every client will "
                "refuse it; renew it (certs/README.md)"
            )
        if now < self.not_before:
            return (
                f"the certificate {path} is not valid until {_utc(self.not_before)} (this "
                f"machine's clock says {_utc(now)}; is it right?): clients will refuse it "
                "until then"
            )
        return None


def certificate_validity(path: str) -> Validity | None:
    """The validity period of the first certificate in the PEM file ``path``; None if it
    cannot be read or parsed (loading it reports that)."""
    try:
        text = Path(path).read_text(encoding="latin-1")
        start = text.index(_PEM_CERTIFICATE) + len(_PEM_CERTIFICATE)
        der = base64.b64decode(text[start : text.index("-----END CERTIFICATE-----", start)])
        return der_validity(der)
    except (OSError, ValueError):
        return None


def der_validity(der: bytes) -> Validity:
    """The validity of a DER X.509 certificate (RFC 5280 section 4.1), read with a minimal
    DER walk: the standard library decodes certificates only privately
    (``ssl._ssl._test_decode_cert``) or for CA certificates. Raises ValueError."""
    _, content, _ = _der_item(der, 0, 0x30)  # Certificate
    _, pos, end = _der_item(der, content, 0x30)  # TBSCertificate
    tag, _, after = _der_item(der, pos)
    if tag == 0xA0:  # [0] EXPLICIT version (absent means v1)
        pos = after
    for expected in (0x02, 0x30, 0x30):  # serialNumber, signature, issuer
        _, _, pos = _der_item(der, pos, expected)
    _, pos, _ = _der_item(der, pos, 0x30)  # validity
    times = []
    for _ in range(2):
        tag, start, pos = _der_item(der, pos)
        times.append(_der_time(tag, der[start:pos]))
    if pos > end:
        raise ValueError("validity beyond the TBSCertificate")
    return Validity(times[0], times[1])


def _der_item(der: bytes, pos: int, expected: int | None = None) -> tuple[int, int, int]:
    """(tag, start of content, end of item) of the DER item at ``pos``."""
    if pos + 2 > len(der):
        raise ValueError("truncated DER")
    tag, length = der[pos], der[pos + 1]
    if expected is not None and tag != expected:
        raise ValueError(f"DER tag {tag:#x} where {expected:#x} was expected")
    start = pos + 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4:
            raise ValueError("unsupported DER length")
        length = int.from_bytes(der[start : start + count], "big")
        start += count
    if start + length > len(der):
        raise ValueError("truncated DER")
    return tag, start, start + length


def _der_time(tag: int, value: bytes) -> float:
    """UTCTime (two-digit year: 50-99 are 19xx, RFC 5280 4.1.2.5.1) or GeneralizedTime."""
    text = value.decode("ascii")
    if tag == 0x17:
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != 0x18:
        raise ValueError(f"DER tag {tag:#x} is not a time")
    moment = datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ")
    return moment.replace(tzinfo=datetime.UTC).timestamp()


def _utc(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


async def open_upstream(
    origin: Origin,
    *,
    context: ssl.SSLContext,
    proxy: UpstreamProxy | None,
    connect_timeout: float,
) -> ByteStream:
    """Connect to ``origin`` (through an HTTP CONNECT or SOCKS5 proxy if given), TLS when
    https; the whole of it, proxy handshake included, within ``connect_timeout``.

    Raises UpstreamTimeout or UpstreamUnavailable (UpstreamProxyFailed: the proxy refused),
    with the foreign error as the cause. Messages name the proxy by address, never its login.
    """
    what = f"{origin}" + (f" via {proxy.label}" if proxy else "")
    tcp: trio.SocketStream | None = None
    try:
        with trio.fail_after(connect_timeout):
            if proxy is None:
                tcp = await trio.open_tcp_stream(origin.host, origin.port)
            elif proxy.is_socks:
                target = origin.host
                if proxy.kind is ProxyKind.SOCKS5:  # socks5h: the proxy resolves the name
                    target = await resolve_address(origin.host, origin.port)
                tcp = await trio.open_tcp_stream(proxy.host, proxy.port)
                await _socks_tunnel(
                    tcp, Socks5Handshake(proxy, target, origin.port, target_name=origin.host)
                )
            else:
                tcp = await trio.open_tcp_stream(proxy.host, proxy.port)
                await _connect_tunnel(tcp, proxy, origin)
            if not origin.tls:
                return tcp
            return await TLSStream.wrap_client(tcp, context, server_hostname=origin.host)
    except trio.TooSlowError as exc:
        await _close_quietly(tcp)
        raise UpstreamTimeout(f"connecting to {what} timed out after {connect_timeout:g}s") from exc
    except (OSError, trio.BrokenResourceError, ssl.SSLError, h11.ProtocolError) as exc:
        await _close_quietly(tcp)
        cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
        raise UpstreamUnavailable(f"cannot connect to {what}: {cause or exc}") from exc
    except UpstreamUnavailable:
        await _close_quietly(tcp)
        raise


async def resolve_address(host: str, port: int) -> str:
    """One address of ``host``, IPv4 first: a SOCKS5 proxy gets one address per connection,
    and the proxy's own network is the one whose IPv6 is least likely to work."""
    if is_ip_literal(host):
        return host
    try:
        found = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UpstreamUnavailable(f"cannot resolve {host}: {exc.strerror}") from exc
    addresses = [str(sockaddr[0]) for family, _, _, _, sockaddr in found if family in _FAMILIES]
    addresses.sort(key=lambda address: ":" in address)  # stable: IPv4 first, in DNS order
    if not addresses:
        raise UpstreamUnavailable(f"cannot resolve {host}: no IPv4 or IPv6 address")
    return addresses[0]


_FAMILIES = (socket.AF_INET, socket.AF_INET6)


async def _socks_tunnel(tcp: trio.SocketStream, handshake: Socks5Handshake) -> None:
    """Run the SOCKS5 handshake (policy.proxies) over ``tcp`` until the tunnel is open."""
    outgoing = handshake.start()
    while handshake.state is not SocksState.OPEN:
        if outgoing:
            await tcp.send_all(outgoing)
        # never more than the handshake wants: the bytes after it are the target's
        outgoing = handshake.receive_data(bytes(await tcp.receive_some(handshake.wanted)))


async def _connect_tunnel(tcp: trio.SocketStream, proxy: UpstreamProxy, origin: Origin) -> None:
    """Ask an HTTP proxy for a tunnel to ``origin`` (RFC 9110 section 9.3.6)."""
    conn = h11.Connection(h11.CLIENT)
    host = f"[{origin.host}]" if ":" in origin.host else origin.host
    authority = f"{host}:{origin.port}"  # CONNECT always names the port
    request = h11.Request(method="CONNECT", target=authority, headers=[("host", authority)])
    await tcp.send_all(conn.send(request) or b"")
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await tcp.receive_some(HEAD_READ)
            conn.receive_data(bytes(data))
            continue
        if isinstance(event, h11.InformationalResponse):
            continue
        if isinstance(event, h11.Response):
            if 200 <= event.status_code < 300:
                return
            raise UpstreamProxyFailed(
                f"{proxy.label} refused CONNECT to {authority}: {event.status_code}"
            )
        raise UpstreamProxyFailed(f"{proxy.label} closed the connection during CONNECT")


async def _close_quietly(stream: ByteStream | None) -> None:
    if stream is not None:
        await close_forcefully(stream)


def abortable(stream: ByteStream) -> bool:
    """Whether :func:`abort` can close ``stream`` at once: a socket, bare or under TLS."""
    if isinstance(stream, TLSStream):
        return isinstance(stream.transport_stream, trio.SocketStream)
    return isinstance(stream, SocketTLSStream | trio.SocketStream)


def abort(stream: ByteStream) -> bool:
    """Close ``stream``'s socket at once, sending nothing (no TLS ``close_notify``), from any
    task and without awaiting: a task blocked in its receive or send gets
    ClosedResourceError. False, and nothing done, for a stream not on a socket."""
    if isinstance(stream, TLSStream | SocketTLSStream):
        return stream.abort()
    if isinstance(stream, trio.SocketStream):
        stream.socket.close()  # trio tells the tasks waiting on it
        return True
    return False


async def close_forcefully(stream: ByteStream) -> None:
    """Close without waiting for the peer and without a TLS ``close_notify``, like trio's
    helper; never raises. A socket, bare or under TLS, is closed at once: a hundred
    connections torn down after resets cost a fraction of as many cancelled ``aclose`` calls
    (each built a ``close_notify`` it then could not send, and raised Cancelled twice)."""
    if abort(stream):
        await trio.lowlevel.cancel_shielded_checkpoint()
        return
    with trio.CancelScope() as scope:
        scope.cancel()
        await stream.aclose()
