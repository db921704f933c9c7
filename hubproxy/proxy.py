"""The request handler the server calls: admit, route, dispatch.

``Proxy.handle`` applies the admission rules (``admission``), routes the request (``routing``,
``registries``), resolves what credential it may carry upstream (``tokenpolicy``), and hands it to
one of the parts that answer: the operator's paths (``operations``), the token endpoint
(``tokens``), the cache (``pullthrough``) or the upstreams directly (``forwarder``). It decides
nothing itself; the inbound request is never changed (what goes upstream is built beside it).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace

import h11
import trio

from .cache.pullthrough import PullThrough
from .forwarder import Forwarder, answer_whole, read_whole
from .net.pool import Pool
from .net.server import ClientRequest, ClientResponse
from .net.upstream import UpstreamConnection
from .ops.metrics import HubMetrics
from .ops.operations import Operations
from .policy.access import client_key
from .policy.accounting import client_name
from .policy.admission import (
    ADMIN_PREFIX,
    OPS_PATHS,
    Admission,
    Reason,
    Refused,
    require_login,
)
from .policy.auth import login_challenge
from .policy.errors import (
    ClientProtocolError,
    MirrorUnauthorized,
    ProxyError,
    RegistryNotServed,
    RouteNotFound,
)
from .policy.headers import Headers, get_header
from .policy.pulls import PullSummary, image_name, manifest_layers, summary_line
from .policy.registries import address, not_served_line
from .policy.routing import Route, RouteKind, route_label, route_request
from .policy.search import MAX_SEARCH_ANSWER, filter_search_answer
from .policy.tokenpolicy import Credential, check_method, client_credential, outbound
from .policy.trouble import LineThrottle
from .policy.upstreams import UpstreamSet
from .policy.urls import Url
from .tokens import TokenEndpoint

log = logging.getLogger("hubproxy")
# one line per image pulled: activity, like the access lines, apart from what went wrong
pull_log = logging.getLogger("hubproxy.pulls")

SCRYPT_THREADS = 2  # password checks at once (each ~50 ms of CPU and 16 MiB)
SWEEP_CHECK = 1.0  # seconds: how often the pull sweeper looks whether the server is stopping


@dataclass
class _Turn:
    lock: trio.Lock = field(default_factory=trio.Lock)
    users: int = 0


class OneEach:
    """At most one task per key at a time, FIFO within a key; a key's entry lives only while
    someone holds or awaits it. In front of a shared FIFO limiter this makes the limiter's queue
    round-robin over keys: a newcomer waits behind at most one task of each other key, however
    many tasks one key has queued."""

    def __init__(self) -> None:
        self._turns: dict[str, _Turn] = {}

    def __len__(self) -> int:
        return len(self._turns)

    @asynccontextmanager
    async def turn(self, key: str) -> AsyncIterator[None]:
        entry = self._turns.get(key)
        if entry is None:
            entry = self._turns[key] = _Turn()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._turns[key]


class Proxy:
    """Admit, route and dispatch: the meeting point of one running mirror."""

    def __init__(
        self,
        forwarder: Forwarder,
        admission: Admission,
        tokens: TokenEndpoint,
        operations: Operations,
        *,
        index_url: Url | None,
        pullthrough: PullThrough | None = None,
    ) -> None:
        self.forwarder = forwarder
        self.admission = admission
        self.tokens = tokens
        self.operations = operations
        self.index_url = index_url
        self.pullthrough = pullthrough
        self.metrics: HubMetrics = forwarder.metrics
        self._scrypt_threads = trio.CapacityLimiter(SCRYPT_THREADS)
        self._scrypt_turns = OneEach()  # one check per address in the threads' queue
        self._sweeping = False  # a task ends quiet pulls (``_sweep_pulls``)
        self._failures = LineThrottle()  # one line a minute per kind of failure answered

    def _log_failure(
        self, request: ClientRequest, response: ClientResponse, error: ProxyError
    ) -> None:
        """A 5xx answered to a client: one line, then at most one a minute for the same kind of
        failure (saying how many were not logged): a dead upstream fails every request alike."""
        held = self._failures.admit((type(error).__name__, error.status), trio.current_time())
        if held is None:
            return
        more = f" ({held} more like it in the last minute, not logged)" if held else ""
        log.warning("%s %s failed: %s%s", request.method, response.record.path, error, more)

    @property
    def pool(self) -> Pool:
        return self.forwarder.pool

    async def handle(self, request: ClientRequest, response: ClientResponse) -> None:
        label = "other"
        record = response.record
        # body bytes are counted as they leave, under the label the request has by then
        response.on_sent = lambda count: self.metrics.count_sent(label, record.upstream, count)
        try:
            admission = self.admission
            if admission.checks_clients:
                self._check(request, admission.admit_client(request.client_ip, trio.current_time()))
            path = request.target.partition("?")[0]
            if path in OPS_PATHS and request.method in ("GET", "HEAD"):
                label = "ops"
                if admission.checks_ops:
                    self._check(request, admission.admit_ops(request.client_ip))
                await self.operations.serve(path, request, response)
                return
            if path.startswith(ADMIN_PREFIX) and self.operations.admin.enabled:
                label = "ops"
                await self._admin(request, response)
                return
            route = self._route(request)
            label = route_label(route)
            if route.kind is RouteKind.REGISTRY:
                await self._watched(request, response, route)
            elif route.kind is RouteKind.TOKEN:
                mirror_user, stamp = await self._mirror_login(request)
                response.record.user = mirror_user
                await self.tokens.serve(
                    request, route, response, mirror_user=mirror_user, stamp=stamp
                )
            else:
                await self._search(request, response, route)
        except ProxyError as error:
            if error.status >= 500:
                self._log_failure(request, response, error)
            await response.send_error(error, close=isinstance(error, ClientProtocolError))
        finally:
            self.metrics.count_request(
                label,
                status=record.status,
                source=record.upstream,
                bytes_sent=0,  # each was counted as it left (on_sent)
                caching=self.pullthrough is not None,
            )

    async def _watched(
        self, request: ClientRequest, response: ClientResponse, route: Route
    ) -> None:
        """A registry request, shown among the transfers under way while it runs (manifest and
        blob GETs) and fed to the pull tracker once answered."""
        kind = route_label(route)
        if route.repository is None or kind not in ("manifest", "blob"):
            await self._registry_request(request, response, route)
            return
        name = f"{route.registry}/{route.repository}" if route.registry else route.repository
        reference = route.blob_digest or route.manifest_reference or ""
        shown = image_name(name, reference) if kind == "manifest" else f"{name} {reference[:19]}"
        activity = self.metrics.activity
        key = activity.transfers.begin(shown, response.record) if request.method == "GET" else None
        if kind == "manifest" and request.method == "GET":
            response.tap = []  # the pull tracker reads the layers it names
        answered = False
        try:
            await self._registry_request(request, response, route)
            answered = True
        finally:
            if key is not None:
                activity.transfers.end(key)
            registry = route.registry or self.forwarder.table.default
            self._note_pull(
                request, response, kind, name, reference, answered=answered, registry=registry
            )

    def _note_pull(
        self,
        request: ClientRequest,
        response: ClientResponse,
        kind: str,
        name: str,
        reference: str,
        *,
        answered: bool,
        registry: str,
    ) -> None:
        """Feed the pull tracker one answered manifest or blob request; log the pulls it ends.
        A manifest GET is also a pull as Docker Hub counts them (``accounting``)."""
        record = response.record
        if not 200 <= record.status < 300 or request.method not in ("GET", "HEAD"):
            return
        if kind == "manifest" and request.method == "GET":
            client = client_name(client_key(request.client_ip), record.user)
            self.metrics.note_client_pull(registry=registry, client=client, image=name)
        tracker = self.metrics.activity.pulls
        now = trio.current_time()
        ended = tracker.expire(now)
        complete = answered and record.status == 200 and not record.aborted
        if record.length is not None and request.method == "GET":
            complete = complete and record.bytes_sent >= record.length
        if kind == "manifest":
            tap = response.tap
            ended += tracker.manifest(
                client=request.client_ip,
                repository=name,
                reference=reference,
                method=request.method,
                layers=manifest_layers(b"".join(tap)) if tap is not None and complete else None,
                size=record.bytes_sent,
                now=now,
                wall=time.time(),
            )
        elif request.method == "GET":
            ended += tracker.blob(
                client=request.client_ip,
                repository=name,
                digest=reference,
                size=record.bytes_sent,
                complete=complete,
                from_cache=record.upstream == "cache",
                now=now,
            )
        response.tap = None
        _log_pulls(ended)
        background = self.forwarder.background
        if len(tracker) and not self._sweeping and background is not None:
            self._sweeping = True
            background.start_soon(self._sweep_pulls)

    async def _sweep_pulls(self) -> None:
        """End pulls once quiet (the client had the other layers, or left), and log them.

        It runs in the background nursery, which a graceful stop waits for: it looks at the
        server at least once a second and, once it drains, logs the open pulls as they stand
        and ends, so that it never holds a stop up by more than that second."""
        tracker = self.metrics.activity.pulls
        server = self.operations.server
        try:
            while (deadline := tracker.next_deadline()) is not None:
                if server is not None and server.draining:
                    _log_pulls(tracker.expire(math.inf))
                    return
                await trio.sleep_until(min(deadline, trio.current_time() + SWEEP_CHECK))
                _log_pulls(tracker.expire(trio.current_time()))
        finally:
            self._sweeping = False

    async def _admin(self, request: ClientRequest, response: ClientResponse) -> None:
        """The admin API: from --ops-allow (or this machine) with the token, else 403 or 401."""
        self._check(request, self.admission.admit_admin(request.client_ip))
        admin = self.operations.admin
        try:
            admin.check_token(request)
        except MirrorUnauthorized:
            self.metrics.denied.inc(reason=Reason.AUTH.value)
            if self.admission.should_log(request.client_ip, trio.current_time()):
                log.warning(
                    "refused %s %s: no or a wrong admin token",
                    request.method,
                    request.target[:200],
                )
            raise
        await admin.serve(request, response)

    def _check(self, request: ClientRequest, refused: Refused | None) -> None:
        """Raise what an admission rule refused; count it, and log it at most once a minute
        per client."""
        if refused is None:
            return
        self.metrics.denied.inc(reason=refused.reason.value)
        if self.admission.should_log(request.client_ip, trio.current_time()):
            log.warning("refused %s %s: %s", request.method, request.target[:200], refused.error)
        raise refused.error

    def _route(self, request: ClientRequest) -> Route:
        """Normalise how the client named the registry (``ns=``, a path prefix, the host name;
        see ``registries``), then route the request as that registry sees it."""
        table = self.forwarder.table
        if not request.target.startswith("/v2"):
            return route_request(
                request.method, request.target, library_prefix=table.default_registry.library_prefix
            )
        try:
            addressed = address(table, request.target, request.host)
        except RegistryNotServed as refused:
            log.debug("%s", not_served_line(table, refused, request.client_ip))
            raise
        registry = addressed.registry
        route = route_request(
            request.method, addressed.target, library_prefix=registry.library_prefix
        )
        if registry.name == table.default:
            return route
        return replace(route, registry=registry.name)

    async def _registry_request(
        self, request: ClientRequest, response: ClientResponse, route: Route
    ) -> None:
        forwarder = self.forwarder
        upstreams = forwarder.upstreams_for(route)
        registry = upstreams.registry
        if self.admission.checks_images and route.repository is not None:
            self._check(request, self.admission.admit_image(registry.name, route.repository))
        credential = await self._credential(request, route, upstreams)
        response.record.user = credential.user
        check_method(credential, method=request.method, registry=registry)
        if registry.login is not None and credential.upstream is None:
            if not upstreams.primary.known:
                await self._learn_quietly(upstreams)
        sent = outbound(credential, registry, upstreams.primary, method=request.method)
        plan = forwarder.plan(
            request,
            route.target,
            upstreams,
            authorization=sent.authorization,
            operator_authorization=sent.operator,
            # a mirror user's token was fetched anonymously (pull accounting says so)
            anonymous_token=credential.user is not None and not credential.operator,
        )
        if self.pullthrough is not None and self.pullthrough.handles(request, route):
            await self.pullthrough.serve(plan, request, response, route)
        else:
            await forwarder.run_flow(
                plan, request, response, upstreams=upstreams, blob_digest=route.blob_digest
            )

    async def _credential(
        self, request: ClientRequest, route: Route, upstreams: UpstreamSet
    ) -> Credential:
        """What this registry request may carry upstream; MirrorUnauthorized with a challenge
        for a client that must (again) fetch a token from us."""
        authorization = get_header(request.headers, b"authorization")
        admission = self.admission
        try:
            return client_credential(
                authorization,
                registry=upstreams.registry.name,
                sealer=self.tokens.sealer,
                now=time.time(),
                stamp_of=admission.stamp if admission.requires_login else None,
                basic_user=await self._basic_user(request, authorization),
            )
        except MirrorUnauthorized as refused:
            self.metrics.denied.inc(reason=Reason.AUTH.value)
            # the challenge (which may need the upstream's service) only for those refused
            challenge = await self._login_challenge(request, route, upstreams)
            raise MirrorUnauthorized(
                refused.message, headers=((b"www-authenticate", challenge),)
            ) from None

    async def _mirror_login(self, request: ClientRequest) -> tuple[str | None, bytes]:
        """At the token endpoint under ``--users``: the mirror user and its stamp."""
        if not self.admission.requires_login:
            return None, b""
        authorization = get_header(request.headers, b"authorization")
        try:
            user = require_login(await self._basic_user(request, authorization), authorization)
        except MirrorUnauthorized:
            self.metrics.denied.inc(reason=Reason.AUTH.value)
            raise
        return user, self.admission.stamp(user) or b""

    async def _basic_user(self, request: ClientRequest, authorization: bytes | None) -> str | None:
        """The mirror user named by Basic credentials, else None; ClientRateLimited for an
        address out of wrong-password tokens (``admission.LoginThrottle``), before any scrypt.

        A first check runs scrypt (tens of milliseconds, 16 MiB), so it runs in a worker
        thread, two at a time, instead of stalling every transfer; a repeated header is
        answered from the cache, also for an address that is throttled. Each address has at
        most one check in the threads' queue (``OneEach``), so a flood from one address
        delays another address's login by one check at most, not by the whole flood."""
        authenticator = self.admission.authenticator
        if authenticator is None or authorization is None:
            return None
        if authorization[:6].lower() != b"basic ":
            return None
        user = authenticator.cached_user(authorization)
        if user is not None:
            return user
        self._check(request, self.admission.admit_login(request.client_ip, trio.current_time()))
        async with self._scrypt_turns.turn(client_key(request.client_ip)):
            user = await trio.to_thread.run_sync(
                authenticator.verify, authorization, limiter=self._scrypt_threads
            )
        if user is not None:
            self.admission.login_succeeded(request.client_ip, trio.current_time())
            if authenticator is self.admission.authenticator:
                authenticator.remember(authorization, user)  # not if a reload replaced it
        return user

    async def _learn_quietly(self, upstreams: UpstreamSet) -> None:
        try:
            await self.forwarder.learn_challenge(upstreams, 0)
        except ProxyError as exc:
            log.info("could not ask %s for its challenge: %s", upstreams.urls[0].origin, exc)

    async def _login_challenge(
        self, request: ClientRequest, route: Route, upstreams: UpstreamSet
    ) -> bytes:
        """The challenge for a client without a usable login: the primary's realm routed to
        us, with the service the primary's own challenges name (its token service wants it)."""
        if not upstreams.primary.known:
            await self._learn_quietly(upstreams)
        realm = f"{self.forwarder.public_base(request)}{upstreams.token_prefix}0"
        return login_challenge(realm, upstreams.primary.service, route.repository).encode("latin-1")

    async def _search(self, request: ClientRequest, response: ClientResponse, route: Route) -> None:
        """``/v1/search`` (``docker search``): for mirror users only, and only the images the
        image rules serve."""
        if self.index_url is None:
            raise RouteNotFound("search is not configured on this mirror")
        if self.admission.requires_login:
            default = self.forwarder.default
            await self._credential(request, route, default)
        forwarder = self.forwarder
        plan = forwarder.plan(request, route.target, (self.index_url,))
        if not self.admission.checks_images:
            await forwarder.run_flow(plan, request, response, upstreams=None)
            return
        images = self.admission.images
        registry = forwarder.table.default

        async def deliver(
            conn: UpstreamConnection, head: h11.Response, headers: Headers, _: AsyncExitStack
        ) -> None:
            answer = await read_whole(conn, MAX_SEARCH_ANSWER, "the search index")
            if head.status_code == 200:
                answer = filter_search_answer(answer, lambda name: images.permits(registry, name))
            await answer_whole(request, response, head.status_code, headers, answer, head.reason)

        await forwarder.run_flow(plan, request, response, upstreams=None, deliver=deliver)


def _log_pulls(ended: list[PullSummary]) -> None:
    for pull in ended:
        pull_log.info("%s", summary_line(pull))
