"""Where a request meets the upstreams: the driver of the per-request flow.

:meth:`Forwarder.run_flow` drives ``flow``'s state machine with real I/O: it performs each
``Send`` over a pooled upstream connection (with the ``Authorization`` the machine chose for that
attempt), feeds the response head back, and on ``Respond`` hands the answer to a *sink*: by default
:meth:`stream_response`, which streams the body to the client one chunk at a time (receive, await
the send, receive again: the client's pace is the upstream's pace, so a transfer holds at most one
chunk). The token endpoint and the cache side pass their own sinks.

On the way out, every ``WWW-Authenticate`` of an upstream's own answer is rewritten to point at
the mirror's token endpoint for that upstream, and what it says is learned for that upstream
(``upstreams``); an answer from a redirect target (a CDN) teaches nothing and its challenge is not
passed on (the client only ever talks to the mirror).

Every outcome of a request to an upstream itself (an answer, or no answer) is noted in that
upstream's health (``trouble``): the trouble episodes logged once each, ``/readyz``, and the
cause named when the cache answers stale. :meth:`Forwarder.probe` asks an upstream ``GET /v2/``
(at start, and for ``/readyz`` when no request told recently), with its failure put in words.

This module decides nothing of its own: flow, headers, redirects, auth, upstreams and trouble do.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import h11
import trio

from .config import Config
from .net.pool import Connector, Pool
from .net.server import ClientRequest, ClientResponse
from .net.streams import ByteStream, open_upstream, upstream_ssl_context
from .net.upstream import UpstreamConnection
from .ops.metrics import HubMetrics, pool_figures
from .policy import flow, trouble
from .policy.access import client_key
from .policy.accounting import (
    RanLow,
    Recovered,
    credential_identity,
    low_line,
    manifest_repository,
    recovered_line,
)
from .policy.auth import public_base, rewrite_challenge
from .policy.errors import (
    MirrorBusy,
    ProxyError,
    ResponseAborted,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .policy.headers import Headers, client_response_headers, upstream_request_headers
from .policy.peers import PEER_PROFILE
from .policy.proxies import UpstreamProxy
from .policy.redirects import client_location
from .policy.registries import RegistryTable
from .policy.routing import Route
from .policy.slots import lane_of
from .policy.upstreams import UpstreamSet
from .policy.urls import Origin, Url

log = logging.getLogger("hubproxy")

DRAIN_LIMIT = 64 * 1024  # a redirect's body up to this size is read so its connection is reused
START_PROBE_TIMEOUT = 10.0  # the reachability check at start gives each upstream this long
# what a registry answers GET /v2/ with (200 open, 401 a challenge, 403 a gated one)
REGISTRY_PING_STATUSES = frozenset({200, 401, 403})

# What receives the final response: the connection with its head read, the client-facing
# headers, and the exit stack that owns the connection (a cache fill takes it over).
Sink = Callable[[UpstreamConnection, h11.Response, Headers, AsyncExitStack], Awaitable[None]]


def build_pool(config: Config, table: RegistryTable, connector: Connector | None) -> Pool:
    """The upstream connection pool; each registry's connections use its CA and proxy
    (its "profile"; "" is the global settings, for the search index)."""
    settings: dict[str, tuple[ssl.SSLContext, UpstreamProxy | None]] = {
        "": (upstream_ssl_context(config.upstream_ca), config.upstream_proxy)
    }
    for registry in table.registries:
        ca = registry.upstream_ca or config.upstream_ca
        settings[registry.name] = (
            upstream_ssl_context(ca) if ca != config.upstream_ca else settings[""][0],
            registry.upstream_proxy or config.upstream_proxy,
        )
    if config.peers:
        # the other instances' own TLS (--peer-ca), reached directly
        settings[PEER_PROFILE] = (upstream_ssl_context(config.peer_ca), None)
    connect_timeout = config.timeouts.connect

    async def open_stream(origin: Origin, profile: str) -> ByteStream:
        context, via = settings.get(profile, settings[""])
        return await open_upstream(
            origin, context=context, proxy=via, connect_timeout=connect_timeout
        )

    return Pool(
        connector or open_stream,
        idle_timeout=config.timeouts.upstream_idle,
        keepalive=config.timeouts.upstream_keepalive,
        max_idle_per_origin=config.pool_max_idle_per_origin,
        max_per_origin=config.pool_max_per_origin,
        max_per_client=config.pool_max_per_client,
        reserve_small=config.pool_reserve_small,
        wait_timeout=config.timeouts.pool_wait,
    )


class Forwarder:
    """The registries' upstreams, the pool, and the flow driver."""

    def __init__(
        self, config: Config, table: RegistryTable, pool: Pool, metrics: HubMetrics
    ) -> None:
        self.config = config
        self.table = table
        self.pool = pool
        self.metrics = metrics
        metrics.pool = lambda: pool_figures(pool)
        self.registries = {
            registry.name: UpstreamSet(registry, default=registry.name == table.default)
            for registry in table.registries
        }
        self.default = self.registries[table.default]
        self.background: trio.Nursery | None = None  # where cache fills and probes run
        self.start_probed = trio.Event()  # the reachability check at start is done

    def upstreams_for(self, route: Route) -> UpstreamSet:
        """The upstreams of the registry a route is for."""
        return self.registries[route.registry or self.table.default]

    def public_base(self, request: ClientRequest) -> str:
        """The base URL this client reaches the mirror at (for realms we hand out)."""
        config = self.config
        host = config.listen_host
        listen = f"[{host}]:{config.listen_port}" if ":" in host else f"{host}:{config.listen_port}"
        return public_base(
            configured=config.public_url,
            scheme=request.scheme,
            host_header=request.host,
            fallback=listen,
        )

    def plan(
        self,
        request: ClientRequest,
        target: str,
        upstreams: UpstreamSet | tuple[Url, ...],
        *,
        profile: str = "",
        authorization: bytes | None = None,
        operator_authorization: bytes | None = None,
        anonymous_token: bool = False,
    ) -> flow.Plan:
        """The plan of one request: ``authorization`` is the client's upstream credential (not
        its Authorization header as such), ``operator_authorization`` the operator's login when
        this request may use it."""
        if isinstance(upstreams, UpstreamSet):
            urls, profile = upstreams.urls, upstreams.profile
        else:
            urls = upstreams
        return flow.Plan(
            method=request.method,
            target=target,
            upstreams=urls,
            profile=profile,
            replayable=not request.body.present,
            max_hops=self.config.max_redirects,
            rate_limit_rest=self.config.rate_limit_rest,
            unreachable_rest=self.config.unreachable_rest,
            authorization=authorization,
            operator_authorization=operator_authorization,
            anonymous_token=anonymous_token,
        )

    async def run_flow(
        self,
        plan: flow.Plan,
        request: ClientRequest,
        response: ClientResponse,
        *,
        upstreams: UpstreamSet | None,
        blob_digest: str | None = None,
        deliver: Sink | None = None,
        health_of: UpstreamSet | None = None,
    ) -> None:
        """Drive the flow state machine until the client has its answer.

        The final response goes to ``deliver`` (default: stream it to the client). ``upstreams``
        (None for a token realm or the search index) is whose rests apply and whose challenges
        are rewritten and learned; its upstreams must be the plan's. Outcomes are noted in the
        health of ``upstreams``, or of ``health_of`` (whose first upstreams are the plan's: an
        access check), whose trouble is then never announced (no failover could happen).
        """
        watched = upstreams or health_of
        resting = upstreams.resting_until if upstreams else [0.0] * len(plan.upstreams)
        state, action = flow.start(plan, resting, trio.current_time())
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
                except MirrorBusy:
                    raise  # our own slots are taken: no fault of the upstream's, no failover
                except ProxyError as error:
                    event = flow.AttemptFailed(error)
                else:
                    event = flow.HeadReceived(head.status_code, conn.head_headers)
                    if upstreams is not None:
                        self._note_answer(upstreams, plan, attempt, head.status_code, conn, sent_at)
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
                if watched is not None and attempt.hops == 0:
                    # the registry itself answered or failed (a CDN's outcome says nothing of it)
                    moved = isinstance(next_action, flow.Send) and (
                        next_action.attempt.upstream != attempt.upstream
                    )
                    self.note_outcome(
                        watched,
                        attempt.upstream,
                        event,
                        reached_client=upstreams is not None and not moved,
                    )
                if upstreams is not None and not attempt.hops:
                    self._note_state(str(attempt.url.origin), event, rest)
                if isinstance(next_action, flow.Fail):
                    raise next_action.error
                if isinstance(next_action, flow.Respond) and conn is not None:
                    headers = self._client_headers(request, plan, state, conn, upstreams)
                    if blob_digest and state.attempt.hops and 200 <= head.status_code < 300:
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
                if conn is not None:
                    await conn.discard_body(DRAIN_LIMIT)

    def _note_answer(
        self,
        upstreams: UpstreamSet,
        plan: flow.Plan,
        attempt: flow.Attempt,
        status: int,
        conn: UpstreamConnection,
        sent_at: float,
    ) -> None:
        """Metrics and readiness from a registry upstream's response head (not the CDN's)."""
        now = trio.current_time()
        upstreams.last_answer = now
        if attempt.hops:
            return  # a redirect target (the CDN) is not the registry
        name = str(attempt.url.origin)
        metrics = self.metrics
        metrics.upstream_latency.observe(now - sent_at, upstream=name)
        wall = time.time()
        if status == 429:
            metrics.note_rate_limited(name, wall)
        metrics.note_ratelimit_headers(name, conn.head_headers, wall)
        self._account(upstreams, plan, attempt, status, conn, wall)

    def _account(
        self,
        upstreams: UpstreamSet,
        plan: flow.Plan,
        attempt: flow.Attempt,
        status: int,
        conn: UpstreamConnection,
        wall: float,
    ) -> None:
        """Pull accounting of a registry's own answer: a manifest GET that got a manifest is
        an upstream pull, and the rate-limit headers are noted for the identity that spent it
        (one warning when it runs low, one line when it recovers)."""
        registry = upstreams.registry.name
        identity = credential_identity(
            attempt.authorization, plan.operator_authorization, anonymous=plan.anonymous_token
        )
        if plan.method == "GET" and 200 <= status < 300:
            repository = manifest_repository(plan.target)
            if repository is not None:
                image = repository if registry == self.table.default else f"{registry}/{repository}"
                self.metrics.note_upstream_pull(registry=registry, identity=identity, image=image)
        note = self.metrics.note_allowance(
            registry=registry, identity=identity, headers=conn.head_headers, wall=wall
        )
        if isinstance(note, RanLow):
            log.warning("%s", low_line(note.allowance))
        elif isinstance(note, Recovered):
            log.info("%s", recovered_line(note.allowance))

    def _note_state(self, name: str, event: flow.Event, rest: flow.Rest | None) -> None:
        """The status page's state of a registry upstream, from its own answer or failure."""
        health = self.metrics.activity.upstreams
        wall = time.time()
        if isinstance(event, flow.HeadReceived):
            # a rest is on trio's clock; the page shows wall-clock times
            until = wall + (rest.until - trio.current_time()) if rest is not None else None
            health.answered(name, event.status, wall=wall, until=until)
        else:
            health.failed(name, str(event.error), wall=wall)

    def note_outcome(
        self, upstreams: UpstreamSet, index: int, event: flow.Event, *, reached_client: bool
    ) -> None:
        """Note an answer or failure of upstream ``index`` itself in its health, and log what
        its trouble episode says to (``trouble``: once when it starts, a summary at most once a
        minute, once when it ends)."""
        health = upstreams.health[index]
        now = trio.current_time()
        if isinstance(event, flow.HeadReceived):
            cause = trouble.status_cause(event.status, event.headers, time.time())
            health, note = trouble.note_answer(health, now, cause, reached_client=reached_client)
        else:
            cause = describe_failure(event.error, upstreams.urls[index].origin)
            health, note = trouble.note_failure(health, now, cause, reached_client=reached_client)
        upstreams.health[index] = health
        origin = str(upstreams.urls[index].origin)
        if isinstance(note, trouble.Started):
            registry = upstreams.registry
            advice = trouble.advice(
                note.cause.kind,
                registry=registry.name,
                default=registry.name == self.table.default,
                fallbacks=len(upstreams.urls) - 1,
                login=registry.login is not None,
            )
            log.warning("%s", trouble.started_line(origin, note.cause, advice))
        elif isinstance(note, trouble.Continuing):
            log.warning("%s", trouble.continuing_line(origin, note))
        elif isinstance(note, trouble.Ended):
            log.info("%s", trouble.ended_line(origin, note))

    async def probe(
        self, upstreams: UpstreamSet, index: int, *, patience: float
    ) -> tuple[int, float] | trouble.Cause:
        """``GET /v2/`` of upstream ``index`` on a new connection, closed after (DNS, connect,
        TLS and HTTP are all tried): its status and how long it took, or why it failed. Noted
        in its health like any request's outcome."""
        base = upstreams.urls[index]
        url = Url(base.origin, base.target.rstrip("/") + "/v2/")
        started = trio.current_time()
        event: flow.Event
        try:
            with trio.fail_after(patience):
                # a new connection, closed after: a probe leaves no socket behind
                status, headers, _ = await self.simple_request(
                    "GET", url, [(b"connection", b"close")], profile=upstreams.profile, fresh=True
                )
        except trio.TooSlowError as exc:
            error = UpstreamTimeout(f"no answer within {patience:g}s")
            error.__cause__ = exc
            event = flow.AttemptFailed(error)
        except MirrorBusy as error:
            return trouble.Cause(trouble.Kind.UNREACHABLE, str(error))  # ours, not its: no note
        except ProxyError as error:
            event = flow.AttemptFailed(error)
        else:
            event = flow.HeadReceived(status, headers)
        self.note_outcome(upstreams, index, event, reached_client=False)
        if isinstance(event, flow.AttemptFailed):
            return describe_failure(event.error, base.origin)
        return event.status, trio.current_time() - started

    async def probe_at_start(self) -> None:
        """The reachability check at start: every upstream of the default registry and of each
        registry the operator configured, at once, one line each (INFO reachable, WARNING with
        the failure in words and the flag to check). The server does not wait for it."""
        async with trio.open_nursery() as nursery:
            for registry in trouble.probed_registries(self.table):
                upstreams = self.registries[registry.name]
                for index in range(len(upstreams.urls)):
                    nursery.start_soon(self._probe_and_log, upstreams, index)
        self.start_probed.set()

    async def _probe_and_log(self, upstreams: UpstreamSet, index: int) -> None:
        url = str(upstreams.urls[index]).rstrip("/")  # https://registry-1.docker.io
        default = upstreams.registry.name == self.table.default
        name = upstreams.registry.name
        result = await self.probe(upstreams, index, patience=START_PROBE_TIMEOUT)
        # the status page shows the check's outcome until the first pull says more
        page = self.metrics.activity.upstreams
        origin = str(upstreams.urls[index].origin)
        if isinstance(result, trouble.Cause):
            page.failed(origin, result.words, wall=time.time())
        else:
            page.answered(origin, result[0], wall=time.time(), until=None)
        if isinstance(result, trouble.Cause):
            log.warning(
                "upstream %s unreachable at start: %s",
                url,
                _with_hint(result, name, default, index),
            )
            return
        status, took = result
        if status in REGISTRY_PING_STATUSES:
            log.info("upstream %s reachable (%d in %.0f ms)", url, status, took * 1000)
        elif status == 429:
            log.warning("upstream %s reachable but already rate limiting this mirror (429)", url)
        elif status >= 500:
            log.warning("upstream %s reachable but failing: /v2/ answered %d", url, status)
        else:
            log.warning(
                "upstream %s answered /v2/ with %d, which no registry does: check %s",
                url,
                status,
                trouble.upstream_flag(name, default=default, index=index),
            )

    async def _exchange(
        self, stack: AsyncExitStack, plan: flow.Plan, attempt: flow.Attempt, request: ClientRequest
    ) -> tuple[UpstreamConnection, h11.Response]:
        """Send one attempt and return the connection with the response head read."""
        origin = attempt.url.origin
        body = request.body if request.body.present else None
        client_host = request.host if plan.client_host else None
        headers = upstream_request_headers(
            request.headers,
            host=client_host.encode("latin-1") if client_host else origin.authority.encode(),
            client_ip=request.client_ip,
            client_proto=request.scheme,
            authorization=attempt.authorization,
            body_length=request.body.length
            if body is not None and not request.body.chunked
            else None,
            chunked_body=body is not None and request.body.chunked,
        )
        method = plan.method
        # whose share of the origin's slots this is, and whether it moves a blob's body
        client, lane = client_key(request.client_ip), lane_of(method, plan.target)
        lending = self.pool.connection(origin, profile=plan.profile, client=client, lane=lane)
        conn = await lending.__aenter__()
        try:
            await conn.send_request(method, attempt.url.target, headers, body)
            head = await conn.receive_head(method)
        except UpstreamUnavailable as exc:
            # A pooled connection the server closed just before our request: retry once on
            # a fresh one, if nothing came back and the request can be replayed.
            retry = conn.exchanges > 0 and not conn.received_any and plan.replayable
            await lending.__aexit__(type(exc), exc, exc.__traceback__)
            if not retry:
                raise
        except BaseException as exc:
            await lending.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        else:
            stack.push_async_exit(lending)  # the caller's stack now owns it
            return conn, head
        # the stale connection is closed and its pool slot free again
        conn = await stack.enter_async_context(
            self.pool.connection(origin, fresh=True, profile=plan.profile, client=client, lane=lane)
        )
        await conn.send_request(method, attempt.url.target, headers, body)
        return conn, await conn.receive_head(method)

    def _client_headers(
        self,
        request: ClientRequest,
        plan: flow.Plan,
        state: flow.State,
        conn: UpstreamConnection,
        upstreams: UpstreamSet | None,
    ) -> Headers:
        attempt = state.attempt
        headers = client_response_headers(conn.head_headers)
        if state.carried:  # a followed redirect: keep the registry's own headers
            present = {k for k, _ in headers}
            headers += [(k, v) for k, v in state.carried if k not in present]
        upstream_base = plan.upstreams[attempt.upstream]
        out: Headers = []
        for key, value in headers:
            if key == b"www-authenticate" and upstreams is not None:
                if attempt.hops:
                    continue  # a redirect target's challenge: neither learned nor passed on
                value = self._rewrite_challenge(request, upstreams, attempt.upstream, value)
            elif key == b"location":
                value = client_location(value.decode("latin-1"), upstream_base, attempt.url).encode(
                    "latin-1"
                )
            out.append((key, value))
        return out

    def _rewrite_challenge(
        self, request: ClientRequest, upstreams: UpstreamSet, index: int, value: bytes
    ) -> bytes:
        text = value.decode("latin-1")
        upstreams.note_challenge(index, text, from_redirect=False)
        ours = f"{self.public_base(request)}{upstreams.token_prefix}{index}"
        rewritten, realm = rewrite_challenge(text, ours)
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

    async def simple_request(
        self, method: str, url: Url, headers: Headers, *, profile: str = "", fresh: bool = False
    ) -> tuple[int, Headers, bytes]:
        """One request of our own (no client behind it): status, headers, body up to 64 KiB;
        ``fresh``: on a new connection (a probe of reachability)."""
        # the mirror's own requests share the client "" and read at most DRAIN_LIMIT: small
        async with self.pool.connection(url.origin, profile=profile, fresh=fresh) as conn:
            all_headers: Headers = [(b"host", url.origin.authority.encode()), *headers]
            await conn.send_request(method, url.target, all_headers)
            head = await conn.receive_head(method)
            body = bytearray()
            while (chunk := await conn.receive_body()) is not None and len(body) <= DRAIN_LIMIT:
                body += chunk
        return head.status_code, list(head.headers), bytes(body)

    async def learn_challenge(self, upstreams: UpstreamSet, index: int) -> None:
        """Ask upstream ``index`` for its challenge (``GET /v2/``) and learn what it says."""
        base = upstreams.urls[index]
        _status, headers, _body = await self.simple_request(
            "GET", Url(base.origin, base.target.rstrip("/") + "/v2/"), [], profile=upstreams.profile
        )
        for key, value in headers:
            if key == b"www-authenticate":
                upstreams.note_challenge(index, value.decode("latin-1"), from_redirect=False)

    async def learn_realm(self, upstreams: UpstreamSet, index: int) -> Url:
        """The token realm of upstream ``index``, asked for if not known yet."""
        if upstreams.learned[index].realm is None:
            await self.learn_challenge(upstreams, index)
        realm = upstreams.learned[index].realm
        if realm is None:
            origin = upstreams.urls[index].origin
            raise UpstreamUnavailable(f"{origin} did not name a token realm in its challenge")
        return realm


async def read_whole(conn: UpstreamConnection, limit: int, what: str) -> bytes:
    """A small answer read whole (a token, search results): UpstreamUnavailable past ``limit``
    bytes, so an upstream cannot make us hold more."""
    body = bytearray()
    while (chunk := await conn.receive_body()) is not None:
        body += chunk
        if len(body) > limit:
            raise UpstreamUnavailable(f"{what} sent an answer larger than {limit} bytes")
    return bytes(body)


async def answer_whole(
    request: ClientRequest,
    response: ClientResponse,
    status: int,
    headers: Headers,
    body: bytes,
    reason: bytes = b"",
) -> None:
    """Answer with ``body`` whole: ``headers`` with the body's own Content-Length."""
    kept = [(k, v) for k, v in headers if k != b"content-length"]
    await response.start(status, [*kept, (b"content-length", b"%d" % len(body))], reason)
    if request.method != "HEAD":
        await response.send(body)
    await response.finish()


def describe_failure(error: ProxyError, origin: Origin) -> trouble.Cause:
    """A request that got no answer, in words an operator reads (``cannot resolve HOST``,
    ``connection refused``, ``TLS: certificate not trusted``), from the foreign error behind it."""
    words = str(error)
    found = list(_foreign_causes(error))
    for exc in found:
        if isinstance(exc, ssl.SSLCertVerificationError):
            words = _certificate_words(exc, origin)
            break
        if isinstance(exc, socket.gaierror):
            words = f"cannot resolve {origin.host}"
            break
        if isinstance(exc, ConnectionRefusedError):
            words = "connection refused"
            break
    else:
        if isinstance(error, UpstreamTimeout):
            words = f"timed out ({error})"
        elif any(isinstance(exc, ssl.SSLError) for exc in found):
            reason = next(
                getattr(exc, "reason", None) or str(exc)
                for exc in found
                if isinstance(exc, ssl.SSLError)
            )
            plain = " (is it plain http://?)" if "WRONG_VERSION_NUMBER" in str(reason) else ""
            words = f"TLS handshake failed: {reason}{plain}"
        else:
            for exc in found:
                if isinstance(exc, OSError) and exc.errno is not None:
                    words = (exc.strerror or errno.errorcode.get(exc.errno, "")).lower()
                    break
    return trouble.Cause(trouble.Kind.UNREACHABLE, words)


def _foreign_causes(error: BaseException) -> list[BaseException]:
    """The errors behind ``error``: its causes and contexts, and the members of exception
    groups (trio's open_tcp_stream raises one OSError from a group of each address's)."""
    seen: list[BaseException] = []
    todo: list[BaseException] = [error]
    while todo:
        exc = todo.pop(0)
        if any(exc is s for s in seen):
            continue
        seen.append(exc)
        if isinstance(exc, BaseExceptionGroup):
            todo.extend(exc.exceptions)
        for nxt in (exc.__cause__, exc.__context__):
            if nxt is not None:
                todo.append(nxt)
    return seen[1:]


def _certificate_words(exc: ssl.SSLCertVerificationError, origin: Origin) -> str:
    message = str(exc.verify_message or exc.reason or exc)
    if "expired" in message:
        return "TLS: certificate has expired"
    if "mismatch" in message.lower() or "not valid for" in message:
        return f"TLS: certificate is not for {origin.host}"
    return "TLS: certificate not trusted"


def _with_hint(cause: trouble.Cause, registry: str, default: bool, index: int) -> str:
    """A failure at start with the flag to look at: the URL for a name that does not resolve,
    the CA for a certificate not trusted."""
    if cause.words.startswith("cannot resolve"):
        return (
            f"{cause.words}: check {trouble.upstream_flag(registry, default=default, index=index)}"
        )
    if cause.words == "TLS: certificate not trusted":
        flag = "--upstream-ca" if default else f"--registry-ca {registry}=FILE"
        return f"{cause.words} (use {flag})"
    return cause.words


def _log_failover(
    plan: flow.Plan,
    failed: flow.Attempt,
    nxt: flow.Attempt,
    event: flow.Event,
    rest: flow.Rest | None,
) -> None:
    why = f"answered {event.status}" if isinstance(event, flow.HeadReceived) else str(event.error)
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
