"""Pull-through caching: the driver of :mod:`cachepolicy` for blobs, manifests and ``/v2/``.

Every rule about whether the cache may answer a client lives in ``cachepolicy.py``; this module
gathers the facts (what the stores hold, what was confirmed, what the upstream said), asks
:func:`cachepolicy.decide`, and performs the I/O: the access check (a HEAD with the client's own
credentials to the primary upstream; Docker Hub does not count HEADs against the rate limit),
fills, forwarding, stale answers (each logged) and the background question "may anyone read this
repository?" (asked anonymously of the primary upstream, again once the answer is an hour old).

A 404 from the primary upstream to a manifest request is remembered for ``--negative-ttl``
(``negative.py``): for the same credentials at once, and for anyone once an anonymous re-ask in a
repository anyone may read gets 404 too (``cachepolicy.share_negative``).

Tags are revalidated with HEAD (never GET, which Docker Hub counts); ``--manifest-ttl`` lets a tag
skip that for a while once this client's access to the repository is confirmed, for as long as
the most specific of its rules says (``cachepolicy.tag_ttl``: ``latest`` briefly, ``1.27.3`` long).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import time
import urllib.parse
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import h11
import trio

from ..net.fairness import gate
from ..net.server import ClientRequest, ClientResponse
from ..net.upstream import UpstreamConnection
from ..policy import flow
from ..policy.access import client_key
from ..policy.auth import parse_challenges
from ..policy.cachepolicy import (
    ANYONE,
    AskUpstream,
    CacheRequest,
    ConfirmationKey,
    Confirmations,
    Decision,
    FetchKey,
    Fill,
    Kind,
    ManifestReferences,
    NegativeKey,
    Readability,
    ServeCache,
    ServeStale,
    TagKey,
    TtlRule,
    UpstreamVerdict,
    access_check_headers,
    after_upstream,
    anonymously_readable,
    confirmation_key,
    decide,
    fetch_share,
    keep_manifest,
    may_share_fetch,
    ping_stale_allowed,
    remember_negative,
    share_negative,
    should_probe,
    stale_allowed,
    tag_current,
    tag_fresh,
    tag_ttl,
    upstream_unavailable,
    verdict,
    vouched_paths,
)
from ..policy.errors import (
    CacheFillFailed,
    ManifestUnknown,
    MirrorBusy,
    ProxyError,
    RangeNotSatisfiable,
    ResponseAborted,
    UpstreamUnavailable,
)
from ..policy.headers import Headers, get_all, get_header
from ..policy.inventory import image_key
from ..policy.peers import PEER_MARKER, PEER_PROFILE, PeerAnswer, peer_answer
from ..policy.redirecthits import loggable_url, may_redirect, redirect_headers, redirect_hit
from ..policy.routing import Route
from ..policy.sending import send_limits
from ..policy.trouble import note_stale, stale_cause, stale_line, status_cause
from ..policy.urls import Url, parse_url
from .claims import ClaimedElsewhere
from .inflight import (
    RETRY_AFTER,
    ManifestFetch,
    ManifestFetches,
    MemoryBudget,
    Outgoing,
    SendBudget,
    SharedBodies,
)
from .lru import ShardedLRU
from .manifests import (
    MAX_MANIFEST,
    CachedManifest,
    ManifestStore,
    accept_key,
    accepted_types,
    takes,
)
from .negative import NegativeCache
from .peering import PeerBody, Peers
from .sharedstate import SharedState
from .store import (
    BlobReader,
    BlobStore,
    BodySource,
    NoRoom,
    cached_blob_answer,
    sha256_hex,
)

if TYPE_CHECKING:
    from ..forwarder import Forwarder

log = logging.getLogger("hubproxy.cache")

CACHE_METHODS = frozenset({"GET", "HEAD"})
PROBE_BODY_LIMIT = 64 * 1024
SENDFILE_SIZE = 4 * 1024 * 1024  # per os.sendfile call: no copy, so larger spans cost nothing
# A manifest body goes out in slices of one shared buffer, one in flight: a client that reads
# nothing holds one framed (and encrypted) slice, not a copy of the whole manifest.
MANIFEST_SLICE = 64 * 1024
# Anonymous re-asks of a 404 (may it be repeated to anyone?) under way at once; beyond them a 404
# is only repeated to the same credentials: a client asking for many missing tags makes the
# mirror hold this many background requests, not one each.
MAX_NEGATIVE_CHECKS = 8


def state_name(route: Route) -> str:
    """The name cached state is kept under: the repository, qualified by its registry unless
    it is the default one (so ``ghcr.io/owner/image`` and Docker Hub's ``owner/image`` differ)."""
    repository = route.repository or ""
    return f"{route.registry}/{repository}" if route.registry else repository


def _path(route: Route) -> str:
    return route.target.partition("?")[0]


class PullThrough:
    """The cache side of the proxy: blobs (``BlobStore``) and manifests (``ManifestStore``)."""

    def __init__(
        self,
        forwarder: Forwarder,
        blobs: BlobStore,
        manifests: ManifestStore,
        manifest_ttl: float,
        ttl_rules: tuple[TtlRule, ...] = (),
    ) -> None:
        self.forwarder = forwarder
        self.blobs = blobs
        self.manifests = manifests
        self.manifest_ttl = manifest_ttl  # tags no rule names
        self.ttl_rules = ttl_rules  # --manifest-ttl PATTERN=DURATION
        self.stats = blobs.stats
        self.peers: Peers | None = None  # --peer: the instances sharing the upstream fetches
        # --cache-store: the manifest state other instances published (cache/sharedstate.py)
        self.shared_state: SharedState | None = None
        # --peer: blobs this instance asks the upstream for now, until the answer's head (one
        # entry per request under way: bounded by the connection limits)
        # (registry, blob key) -> set once the one request asking for it has an answer (a
        # stalled ask for one registry never holds a request for the same digest on another)
        self.asking: dict[tuple[str, str], trio.Event] = {}
        # blobs another process removed (hubproxy cache rm, another worker's admin API)
        manifests.on_blobs_removed = blobs.forget
        self.confirmations = Confirmations()
        self.references = ManifestReferences()  # what served manifests name, parsed once
        # --workers N: confirmations passed on here, sent to the other workers (confirmshare)
        self.share_confirmations: Callable[[list[tuple[ConfirmationKey, float]]], None] | None = (
            None
        )
        # when each tag answer was revalidated: one entry per tag and Accept asked, so bounded
        # like the manifest store's own indexes (oldest revalidation dropped first)
        self.tag_checked: ShardedLRU[TagKey, float] = ShardedLRU()
        self.probing: set[str] = set()
        self._probes_idle = trio.Event()
        self._probes_idle.set()
        metrics = forwarder.metrics
        self.negatives = NegativeCache(
            forwarder.config.negative_ttl,
            forwarder.config.manifest_cache_entries,
            metrics.negative_cache_entries.set,
        )
        self.negative_checks: set[NegativeKey] = set()  # anonymous re-asks under way
        self.manifest_fetches = ManifestFetches()
        self.manifest_memory = MemoryBudget(
            forwarder.config.manifest_memory,
            metrics.manifest_bytes_in_flight.set,
            share=fetch_share(forwarder.config.manifest_memory, MAX_MANIFEST),
        )
        metrics.manifest_memory_limit.set(forwarder.config.manifest_memory)
        self.manifest_bodies = SharedBodies()
        # bodies held for sending: per client address and in all (a client that never reads
        # must not pin one body per connection it opens)
        self.manifest_sending = SendBudget(
            send_limits(forwarder.config.manifest_memory, MAX_MANIFEST),
            metrics.manifest_bytes_sending.set,
            on_wait=metrics.manifest_send_waits.inc,
            on_timeout=metrics.manifest_send_wait_timeouts.inc,
            on_fetch_wait=metrics.manifest_fetch_waits.inc,
        )

    def _note_tag_checked(self, key: TagKey) -> None:
        """Record that ``key``'s answer was just confirmed (``--manifest-cache-entries`` kept)."""
        self.tag_checked[key] = trio.current_time()
        self.tag_checked.move_to_end(key)
        while len(self.tag_checked) > self.manifests.max_entries:
            self.tag_checked.popitem(last=False)

    def expire_tag(self, repository: str, tag: str, headers: Headers) -> None:
        """Make the next request for ``repository:tag`` by a client sending these ``Accept``
        ``headers`` ask the upstream where the tag points, whatever its ``--manifest-ttl``
        (the scheduled prefetch: a moved tag is picked up each round)."""
        accepted = accepted_types(get_all(headers, b"accept"))
        key = TagKey(repository, tag, accepted)
        if key in self.tag_checked:
            del self.tag_checked[key]

    def handles(self, request: ClientRequest, route: Route) -> bool:
        if request.method not in CACHE_METHODS:
            return False
        if route.repository is None:
            return route.target.partition("?")[0] == "/v2/"
        if route.blob_digest is not None:
            return sha256_hex(route.blob_digest) is not None
        reference = route.manifest_reference
        if reference is None:
            return False
        return ":" not in reference or sha256_hex(reference) is not None  # a tag, or sha256

    async def serve(
        self, plan: flow.Plan, request: ClientRequest, response: ClientResponse, route: Route
    ) -> None:
        if route.blob_digest is not None:
            key = sha256_hex(route.blob_digest)
            assert key is not None  # handles() said so
            await self._serve_blob(plan, request, response, route, key)
        elif route.manifest_reference is not None:
            await self._serve_manifest(plan, request, response, route)
        else:
            await self._serve_ping(plan, request, response, route)

    async def _serve_ping(
        self, plan: flow.Plan, request: ClientRequest, response: ClientResponse, route: Route
    ) -> None:
        """``/v2/``: the upstream's answer; while it is down, a 200 so that clients go on to
        what the cache can serve (the public repositories' manifests and blobs)."""
        try:
            await self.forwarder.run_flow(
                plan, request, response, upstreams=self.forwarder.upstreams_for(route)
            )
        except ProxyError:
            readable = ping_stale_allowed(self.manifests.readability.values(), time.time())
            if not readable and not response.started and self.shared_state is not None:
                # an instance that knows no repository yet: the one others learned last
                await self.shared_state.adopt_latest_readable(self.manifests)
                readable = ping_stale_allowed(self.manifests.readability.values(), time.time())
            if response.started or not readable:
                raise
            self._note_stale(route, "the /v2/ ping", response)
            body = b"{}"
            await response.start(
                200,
                [
                    (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(body)),
                    (b"docker-distribution-api-version", b"registry/2.0"),
                ],
            )
            if request.method == "GET":
                await response.send(body)
            await response.finish()

    # -- access ------------------------------------------------------------------------------

    def _confirmed(self, request: ClientRequest, route: Route) -> bool:
        key = self._confirmation_key(request, route)
        return self.confirmations.confirmed(key, trio.current_time())

    def _remember_access(
        self, request: ClientRequest, route: Route, response: ClientResponse | None = None
    ) -> None:
        """Remember that the upstream let this client read this path. ``response``: the one
        whose upstream answer said so, when it was not an access check: a fallback's yes proves
        nothing about this client (it may hold credentials of its own), so is not kept."""
        if response is not None and self._from_fallback(response, route):
            return
        key = self._confirmation_key(request, route)
        self.confirmations.remember(key, trio.current_time())

    def _from_fallback(self, response: ClientResponse, route: Route) -> bool:
        """Whether ``response`` carries the answer of one of the route's ``--fallback``s."""
        return self.forwarder.upstreams_for(route).index_of(response.record.upstream) > 0

    def _pass_on_access(self, key: ConfirmationKey, route: Route, manifest: CachedManifest) -> None:
        """A manifest served on confirmation ``key`` (this client's, for this route): confirm,
        until the same expiry, what it names that its repository was seen to hold
        (``vouched_paths``), so that the rest of the pull asks the upstream nothing more."""
        now = trio.current_time()
        until = self.confirmations.expiry(key, now)
        if until is None or route.repository is None:
            return
        if not self.confirmations.first_pass(key, until, now):
            return  # this very confirmation was passed on already
        repository = state_name(route)
        references = self.references.of(manifest.digest, manifest.media_type, manifest.body)
        linked = functools.partial(self.manifests.linked_shared, repository)
        carried: list[tuple[ConfirmationKey, float]] = []
        for path in vouched_paths(route.repository, references, linked):
            vouched = key._replace(path=path)
            if not self.confirmations.carry(vouched, until, now):
                break
            carried.append((vouched, until - now))
        if carried and self.share_confirmations is not None:
            self.share_confirmations(carried)
            self.stats.confirmations_shared += len(carried)

    def keep_shared(self, key: ConfirmationKey, seconds_left: float) -> None:
        """A confirmation another worker passed on (``confirmshare``), kept as long as there."""
        now = trio.current_time()
        if self.confirmations.carry(key, now + seconds_left, now):
            self.stats.confirmations_received += 1

    async def _ask_upstream(
        self,
        plan: flow.Plan,
        request: ClientRequest,
        response: ClientResponse,
        route: Route,
        kind: Kind,
    ) -> tuple[UpstreamVerdict, h11.Response | None]:
        """HEAD the client's path on the primary upstream with its credentials (and without its
        conditions): may it read this? A fallback's yes would prove nothing about this client
        (it may hold credentials of its own), so a resting primary means no answer."""
        upstreams = self.forwarder.upstreams_for(route)
        if upstreams.resting_until[0] > trio.current_time():
            return UpstreamVerdict.UNAVAILABLE, None
        # the request's own credentials (the client's, or the operator's where it may use them)
        plan = dataclasses.replace(
            plan,
            method="HEAD",
            target=_path(route),
            upstreams=upstreams.urls[:1],
            replayable=True,
            follow_redirects=False,
        )
        checked = dataclasses.replace(request, headers=access_check_headers(request.headers))
        answer: h11.Response | None = None

        async def keep_head(
            conn: UpstreamConnection, head: h11.Response, headers: Headers, stack: AsyncExitStack
        ) -> None:
            nonlocal answer
            answer = head
            await conn.discard_body(PROBE_BODY_LIMIT)

        try:
            # upstreams=None: the plan holds the primary only, and no failover may happen
            await self.forwarder.run_flow(
                plan, checked, response, upstreams=None, deliver=keep_head, health_of=upstreams
            )
        except ProxyError:
            return UpstreamVerdict.UNAVAILABLE, None
        assert answer is not None
        said = verdict(answer.status_code, list(answer.headers), kind=kind)
        if said is UpstreamVerdict.ALLOWED:
            self._remember_access(request, route)
            if kind is Kind.MANIFEST:
                self.negatives.forget_path(route.registry or "", _path(route))
        return said, answer

    def _stale_ok(self, route: Route, digest: str) -> bool:
        repository = state_name(route)
        return stale_allowed(
            self.manifests.readability.get(repository),
            self.manifests.linked(repository, digest),
            time.time(),
        )

    async def _stale_ok_anywhere(self, route: Route, digest: str) -> bool:
        """``_stale_ok``, and failing that the same rule over the facts another instance
        published (``--cache-store``): for when the upstream cannot answer, and the answer is
        cached but this instance never learned whether it may go out stale."""
        if self._stale_ok(route, digest):
            return True
        if self.shared_state is None:
            return False
        await self.shared_state.adopt_link(self.manifests, state_name(route), digest)
        return self._stale_ok(route, digest)

    def _note_stale(
        self, route: Route, what: str, response: ClientResponse, head: h11.Response | None = None
    ) -> None:
        """Count a stale answer; log it once per upstream and cause (``trouble.note_stale``),
        naming the cause: the status that ``head`` (the upstream's answer) had, else the trouble
        the upstream last asked (``response.record.upstream``) is in."""
        self.stats.stale_answers += 1
        upstreams = self.forwarder.upstreams_for(route)
        index = upstreams.index_of(response.record.upstream)
        health = upstreams.health[index]
        cause = None
        if head is not None:
            cause = status_cause(head.status_code, list(head.headers), time.time())
        if cause is None:
            cause = stale_cause(health)
        upstreams.health[index], due = note_stale(health, cause)
        if due:
            first = what if route.repository is None else f"{what} of {state_name(route)}"
            log.warning("%s", stale_line(str(upstreams.urls[index].origin), cause, first))

    # -- blobs -------------------------------------------------------------------------------

    async def _serve_blob(
        self,
        plan: flow.Plan,
        request: ClientRequest,
        response: ClientResponse,
        route: Route,
        key: str,
        *,
        waited: bool = False,
    ) -> None:
        """A hit (after the access check), or a miss whose upstream answer may start a fill.

        Nobody waits for another client's miss: only a fill under way (which exists once an
        upstream answered 200 with a size the cache takes) is followed, and only by clients of
        the registry it comes from. Concurrent misses each ask their upstream; the first 200
        starts the fill and the others follow it (see ``_deliver_blob``)."""
        digest = route.blob_digest or ""
        self.manifests.settle()  # another process's removals first
        shared = self.blobs.shared
        candidate = shared is not None and may_redirect(
            enabled=self.forwarder.config.redirect_hits,
            method=request.method,
            from_peer=get_header(request.headers, PEER_MARKER) is not None,
        )
        # --redirect-hits: a blob the store holds is a hit (the access check below decides
        # whether this client gets it), answered with its URL; nothing is read into the cache
        in_store = candidate and shared is not None and await shared.holds(key)
        if not candidate:  # (a candidate's store lookup just said no: not asked twice)
            await self._read_shared(request, route, key)
        if not in_store:
            await self._await_asking(request, route, key)
        facts = CacheRequest(
            kind=Kind.BLOB,
            method=request.method,
            has_range=get_header(request.headers, b"range") is not None,
            cached=in_store or self._blob_cached(key, route),
            confirmed=self._confirmed(request, route),
        )
        decision: Decision = decide(facts)
        if isinstance(decision, AskUpstream):
            said, _head = await self._ask_upstream(plan, request, response, route, Kind.BLOB)
            if said is UpstreamVerdict.ALLOWED:
                self.manifests.link(state_name(route), digest)
            # evicted while we asked: a miss after all
            cached = in_store or self._blob_cached(key, route)
            facts = dataclasses.replace(facts, cached=cached)
            if said is UpstreamVerdict.UNAVAILABLE and facts.cached:
                facts = dataclasses.replace(
                    facts, stale_ok=await self._stale_ok_anywhere(route, digest)
                )
            decision = decide(facts, said)
        redirect = redirect_hit(decision, candidate=candidate, in_store=in_store)
        if isinstance(decision, ServeCache | ServeStale):
            if isinstance(decision, ServeStale):
                self._note_stale(route, "a blob", response)
            else:
                self.stats.hits += 1
            if self.blobs.shared is not None:  # the bucket's recency (--cache-store-size)
                self.blobs.shared.accessed(key)
            if redirect and await self._redirect_blob(response, route, key):
                return
            if in_store and not self._blob_cached(key, route):
                await self._read_shared(request, route, key)  # no URL after all: stream it
            await self._send_blob(plan, request, response, route, key)
            return
        deliver = None
        asking = None
        try:
            if isinstance(decision, Fill):
                self.stats.misses += 1
                # from here until a fill starts (from the owner's answer or the upstream's),
                # other misses of this blob wait for it (``_await_asking``): one request to the
                # owner per blob, and one to the upstream if the owner fails, not one per client
                asking = self._start_asking(route, key)
                if asking is None and self.peers is not None and not waited:
                    # another miss began asking while this one made its access check: its
                    # answer, then this request again (a fill it started is followed)
                    await self._await_asking(request, route, key)
                    await self._serve_blob(plan, request, response, route, key, waited=True)
                    return
                if await self._fill_from_peer(plan, request, response, route, key):
                    return
                deliver = functools.partial(self._deliver_blob, plan, request, response, route, key)
            await self.forwarder.run_flow(
                plan,
                request,
                response,
                upstreams=self.forwarder.upstreams_for(route),
                blob_digest=route.blob_digest,
                deliver=deliver,
            )
        finally:
            self._done_asking(route, key, asking)

    def _start_asking(self, route: Route, key: str) -> trio.Event | None:
        """``--peer``: note that this request asks the upstream for blob ``key`` (another miss
        of it waits for the answer rather than asking too; see ``_await_asking``)."""
        asked = (route.registry or "", key)
        if self.peers is None or asked in self.asking:
            return None
        event = self.asking[asked] = trio.Event()
        return event

    def _done_asking(self, route: Route, key: str, event: trio.Event | None) -> None:
        """The upstream answered (a fill started, or not) or failed: the waiters go on."""
        asked = (route.registry or "", key)
        if event is not None and self.asking.get(asked) is event:
            del self.asking[asked]
            event.set()

    async def _await_asking(self, request: ClientRequest, route: Route, key: str) -> None:
        """``--peer``: a whole-blob GET miss while this instance already asks for the blob (the
        owner asks its upstream, for its peers and its own clients at once; another instance
        asks the owner, then the upstream if the owner fails) waits for that answer, at most
        twice ``--peer-timeout`` (the owner's time, then the upstream's head): then the fill it
        started is followed (after this client's own access check), and the owner and the
        upstream are each asked once, not once per request."""
        event = self.asking.get((route.registry or "", key))
        if (
            event is None
            or self.peers is None
            or request.method != "GET"
            or self._blob_cached(key, route)
        ):
            return
        with trio.move_on_after(2 * self.peers.timeout):
            await event.wait()

    async def _fill_from_peer(
        self,
        plan: flow.Plan,
        request: ClientRequest,
        response: ClientResponse,
        route: Route,
        key: str,
    ) -> bool:
        """``--peer``: a whole-blob GET miss whose digest another instance owns is fetched from
        that instance, which fetches it from the upstream once for everyone; filled here from
        its answer as from an upstream's (the same digest verification). The request goes as
        the client sent it (its path, routing and own Authorization: the owner makes the same
        access decision), marked so that the owner never passes it on. False: this instance
        owns the digest, the owner rests after a failure, it failed now (no answer within
        ``--peer-timeout``, or an error other than the upstream's 403/404), or it did not take
        the client's credentials (401: a mirror token only this instance reads): the upstream
        is asked instead, nothing having been sent to the client."""
        peers = self.peers
        if (
            peers is None
            or request.method != "GET"
            or get_header(request.headers, b"range") is not None
            or get_header(request.headers, PEER_MARKER) is not None
        ):
            return False
        index = peers.owner_of(key)
        if index is None:
            return False
        asked = dataclasses.replace(request, headers=[*request.headers, (PEER_MARKER, b"1")])
        peer_plan = dataclasses.replace(
            plan,
            target=request.target,  # the client's own path and query (ns=): the same routing
            upstreams=(peers.urls[index],),
            profile=PEER_PROFILE,
            replayable=True,
            follow_redirects=False,
            authorization=get_header(request.headers, b"authorization"),
            operator_authorization=None,
            anonymous_token=False,
            client_host=True,
        )
        refused: int | None = None
        passed = False

        async def deliver(
            conn: UpstreamConnection, head: h11.Response, headers: Headers, stack: AsyncExitStack
        ) -> None:
            nonlocal refused, passed
            waiting.deadline = math.inf  # it answered in time: the transfer has its own timeouts
            answer = peer_answer(head.status_code)
            if answer is PeerAnswer.ASK_UPSTREAM:
                refused = 0  # nothing sent; the peer is not in trouble
            elif answer is PeerAnswer.SKIP:
                refused = head.status_code  # its connection is closed, nothing sent
            elif answer is PeerAnswer.PASS:
                passed = True
                await self.forwarder.stream_response(conn, head, headers, response)
            else:
                await self._deliver_blob(
                    plan, request, response, route, key, conn, head, headers, stack, PeerBody(conn)
                )

        with trio.move_on_after(peers.timeout) as waiting:
            try:
                await self.forwarder.run_flow(
                    peer_plan,
                    asked,
                    response,
                    upstreams=None,
                    blob_digest=route.blob_digest,
                    deliver=deliver,
                )
            except ProxyError as exc:
                if waiting.deadline == math.inf:
                    raise  # it answered: a failure of the transfer itself
                peers.failed(index, f"could not be reached ({exc})")
                peers.note(index, "upstream")
                return False
        if waiting.cancelled_caught:
            peers.failed(index, f"did not answer within {peers.timeout:g}s (--peer-timeout)")
            peers.note(index, "upstream")
            return False
        if refused is not None:
            if refused:
                peers.failed(index, f"answered {refused}")
            peers.note(index, "upstream")
            return False
        peers.note(index, "passed" if passed else "filled")
        return True

    async def _redirect_blob(self, response: ClientResponse, route: Route, key: str) -> bool:
        """``--redirect-hits``: answer a hit with a 307 to a presigned URL of the blob in the
        store, so that its bytes go from the bucket to the client, not through this instance.
        The mirror cannot verify bytes it never sees: the client does, as registry clients
        verify the digest of every blob they pull (moby, containerd, containers/image); so a
        blob changed in the bucket is refused by the client instead of cut short by the mirror
        (``policy/redirecthits.py``). False: no URL could be signed (the hit is streamed)."""
        shared = self.blobs.shared
        assert shared is not None  # a candidate only with a store
        url = await shared.presigned(key)
        if url is None:
            return False
        shared.redirects += 1
        response.record.upstream = "redirect"  # the access log shows this, never the URL
        # the query carries the signature: only the rest may be logged
        log.debug("redirected %s to %s", route.blob_digest, loggable_url(url))
        await response.start(307, redirect_headers(url, route.blob_digest or ""))
        await response.finish()
        return True

    async def _read_shared(self, request: ClientRequest, route: Route, key: str) -> None:
        """``--cache-store``: a whole-blob GET of a blob neither on local disk nor being
        filled starts a local fill from the shared store if it has it (``cache/shared.py``);
        the request is then a hit, its access checked as any hit's."""
        shared = self.blobs.shared
        background = self.forwarder.background
        if shared is None or background is None or request.method != "GET":
            return
        if get_header(request.headers, b"range") is not None or self._blob_cached(key, route):
            return
        await shared.fill_from_store(self.blobs, key, route.registry or "", background)

    def _blob_cached(self, key: str, route: Route) -> bool:
        """Whether the store holds the blob, or fills it from this route's registry (another
        registry's fill is not followed: its upstream may be stalled)."""
        if self.blobs.size_of(key) is not None:
            return True
        fill = self.blobs.fill_of(key)  # another worker's fill too (--workers)
        return fill is not None and fill.source == (route.registry or "")

    async def _deliver_blob(
        self,
        plan: flow.Plan,
        request: ClientRequest,
        response: ClientResponse,
        route: Route,
        key: str,
        conn: UpstreamConnection,
        head: h11.Response,
        headers: Headers,
        stack: AsyncExitStack,
        body: BodySource | None = None,
    ) -> None:
        """The upstream's answer to a blob miss: start a fill and serve from it, follow the one
        that started meanwhile, or stream. ``body``: where the fill reads the bytes, when not
        straight from ``conn`` (an owner peer's answer: ``PeerBody``)."""
        store = self.blobs
        # the misses waiting for this answer go on, but only at this task's next checkpoint:
        # by then the fill below has started (or will not), and they follow it or ask themselves
        self._done_asking(route, key, self.asking.get((route.registry or "", key)))
        length = get_header(head.headers, b"content-length")
        size = int(length) if length is not None and length.isdigit() else None
        background = self.forwarder.background
        if head.status_code == 200 and size is not None and background is not None:
            if self._blob_cached(key, route):
                # another client's fill (or a hit) beat this answer: this client may read the
                # blob (its upstream said 200), so it follows the one fetch; its own is dropped
                await stack.aclose()
                self._remember_access(request, route, response)
                await self._send_blob(plan, request, response, route, key)
                return
            if key not in store.fills and store.can_fill(size):
                try:
                    fill = store.start_fill(key, size, route.registry or "")
                except OSError as exc:
                    if not isinstance(
                        exc, ClaimedElsewhere | NoRoom
                    ):  # lost to another worker: uncached
                        log.warning("cache: cannot create a file in %s: %s", store.tmp_dir, exc)
                else:
                    self._remember_access(request, route, response)
                    self.manifests.link(state_name(route), route.blob_digest or "")
                    source = conn if body is None else body
                    background.start_soon(store.run_fill, fill, source, stack.pop_all())
                    self._maybe_probe(route, _path(route), Kind.BLOB)
                    await self._send_blob(plan, request, response, route, key)
                    return
        cached = store.size_of(key) is not None
        stale = after_upstream(
            head.status_code, cached=cached, stale_ok=self._stale_ok(route, route.blob_digest or "")
        )
        if not isinstance(stale, ServeStale) and cached and upstream_unavailable(head.status_code):
            stale_ok = await self._stale_ok_anywhere(route, route.blob_digest or "")
            stale = after_upstream(head.status_code, cached=cached, stale_ok=stale_ok)
        if isinstance(stale, ServeStale):
            self._note_stale(route, "a blob", response, head)
            await self._send_blob(plan, request, response, route, key)
            return
        await self.forwarder.stream_response(conn, head, headers, response)

    async def _send_blob(
        self,
        plan: flow.Plan,
        request: ClientRequest,
        response: ClientResponse,
        route: Route,
        key: str,
    ) -> None:
        """Answer from the store (the growing file during a fill), with Range support."""
        digest = route.blob_digest or ""
        store = self.blobs
        size = store.size_of(key)
        fill = store.fills.get(key) if size is None else None
        if fill is not None:
            size = fill.size
        if size is None:
            # evicted, or its fill failed, since the decision (a follower closes its own
            # upstream exchange first, and that awaits): nothing was sent yet, so the upstream
            # answers this client instead, uncached
            log.info("cached blob %s went away before it was sent; asking the upstream", digest)
            await self.forwarder.run_flow(
                plan,
                request,
                response,
                upstreams=self.forwarder.upstreams_for(route),
                blob_digest=route.blob_digest,
            )
            return
        # a fill that verified its blob is the cache's, only not synced and renamed yet
        following = fill is not None and not fill.verified
        response.record.upstream = "cache-fill" if following else "cache"
        try:
            answer = cached_blob_answer(digest, size, get_header(request.headers, b"range"))
        except RangeNotSatisfiable:
            await response.start(
                416, [(b"content-range", b"bytes */%d" % size), (b"content-length", b"0")]
            )
            await response.finish()
            return
        # whether the cache had it or fetches it now (hubproxy prefetch counts its bytes so)
        headers = [*answer.headers, (b"x-cache", b"MISS" if following else b"HIT")]
        if request.method == "HEAD":
            await response.start(answer.status, headers)
            await response.finish()
            return
        reader = store.reader(key, answer.start, answer.end)
        try:
            await response.start(answer.status, headers)
            response.unwatch()  # the file, or a fill that goes on without this client
            if response.can_sendfile:
                while (span := await reader.next_span(SENDFILE_SIZE)) is not None:
                    await response.sendfile(*span)
                    self.stats.sendfile_bytes += span[2]
            else:
                while (chunk := await reader.next_chunk()) is not None:
                    await response.send(chunk)
        except CacheFillFailed as exc:
            whole = answer.start == 0 and answer.end == size and request.method == "GET"
            if not (exc.resumable and whole):
                if not response.committed:  # no byte left yet: the client gets a clear 502
                    raise UpstreamUnavailable(str(exc)) from exc
                raise ResponseAborted(str(exc)) from exc
            # only our disk failed: the client's transfer goes on from the upstream
            await self._finish_from_upstream(
                plan, request, response, route, key, reader, size, str(exc)
            )
        finally:
            reader.close()
        await response.finish()

    async def _finish_from_upstream(
        self,
        plan: flow.Plan,
        request: ClientRequest,
        response: ClientResponse,
        route: Route,
        key: str,
        reader: BlobReader,
        size: int,
        why: str,
    ) -> None:
        """Send the rest of a blob with a Range request upstream, verifying the whole blob
        (the part already sent is re-read from the partial file) before its last byte."""
        position = reader.position
        digest = route.blob_digest or ""
        log.warning(
            "cache: %s; finishing the transfer of %s from the upstream at byte %d",
            why,
            digest,
            position,
        )
        hasher = reader.hash_sent(hashlib.sha256())
        headers = [(k, v) for k, v in request.headers if k != b"range"]
        ranged = dataclasses.replace(
            request, headers=[*headers, (b"range", b"bytes=%d-" % position)]
        )
        plan = dataclasses.replace(plan, replayable=True)  # the same request, another range

        async def relay_rest(
            conn: UpstreamConnection, head: h11.Response, headers: Headers, stack: AsyncExitStack
        ) -> None:
            content_range = get_header(head.headers, b"content-range") or b""
            if head.status_code != 206 or not content_range.startswith(b"bytes %d-" % position):
                raise ResponseAborted(f"upstream could not resume {digest} at byte {position}")
            remaining = size - position
            while (chunk := await conn.receive_body()) is not None:
                hasher.update(chunk)
                remaining -= len(chunk)
                if remaining < 0:
                    raise ResponseAborted(f"upstream sent more of {digest} than its size")
                if remaining == 0:  # the last byte goes out only if the whole blob verifies
                    await response.send(chunk[:-1])
                    if hasher.hexdigest() != key:
                        self.stats.verification_failures += 1
                        raise ResponseAborted(f"{digest} from upstream does not match its digest")
                    await response.send(chunk[-1:])
                else:
                    await response.send(chunk)
            if remaining:
                raise ResponseAborted(f"upstream ended {digest} {remaining} bytes short")

        await self.forwarder.run_flow(
            plan,
            ranged,
            response,
            upstreams=self.forwarder.upstreams_for(route),
            deliver=relay_rest,
        )

    # -- manifests ---------------------------------------------------------------------------

    async def _cached_manifest(
        self, request: ClientRequest, repository: str, digest: str | None
    ) -> CachedManifest | None:
        """The cached manifest as served in ``repository``, if this client takes its type."""
        cached = await self.manifests.load(repository, digest) if digest else None
        if cached is not None and not takes(get_all(request.headers, b"accept"), cached.media_type):
            return None  # cached for another media type than this client takes
        return cached

    async def _serve_manifest(
        self,
        plan: flow.Plan,
        request: ClientRequest,
        response: ClientResponse,
        route: Route,
        *,
        coalesce: bool = True,
    ) -> None:
        """A hit (after the access check), or a miss; concurrent misses of one manifest make
        one upstream GET (``coalesce``: this request may lead or follow one)."""
        reference = route.manifest_reference or ""
        repository = state_name(route)
        by_digest = reference.startswith("sha256:")
        accepted = accepted_types(get_all(request.headers, b"accept"))
        if self._known_missing(request, route, accepted):
            self.forwarder.metrics.negative_cache_hits.inc()
            response.record.upstream = "cache"
            raise ManifestUnknown(
                f"manifest unknown: the upstream answered 404 for {route.repository}:{reference} "
                "moments ago"
            )
        tag_key = TagKey(repository, reference, accepted)
        digest = reference if by_digest else self.manifests.tag(repository, reference, accepted)
        cached = await self._cached_manifest(request, repository, digest)
        if cached is None and (digest is None or not self.manifests.linked(repository, digest)):
            # not here: another instance's, if it published it (then a hit after this client's
            # access check, a HEAD, instead of a GET counted against the rate limit)
            if await self._adopt_manifest(repository, reference, accepted):
                digest = (
                    reference if by_digest else self.manifests.tag(repository, reference, accepted)
                )
                cached = await self._cached_manifest(request, repository, digest)
        # the bytes are here, but the upstream never served them in this repository: the access
        # check's answer tells which media type it serves them with here
        learnable = cached is None and by_digest and self.manifests.has_body(reference)
        access = self._confirmation_key(request, route)  # and what a hit passes on (below)
        now = trio.current_time()
        facts = CacheRequest(
            kind=Kind.MANIFEST,
            method=request.method,
            has_range=False,
            cached=cached is not None or learnable,
            confirmed=cached is not None and self.confirmations.confirmed(access, now),
            by_digest=by_digest,
            tag_fresh=not by_digest
            and tag_fresh(
                self.tag_checked.get(tag_key),
                now,
                tag_ttl(reference, self.ttl_rules, self.manifest_ttl),
            ),
        )
        decision: Decision = decide(facts)
        if isinstance(decision, AskUpstream):
            said, head = await self._ask_upstream(plan, request, response, route, Kind.MANIFEST)
            current = False
            if said is UpstreamVerdict.ALLOWED and head is not None:
                if by_digest:
                    media_type = get_header(head.headers, b"content-type")
                    if media_type is not None:
                        self.manifests.link(repository, reference, _media_type(media_type))
                    cached = await self._cached_manifest(request, repository, reference)
                elif cached is not None:
                    header = get_header(head.headers, b"docker-content-digest")
                    current = tag_current(cached.digest, header)
                    if current:
                        self._note_tag_checked(tag_key)
            facts = dataclasses.replace(facts, cached=cached is not None, tag_current=current)
            if said is UpstreamVerdict.UNAVAILABLE and cached is not None:
                facts = dataclasses.replace(
                    facts, stale_ok=await self._stale_ok_anywhere(route, cached.digest)
                )
            decision = decide(facts, said)
        if isinstance(decision, ServeCache | ServeStale) and cached is not None:
            if isinstance(decision, ServeStale):
                self._note_stale(route, "a manifest", response)
            else:
                self.stats.hits += 1
                self._maybe_probe(route, f"/v2/{route.repository}/manifests/{cached.digest}")
                self._pass_on_access(access, route, cached)
            self._count_pull(request, route, hit=True)
            outgoing, cached = Outgoing.of(repository, cached), None  # pinned only while held
            await self._send_manifest(request, response, outgoing)
            return
        fetch: ManifestFetch | None = None
        counted = AsyncExitStack()  # this client's fetch, counted (policy.sending.may_fetch)
        handed_over: Callable[[], None] | None = None
        try:
            if isinstance(decision, Fill) and coalesce:
                key = FetchKey(route.registry or "", _path(route), accepted)
                credentials = self._confirmation_key(request, route)
                running = self.manifest_fetches.current(key)
                if running is None and request.method == "GET":
                    # a client that is not reading its manifests gets no more fetched meanwhile
                    handed_over = await counted.enter_async_context(
                        self.manifest_sending.fetching(
                            client_key(request.client_ip),
                            self.forwarder.config.timeouts.upstream_idle,
                        )
                    )
                    running = self.manifest_fetches.current(key)  # someone may have started it
                if running is not None:
                    await counted.aclose()
                    await self._follow(plan, request, response, route, running, credentials)
                    return
                fetch = self.manifest_fetches.lead(key, credentials)
            deliver = functools.partial(
                self._deliver_manifest,
                request,
                response,
                route,
                accepted,
                cached,
                fetch,
                handed_over,
            )
            try:
                await self.forwarder.run_flow(
                    plan,
                    request,
                    response,
                    upstreams=self.forwarder.upstreams_for(route),
                    deliver=deliver,
                )
            except ProxyError:
                stale_ok = facts.stale_ok
                if not stale_ok and not response.started and cached is not None:
                    stale_ok = await self._stale_ok_anywhere(route, cached.digest)
                stale = after_upstream(None, cached=cached is not None, stale_ok=stale_ok)
                if response.started or cached is None or not isinstance(stale, ServeStale):
                    raise
                self._note_stale(route, "a manifest", response)
                self._count_pull(request, route, hit=True)
                outgoing, cached = Outgoing.of(repository, cached), None
                await self._send_manifest(request, response, outgoing)
            finally:
                if fetch is not None:  # failed or cancelled before storing: followers go alone
                    self.manifest_fetches.finish(fetch, None)
        finally:
            await counted.aclose()

    async def _follow(
        self,
        plan: flow.Plan,
        request: ClientRequest,
        response: ClientResponse,
        route: Route,
        fetch: ManifestFetch,
        credentials: ConfirmationKey,
    ) -> None:
        """Wait for another request's fetch of this manifest; take its answer if this client
        may (``may_share_fetch``), else decide again without following anyone: a cache hit
        after this client's own access check, or its own fetch if the leader stored nothing."""
        answer = await self.manifest_fetches.follow(fetch)
        shared = may_share_fetch(fetch.credentials, credentials, stored=answer is not None)
        if shared and answer is not None:
            if takes(get_all(request.headers, b"accept"), answer.media_type):
                self.forwarder.metrics.manifest_fetches_shared.inc()
                self._count_pull(request, route, hit=True)  # no upstream GET of its own
                outgoing, answer = Outgoing.of(state_name(route), answer), None
                await self._send_manifest(request, response, outgoing)
                return
        await self._serve_manifest(plan, request, response, route, coalesce=False)

    async def _adopt_manifest(
        self, repository: str, reference: str, accepted: frozenset[str]
    ) -> bool:
        """``--cache-store``: take a manifest this instance lacks from the store."""
        if self.shared_state is None:
            return False
        return await self.shared_state.adopt_manifest(
            self.manifests, repository, reference, accepted, accept_key(accepted)
        )

    def _count_pull(self, request: ClientRequest, route: Route, *, hit: bool) -> None:
        """Count a manifest GET answered 200 for ``hubproxy cache ls`` (HEADs are not pulls,
        as Docker Hub counts them)."""
        if request.method == "GET":
            self.manifests.note_pull(
                image_key(state_name(route), route.manifest_reference or ""),
                hit=hit,
                now=time.time(),
            )

    def _confirmation_key(self, request: ClientRequest, route: Route) -> ConfirmationKey:
        return confirmation_key(
            get_header(request.headers, b"authorization"), route.registry or "", _path(route)
        )

    # -- negative answers ---------------------------------------------------------------------

    def _negative_key(
        self, request: ClientRequest, route: Route, accepted: frozenset[str]
    ) -> NegativeKey:
        """The key of a 404 for this very request: its registry, path, Accept and credentials."""
        credentials = self._confirmation_key(request, route).credentials
        return NegativeKey(route.registry or "", _path(route), accepted, credentials)

    def _known_missing(
        self, request: ClientRequest, route: Route, accepted: frozenset[str]
    ) -> bool:
        """Whether the upstream answered 404 to this request (for anyone, or for these very
        credentials) within --negative-ttl."""
        if not len(self.negatives):
            return False  # the common case, without building a key per request
        key = self._negative_key(request, route, accepted)
        now = trio.current_time()
        if self.negatives.answers(key, now):
            return True
        # anyone's 404 goes to a client that shows credentials: one that shows none is first
        # sent to get a token, as the upstream would send it (a 401, never remembered)
        shared = dataclasses.replace(key, credentials=ANYONE)
        has_credentials = get_header(request.headers, b"authorization") is not None
        return has_credentials and self.negatives.answers(shared, now)

    def _note_answer(
        self,
        request: ClientRequest,
        response: ClientResponse,
        route: Route,
        accepted: frozenset[str],
        status: int,
    ) -> None:
        """Learn from an upstream's answer to a manifest request: a 200 ends the 404s remembered
        for its path; the primary's 404 is remembered for these credentials, and, in a
        repository anyone may read, re-asked anonymously in the background to be shared."""
        registry, path = route.registry or "", _path(route)
        if status == 200:
            self.negatives.forget_path(registry, path)
            return
        upstreams = self.forwarder.upstreams_for(route)
        primary = response.record.upstream == str(upstreams.urls[0].origin)
        if not remember_negative(status, primary=primary, ttl=self.negatives.ttl):
            return
        key = self._negative_key(request, route, accepted)
        self.negatives.remember(key, trio.current_time())
        shared = dataclasses.replace(key, credentials=ANYONE)
        readability = self.manifests.readability.get(state_name(route))
        background = self.forwarder.background
        if (
            background is None
            or not anonymously_readable(readability, time.time())
            or shared in self.negative_checks
            or len(self.negative_checks) >= MAX_NEGATIVE_CHECKS
        ):
            return
        self.negative_checks.add(shared)
        self._probes_idle = trio.Event()
        accept = [(b"accept", value) for value in get_all(request.headers, b"accept")]
        base = upstreams.urls[0]
        url = Url(base.origin, base.target.rstrip("/") + path)
        background.start_soon(
            self._check_missing_for_anyone,
            shared,
            state_name(route),
            url,
            upstreams.profile,
            accept,
        )

    async def _check_missing_for_anyone(
        self, shared: NegativeKey, repository: str, url: Url, profile: str, accept: Headers
    ) -> None:
        """Ask the primary upstream as an anonymous client (with the same Accept) for what it
        just answered 404; remember the 404 for anyone if that is its answer to anyone too."""
        try:
            with trio.fail_after(self.forwarder.config.timeouts.upstream_idle):
                status, _ = await self._anonymous_answer(url, profile, accept)
        except (ProxyError, trio.TooSlowError, ValueError, KeyError, AttributeError) as exc:
            log.info("could not ask anonymously for %s: %s", url.target, exc)
            status = 0
        finally:
            self.negative_checks.discard(shared)
        # anyone may read the repository still? (the probe may have learned otherwise meanwhile)
        readability = self.manifests.readability.get(repository)
        if share_negative(readability, status, time.time()):
            self.negatives.remember(shared, trio.current_time())
        self._maybe_idle()

    async def _deliver_manifest(
        self,
        request: ClientRequest,
        response: ClientResponse,
        route: Route,
        accepted: frozenset[str],
        cached: CachedManifest | None,
        fetch: ManifestFetch | None,
        handed_over: Callable[[], None] | None,
        conn: UpstreamConnection,
        head: h11.Response,
        headers: Headers,
        stack: AsyncExitStack,
    ) -> None:
        """The upstream's manifest answer: keep a verified copy of a 200 GET (its bytes count
        against --manifest-memory while they arrive), serve stale on 429/5xx."""
        stale_ok = cached is not None and self._stale_ok(route, cached.digest)
        if not stale_ok and cached is not None and upstream_unavailable(head.status_code):
            stale_ok = await self._stale_ok_anywhere(route, cached.digest)
        stale = after_upstream(head.status_code, cached=cached is not None, stale_ok=stale_ok)
        if isinstance(stale, ServeStale) and cached is not None:
            self._note_stale(route, "a manifest", response, head)
            self._count_pull(request, route, hit=True)
            outgoing, cached = Outgoing.of(state_name(route), cached), None
            await self._send_manifest(request, response, outgoing)
            return
        self._note_answer(request, response, route, accepted, head.status_code)
        length = get_header(head.headers, b"content-length")
        media_type = get_header(head.headers, b"content-type")
        size = int(length) if length is not None and length.isdigit() else None
        if (
            size is None
            or media_type is None
            or not keep_manifest(request.method, head.status_code, size, media_type, MAX_MANIFEST)
        ):
            await self.forwarder.stream_response(conn, head, headers, response)
            return
        reference = route.manifest_reference or ""
        patience = self.forwarder.config.timeouts.upstream_idle
        async with self.manifest_memory.hold(size, patience, client_key(request.client_ip)):
            chunks = []
            hasher = hashlib.sha256()
            while (chunk := await conn.receive_body()) is not None:
                hasher.update(chunk)
                chunks.append(chunk)
            data = b"".join(chunks)
            del chunks
            claimed = get_header(head.headers, b"docker-content-digest")
            stored = self.manifests.put(
                state_name(route),
                reference,
                accepted=accepted,
                media_type=_media_type(media_type),
                body=data,
                claimed=claimed.decode("latin-1") if claimed is not None else None,
                sha256_hex=hasher.hexdigest(),
            )
        if stored is None:  # nothing was stored, and the client gets none of it
            self.stats.verification_failures += 1
            raise UpstreamUnavailable(
                f"upstream manifest for {route.repository}:{reference} does not match its digest"
            )
        manifest = CachedManifest(stored, _media_type(media_type), data)
        self._count_pull(request, route, hit=False)
        # from here on only ``outgoing`` holds the body, which it drops if it has to wait
        outgoing = Outgoing.of(state_name(route), manifest)
        if fetch is not None:  # followers go on now, not once this client has read it all
            self.manifest_fetches.finish(fetch, manifest)
        self._remember_access(request, route, response)
        self._pass_on_access(self._confirmation_key(request, route), route, manifest)
        del manifest, data
        if not reference.startswith("sha256:") and not self._from_fallback(response, route):
            # where the tag points, as the primary says: a fallback's answer is no revalidation
            key = TagKey(state_name(route), reference, accepted)
            self._note_tag_checked(key)
        self._maybe_probe(route, f"/v2/{route.repository}/manifests/{stored}")
        outgoing.fetched = handed_over  # a fetch of its client's until held (or waiting)
        await self._send_held(request, response, outgoing, head.status_code, headers, head.reason)

    async def _send_manifest(
        self, request: ClientRequest, response: ClientResponse, outgoing: Outgoing
    ) -> None:
        response.record.upstream = "cache"
        headers = [
            (b"content-type", outgoing.media_type.encode("latin-1")),
            (b"content-length", b"%d" % outgoing.size),
            (b"docker-content-digest", outgoing.digest.encode("ascii")),
            (b"etag", b'"%s"' % outgoing.digest.encode("ascii")),
            (b"docker-distribution-api-version", b"registry/2.0"),
        ]
        await self._send_held(request, response, outgoing, 200, headers)

    async def _send_held(
        self,
        request: ClientRequest,
        response: ClientResponse,
        outgoing: Outgoing,
        status: int,
        headers: Headers,
        reason: bytes = b"",
    ) -> None:
        """Send a manifest's head and body, the body held only with room in the send budget
        (per client address and in all): taken before the head, so that a sender that waited
        past its patience still gets a 503. A sender that waited takes the body again from
        whoever sends it now, else from the store; gone from both, 503 (a retry fetches it)."""
        if request.method != "GET":
            outgoing.body = None
            await response.start(status, headers, reason)
            await response.finish()
            return
        patience = self.forwarder.config.timeouts.upstream_idle
        client = client_key(request.client_ip)
        async with self.manifest_sending.hold(client, outgoing, patience):
            body = outgoing.body
            outgoing.body = None
            if body is None:
                body = self.manifest_bodies.current(outgoing.digest)
            if body is None:
                # reading it back costs a hash of it: its turn first (a waiter whose client
                # is gone is cancelled meanwhile, instead of reading for nobody)
                await gate(outgoing.size)
                stored = await self.manifests.load(outgoing.repository, outgoing.digest)
                body = stored.body if stored is not None else None
                del stored
            if body is None:
                raise MirrorBusy(
                    "the manifest left the cache while its turn to be sent came; retry",
                    headers=((b"retry-after", RETRY_AFTER),),
                )
            manifest = CachedManifest(outgoing.digest, outgoing.media_type, body)
            del body
            await response.start(status, headers, reason)
            with self.manifest_bodies.share(manifest) as shared:
                del manifest
                await send_sliced(response, shared)
        await response.finish()

    # -- which repositories anyone may read ----------------------------------------------------

    def _maybe_probe(self, route: Route, path: str, kind: Kind = Kind.MANIFEST) -> None:
        """Ask in the background whether anyone may read the repository, if not known or the
        answer is an hour old."""
        repository = state_name(route)
        fresh = not should_probe(self.manifests.readability.get(repository), time.time())
        background = self.forwarder.background
        if fresh or repository in self.probing or background is None:
            return
        self.probing.add(repository)
        self._probes_idle = trio.Event()
        upstreams = self.forwarder.upstreams_for(route)
        background.start_soon(
            self._probe_anonymous, repository, path, kind, upstreams.urls[0], upstreams.profile
        )

    async def wait_probes(self) -> None:
        """Wait until no repository is being probed and no 404 re-asked anonymously (tests, and
        a clean shutdown)."""
        await self._probes_idle.wait()

    async def _probe_anonymous(
        self, repository: str, path: str, kind: Kind, base: Url, profile: str
    ) -> None:
        """Ask the primary upstream, as an anonymous client would, whether ``path`` is public."""
        url = Url(base.origin, base.target.rstrip("/") + path)
        try:
            with trio.fail_after(self.forwarder.config.timeouts.upstream_idle):
                readable = await self._anonymous_head(url, profile, kind)
        except (ProxyError, trio.TooSlowError, ValueError, KeyError, AttributeError) as exc:
            log.info("could not learn whether %s is public: %s", repository, exc)
            readable = None
        finally:
            self.probing.discard(repository)
        if readable is not None:
            self.manifests.set_readability(repository, Readability(readable, time.time()))
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if not self.probing and not self.negative_checks:
            self._probes_idle.set()

    async def _anonymous_head(self, url: Url, profile: str, kind: Kind) -> bool | None:
        """Whether an anonymous client may read ``url``; None if the upstream could not say."""
        status, headers = await self._anonymous_answer(url, profile, [])
        return _readable(status, headers, kind)

    async def _anonymous_answer(
        self, url: Url, profile: str, extra: Headers
    ) -> tuple[int, Headers]:
        """The upstream's answer to a HEAD of ``url`` (with ``extra`` headers) by an anonymous
        client: with the anonymous token its challenge offers, if it asks for one (a 401 when it
        offers none)."""
        status, headers, _ = await self.forwarder.simple_request(
            "HEAD", url, extra, profile=profile
        )
        if status != 401:
            return status, headers
        challenge = next(
            (
                c
                for value in get_all(headers, b"www-authenticate")
                for c in parse_challenges(value.decode("latin-1"))
                if c.scheme.lower() == "bearer"
            ),
            None,
        )
        if challenge is None or challenge.param("realm") is None:
            return status, headers
        query = urllib.parse.urlencode(
            [(k, v) for k in ("service", "scope") if (v := challenge.param(k) or "")]
        )
        realm = parse_url(challenge.param("realm") or "")
        token_url = Url(realm.origin, realm.target + ("&" if "?" in realm.target else "?") + query)
        refused = 401, headers
        token_status, _, body = await self.forwarder.simple_request(
            "GET", token_url, [], profile=profile
        )
        if token_status != 200:
            return refused
        document = json.loads(body)
        if not isinstance(document, dict):
            return refused
        token = document.get("token") or document.get("access_token")
        if not isinstance(token, str):
            return refused
        authorization = [(b"authorization", b"Bearer " + token.encode("latin-1")), *extra]
        status, headers, _ = await self.forwarder.simple_request(
            "HEAD", url, authorization, profile=profile
        )
        return status, headers


async def send_sliced(response: ClientResponse, body: bytes) -> None:
    """Send ``body`` in :data:`MANIFEST_SLICE` views of it, each sent before the next is framed
    (``send`` waits until the client took it): a client that reads nothing holds one slice."""
    if len(body) <= MANIFEST_SLICE:
        # (most manifests: the body itself, no view, which the pull tracker's tap keeps by
        # reference rather than copying)
        await response.send(body)
        return
    view = memoryview(body)
    for start in range(0, len(view), MANIFEST_SLICE):
        await response.send(view[start : start + MANIFEST_SLICE])


def _readable(status: int, headers: Headers, kind: Kind) -> bool | None:
    said = verdict(status, headers, kind=kind)
    return None if said is UpstreamVerdict.UNAVAILABLE else said is UpstreamVerdict.ALLOWED


def _media_type(value: bytes) -> str:
    return value.decode("latin-1").split(";")[0].strip()
