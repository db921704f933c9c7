"""An HTTP CONNECT proxy for tests: the kind of egress proxy hubproxy may have to go through.

It parses the CONNECT request with h11 (which treats a 2xx answer to CONNECT as a protocol
switch), then splices raw bytes both ways until either side closes. Tunnels are only opened to
the loopback interface, so a misconfigured test can never reach the outside world.
"""

from __future__ import annotations

import logging
import re

import h11
import trio

from tests.fakehub import _next_event, _send  # one h11 event loop for both fakes

__all__ = ["ConnectProxy"]

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
