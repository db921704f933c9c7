"""Keep-alive connections to upstream origins, one small pool per origin, and who may use them.

Docker Hub, its token service and its CDN are three origins; keeping connections to each alive
saves a TCP + TLS handshake per blob (the CDN redirect makes that two per blob otherwise). The
decisions (may this idle connection be reused, must this one be closed) are near-pure
functions; the caller does the closing I/O. A pooled connection that the server closed while idle
is usually detected by a zero-cost peek before reuse; the rare one that dies between the peek and
our request is retried once by the proxy on a fresh connection (only if nothing was received).

Slots. A lending holds one of the origin's slots (open connections) for its whole exchange.
Who may take a free slot, and which waiter gets the next one, is ``policy.slots.grant``: one
client cannot take every slot, and blob transfers leave some for small requests. The pool keeps
the waiters in arrival order and runs ``grant`` whenever a slot is released; a waiter that gets
nothing within ``wait_timeout`` fails with ``MirrorBusy`` (503), never hangs.

Sweeping. :meth:`Pool.sweep` (a task the app runs) closes idle connections past the keep-alive
and ones whose peer closed them, so an idle mirror keeps no sockets in CLOSE_WAIT.
"""

from __future__ import annotations

import select
from collections import Counter
from collections.abc import Awaitable, Callable
from types import TracebackType

import trio

from ..policy.errors import MirrorBusy
from ..policy.slots import Ask, Lane, SlotLimits, grant, slot_limits
from ..policy.urls import Origin
from .changes import Changes
from .streams import ByteStream, close_forcefully
from .upstream import UpstreamConnection
from .watch import Stalls

# (origin, profile): the profile names whose settings (CA, CONNECT proxy) a connection was made
# with, so that two registries reaching one CDN through different proxies never share one
Connector = Callable[[Origin, str], Awaitable[ByteStream]]
PoolKey = tuple[Origin, str]

# New connections one client address may be opening to one origin at once. A burst of requests
# from one address (a pull of many layers, or an attack) then opens its connections a few at a
# time, and each request that waits takes a connection another of the burst's exchanges put back
# meanwhile instead of opening its own: fewer TCP + TLS handshakes for us and the upstream, and
# the handshakes of one address never fill a whole scheduler round of everyone else's.
DIALS_PER_CLIENT = 4

# How often idle connections are checked for a peer that closed them, besides their expiry: a
# closed one sits in CLOSE_WAIT until we close it too.
PEER_CHECK_INTERVAL = 5.0


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


class _Waiter:
    """A request waiting for a slot; ``granted`` is set (with the event) when it got one."""

    __slots__ = ("ask", "event", "granted")

    def __init__(self, ask: Ask) -> None:
        self.ask = ask
        self.event = trio.Event()
        self.granted = False


class _Origin:
    """One (origin, profile)'s idle connections, the slots held, and who waits for one."""

    def __init__(self) -> None:
        self.idle: list[UpstreamConnection] = []
        self.held: Counter[Ask] = Counter()
        self.waiting: list[_Waiter] = []
        self.dialing: Counter[str] = Counter()  # by client key: connections being opened
        self.dial_done = trio.Event()  # set (and renewed) when a dial ends or a connection idles


class Lending:
    """One lending of :meth:`Pool.connection`: an async context manager (a class rather than
    an ``asynccontextmanager``: a generator per exchange is measurable on small requests)."""

    __slots__ = ("_ask", "_conn", "_fresh", "_key", "_pool")

    def __init__(self, pool: Pool, key: PoolKey, ask: Ask, *, fresh: bool) -> None:
        self._pool = pool
        self._key = key
        self._ask = ask
        self._fresh = fresh
        self._conn: UpstreamConnection | None = None

    async def __aenter__(self) -> UpstreamConnection:
        pool, key = self._pool, self._key
        await pool._acquire(key, self._ask)
        try:
            self._conn = await pool._take_or_open(key, self._ask.client, fresh=self._fresh)
        except BaseException:
            pool._release(key, self._ask)
            raise
        return self._conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return  # left already
        try:
            conn.exchanges += 1
            await self._pool._put_back(conn, self._key)
        finally:
            self._pool._release(self._key, self._ask)


class Pool:
    """Per-origin keep-alive pools: a cap on idle connections, and slots bounded per origin, per
    client and per lane (see ``policy.slots``)."""

    def __init__(
        self,
        connector: Connector,
        *,
        idle_timeout: float,
        keepalive: float,
        max_idle_per_origin: int,
        max_per_origin: int,
        max_per_client: int = 0,
        reserve_small: int = 0,
        wait_timeout: float = 30.0,
    ) -> None:
        self._connector = connector
        self._idle_timeout = idle_timeout
        self._keepalive = keepalive
        self._max_idle = max_idle_per_origin
        self.limits: SlotLimits = slot_limits(max_per_origin, max_per_client, reserve_small)
        self._wait_timeout = wait_timeout
        self._origins: dict[PoolKey, _Origin] = {}
        self._idle_added = trio.Event()  # wakes the sweeper when it had nothing to watch
        self._changed = Changes()  # noted when slots are taken, given or waited for
        self.opened = 0  # connections ever opened (tests and metrics read it)
        # per (origin, lane): requests that had to wait for a slot, and waits that timed out
        self.waits: Counter[tuple[str, str]] = Counter()
        self.wait_timeouts: Counter[tuple[str, str]] = Counter()
        self.swept = 0  # idle connections closed by the sweeper (expired, or closed by the peer)
        # every send and receive of the connections lent, each bound by the idle timeout
        # (net.upstream); its task is run beside the sweeper
        self.stalls = Stalls(idle_timeout)

    def idle_count(self, origin: Origin | None = None) -> int:
        return sum(
            len(v.idle) for k, v in self._origins.items() if origin is None or k[0] == origin
        )

    def in_use(self, origin: Origin) -> int:
        return sum(sum(v.held.values()) for k, v in self._origins.items() if k[0] == origin)

    def slots_in_use(self) -> dict[tuple[str, str], int]:
        """Slots held now, by (origin, lane)."""
        found: Counter[tuple[str, str]] = Counter()
        for (origin, _profile), state in self._origins.items():
            for ask, count in state.held.items():
                found[str(origin), ask.lane.value] += count
        return dict(found)

    def waiting(self) -> dict[tuple[str, str], int]:
        """Requests waiting for a slot now, by (origin, lane)."""
        found: Counter[tuple[str, str]] = Counter()
        for (origin, _profile), state in self._origins.items():
            for waiter in state.waiting:
                found[str(origin), waiter.ask.lane.value] += 1
        return dict(found)

    def idle_by_origin(self) -> dict[str, int]:
        """Idle pooled connections now, by origin."""
        found: Counter[str] = Counter()
        for (origin, _profile), state in self._origins.items():
            found[str(origin)] += len(state.idle)
        return dict(found)

    async def wait_changed(self) -> None:
        """Wait until a slot is taken or released, or a request starts or stops waiting."""
        await self._changed.wait()

    def _note_change(self) -> None:
        self._changed.note()

    def connection(
        self,
        origin: Origin,
        *,
        fresh: bool = False,
        profile: str = "",
        client: str = "",
        lane: Lane = Lane.SMALL,
    ) -> Lending:
        """Lend a connection to ``origin`` for one exchange (``async with``); it returns to the
        pool if reusable.

        ``client`` (a ``policy.access.client_key``; "" for the mirror's own requests) and ``lane``
        say whose share the slot counts against. Waiting for a slot longer than the wait timeout
        raises MirrorBusy.

        Leaving the block by an exception (or before the response was read to its end) closes
        the connection instead: its state is unknown. The block may be left from another task
        than the one that entered it (a cache fill takes over a client's exchange), so the slot
        is held on behalf of the lending, not of a task.
        """
        return Lending(self, (origin, profile), Ask(client, lane), fresh=fresh)

    async def _acquire(self, key: PoolKey, ask: Ask) -> None:
        # No schedule point when a slot is free: the exchange's own I/O follows at once, and
        # an extra trip through the scheduler per request is measurable on small requests.
        await trio.lowlevel.checkpoint_if_cancelled()
        state = self._origins.get(key)
        if state is None:
            state = self._origins[key] = _Origin()
        if grant(self.limits, state.held, [ask]):
            state.held[ask] += 1
            self._note_change()
            return
        waiter = _Waiter(ask)
        state.waiting.append(waiter)
        self._note_change()
        series = (str(key[0]), ask.lane.value)
        self.waits[series] += 1
        try:
            with trio.move_on_after(self._wait_timeout):
                await waiter.event.wait()
        except BaseException:
            if waiter.granted:  # granted, then cancelled before it could use the slot
                self._release(key, ask)
            else:
                state.waiting.remove(waiter)
                self._note_change()
            raise
        if waiter.granted:
            return
        state.waiting.remove(waiter)
        self._note_change()
        self.wait_timeouts[series] += 1
        held = sum(state.held.values())
        raise MirrorBusy(
            f"the mirror is busy: no connection to {key[0]} came free within "
            f"{self._wait_timeout:g}s ({held} of {self.limits.per_origin} in use); retry later",
            headers=((b"retry-after", b"%d" % max(1, round(self._wait_timeout))),),
        )

    def _release(self, key: PoolKey, ask: Ask) -> None:
        state = self._origins[key]
        state.held[ask] -= 1
        if state.held[ask] <= 0:
            del state.held[ask]
        self._note_change()
        if not state.waiting:
            return
        chosen = grant(self.limits, state.held, [w.ask for w in state.waiting])
        for index in chosen:
            waiter = state.waiting[index]
            state.held[waiter.ask] += 1
            waiter.granted = True
            waiter.event.set()
        if chosen:
            taken = set(chosen)
            state.waiting = [w for i, w in enumerate(state.waiting) if i not in taken]

    async def _take_or_open(self, key: PoolKey, client: str, *, fresh: bool) -> UpstreamConnection:
        """An idle connection, or a new one once this client has fewer than
        ``DIALS_PER_CLIENT`` being opened (taking one put back meanwhile, unless ``fresh``)."""
        state = self._origins[key]
        while True:
            conn = None if fresh else await self._take_idle(key)
            if conn is not None:
                return conn
            if state.dialing[client] < DIALS_PER_CLIENT:
                break
            await state.dial_done.wait()
        state.dialing[client] += 1
        try:
            stream = await self._connector(key[0], key[1])
        finally:
            state.dialing[client] -= 1
            if not state.dialing[client]:
                del state.dialing[client]
            self._note_dial_done(state)
        self.opened += 1
        return UpstreamConnection(
            key[0], stream, idle_timeout=self._idle_timeout, stalls=self.stalls
        )

    @staticmethod
    def _note_dial_done(state: _Origin) -> None:
        # renewed only once someone waited on it: every exchange puts a connection back, and
        # a fresh Event per request would be an allocation on the common path for nobody
        if state.dial_done.statistics().tasks_waiting:
            state.dial_done.set()
            state.dial_done = trio.Event()

    async def _take_idle(self, key: PoolKey) -> UpstreamConnection | None:
        idle = self._origins[key].idle
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
        idle = self._origins[key].idle
        if conn.reusable and len(idle) < self._max_idle:
            conn.idle_since = trio.current_time()
            idle.append(conn)
            self._idle_added.set()
            self._note_dial_done(self._origins[key])  # a waiting dialer may take it
            return
        with trio.CancelScope(shield=True):
            await close_forcefully(conn.stream)

    async def sweep(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Close idle connections past the keep-alive, or closed by their peer, until cancelled.

        It sleeps until the oldest idle connection expires (checking for closed peers every
        ``PEER_CHECK_INTERVAL`` meanwhile), and while nothing is idle, until something is.
        """
        task_status.started()
        while True:
            now = trio.current_time()
            await self._close_stale(now)
            idle_since = [c.idle_since for s in self._origins.values() for c in s.idle]
            if not idle_since:
                self._idle_added = trio.Event()
                await self._idle_added.wait()
                continue
            expiry = min(idle_since) + self._keepalive
            await trio.sleep_until(min(expiry, now + PEER_CHECK_INTERVAL))

    async def _close_stale(self, now: float) -> None:
        stale: list[UpstreamConnection] = []
        for state in self._origins.values():
            kept = []
            for conn in state.idle:
                if is_expired(conn.idle_since, now, self._keepalive) or peer_closed(conn.stream):
                    stale.append(conn)
                else:
                    kept.append(conn)
            state.idle[:] = kept
        self.swept += len(stale)
        for conn in stale:
            await close_forcefully(conn.stream)

    async def aclose(self) -> None:
        """Close every idle connection (at shutdown)."""
        idle = [conn for state in self._origins.values() for conn in state.idle]
        for state in self._origins.values():
            state.idle.clear()
        for conn in idle:
            await close_forcefully(conn.stream)
