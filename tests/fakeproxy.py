"""An HTTP CONNECT proxy for tests: the kind of egress proxy hubproxy may have to go through.

It parses the CONNECT request with h11 (which treats a 2xx answer to CONNECT as a protocol
switch), then splices raw bytes both ways until either side closes. Tunnels are only opened to
the loopback interface, so a misconfigured test can never reach the outside world.
"""

from __future__ import annotations

import ipaddress
import logging
import re

import h11
import trio

from tests.fakehub import _next_event, _send  # one h11 event loop for both fakes

__all__ = ["ConnectProxy", "SocksProxy"]

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024
_LOOPBACK = {"127.0.0.1": "127.0.0.1", "localhost": "127.0.0.1"}


class _Refused(Exception):
    """The request gets an error answer instead of a tunnel."""

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]] | None = None):
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.headers = headers or []


async def _pump(
    source: trio.abc.ReceiveStream, sink: trio.abc.SendStream, done: trio.CancelScope
) -> None:
    # One chunk in flight per direction: receive, await the send, then receive again.
    try:
        while data := await source.receive_some(_CHUNK):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    done.cancel()  # either side closing ends the tunnel


def _parse_authority(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or re.fullmatch(r"[0-9]{1,5}", port) is None or not 0 < int(port) < 65536:
        raise _Refused(400, "Bad Request")
    host = host.removeprefix("[").removesuffix("]").lower()
    if host not in _LOOPBACK:
        raise _Refused(403, "Forbidden")
    return _LOOPBACK[host], int(port)


class ConnectProxy:
    """A plain-HTTP CONNECT proxy on 127.0.0.1; ``connects`` lists every target asked for."""

    def __init__(self, *, required_auth: str | None = None) -> None:
        # The exact Proxy-Authorization value required, e.g. "Basic dXNlcjpwYXNz".
        self.required_auth = required_auth
        self.url = ""
        self.connects: list[str] = []

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on an ephemeral port and serve until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._connection, listeners)
            task_status.started()

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = await _next_event(stream, conn)
                if not isinstance(event, h11.Request):
                    return
                while not isinstance(await _next_event(stream, conn), h11.EndOfMessage):
                    pass  # a CONNECT has no body; drain whatever a refused method sent
                try:
                    upstream = await self._open(event)
                except _Refused as refused:
                    body = f"{refused.status} {refused.reason}\n".encode()
                    headers = [*refused.headers, ("content-length", str(len(body)))]
                    await _send(
                        stream,
                        conn,
                        h11.Response(
                            status_code=refused.status,
                            headers=headers,
                            reason=refused.reason.encode(),
                        ),
                    )
                    await _send(stream, conn, h11.Data(data=body))
                    await _send(stream, conn, h11.EndOfMessage())
                    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                        return
                    conn.start_next_cycle()  # e.g. curl retries a 407 on the same connection
                    continue
                async with upstream:
                    await _send(
                        stream,
                        conn,
                        h11.Response(status_code=200, headers=[], reason=b"Connection established"),
                    )
                    leftover, _ = conn.trailing_data
                    if leftover:
                        await upstream.send_all(leftover)
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(_pump, stream, upstream, nursery.cancel_scope)
                        nursery.start_soon(_pump, upstream, stream, nursery.cancel_scope)
                return
        except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("fakeproxy: connection failed")
        finally:
            await trio.aclose_forcefully(stream)

    async def _open(self, request: h11.Request) -> trio.SocketStream:
        if request.method != b"CONNECT":
            raise _Refused(405, "Method Not Allowed", [("allow", "CONNECT")])
        target = request.target.decode("latin-1")
        self.connects.append(target)
        if self.required_auth is not None:
            given = [v for k, v in request.headers if k == b"proxy-authorization"]
            if given != [self.required_auth.encode("latin-1")]:
                raise _Refused(
                    407,
                    "Proxy Authentication Required",
                    [("proxy-authenticate", 'Basic realm="fakeproxy"')],
                )
        host, port = _parse_authority(target)
        try:
            return await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise _Refused(502, "Bad Gateway") from exc


# -- SOCKS5 -------------------------------------------------------------------------------------


class SocksProxy:
    """A SOCKS5 proxy on 127.0.0.1 written from RFC 1928 and RFC 1929 alone (not from
    hubproxy's client), so the handshake is checked against an independent peer.

    ``login``: the (user, password) it requires; None offers no authentication only.
    ``refuse``: a reply code (RFC 1928 section 6) to answer every CONNECT with.
    ``asked`` records each CONNECT as (address type, host, port): ``"name"`` when the client
    sent a host name (socks5h), ``"ipv4"``/``"ipv6"`` when it sent an address (socks5).
    Like ConnectProxy it only reaches the loopback interface.
    """

    def __init__(self, *, login: tuple[str, str] | None = None, refuse: int | None = None):
        self.login = login
        self.refuse = refuse
        self.address = ""  # host:port
        self.connections = 0
        self.asked: list[tuple[str, str, int]] = []
        self.logins: list[tuple[str, str]] = []  # what clients logged in with

    def url(self, scheme: str = "socks5", login: tuple[str, str] | None = None) -> str:
        given = f"{login[0]}:{login[1]}@" if login else ""
        return f"{scheme}://{given}{self.address}"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on an ephemeral port and serve until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.address = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._connection, listeners)
            task_status.started()

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            reader = _Reader(stream)
            upstream = await self._handshake(reader, stream)
            if upstream is None:
                return
            async with upstream, trio.open_nursery() as nursery:
                if reader.buffer:  # sent before our reply: already the target's bytes
                    await upstream.send_all(reader.buffer)
                nursery.start_soon(_pump, stream, upstream, nursery.cancel_scope)
                nursery.start_soon(_pump, upstream, stream, nursery.cancel_scope)
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _handshake(
        self, reader: _Reader, stream: trio.SocketStream
    ) -> trio.SocketStream | None:
        version, count = await reader.exactly(2)
        methods = await reader.exactly(count)
        if version != 5:
            return None
        wanted = 0x02 if self.login else 0x00
        if wanted not in methods:
            await stream.send_all(b"\x05\xff")
            return None
        await stream.send_all(bytes([5, wanted]))
        if self.login:
            _, size = await reader.exactly(2)  # VER ULEN (RFC 1929)
            user = (await reader.exactly(size)).decode()
            password = (await reader.exactly((await reader.exactly(1))[0])).decode()
            self.logins.append((user, password))
            if (user, password) != self.login:
                await stream.send_all(b"\x01\x01")
                return None
            await stream.send_all(b"\x01\x00")
        _, command, _, atyp = await reader.exactly(4)
        if atyp == 1:
            kind, host = "ipv4", str(ipaddress.IPv4Address(await reader.exactly(4)))
        elif atyp == 4:
            kind, host = "ipv6", str(ipaddress.IPv6Address(await reader.exactly(16)))
        else:
            kind, host = "name", (await reader.exactly((await reader.exactly(1))[0])).decode()
        port = int.from_bytes(await reader.exactly(2), "big")
        self.asked.append((kind, host, port))
        reply = self.refuse
        if reply is None and command != 1:
            reply = 7
        if reply is None and host not in _LOOPBACK:
            reply = 2  # not allowed: the tests never leave this machine
        upstream = None
        if reply is None:
            try:
                upstream = await trio.open_tcp_stream(_LOOPBACK[host], port)
            except OSError:
                reply = 5
        await stream.send_all(bytes([5, reply or 0, 0, 1, 127, 0, 0, 1, 0, 0]))
        return upstream


class _Reader:
    """Exact-size reads over a stream (what a SOCKS server needs)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            data = await self.stream.receive_some(_CHUNK)
            if not data:
                raise EOFError
            self.buffer += data
        head, self.buffer = self.buffer[:size], self.buffer[size:]
        return head
