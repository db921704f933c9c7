"""The one place that ties a client's request to the upstreams, end to end.

``Proxy.handle`` routes the request (``routing``), then drives the per-request state machine
(``flow``) with real I/O: it performs each ``Send`` over a pooled upstream connection, feeds the
response head back, and on ``Respond`` streams the body to the client one chunk at a time (receive,
await the send, receive again: the client's pace is the upstream's pace, so a transfer holds at
most one chunk). Challenges are rewritten on the way out (``auth``), and the upstream realm they
named is remembered per upstream so token requests can be forwarded to it.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from urllib.parse import quote

import h11
import trio

from . import flow
from .auth import bearer_service, login_challenge, public_base, rewrite_challenge
from .config import Config
from .errors import (
    AccessDenied,
    ClientProtocolError,
    ClientRateLimited,
    MirrorUnauthorized,
    ProxyError,
    RouteNotFound,
    UpstreamUnavailable,
)
from .gate import (
    MAX_TOKEN_RESPONSE,
    OPS_PATHS,
    Gate,
    seal_token_response,
    without_authorization,
)
from .headers import Headers, client_response_headers, get_header, upstream_request_headers
from .metrics import HubMetrics
from .operations import Operations
from .pool import Connector, Pool
from .pullthrough import PullThrough
from .redirects import client_location
from .registries import Registry, address, rewrite_token_query, token_registry
from .routing import (
    Route,
    RouteKind,
    route_label,
    route_request,
    without_query_param,
)
from .server import AccessRecord, ClientRequest, ClientResponse, ResponseAborted
from .streams import ByteStream, open_upstream, upstream_ssl_context
from .upstream import UpstreamConnection
from .urls import Origin, Url, parse_url

log = logging.getLogger("hubproxy")

# Registry headers of a redirecting response that the client must still see when we follow the
# redirect: the CDN's final response does not carry them.
CARRIED_FROM_REDIRECT = (
    b"docker-content-digest",
    b"docker-distribution-api-version",
    b"ratelimit-limit",
    b"ratelimit-remaining",
    b"docker-ratelimit-source",
)
DRAIN_LIMIT = 64 * 1024  # a redirect's body up to this size is read so its connection is reused


Deliver = Callable[[UpstreamConnection, h11.Response, Headers, AsyncExitStack], Awaitable[None]]


class UpstreamSet:
    """The upstreams of one registry and what we learned about them: rests and realms."""

    def __init__(self, registry: Registry, *, default: bool) -> None:
        self.registry = registry
        self.urls = registry.upstreams
        self.profile = registry.name  # its connections use its CA and proxy
        # the default registry keeps the short /token/N realms; the others name themselves
        self.token_prefix = "/token/" if default else f"/token/{registry.name}/"
        self.resting_until = [0.0] * len(self.urls)
        self.realms: dict[int, Url] = {}
        self.services: dict[int, str] = {}  # the ``service`` their challenges named
        self.basic_only = False  # its challenges were Basic: an operator login goes to /v2/
        self.last_answer = -math.inf  # trio time of the last response head from any of them


class Proxy:
    """Route, forward, rewrite and stream: the request handler the server calls."""

    def __init__(self, config: Config, *, connector: Connector | None = None) -> None:
        """``connector`` replaces how upstream streams are opened (tests use memory streams)."""
        self.config = config
        self.table = config.registry_table()
        timeouts = config.timeouts
        # per profile (registry name; "" for the search index): its CA file and CONNECT proxy
        settings: dict[str, tuple[ssl.SSLContext, Url | None]] = {
            "": (upstream_ssl_context(config.upstream_ca), config.upstream_proxy)
        }
        for registry in self.table.registries:
            ca = registry.upstream_ca or config.upstream_ca
            settings[registry.name] = (
                upstream_ssl_context(ca) if ca != config.upstream_ca else settings[""][0],
                registry.upstream_proxy or config.upstream_proxy,
            )

        async def open_stream(origin: Origin, profile: str) -> ByteStream:
            context, via = settings.get(profile, settings[""])
            return await open_upstream(
                origin, context=context, proxy=via, connect_timeout=timeouts.connect
            )

        self.pool = Pool(
            connector or open_stream,
            idle_timeout=timeouts.upstream_idle,
            keepalive=timeouts.upstream_keepalive,
            max_idle_per_origin=config.pool_max_idle_per_origin,
            max_per_origin=config.pool_max_per_origin,
        )
        self.registries = {
            registry.name: UpstreamSet(registry, default=registry.name == self.table.default)
            for registry in self.table.registries
        }
        self.registry = self.registries[self.table.default]  # the default registry's
        self.gate = Gate(config)
        self.metrics = HubMetrics()
        self.operations = Operations(self)
        self.pullthrough: PullThrough | None = None  # set by the app when caching
        self.background: trio.Nursery | None = None  # where cache fills and probes run

    async def handle(self, request: ClientRequest, response: ClientResponse) -> None:
        label = "other"
        try:
            gate = self.gate
            if gate.checks_clients:
                self._admit(request, "network")
            path = request.target.partition("?")[0]
            if path in OPS_PATHS and request.method in ("GET", "HEAD"):
                label = "ops"
                if gate.checks_ops:
                    self._admit(request, "ops")
                await self.operations.serve(path, request, response)
                return
            route = self._route(request)
            label = route_label(route)
            if route.kind is RouteKind.REGISTRY:
                upstreams = self.upstreams_for(route)
                if gate.checks_images and route.repository is not None:
                    self._admit(request, "image", route.repository, upstreams.registry.name)
                request = await self._authenticate(request, route)
                request = await self._with_operator_login(request, upstreams, registry=True)
                plan = self.plan(request, route.target, upstreams)
                if self.pullthrough is not None and self.pullthrough.handles(request, route):
                    await self.pullthrough.serve(plan, request, response, route)
                else:
                    await self.run_flow(
                        plan,
                        request,
                        response,
                        upstreams=upstreams,
                        blob_digest=route.blob_digest,
                    )
            elif route.kind is RouteKind.TOKEN:
                await self._forward_token(request, route, response)
            else:
                if self.config.index_url is None:
                    raise RouteNotFound("search is not configured on this mirror")
                plan = self.plan(request, route.target, (self.config.index_url,))
                await self.run_flow(plan, request, response, upstreams=None)
        except ProxyError as error:
            if error.status >= 500:
                log.warning("%s %s failed: %s", request.method, response.record.path, error)
            await response.send_error(error, close=isinstance(error, ClientProtocolError))
        finally:
            self._count(label, response.record)

    def _route(self, request: ClientRequest) -> Route:
        """Normalise how the client named the registry (``ns=``, a path prefix, the host name;
        see ``registries``), then route the request as that registry sees it."""
        if not request.target.startswith("/v2"):
            return route_request(
                request.method, request.target, library_prefix=self.registry.registry.library_prefix
            )
        addressed = address(self.table, request.target, request.host)
        registry = addressed.registry
        route = route_request(
            request.method, addressed.target, library_prefix=registry.library_prefix
        )
        if registry.name == self.table.default:
            return route
        return replace(route, registry=registry.name)

    def upstreams_for(self, route: Route) -> UpstreamSet:
        """The upstreams of the registry a route is for."""
        return self.registries[route.registry or self.table.default]

    async def _with_operator_login(
        self, request: ClientRequest, upstreams: UpstreamSet, *, registry: bool
    ) -> ClientRequest:
        """The operator's login for this registry, only when the client sent no credentials:
        on token requests, and on registry requests of a registry that wants Basic auth."""
        login = upstreams.registry.login
        if login is None or get_header(request.headers, b"authorization") is not None:
            return request
        if registry:
            if not upstreams.realms and not upstreams.basic_only:
                with contextlib.suppress(ProxyError):
                    await self.learn_challenge(upstreams, 0)
            if not upstreams.basic_only:
                return request
        basic = base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode("ascii")
        return replace(
            request, headers=[*request.headers, (b"authorization", f"Basic {basic}".encode())]
        )

    def _admit(
        self, request: ClientRequest, rule: str, repository: str = "", registry: str = ""
    ) -> None:
        """Apply one of the gate's rules; count and log (at most once a minute per client)
        what it refuses."""
        gate = self.gate
        try:
            if rule == "network":
                gate.admit_client(request.client_ip, trio.current_time())
            elif rule == "ops":
                gate.admit_ops(request.client_ip)
            else:
                gate.admit_image(registry, repository)
        except (AccessDenied, ClientRateLimited) as error:
            reason = "rate" if isinstance(error, ClientRateLimited) else rule
            self.metrics.denied.inc(reason=reason if reason != "ops" else "network")
            if gate.should_log(request.client_ip, trio.current_time()):
                log.warning("refused %s %s: %s", request.method, request.target[:200], error)
            raise

    async def _authenticate(self, request: ClientRequest, route: Route) -> ClientRequest:
        """With --users: the request as it goes upstream (the client's Authorization replaced
        by the unsealed upstream token, or dropped), or MirrorUnauthorized with a challenge."""
        gate = self.gate
        if not gate.requires_login:
            return request
        basic_user = await gate.basic_user(request.headers)
        try:
            identity = gate.authenticate(request.headers, time.time(), basic_user=basic_user)
        except MirrorUnauthorized as refused:
            self.metrics.denied.inc(reason="auth")
            # the challenge (which may need the upstream's service) only for those refused
            challenge = await self._login_challenge(request, route)
            raise MirrorUnauthorized(
                refused.message, headers=((b"www-authenticate", challenge),)
            ) from None
        assert identity is not None  # requires_login
        return replace(
            request,
            headers=without_authorization(request.headers, identity.upstream_authorization),
        )

    async def _login_challenge(self, request: ClientRequest, route: Route) -> bytes:
        """The challenge for a client without a mirror login: the primary's realm routed to us,
        with the service the primary's own challenges name (its token service wants it)."""
        upstreams = self.upstreams_for(route)
        if 0 not in upstreams.services:
            with contextlib.suppress(ProxyError):
                await self.learn_challenge(upstreams, 0)
        realm = f"{self._public_base(request)}{upstreams.token_prefix}0"
        service = upstreams.services.get(0)
        return login_challenge(realm, service, route.repository).encode("latin-1")

    def _count(self, label: str, record: AccessRecord) -> None:
        metrics = self.metrics
        metrics.requests.inc(route=label, status=str(record.status or 499))
        if self.pullthrough is not None and label in ("blob", "manifest"):
            if record.upstream == "cache":
                metrics.cache_requests.inc(kind=label, result="hit")
            elif 200 <= record.status < 300:
                metrics.cache_requests.inc(kind=label, result="miss")
        if record.upstream == "cache":
            metrics.response_bytes.inc(record.bytes_sent, source="cache")
        elif record.upstream != "-" and label != "ops":
            metrics.response_bytes.inc(record.bytes_sent, source="upstream")

    def plan(
        self,
        request: ClientRequest,
        target: str,
        upstreams: UpstreamSet | tuple[Url, ...],
        *,
        profile: str = "",
    ) -> flow.Plan:
        urls = upstreams if isinstance(upstreams, tuple) else upstreams.urls
        if isinstance(upstreams, UpstreamSet):
            profile = upstreams.profile
        return flow.Plan(
            method=request.method,
            target=target,
            upstreams=urls,
            profile=profile,
            replayable=not request.body.present,
            max_hops=self.config.max_redirects,
            rate_limit_rest=self.config.rate_limit_rest,
            unreachable_rest=self.config.unreachable_rest,
        )

    async def _forward_token(
        self, request: ClientRequest, route: Route, response: ClientResponse
    ) -> None:
        """Forward a token request to the realm the named upstream advertised.

        With --users the client's Basic login is the mirror's: it is checked here, the upstream
        is asked anonymously, and the answer's token is sealed (see ``gate``)."""
        key = route.realm_key or ""
        named = self.table.find(route.registry) if route.registry else self.registry.registry
        if named is None or named.name not in self.registries:
            raise RouteNotFound(f"unknown token endpoint for registry {route.registry!r}")
        upstreams = self.registries[named.name]
        if not key.isdigit() or int(key) >= len(upstreams.urls):
            raise RouteNotFound(f"unknown token endpoint {upstreams.token_prefix}{key}")
        index = int(key)
        user: str | None = None
        query = route.target.removeprefix("?")
        # a path-prefix pull asks the default registry's realm for another registry's scope
        chosen, query = token_registry(self.table, named, query)
        if chosen is not named:
            upstreams, index = self.registries[chosen.name], 0
            if 0 not in upstreams.services:
                await self.learn_challenge(upstreams, 0)
            if service := upstreams.services.get(0):
                query = "&".join(filter(None, [query, "service=" + quote(service, safe="")]))
        if self.gate.requires_login:
            try:
                user = self.gate.require_login(await self.gate.basic_user(request.headers))
            except MirrorUnauthorized:
                self.metrics.denied.inc(reason="auth")
                raise
            request = replace(request, headers=without_authorization(request.headers, None))
            query = without_query_param(query, "account")  # the mirror user, not Docker Hub's
        request = await self._with_operator_login(request, upstreams, registry=False)
        realm = upstreams.realms.get(index) or await self.learn_realm(upstreams, index)
        query = rewrite_token_query(query, library_prefix=upstreams.registry.library_prefix)
        target = ("&" if "?" in realm.target else "?") + query if query else ""
        plan = self.plan(request, target, (realm,), profile=upstreams.profile)
        if user is None:
            await self.run_flow(plan, request, response, upstreams=None)
            return

        async def deliver_sealed(
            conn: UpstreamConnection, head: h11.Response, headers: Headers, _: AsyncExitStack
        ) -> None:
            body = bytearray()
            while (chunk := await conn.receive_body()) is not None:
                body += chunk
                if len(body) > MAX_TOKEN_RESPONSE:
                    raise UpstreamUnavailable("the token service sent an oversized answer")
            if head.status_code == 200:
                body = bytearray(
                    seal_token_response(
                        self.gate.sealer,
                        user,
                        bytes(body),
                        time.time(),
                        registry=upstreams.registry.name,
                        stamp=self.gate.stamp(user),
                    )
                )
            kept = [(k, v) for k, v in headers if k not in (b"content-length", b"content-type")]
            await response.start(
                head.status_code,
                [
                    *kept,
                    (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(body)),
                ],
            )
            if request.method != "HEAD":
                await response.send(body)
            await response.finish()

        await self.run_flow(plan, request, response, upstreams=None, deliver=deliver_sealed)

    async def simple_request(
        self, method: str, url: Url, headers: Headers, *, profile: str = ""
    ) -> tuple[int, Headers, bytes]:
        """One request of our own (no client behind it): status, headers, body up to 64 KiB."""
        async with self.pool.connection(url.origin, profile=profile) as conn:
            all_headers: Headers = [(b"host", url.origin.authority.encode()), *headers]
            await conn.send_request(method, url.target, all_headers)
            head = await conn.receive_head(method)
            body = bytearray()
            while (chunk := await conn.receive_body()) is not None and len(body) <= DRAIN_LIMIT:
                body += chunk
        return head.status_code, list(head.headers), bytes(body)

    async def learn_challenge(self, upstreams: UpstreamSet, index: int) -> None:
        """Ask upstream ``index`` for its challenge (``GET /v2/``): remember its token realm and
        service, or that it wants Basic credentials."""
        base = upstreams.urls[index]
        _status, headers, _body = await self.simple_request(
            "GET", Url(base.origin, _join(base.target, "/v2/")), [], profile=upstreams.profile
        )
        for key, value in headers:
            if key == b"www-authenticate":
                self._learn(upstreams, index, value.decode("latin-1"))

    async def learn_realm(self, upstreams: UpstreamSet, index: int) -> Url:
        """The token realm of upstream ``index``, asked for if not known yet."""
        if index not in upstreams.realms:
            await self.learn_challenge(upstreams, index)
        realm = upstreams.realms.get(index)
        if realm is None:
            origin = upstreams.urls[index].origin
            raise UpstreamUnavailable(f"{origin} did not name a token realm in its challenge")
        return realm

    def _learn(self, upstreams: UpstreamSet, index: int, challenge: str) -> str | None:
        """Remember what a challenge says; return its Bearer realm (None if it has none)."""
        _rewritten, realm = rewrite_challenge(challenge, "")
        if realm is None:
            if challenge.lower().startswith("basic"):
                upstreams.basic_only = True
            return None
        if service := bearer_service(challenge):
            upstreams.services[index] = service
        try:
            upstreams.realms[index] = parse_url(realm)
        except ValueError as exc:
            raise UpstreamUnavailable(f"upstream named an unusable token realm: {exc}") from exc
        return realm

    async def run_flow(
        self,
        plan: flow.Plan,
        request: ClientRequest,
        response: ClientResponse,
        *,
        upstreams: UpstreamSet | None,
        blob_digest: str | None = None,
        deliver: Deliver | None = None,
    ) -> None:
        """Drive the flow state machine until the client has its answer.

        The final response goes to ``deliver`` (default: stream it to the client), which gets
        the connection with its head read, the client-facing headers, and the exit stack that
        owns the connection (a cache fill takes it over with ``pop_all``).
        """
        resting = upstreams.resting_until if upstreams else [0.0] * len(plan.upstreams)
        state, action = flow.start(plan, resting, trio.current_time())
        first_head: h11.Response | None = None
        while True:
            attempt = action.attempt
            response.record.upstream = str(plan.upstreams[attempt.upstream].origin)
            response.record.hops = attempt.hops
            async with AsyncExitStack() as stack:
                event: flow.Event
                conn: UpstreamConnection | None = None
                sent_at = trio.current_time()
                try:
                    conn, head = await self._exchange(stack, plan, attempt, request)
                except ProxyError as error:
                    event = flow.AttemptFailed(error)
                else:
                    event = flow.HeadReceived(head.status_code, list(head.headers))
                    if upstreams is not None:
                        self._note_answer(upstreams, attempt, head, sent_at)
                state, next_action, rest = flow.transition(
                    plan,
                    state,
                    event,
                    resting_until=resting,
                    now=trio.current_time(),
                    wall_now=time.time(),
                )
                if rest is not None:
                    resting[rest.upstream] = max(resting[rest.upstream], rest.until)
                if isinstance(next_action, flow.Fail):
                    raise next_action.error
                if isinstance(next_action, flow.Respond) and conn is not None:
                    headers = self._client_headers(
                        request, plan, attempt, head, first_head, upstreams
                    )
                    if blob_digest and first_head is not None and 200 <= head.status_code < 300:
                        # storage redirects carry no digest header (distribution's blobserver
                        # sets it only when serving itself); the registry would have sent it
                        headers = _with_default(headers, b"docker-content-digest", blob_digest)
                    if deliver is None:
                        await self.stream_response(conn, head, headers, response)
                    else:
                        await deliver(conn, head, headers, stack)
                    return
                if not isinstance(next_action, flow.Send):
                    raise RuntimeError(f"flow gave {next_action} after {event}")
                action = next_action
                if action.attempt.upstream != attempt.upstream:
                    _log_failover(plan, attempt, action.attempt, event, rest)
                    self.metrics.failovers.inc(
                        from_upstream=str(plan.upstreams[attempt.upstream].origin),
                        to_upstream=str(plan.upstreams[action.attempt.upstream].origin),
                    )
                if action.attempt.hops == 0:
                    first_head = None  # failover: a new chain on another upstream
                elif first_head is None and isinstance(event, flow.HeadReceived):
                    first_head = head  # the registry's redirect, whose headers we carry
                if conn is not None:
                    await conn.discard_body(DRAIN_LIMIT)

    def _note_answer(
        self, upstreams: UpstreamSet, attempt: flow.Attempt, head: h11.Response, sent_at: float
    ) -> None:
        """Metrics and readiness from a registry upstream's response head (not the CDN's)."""
        now = trio.current_time()
        upstreams.last_answer = now
        if attempt.hops:
            return  # a redirect target (the CDN) is not the registry
        name = str(attempt.url.origin)
        metrics = self.metrics
        metrics.upstream_latency.observe(now - sent_at, upstream=name)
        if head.status_code == 429:
            metrics.note_rate_limited(name, time.time())
        for key, value in head.headers:
            if key == b"ratelimit-remaining":
                metrics.note_ratelimit(name, value)

    async def _exchange(
        self, stack: AsyncExitStack, plan: flow.Plan, attempt: flow.Attempt, request: ClientRequest
    ) -> tuple[UpstreamConnection, h11.Response]:
        """Send one attempt and return the connection with the response head read."""
        origin = attempt.url.origin
        body = request.body if request.body.present else None
        headers = upstream_request_headers(
            request.headers,
            host=origin.authority.encode(),
            client_ip=request.client_ip,
            client_proto=request.scheme,
            send_authorization=attempt.send_authorization,
            body_length=request.body.length
            if body is not None and not request.body.chunked
            else None,
            chunked_body=body is not None and request.body.chunked,
        )
        method = plan.method
        async with AsyncExitStack() as first:
            conn = await first.enter_async_context(
                self.pool.connection(origin, profile=plan.profile)
            )
            try:
                await conn.send_request(method, attempt.url.target, headers, body)
                head = await conn.receive_head(method)
            except UpstreamUnavailable:
                # A pooled connection the server closed just before our request: retry once on
                # a fresh one, if nothing came back and the request can be replayed.
                if conn.exchanges == 0 or conn.received_any or not plan.replayable:
                    raise
            else:
                stack.push_async_exit(first.pop_all())  # the caller's stack now owns it
                return conn, head
        # the stale connection is closed and its pool slot free again
        conn = await stack.enter_async_context(
            self.pool.connection(origin, fresh=True, profile=plan.profile)
        )
        await conn.send_request(method, attempt.url.target, headers, body)
        return conn, await conn.receive_head(method)

    def _client_headers(
        self,
        request: ClientRequest,
        plan: flow.Plan,
        attempt: flow.Attempt,
        head: h11.Response,
        first_head: h11.Response | None,
        upstreams: UpstreamSet | None,
    ) -> Headers:
        headers = client_response_headers(list(head.headers))
        if first_head is not None:  # a followed redirect: keep the registry's own headers
            present = {k for k, _ in headers}
            headers += [
                (k, v)
                for k, v in first_head.headers
                if k in CARRIED_FROM_REDIRECT and k not in present
            ]
        upstream_base = plan.upstreams[attempt.upstream]
        out: Headers = []
        for key, value in headers:
            if key == b"www-authenticate" and upstreams is not None:
                value = self._rewrite_challenge(request, upstreams, attempt.upstream, value)
            elif key == b"location":
                value = client_location(value.decode("latin-1"), upstream_base, attempt.url).encode(
                    "latin-1"
                )
            out.append((key, value))
        return out

    def _public_base(self, request: ClientRequest) -> str:
        host = self.config.listen_host
        listen = (
            f"[{host}]:{self.config.listen_port}"
            if ":" in host
            else (f"{host}:{self.config.listen_port}")
        )
        return public_base(
            configured=self.config.public_url,
            scheme=request.scheme,
            host_header=request.host,
            fallback=listen,
        )

    def _rewrite_challenge(
        self, request: ClientRequest, upstreams: UpstreamSet, index: int, value: bytes
    ) -> bytes:
        base = self._public_base(request)
        text = value.decode("latin-1")
        rewritten, realm = rewrite_challenge(text, f"{base}{upstreams.token_prefix}{index}")
        try:
            self._learn(upstreams, index, text)
        except UpstreamUnavailable as exc:
            log.warning("%s", exc)
            return value
        return rewritten.encode("latin-1") if realm is not None else value

    async def stream_response(
        self,
        conn: UpstreamConnection,
        head: h11.Response,
        headers: Headers,
        response: ClientResponse,
    ) -> None:
        """Stream the response: one chunk in flight; a failure mid-body aborts the client."""
        await response.start(head.status_code, headers, head.reason)
        try:
            while (chunk := await conn.receive_body()) is not None:
                await response.send(chunk)
        except ProxyError as error:
            raise ResponseAborted(f"upstream failed mid-body: {error}") from error
        await response.finish()


def _log_failover(
    plan: flow.Plan,
    failed: flow.Attempt,
    nxt: flow.Attempt,
    event: flow.Event,
    rest: flow.Rest | None,
) -> None:
    why = (
        f"answered {event.status}"
        if isinstance(event, flow.HeadReceived)
        else str(event.error)
        if isinstance(event, flow.AttemptFailed)
        else "failed"
    )
    resting = f"; skipping it for {rest.until - trio.current_time():.0f}s" if rest else ""
    log.warning(
        "upstream %s %s%s; trying %s",
        plan.upstreams[failed.upstream].origin,
        why,
        resting,
        plan.upstreams[nxt.upstream].origin,
    )


def _with_default(headers: Headers, name: bytes, value: str) -> Headers:
    if any(k == name for k, _ in headers):
        return headers
    return [*headers, (name, value.encode("ascii"))]


def _join(base_target: str, target: str) -> str:
    return base_target.rstrip("/") + target
