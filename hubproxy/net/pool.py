"""Keep-alive connections to upstream origins, one small pool per origin.

Docker Hub, its token service and its CDN are three origins; keeping connections to each alive
saves a TCP + TLS handshake per blob (the CDN redirect makes that two per blob otherwise). The
decisions (may this idle connection be reused, must this one be closed) are near-pure
functions; the caller does the closing I/O. A pooled connection that the server closed while idle
is usually detected by a zero-cost peek before reuse; the rare one that dies between the peek and
our request is retried once by the proxy on a fresh connection (only if nothing was received).
"""

from __future__ import annotations

import select
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from ..policy.urls import Origin
from .streams import ByteStream, close_forcefully
from .upstream import UpstreamConnection

# (origin, profile): the profile names whose settings (CA, CONNECT proxy) a connection was made
# with, so that two registries reaching one CDN through different proxies never share one
Connector = Callable[[Origin, str], Awaitable[ByteStream]]
PoolKey = tuple[Origin, str]


def is_expired(idle_since: float, now: float, keepalive: float) -> bool:
    return now - idle_since >= keepalive


def peer_closed(stream: object) -> bool:
    """True when an idle connection is readable: EOF, a TLS alert or bytes nobody asked for.

    An idle HTTP/1.1 connection has nothing to say; anything readable makes it unusable.
    """
    inner = getattr(stream, "transport_stream", stream)
    sock = getattr(inner, "socket", None)
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


class Pool:
    """Per-origin keep-alive pools with a cap on idle and on total connections per origin."""

    def __init__(
        self,
        connector: Connector,
        *,
        idle_timeout: float,
        keepalive: float,
        max_idle_per_origin: int,
        max_per_origin: int,
    ) -> None:
        self._connector = connector
        self._idle_timeout = idle_timeout
        self._keepalive = keepalive
        self._max_idle = max_idle_per_origin
        self._max_per_origin = max_per_origin
        self._idle: dict[PoolKey, list[UpstreamConnection]] = {}
        self._limits: dict[PoolKey, trio.CapacityLimiter] = {}
        self.opened = 0  # connections ever opened (tests and metrics read it)

    def idle_count(self, origin: Origin | None = None) -> int:
        return sum(len(v) for k, v in self._idle.items() if origin is None or k[0] == origin)

    def in_use(self, origin: Origin) -> int:
        return sum(limit.borrowed_tokens for key, limit in self._limits.items() if key[0] == origin)

    @asynccontextmanager
    async def connection(
        self, origin: Origin, *, fresh: bool = False, profile: str = ""
    ) -> AsyncIterator[UpstreamConnection]:
        """Lend a connection to ``origin`` for one exchange; it returns to the pool if reusable.

        Leaving the block by an exception (or before the response was read to its end) closes
        the connection instead: its state is unknown. The block may be left from another task
        than the one that entered it (a cache fill takes over a client's exchange), so the slot
        is held on behalf of the lending, not of a task.
        """
        key = (origin, profile)
        limit = self._limits.setdefault(key, trio.CapacityLimiter(self._max_per_origin))
        lending = object()
        await limit.acquire_on_behalf_of(lending)
        try:
            conn = None if fresh else await self._take_idle(key)
            if conn is None:
                stream = await self._connector(origin, profile)
                self.opened += 1
                conn = UpstreamConnection(origin, stream, idle_timeout=self._idle_timeout)
            try:
                yield conn
            finally:
                conn.exchanges += 1
                await self._put_back(conn, key)
        finally:
            limit.release_on_behalf_of(lending)

    async def _take_idle(self, key: PoolKey) -> UpstreamConnection | None:
        idle = self._idle.get(key)
        now = trio.current_time()
        while idle:
            conn = idle.pop()  # most recently used first: least likely to have been closed
            if not is_expired(conn.idle_since, now, self._keepalive) and not peer_closed(
                conn.stream
            ):
                return conn
            await close_forcefully(conn.stream)
        return None

    async def _put_back(self, conn: UpstreamConnection, key: PoolKey) -> None:
        idle = self._idle.setdefault(key, [])
        if conn.reusable and len(idle) < self._max_idle:
            conn.idle_since = trio.current_time()
            idle.append(conn)
            return
        with trio.CancelScope(shield=True):
            await close_forcefully(conn.stream)

    async def aclose(self) -> None:
        """Close every idle connection (at shutdown)."""
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                await close_forcefully(conn.stream)
