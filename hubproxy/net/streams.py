"""Byte streams: the one small interface the HTTP code needs, and how streams are opened.

Everything above this module sees a :class:`ByteStream` (receive_some / send_all / aclose), so the
transport can be swapped without touching HTTP code: plain TCP is trio's ``SocketStream``; TLS is
our own :class:`hubproxy.net.tls.TLSStream`, which hands back every decrypted byte available per
read instead of one 16 KiB record (see its module docstring). Foreign errors are translated into
the proxy's error family here, at the edge.
"""

from __future__ import annotations

import ssl
from typing import Protocol

import h11
import trio

from ..policy.errors import UpstreamTimeout, UpstreamUnavailable
from ..policy.urls import Origin, Url
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


def server_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    """TLS 1.2+ with ALPN ``http/1.1`` for the client-facing listener."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


async def open_upstream(
    origin: Origin,
    *,
    context: ssl.SSLContext,
    proxy: Url | None,
    connect_timeout: float,
) -> ByteStream:
    """Connect to ``origin`` (through an HTTP CONNECT proxy if given), TLS when https.

    Raises UpstreamTimeout or UpstreamUnavailable, with the foreign error as the cause.
    """
    what = f"{origin}" + (f" via proxy {proxy.origin}" if proxy else "")
    tcp: trio.SocketStream | None = None
    try:
        with trio.fail_after(connect_timeout):
            if proxy is None:
                tcp = await trio.open_tcp_stream(origin.host, origin.port)
            else:
                tcp = await trio.open_tcp_stream(proxy.origin.host, proxy.origin.port)
                await _connect_tunnel(tcp, origin)
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


async def _connect_tunnel(tcp: trio.SocketStream, origin: Origin) -> None:
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
            raise UpstreamUnavailable(
                f"upstream proxy refused CONNECT to {origin.authority}: {event.status_code}"
            )
        raise UpstreamUnavailable("upstream proxy closed the connection during CONNECT")


async def _close_quietly(stream: ByteStream | None) -> None:
    if stream is not None:
        await close_forcefully(stream)


async def close_forcefully(stream: ByteStream) -> None:
    """Close without waiting for the peer (no TLS close_notify exchange), like trio's helper."""
    with trio.CancelScope() as scope:
        scope.cancel()
        await stream.aclose()
