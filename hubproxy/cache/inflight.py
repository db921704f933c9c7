"""Manifests in flight: one upstream fetch per manifest at a time, a cap on the bytes buffered
from upstreams, and one shared buffer per manifest being sent.

Theory of operation. A :class:`PullThrough` owns one of each:

- :class:`ManifestFetches` maps a :class:`~hubproxy.policy.cachepolicy.FetchKey` to the
  :class:`ManifestFetch` of its leader. A request that misses while a fetch of the same key runs
  follows it: it waits for :meth:`ManifestFetches.finish`, which the leader calls with the stored
  manifest as soon as it is stored (not after its own client took it: a slow client must not
  hold the followers) or with None from a ``finally`` if it failed or was cancelled, so a
  follower is never left waiting. What a follower may do with the answer is
  ``cachepolicy.may_share_fetch``'s to say.
- :class:`MemoryBudget` counts the bytes of manifests being read from upstreams (their
  Content-Length, from the response head until the body is stored). A fetch that does not fit
  (``cachepolicy.admit_fetches``: in all, and a quarter per client address) waits, first come
  first served, up to a patience the caller gives, then fails with
  :class:`~hubproxy.policy.errors.MirrorBusy` (503, Retry-After).
- :class:`SendBudget` counts the bytes of manifest bodies held for sending to clients (from
  before the response head until the last byte was taken), per client address and in all; who
  may hold one now is ``sending.admit``'s to say. A sender that does not fit drops its body
  (:class:`Outgoing`) while it waits, up to a patience, then fails with MirrorBusy; once let in
  it takes the body again from whoever is sending it, else from the store.
- :class:`SharedBodies` hands every client sending the same manifest the one ``bytes`` object,
  however the store returned it (a store may read a fresh copy per lookup), and counts the
  bytes so held for ``/metrics``.

Everything here runs on the one trio thread: plain dicts and events, no locks.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from ..net.changes import Changes
from ..policy.cachepolicy import ConfirmationKey, FetchKey, admit_fetches
from ..policy.errors import MirrorBusy
from ..policy.sending import SendAsk, SendLimits, admit, may_fetch
from .manifests import CachedManifest

RETRY_AFTER = b"5"  # seconds: a budget held by upstream bodies moves within moments


class ManifestFetch:
    """One leader's upstream fetch of a manifest, which followers wait on."""

    def __init__(self, key: FetchKey, credentials: ConfirmationKey) -> None:
        self.key = key
        self.credentials = credentials  # the leader's: whoever shows the same may share
        self.answer: CachedManifest | None = None  # the stored manifest, if it was stored
        self.followers = 0
        self.done = trio.Event()


class ManifestFetches:
    """The manifest fetches in flight, one per :class:`FetchKey`."""

    def __init__(self) -> None:
        self._fetches: dict[FetchKey, ManifestFetch] = {}
        self._changed = Changes()

    def current(self, key: FetchKey) -> ManifestFetch | None:
        """The fetch of ``key`` running now, if any."""
        return self._fetches.get(key)

    def lead(self, key: FetchKey, credentials: ConfirmationKey) -> ManifestFetch:
        """Register the caller as the one fetching ``key``; it must call :meth:`finish`."""
        fetch = ManifestFetch(key, credentials)
        self._fetches[key] = fetch
        self._note_change()
        return fetch

    async def follow(self, fetch: ManifestFetch) -> CachedManifest | None:
        """Wait for ``fetch`` to finish; its stored manifest, or None if it stored none."""
        fetch.followers += 1
        self._note_change()
        try:
            await fetch.done.wait()
            answer = fetch.answer
        finally:
            fetch.followers -= 1
        if not fetch.followers:
            fetch.answer = None  # all took it: the fetch no longer pins the body
        return answer

    def finish(self, fetch: ManifestFetch, answer: CachedManifest | None) -> None:
        """End ``fetch`` (the first call counts) and release its followers."""
        if fetch.done.is_set():
            return
        fetch.answer = answer if fetch.followers else None  # nobody to pin the body for
        fetch.done.set()
        if self._fetches.get(fetch.key) is fetch:
            del self._fetches[fetch.key]
        self._note_change()

    def followers(self, key: FetchKey) -> int:
        """How many requests wait on the fetch of ``key`` now (0 if none runs)."""
        fetch = self._fetches.get(key)
        return fetch.followers if fetch is not None else 0

    def __len__(self) -> int:
        return len(self._fetches)

    async def wait_changed(self) -> None:
        """Wait until a fetch starts, gains a follower or ends (tests)."""
        await self._changed.wait()

    def _note_change(self) -> None:
        self._changed.note()


@dataclass(eq=False)
class _Waiter:
    client: str
    size: int
    granted: trio.Event


class MemoryBudget:
    """Bytes of manifests being buffered from upstreams, at most ``limit`` (see the module)."""

    def __init__(
        self,
        limit: int,
        on_change: Callable[[int], None] | None = None,
        *,
        share: int | None = None,
    ) -> None:
        """``share``: the bytes one client may have in flight (None: the whole ``limit``)."""
        self.limit = limit
        self.share = limit if share is None else share
        self.used = 0
        self.used_by: dict[str, int] = {}  # client -> bytes in flight (only those > 0)
        self._on_change = on_change
        self._queue: deque[_Waiter] = deque()
        self._changed = Changes()

    @property
    def waiting(self) -> int:
        """Fetches waiting for room now."""
        return len(self._queue)

    @asynccontextmanager
    async def hold(self, size: int, patience: float, client: str = "") -> AsyncIterator[None]:
        """Hold ``size`` bytes of the budget for ``client`` for the body of the ``with``; wait
        up to ``patience`` seconds for room, else raise MirrorBusy."""
        await self._acquire(client, size, patience)
        try:
            yield
        finally:
            self._release(client, size)

    async def _acquire(self, client: str, size: int, patience: float) -> None:
        # a cancel point before taking (nothing may cancel between the two), but no schedule
        # point: the sending or fetching that follows has one, and a second is one more
        # task step, through the whole request's stack, for every manifest
        await trio.lowlevel.checkpoint_if_cancelled()
        asks = [*((w.client, w.size) for w in self._queue), (client, size)]
        if len(asks) - 1 in admit_fetches(self.limit, self.share, self.used, self.used_by, asks):
            self._take(client, size)
            return
        waiter = _Waiter(client, size, trio.Event())
        self._queue.append(waiter)
        self._note_change()
        try:
            with trio.move_on_after(patience):
                await waiter.granted.wait()
        except BaseException:
            self._forget(waiter)
            raise
        if not waiter.granted.is_set():
            self._forget(waiter)
            raise MirrorBusy(
                "too many manifests are being fetched at once; retry shortly",
                headers=((b"retry-after", RETRY_AFTER),),
            )

    def _take(self, client: str, size: int) -> None:
        self.used += size
        self.used_by[client] = self.used_by.get(client, 0) + size
        self._note_change()

    def _release(self, client: str, size: int) -> None:
        self.used -= size
        left = self.used_by.get(client, 0) - size
        if left > 0:
            self.used_by[client] = left
        else:
            self.used_by.pop(client, None)
        self._grant()
        self._note_change()

    def _forget(self, waiter: _Waiter) -> None:
        """A waiter that gave up (timeout or cancel): give back what it was granted, or leave
        the queue (and let whoever was behind it in)."""
        if waiter.granted.is_set():
            self._release(waiter.client, waiter.size)
        else:
            self._queue.remove(waiter)
            self._grant()
            self._note_change()

    def _grant(self) -> None:
        # first come, first served within the whole; a client at its share is passed over
        # (policy.cachepolicy.admit_fetches), so its queue never holds up another's manifest
        waiting = list(self._queue)
        chosen = admit_fetches(
            self.limit, self.share, self.used, self.used_by, [(w.client, w.size) for w in waiting]
        )
        for index in chosen:
            waiter = waiting[index]
            self._queue.remove(waiter)
            self.used += waiter.size
            self.used_by[waiter.client] = self.used_by.get(waiter.client, 0) + waiter.size
            waiter.granted.set()

    async def wait_changed(self) -> None:
        """Wait until bytes are taken or given back, or a fetch starts or stops waiting."""
        await self._changed.wait()

    def _note_change(self) -> None:
        if self._on_change is not None:
            self._on_change(self.used)
        self._changed.note()


class SharedBodies:
    """The bodies of manifests being sent to clients, one object per digest."""

    def __init__(self, on_change: Callable[[int], None] | None = None) -> None:
        self._bodies: dict[str, tuple[bytes, int]] = {}  # digest -> (body, senders)
        self.bytes = 0
        self._on_change = on_change

    def current(self, digest: str) -> bytes | None:
        """The body of ``digest`` if some client is being sent it now."""
        entry = self._bodies.get(digest)
        return entry[0] if entry is not None else None

    def share(self, manifest: CachedManifest) -> _Sharing:
        """The one body of ``manifest.digest`` while the ``with`` sends it (the first sender's
        becomes everyone's)."""
        return _Sharing(self, manifest)

    def _add(self, manifest: CachedManifest) -> bytes:
        digest = manifest.digest
        body, senders = self._bodies.get(digest, (manifest.body, 0))
        if not senders:
            self.bytes += len(body)
        self._bodies[digest] = (body, senders + 1)
        self._note_change()
        return body

    def _drop(self, digest: str) -> None:
        body, senders = self._bodies[digest]
        if senders == 1:
            del self._bodies[digest]
            self.bytes -= len(body)
        else:
            self._bodies[digest] = (body, senders - 1)
        self._note_change()

    def _note_change(self) -> None:
        if self._on_change is not None:
            self._on_change(self.bytes)


class _Sharing:
    """``SharedBodies.share``'s ``with`` (a class: a generator-made context manager costs
    three times the calls, on every manifest sent)."""

    __slots__ = ("_bodies", "_manifest")

    def __init__(self, bodies: SharedBodies, manifest: CachedManifest) -> None:
        self._bodies = bodies
        self._manifest = manifest

    def __enter__(self) -> bytes:
        return self._bodies._add(self._manifest)

    def __exit__(self, *exc_info: object) -> None:
        self._bodies._drop(self._manifest.digest)


@dataclass(eq=False)
class Outgoing:
    """A manifest about to be sent: what it takes to find its body again, and the body while
    it is held (None while its sender waits for room)."""

    repository: str
    digest: str
    media_type: str
    size: int
    body: bytes | None
    # the fetch that brought it, counted against its client (``SendBudget.fetching``) until
    # the sender holds the body or waits for room: called then, once
    fetched: Callable[[], None] | None = None

    @classmethod
    def of(cls, repository: str, manifest: CachedManifest) -> Outgoing:
        """The outgoing form of ``manifest`` served in ``repository``."""
        body = manifest.body
        return cls(repository, manifest.digest, manifest.media_type, len(body), body)


def _hand_over(outgoing: Outgoing) -> None:
    """The fetch that brought ``outgoing`` is no longer one: its sender holds the body, or
    waits for room (``SendBudget.fetching``)."""
    fetched = outgoing.fetched
    if fetched is not None:
        outgoing.fetched = None
        fetched()


class _Holding:
    """``SendBudget.hold``'s ``async with`` (a class, as ``_Sharing``)."""

    __slots__ = ("_ask", "_budget", "_outgoing", "_patience")

    def __init__(
        self, budget: SendBudget, ask: SendAsk, outgoing: Outgoing, patience: float
    ) -> None:
        self._budget = budget
        self._ask = ask
        self._outgoing = outgoing
        self._patience = patience

    async def __aenter__(self) -> None:
        await self._budget._acquire(self._ask, self._outgoing, self._patience)

    async def __aexit__(self, *exc_info: object) -> None:
        self._budget._release(self._ask)


@dataclass(eq=False)
class _Sender:
    ask: SendAsk
    granted: trio.Event


class SendBudget:
    """Bytes of manifest bodies held for sending, bounded per client and in all (see the
    module and ``policy/sending.py``)."""

    def __init__(
        self,
        limits: SendLimits,
        on_change: Callable[[int], None] | None = None,
        on_wait: Callable[[], None] | None = None,
        on_timeout: Callable[[], None] | None = None,
        on_fetch_wait: Callable[[], None] | None = None,
    ) -> None:
        self.limits = limits
        self._held: dict[SendAsk, int] = {}  # (client, digest, size) -> senders holding it
        self.used = 0  # each manifest held counted once
        self._on_change = on_change
        self._on_wait = on_wait
        self._on_timeout = on_timeout
        self._on_fetch_wait = on_fetch_wait
        self._fetching: Counter[str] = Counter()  # client -> manifests it is fetching now
        self._queue: list[_Sender] = []
        self._changed = Changes()

    @property
    def waiting(self) -> int:
        """Senders waiting for room now."""
        return len(self._queue)

    def client_used(self, client: str) -> int:
        """Bytes held for sending to ``client``, each manifest counted once."""
        return sum(ask.size for ask in self._held if ask.client == client)

    def hold(self, client: str, outgoing: Outgoing, patience: float) -> _Holding:
        """Hold room for ``outgoing``'s body for the ``async with``; if there is none now, drop
        the body (``outgoing.body = None``) and wait up to ``patience`` seconds, else
        MirrorBusy."""
        return _Holding(self, SendAsk(client, outgoing.digest, outgoing.size), outgoing, patience)

    async def _acquire(self, ask: SendAsk, outgoing: Outgoing, patience: float) -> None:
        # a cancel point before taking (nothing may cancel between the two), but no schedule
        # point: the sending or fetching that follows has one, and a second is one more
        # task step, through the whole request's stack, for every manifest
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._queue and admit(self.limits, self._held.keys(), (ask,)):
            # room now, nobody queued: held at once (no queue entry, no event to wait on)
            self._hold(ask)
            _hand_over(outgoing)
            self._note_change()
            return
        sender = _Sender(ask, trio.Event())
        self._queue.append(sender)
        self._grant()
        _hand_over(outgoing)
        if sender.granted.is_set():
            self._note_change()
            return
        outgoing.body = None  # wait without pinning the body: it is found again once let in
        if self._on_wait is not None:
            self._on_wait()
        self._note_change()
        try:
            with trio.move_on_after(patience):
                await sender.granted.wait()
        except BaseException:
            self._forget(sender)
            raise
        if not sender.granted.is_set():
            self._forget(sender)
            if self._on_timeout is not None:
                self._on_timeout()
            raise MirrorBusy(
                "too many manifests are being sent at once; retry shortly",
                headers=((b"retry-after", RETRY_AFTER),),
            )

    @asynccontextmanager
    async def fetching(self, client: str, patience: float) -> AsyncIterator[Callable[[], None]]:
        """Wait until ``client`` may fetch another manifest (``policy.sending.may_fetch``; at
        once, no schedule point, if it may now; MirrorBusy after ``patience`` seconds), and
        count it as fetching for the ``with`` or until the function it gives is called (its
        body handed to :meth:`hold`)."""
        if not self._may_fetch(client):
            if self._on_fetch_wait is not None:
                self._on_fetch_wait()
            self._note_change()
            with trio.move_on_after(patience):
                while not self._may_fetch(client):
                    await self._changed.wait()
            if not self._may_fetch(client):
                raise MirrorBusy(
                    "this client has not read the manifests it asked for; retry once it has",
                    headers=((b"retry-after", RETRY_AFTER),),
                )
        self._fetching[client] += 1
        counted = True

        def handed_over() -> None:
            nonlocal counted
            if counted:
                counted = False
                self._fetching[client] -= 1
                if not self._fetching[client]:
                    del self._fetching[client]
                self._note_change()

        try:
            yield handed_over
        finally:
            handed_over()

    def _may_fetch(self, client: str) -> bool:
        return may_fetch(
            self.limits,
            self._held.keys(),
            [s.ask for s in self._queue],
            self._fetching[client],
            client,
        )

    def _release(self, ask: SendAsk) -> None:
        count = self._held[ask] - 1
        if count:
            self._held[ask] = count
        else:
            del self._held[ask]
            if not any(other.digest == ask.digest for other in self._held):
                self.used -= ask.size
        self._grant()
        self._note_change()

    def _forget(self, sender: _Sender) -> None:
        """A sender that gave up (timeout or cancel): give back what it was granted, or leave
        the queue (and let whoever was behind it in)."""
        if sender.granted.is_set():
            self._release(sender.ask)
        else:
            self._queue.remove(sender)
            self._grant()
            self._note_change()

    def _grant(self) -> None:
        if not self._queue:
            return
        chosen = admit(self.limits, self._held.keys(), [s.ask for s in self._queue])
        if not chosen:
            return
        picked = set(chosen)
        for index in chosen:
            sender = self._queue[index]
            self._hold(sender.ask)
            sender.granted.set()
        self._queue = [s for i, s in enumerate(self._queue) if i not in picked]

    def _hold(self, ask: SendAsk) -> None:
        held = self._held.get(ask, 0)
        if not held and not any(other.digest == ask.digest for other in self._held):
            self.used += ask.size
        self._held[ask] = held + 1

    async def wait_changed(self) -> None:
        """Wait until room is taken or given back, or a sender starts or stops waiting, or a
        fetch starts waiting (``wait_to_fetch``)."""
        await self._changed.wait()

    def _note_change(self) -> None:
        if self._on_change is not None:
            self._on_change(self.used)
        self._changed.note()
