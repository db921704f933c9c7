"""Prefetch: pull images into the cache the way a client would, and the scheduled refresh.

Theory of operation. A prefetch is a pull with nothing kept: ``GET /v2/``, the token dance the
mirror's challenge asks for, the manifest by tag (or digest), an index's chosen platforms'
manifests by digest, then the config and layer blobs, each read to its end, hashed and dropped
(``--jobs`` blobs at a time, one chunk each in memory). What the mirror keeps on the way is the
point; what prefetch checks (every manifest and blob against its digest) catches a mirror or an
upstream that answers wrong bytes. The rules (names, platforms, what a manifest names, the lines
shown) are :mod:`hubproxy.policy.prefetch`.

The same client serves three ways of running, which differ only in how a connection is opened
(an :data:`Opener`):

* ``hubproxy prefetch --mirror URL``: TCP (and TLS, with ``--cacert``) to a running mirror, as
  docker would connect;
* ``hubproxy prefetch`` without ``--mirror``: the mirror is built in this process from the same
  settings the server reads (``app.build_proxy``: registries, upstream logins, the cache
  directory) and each connection is one end of a socket pair whose other end an h11 server loop
  of that mirror (``ClientConnection``) serves. No port is opened, and every request takes the
  path a client's takes (token endpoint, access checks, fills, verification), so prefetching
  cannot cache anything a pull would not;
* the ``prefetch`` list of the config file, run by the mirror itself every ``prefetch-interval``
  (:class:`PrefetchSchedule`): socket pairs served by the running server, with a handler that
  skips the client admission rules (``--allow``, ``--users``: the operator's own list) but keeps
  the image rules. Before each round the listed tags are marked for revalidation, so every round
  asks the upstream where each tag points now, whatever ``--manifest-ttl`` says: a moved tag is
  fetched anew.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TextIO
from urllib.parse import quote

import h11
import trio

from . import __version__
from .cache.claims import Claims
from .cache.manifests import MAX_MANIFEST
from .cache.pullthrough import PullThrough
from .cache.store import FillState
from .net.pacing import BandwidthCaps
from .net.server import ClientConnection, Handler, Server
from .net.settings import ListenerSettings
from .net.streams import ByteStream, close_forcefully, open_upstream
from .net.upstream import UpstreamConnection
from .ops.metrics import Counter, Gauge
from .policy.access import NetworkList, RateLimiter
from .policy.admission import Admission
from .policy.auth import parse_challenges
from .policy.errors import PrefetchFailed, ProxyError
from .policy.headers import Headers, get_header
from .policy.prefetch import (
    ACCEPT,
    BadManifest,
    Descriptor,
    FailureMemory,
    ImageRef,
    Platform,
    Tally,
    advice,
    offered_platforms,
    parse_manifest,
    progress_line,
    select_platforms,
    summary_line,
)
from .policy.sealing import TokenSealer
from .policy.sizes import format_decimal_size
from .policy.urls import Origin, Url, parse_url, resolve
from .proxy import Proxy
from .tokens import TokenEndpoint

log = logging.getLogger("hubproxy")

DEFAULT_JOBS = 4  # blobs fetched at once (docker pulls 3 layers at a time, containerd more)
PREFETCH_CLIENT = "prefetch"  # the client address in-process requests carry (access log lines)
IN_PROCESS = Url(Origin("http", "prefetch.invalid", 80), "/")  # the base in-process clients use
MAX_REDIRECTS = 5
MAX_TOKEN_ANSWER = 64 * 1024
MAX_ERROR_BODY = 16 * 1024
REDRAW = 0.2  # seconds between redraws of the progress line on a terminal
PLAIN_EVERY = 30.0  # seconds between progress lines when the output is not a terminal
USER_AGENT = f"hubproxy-prefetch/{__version__}".encode()

# How a connection to an origin is opened (TCP/TLS, or a socket pair to a mirror in-process).
Opener = Callable[[Origin], Awaitable[ByteStream]]


# -- a registry client -------------------------------------------------------------------------


class Session:
    """A registry client for one mirror: keep-alive connections (idle ones at most ``keep``),
    the Bearer token dance the mirror's challenges ask for (a token per scope, fetched again
    when refused), and blob redirects followed (a mirror sends none; a registry does)."""

    def __init__(self, base: Url, opener: Opener, *, idle_timeout: float, keep: int) -> None:
        self.base = base
        self.opener = opener
        self.idle_timeout = idle_timeout
        self.keep = keep
        self._idle: dict[Origin, list[UpstreamConnection]] = {}
        self._tokens: dict[str, bytes] = {}  # scope -> "Bearer ..."

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for conn in connections:
                await close_forcefully(conn.stream)

    @asynccontextmanager
    async def _connection(self, origin: Origin) -> AsyncIterator[UpstreamConnection]:
        idle = self._idle.get(origin)
        conn = idle.pop() if idle else None
        if conn is None:
            conn = UpstreamConnection(
                origin, await self.opener(origin), idle_timeout=self.idle_timeout
            )
        try:
            yield conn
        except BaseException:
            with trio.CancelScope(shield=True):
                await close_forcefully(conn.stream)
            raise
        if conn.reusable and sum(len(c) for c in self._idle.values()) < self.keep:
            self._idle.setdefault(origin, []).append(conn)
        else:
            await close_forcefully(conn.stream)

    @asynccontextmanager
    async def get(
        self, path: str, *, accept: str | None = None, scope: str | None = None
    ) -> AsyncIterator[tuple[UpstreamConnection, h11.Response]]:
        """GET ``path`` of the mirror, with a token for ``scope`` when it asks for one; yields
        the connection with the final answer's head read (the caller reads the body)."""
        url = Url(self.base.origin, self.base.target.rstrip("/") + path)
        for attempt in range(2):
            authorization = self._tokens.get(scope or "")
            async with self._follow(url, accept, authorization) as (conn, head):
                if head.status_code != 401 or attempt == 1:
                    yield conn, head
                    return
                challenge = get_header(conn.head_headers, b"www-authenticate")
                await conn.discard_body(MAX_ERROR_BODY)
            if challenge is None:
                raise PrefetchFailed(f"{url.origin} answered 401 without a challenge", status=401)
            self._tokens[scope or ""] = await self._token(challenge.decode("latin-1"), scope)
        raise AssertionError("unreachable")

    @asynccontextmanager
    async def _follow(
        self, url: Url, accept: str | None, authorization: bytes | None
    ) -> AsyncIterator[tuple[UpstreamConnection, h11.Response]]:
        """One GET, following redirects (credentials only ever to the mirror's own origin)."""
        for _ in range(MAX_REDIRECTS + 1):
            headers: Headers = [
                (b"host", url.origin.authority.encode()),
                (b"user-agent", USER_AGENT),
            ]
            if accept is not None:
                headers.append((b"accept", accept.encode()))
            if authorization is not None and url.origin == self.base.origin:
                headers.append((b"authorization", authorization))
            async with self._connection(url.origin) as conn:
                await conn.send_request("GET", url.target, headers)
                head = await conn.receive_head("GET")
                location = get_header(conn.head_headers, b"location")
                if head.status_code in (301, 302, 303, 307, 308) and location is not None:
                    await conn.discard_body(MAX_ERROR_BODY)
                    try:
                        url = resolve(url, location.decode("latin-1"))
                    except ValueError as exc:
                        raise PrefetchFailed(f"{url.origin} redirected to a bad URL") from exc
                    continue
                yield conn, head
                return
        raise PrefetchFailed(f"more than {MAX_REDIRECTS} redirects from {url.origin}")

    async def _token(self, challenge: str, scope: str | None) -> bytes:
        """A token from the realm the challenge names (the mirror's token endpoint)."""
        bearer = next(
            (c for c in parse_challenges(challenge) if c.scheme.lower() == "bearer"), None
        )
        realm = bearer.param("realm") if bearer is not None else None
        if bearer is None or realm is None:
            raise PrefetchFailed(
                "the mirror asks for a login (a --users mirror): prefetch with the mirror's own "
                "prefetch list, or without --mirror on the mirror's machine",
                status=401,
            )
        query = [("service", bearer.param("service") or "")]
        wanted = scope or bearer.param("scope")
        if wanted:
            query.append(("scope", wanted))
        encoded = "&".join(f"{k}={quote(v, safe='')}" for k, v in query if v)
        try:
            url = parse_url(realm + ("&" if "?" in realm else "?") + encoded)
        except ValueError as exc:
            raise PrefetchFailed(f"the mirror's token realm {realm[:100]!r} is no URL") from exc
        if url.origin != self.base.origin and self.base == IN_PROCESS:
            url = Url(self.base.origin, url.target)  # in-process: every origin is the mirror
        async with self._follow(url, None, None) as (conn, head):
            body = await _read_limited(conn, MAX_TOKEN_ANSWER)
        if head.status_code != 200:
            raise PrefetchFailed(
                f"token request answered {head.status_code}{_error_message(body)}",
                status=head.status_code,
            )
        try:
            document = json.loads(body)
            token = document.get("token") or document.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise PrefetchFailed("the token answer holds no token")
        return b"Bearer " + token.encode("latin-1")


async def _read_limited(conn: UpstreamConnection, limit: int) -> bytes:
    chunks, size = [], 0
    while (chunk := await conn.receive_body()) is not None:
        size += len(chunk)
        if size > limit:
            raise PrefetchFailed(f"an answer from {conn.origin} is larger than {limit} bytes")
        chunks.append(bytes(chunk))
    return b"".join(chunks)


def _error_message(body: bytes) -> str:
    """``: <the registry error's message>``, or nothing."""
    try:
        errors = json.loads(body).get("errors")
        message = errors[0].get("message") if isinstance(errors, list) and errors else None
    except (ValueError, AttributeError, UnicodeDecodeError):
        return ""
    if not isinstance(message, str) or not message:
        return ""
    return ": " + "".join(c if c.isprintable() else "?" for c in message[:300])


async def _refused(conn: UpstreamConnection, head: h11.Response, what: str) -> PrefetchFailed:
    """The failure for a non-200 answer to ``what``, naming the mirror's reason and the fix."""
    try:
        body = await _read_limited(conn, MAX_ERROR_BODY)
    except ProxyError:
        body = b""
    status = head.status_code
    return PrefetchFailed(advice(status, f"{what}: {status}{_error_message(body)}"), status=status)


# -- one image ------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """One prefetch run: its session, platforms, bounds, numbers and output."""

    session: Session
    platforms: tuple[Platform, ...] | None  # None: every platform
    jobs: int
    tally: Tally = dataclasses.field(default_factory=Tally)
    report: Callable[[str], None] = lambda line: None  # a line for the person watching
    started: float = dataclasses.field(default_factory=time.monotonic)
    _blobs: trio.CapacityLimiter | None = None

    @property
    def blob_turns(self) -> trio.CapacityLimiter:
        if self._blobs is None:
            self._blobs = trio.CapacityLimiter(self.jobs)
        return self._blobs


async def fetch_manifest(run: Run, ref: ImageRef, reference: str) -> tuple[bytes, str]:
    """A manifest's body (verified against its digest) and media type."""
    what = f"manifest {ref.path}:{reference}" if ":" not in reference else f"manifest {reference}"
    scope = f"repository:{ref.path}:pull"
    path = f"/v2/{ref.path}/manifests/{reference}"
    async with run.session.get(path, accept=ACCEPT, scope=scope) as (conn, head):
        if head.status_code != 200:
            raise await _refused(conn, head, what)
        body = await _read_limited(conn, MAX_MANIFEST)
        media_type = (get_header(conn.head_headers, b"content-type") or b"").decode("latin-1")
        claimed = get_header(conn.head_headers, b"docker-content-digest")
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    expected = reference if reference.startswith("sha256:") else None
    if expected is None and claimed is not None:
        expected = claimed.decode("latin-1").strip()
    if expected is not None and expected != digest:
        raise PrefetchFailed(
            f"{what} does not match its digest {expected} (it hashes to {digest}): the mirror "
            "or its upstream answered wrong bytes; retry, and see the mirror's log"
        )
    return body, media_type.split(";")[0].strip()


async def fetch_blob(run: Run, ref: ImageRef, blob: Descriptor) -> None:
    """Read one blob to its end through the mirror, hashing it; PrefetchFailed if it does not
    match its digest or size."""
    tally = run.tally
    path = f"/v2/{ref.path}/blobs/{blob.digest}"
    async with (
        run.blob_turns,
        run.session.get(path, scope=f"repository:{ref.path}:pull") as (
            conn,
            head,
        ),
    ):
        if head.status_code != 200:
            raise await _refused(conn, head, f"blob {blob.digest}")
        # the mirror says whether it had the blob (x-cache: HIT) or fetched it for us
        cached = get_header(conn.head_headers, b"x-cache") == b"HIT"
        hasher = hashlib.sha256()
        received = 0
        while (chunk := await conn.receive_body()) is not None:
            hasher.update(chunk)
            received += len(chunk)
            if cached:
                tally.bytes_cached += len(chunk)
            else:
                tally.bytes_fetched += len(chunk)
    actual = "sha256:" + hasher.hexdigest()
    if received != blob.size or actual != blob.digest:
        raise PrefetchFailed(
            f"blob {blob.digest} came with {received} bytes hashing to {actual} (expected "
            f"{blob.size} bytes): a bad answer from the mirror or its upstream; on the mirror's "
            "machine run 'hubproxy cache verify', then retry"
        )
    tally.blobs_done += 1


async def prefetch_image(run: Run, ref: ImageRef) -> str:
    """Fetch one image (its chosen platforms); what it fetched, as a short text. Raises
    PrefetchFailed (or another ProxyError: the connection) with what failed."""
    body, media_type = await fetch_manifest(run, ref, ref.reference)
    try:
        top = parse_manifest(body, media_type)
    except BadManifest as exc:
        raise PrefetchFailed(f"cannot follow the manifest of {ref}: {exc}") from exc
    images = [top]
    shown = "one platform"
    if top.index:
        chosen, missing = select_platforms(top, run.platforms)
        if missing:
            raise PrefetchFailed(
                f"it has no {', '.join(str(p) for p in missing)} image (it has "
                f"{offered_platforms(top)}): pick those with --platform, or use --all-platforms"
            )
        shown = ", ".join(str(c.platform) for c in chosen if c.platform) or "no platform"
        images = []
        for child in chosen:
            child_body, child_type = await fetch_manifest(run, ref, child.digest)
            try:
                manifest = parse_manifest(child_body, child_type or child.media_type)
            except BadManifest as exc:
                raise PrefetchFailed(f"cannot follow manifest {child.digest}: {exc}") from exc
            if manifest.index:
                raise PrefetchFailed(f"manifest {child.digest} is an index inside an index")
            images.append(manifest)
    run.tally.manifests += len(images)
    blobs = list({b.digest: b for image in images for b in image.blobs}.values())
    run.tally.blobs += len(blobs)
    failures: list[str] = []

    async def one(blob: Descriptor) -> None:
        try:
            await fetch_blob(run, ref, blob)
        except ProxyError as exc:
            failures.append(str(exc))

    async with trio.open_nursery() as nursery:
        for blob in blobs:
            nursery.start_soon(one, blob)
    if failures:
        more = f" (and {len(failures) - 1} more blobs failed)" if len(failures) > 1 else ""
        raise PrefetchFailed(failures[0] + more)
    size = sum(b.size for b in blobs)
    return f"{shown}, {len(blobs)} blobs, {format_decimal_size(size)}"


async def prefetch_images(run: Run, refs: Sequence[ImageRef]) -> dict[ImageRef, str | None]:
    """Fetch every image, ``run.jobs`` at most at once; the failure line of each (None: ok).
    Each outcome is also reported as one line as it comes."""
    outcomes: dict[ImageRef, str | None] = {}
    turns = trio.CapacityLimiter(run.jobs)
    tally = run.tally
    tally.images += len(refs)

    async def one(ref: ImageRef) -> None:
        async with turns:
            try:
                done = await prefetch_image(run, ref)
            except ProxyError as exc:
                outcomes[ref] = f"{ref}: {exc}"
                tally.failed += 1
                tally.failures.append(f"{ref}: {exc}")
                run.report(f"failed {ref}: {exc}")
            else:
                outcomes[ref] = None
                run.report(f"done   {ref} ({done})")
            finally:
                tally.images_done += 1

    async with trio.open_nursery() as nursery:
        for ref in dict.fromkeys(refs):
            nursery.start_soon(one, ref)
    return outcomes


# -- the ways of connecting -------------------------------------------------------------------


def network_opener(context: ssl.SSLContext, connect_timeout: float) -> Opener:
    """Connections over the network (``--mirror``): TCP, and TLS with ``context`` for https."""

    async def open_stream(origin: Origin) -> ByteStream:
        return await open_upstream(
            origin, context=context, proxy=None, connect_timeout=connect_timeout
        )

    return open_stream


def in_process_opener(server: Server, handler: Handler, nursery: trio.Nursery) -> Opener:
    """Connections to a mirror in this process: a socket pair, the far end served by an h11
    server loop of ``server`` with ``handler`` (no port opened)."""

    async def open_stream(origin: Origin) -> ByteStream:
        ours, theirs = trio.socket.socketpair()
        client = ClientConnection(
            trio.SocketStream(theirs),
            settings=server.settings,
            client_ip=PREFETCH_CLIENT,
            scheme="http",
        )
        nursery.start_soon(client.serve, handler, server)
        return trio.SocketStream(ours)

    return open_stream


def prefetch_handler(proxy: Proxy) -> Handler:
    """The handler in-process prefetch requests go to: the mirror's own, except that the client
    admission rules (networks, rate, mirror users) do not apply to the operator's prefetch; the
    image rules do."""
    admission = proxy.admission
    open_door = Admission(
        networks=NetworkList(),
        ops_networks=NetworkList(),
        images=admission.images,
        limiter=RateLimiter(0.0, 1),
        authenticator=None,
    )
    forwarder = proxy.forwarder
    inner = Proxy(
        forwarder,
        open_door,
        TokenEndpoint(forwarder, TokenSealer(), admission.images),
        proxy.operations,
        index_url=proxy.index_url,
        pullthrough=proxy.pullthrough,
    )
    return inner.handle


async def wait_fills(pullthrough: PullThrough | None) -> None:
    """Wait until this process's cache fills ended (committed or failed)."""
    if pullthrough is None:
        return
    for fill in list(pullthrough.blobs.fills.values()):
        while fill.state is FillState.FILLING:
            await fill.wait_change()


# -- the terminal --------------------------------------------------------------------------------


class Display:
    """Progress for a person: on a terminal one line redrawn in place (bytes, blobs, images,
    rate); otherwise plain lines (one per image as it ends, and the progress every
    ``PLAIN_EVERY`` seconds), so a CI log stays readable."""

    def __init__(self, out: TextIO, *, tty: bool) -> None:
        self.out = out
        self.tty = tty
        self.drawn = False

    def line(self, text: str) -> None:
        if self.tty and self.drawn:
            self.out.write("\r\x1b[K")
            self.drawn = False
        self.out.write(text + "\n")
        self.out.flush()

    def draw(self, text: str) -> None:
        if self.tty:
            self.out.write("\r\x1b[K" + text)
            self.drawn = True
        else:
            self.out.write(text + "\n")
        self.out.flush()

    async def follow(self, run: Run) -> None:
        """Redraw until cancelled."""
        every = REDRAW if self.tty else PLAIN_EVERY
        while True:
            await trio.sleep(every)
            self.draw(progress_line(run.tally, time.monotonic() - run.started))


async def run_with_display(run: Run, refs: Sequence[ImageRef], display: Display) -> Tally:
    """Fetch ``refs`` showing progress on ``display``; the summary is its last line."""
    run.report = display.line
    async with trio.open_nursery() as nursery:
        nursery.start_soon(display.follow, run)
        await prefetch_images(run, refs)
        nursery.cancel_scope.cancel()
    display.line(summary_line(run.tally, time.monotonic() - run.started))
    return run.tally


# -- the command's two ways ------------------------------------------------------------------------


class MirrorUnreachable(Exception):
    """``--mirror URL`` does not answer as a registry: the message says why and what to do."""


async def prefetch_through_mirror(
    base: Url,
    refs: Sequence[ImageRef],
    platforms: tuple[Platform, ...] | None,
    *,
    jobs: int,
    context: ssl.SSLContext,
    display: Display,
    idle: float = 30.0,
) -> Tally:
    """``hubproxy prefetch --mirror URL``: pull through a running mirror as a client would,
    starting with ``GET /v2/`` (MirrorUnreachable if that fails). ``idle``: seconds a
    connection may take to open, and the mirror to send nothing, before it counts as failed."""
    session = Session(base, network_opener(context, idle), idle_timeout=idle, keep=jobs)
    try:
        try:
            async with session.get("/v2/") as (conn, head):
                await conn.discard_body(MAX_ERROR_BODY)
        except ProxyError as exc:
            raise MirrorUnreachable(
                f"cannot reach the mirror at {base.origin}: {exc} (is it running, and is the URL "
                "right? for a private CA pass it with --cacert)"
            ) from exc
        if head.status_code not in (200, 401):
            raise MirrorUnreachable(
                f"{base.origin}/v2/ answered {head.status_code}: is this a registry mirror?"
            )
        return await run_with_display(Run(session, platforms, jobs), refs, display)
    finally:
        with trio.CancelScope(shield=True):
            await session.aclose()


async def prefetch_in_process(
    proxy: Proxy,
    listener: ListenerSettings,
    refs: Sequence[ImageRef],
    platforms: tuple[Platform, ...] | None,
    *,
    jobs: int,
    display: Display,
) -> Tally:
    """``hubproxy prefetch`` without ``--mirror``: pull through ``proxy`` (built from the
    server's settings, on its cache directory) in this process, over socket pairs."""
    # no bandwidth caps: they are for the clients of the server, not for filling its cache
    server = Server(dataclasses.replace(listener, cert=None, key=None, bandwidth=BandwidthCaps()))
    pullthrough = proxy.pullthrough
    try:
        async with trio.open_nursery() as background:
            proxy.forwarder.background = background  # cache fills run here
            if pullthrough is not None and isinstance(pullthrough.blobs.claims, Claims):
                pullthrough.blobs.claims.nursery = background
            async with trio.open_nursery() as connections:
                opener = in_process_opener(server, prefetch_handler(proxy), connections)
                timeout = proxy.forwarder.config.timeouts.upstream_idle
                session = Session(IN_PROCESS, opener, idle_timeout=timeout, keep=jobs)
                try:
                    tally = await run_with_display(Run(session, platforms, jobs), refs, display)
                finally:
                    with trio.CancelScope(shield=True):
                        await session.aclose()
                await wait_fills(pullthrough)
                connections.cancel_scope.cancel()
            background.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await proxy.pool.aclose()
            if pullthrough is not None:
                await trio.to_thread.run_sync(pullthrough.manifests.close)
    return tally


# -- the scheduled refresh ------------------------------------------------------------------------


class PrefetchSchedule:
    """The config file's ``prefetch`` list, fetched by the running mirror at start and then
    every ``interval`` seconds (trio's clock). A failing image is logged when its failure
    starts or changes, and once when it recovers (``FailureMemory``); each round's result is
    on ``/metrics`` and the status page."""

    def __init__(
        self,
        proxy: Proxy,
        server: Server,
        images: Sequence[ImageRef],
        *,
        interval: float,
        platforms: tuple[Platform, ...] | None,
        jobs: int = DEFAULT_JOBS,
    ) -> None:
        self.proxy = proxy
        self.server = server
        self.images = tuple(dict.fromkeys(images))
        self.interval = interval
        self.platforms = platforms
        self.jobs = jobs
        self.failures = FailureMemory()
        self.rounds_done = 0
        self.round_done = trio.Event()  # set after each round (tests wait for it)
        metrics = proxy.metrics
        registry = metrics.registry
        self.rounds = registry.register(
            Counter("hubproxy_prefetch_rounds", "Rounds of the prefetch list run.")
        )
        self.images_gauge = registry.register(
            Gauge(
                "hubproxy_prefetch_images",
                "Images of the prefetch list by the result of the last round (ok, failed).",
                ("result",),
            )
        )
        self.bytes_counter = registry.register(
            Counter(
                "hubproxy_prefetch_bytes",
                "Blob bytes the prefetch list's rounds read, by where the mirror had them "
                "(upstream: fetched for the round; cache: cached already).",
                ("source",),
            )
        )
        self.last_round = registry.register(
            Gauge(
                "hubproxy_prefetch_last_round_timestamp_seconds",
                "When the last round of the prefetch list ended (Unix seconds).",
            )
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run rounds until cancelled: one now, then one every interval."""
        task_status.started()
        while True:
            await self.refresh()
            await trio.sleep(self.interval)

    def _revalidate(self, ref: ImageRef) -> None:
        """Make the next request for a listed tag ask the upstream where it points now."""
        pullthrough = self.proxy.pullthrough
        tag = ref.tag
        if pullthrough is None or tag is None:
            return
        table = self.proxy.forwarder.table
        registry = table.find(ref.registry)
        name = registry.name if registry is not None else ref.registry
        repository = ref.repository if name == table.default else f"{name}/{ref.repository}"
        pullthrough.expire_tag(repository, tag, [(b"accept", ACCEPT.encode())])

    async def refresh(self) -> Tally:
        """One round: every listed image, its tags asked of the upstream anew."""
        for ref in self.images:
            self._revalidate(ref)
        config = self.proxy.forwarder.config
        async with trio.open_nursery() as nursery:
            opener = in_process_opener(self.server, prefetch_handler(self.proxy), nursery)
            session = Session(
                IN_PROCESS, opener, idle_timeout=config.timeouts.upstream_idle, keep=self.jobs
            )
            run = Run(session, self.platforms, self.jobs)
            try:
                outcomes = await prefetch_images(run, self.images)
            finally:
                with trio.CancelScope(shield=True):
                    await session.aclose()
            await wait_fills(self.proxy.pullthrough)
            nursery.cancel_scope.cancel()
        self._note(run.tally, outcomes, time.monotonic() - run.started)
        return run.tally

    def _note(self, tally: Tally, outcomes: dict[ImageRef, str | None], seconds: float) -> None:
        for ref, failure in outcomes.items():
            if failure is not None:
                if self.failures.failed(str(ref), failure):
                    log.warning(
                        "prefetch: %s (logged once; tried again every %gs)", failure, self.interval
                    )
            elif self.failures.succeeded(str(ref)):
                log.warning("prefetch: %s works again", ref)
        self.failures.forget_others({str(ref) for ref in self.images})
        self.rounds.inc()
        self.images_gauge.set(len(self.images) - tally.failed, result="ok")
        self.images_gauge.set(tally.failed, result="failed")
        self.bytes_counter.inc(tally.bytes_fetched, source="upstream")
        self.bytes_counter.inc(tally.bytes_cached, source="cache")
        now = time.time()
        self.last_round.set(now)
        line = summary_line(tally, seconds)
        log.info("prefetch list: %s", line)
        self.proxy.metrics.prefetch_status = (
            f"{line}; last round {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(now))}"
        )
        self.rounds_done += 1
        self.round_done.set()
        self.round_done = trio.Event()
