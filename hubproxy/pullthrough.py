"""Pull-through caching: when a blob or manifest may come from the cache, and how.

The security rule: the cache only serves what the upstream would serve this client. Before a hit
is served, the client's own credentials (or none) are shown to the upstream with a HEAD request
(Docker Hub does not count HEADs against the rate limit); a yes is remembered per credentials
and blob or manifest for :data:`ACCESS_CONFIRMATION_TTL`. A no, or any answer we cannot read as a
yes, sends the client's request upstream as it is, so the client gets the registry's own answer.

When the upstream cannot answer (down, 429, 5xx) a cached manifest or blob is still served, but
only for a repository known to be anonymously readable (asked once per repository, in the
background, with an anonymous token): a stale answer never leaks a private image. Each stale
answer is logged.

Tags are revalidated with HEAD (never GET, which Docker Hub counts); ``--manifest-ttl`` lets a tag
skip that for a while once this client's access to the repository is confirmed.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
import logging
import urllib.parse
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import h11
import trio

from . import flow
from .auth import parse_challenges
from .cache import (
    BlobReader,
    BlobStore,
    CacheFillFailed,
    RangeNotSatisfiable,
    cached_blob_answer,
    sha256_hex,
)
from .errors import ProxyError, UpstreamUnavailable
from .headers import Headers, get_all, get_header
from .manifests import MAX_MANIFEST, CachedManifest, ManifestStore, accepts
from .routing import Route
from .server import ClientRequest, ClientResponse, ResponseAborted
from .upstream import UpstreamConnection
from .urls import Url, parse_url

if TYPE_CHECKING:
    from .forwarder import Forwarder

log = logging.getLogger("hubproxy.cache")

CACHE_METHODS = frozenset({"GET", "HEAD"})
ACCESS_CONFIRMATION_TTL = 60.0  # Docker Hub tokens live 300 s; a revoked grant is seen soon
MAX_CONFIRMATIONS = 10_000
PROBE_BODY_LIMIT = 64 * 1024
SENDFILE_SIZE = 4 * 1024 * 1024  # per os.sendfile call: no copy, so larger spans cost nothing


class Access(enum.Enum):
    ALLOWED = "allowed"
    DENIED = "denied"
    UNAVAILABLE = "unavailable"  # the upstream could not say (down, 429, 5xx)


def state_name(route: Route) -> str:
    """The name cached state is kept under: the repository, qualified by its registry unless
    it is the default one (so ``ghcr.io/owner/image`` and Docker Hub's ``owner/image`` differ)."""
    repository = route.repository or ""
    return f"{route.registry}/{repository}" if route.registry else repository


def upstream_unavailable(status: int) -> bool:
    return status == 429 or status >= 500


class PullThrough:
    """The cache side of the proxy: blobs (``BlobStore``) and manifests (``ManifestStore``)."""

    def __init__(
        self, proxy: Forwarder, blobs: BlobStore, manifests: ManifestStore, manifest_ttl: float
    ) -> None:
        self.proxy = proxy
        self.blobs = blobs
        self.manifests = manifests
        self.manifest_ttl = manifest_ttl
        self.stats = blobs.stats
        self.confirmed: dict[tuple[str, str], float] = {}  # (sha256(auth), path) -> until
        self.tag_checked: dict[tuple[str, str], float] = {}  # (repo, tag) -> when revalidated
        self.pending: dict[str, trio.Event] = {}  # blob misses whose upstream head is awaited
        self.probing: set[str] = set()
        self._probes_idle = trio.Event()
        self._probes_idle.set()

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
            await self.proxy.run_flow(
                plan, request, response, upstreams=self.proxy.upstreams_for(route)
            )
        except ProxyError as error:
            if response.started or not self.manifests.anonymous:
                raise
            self.stats.stale_answers += 1
            log.warning("upstream unavailable (%s): answering /v2/ from the cache", error)
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

    def _confirmation_key(self, request: ClientRequest, route: Route) -> tuple[str, str]:
        # Per resource, not per repository: blobs and manifests are stored by digest for every
        # repository, and a registry answers BLOB_UNKNOWN for a digest the repository does not
        # link, however readable the repository is.
        authorization = get_header(request.headers, b"authorization") or b""
        path = route.target.partition("?")[0]
        return hashlib.sha256(authorization).hexdigest(), f"{route.registry or ''}{path}"

    def _access_confirmed(self, request: ClientRequest, route: Route) -> bool:
        until = self.confirmed.get(self._confirmation_key(request, route), 0.0)
        return until > trio.current_time()

    def _remember_access(self, request: ClientRequest, route: Route) -> None:
        now = trio.current_time()
        if len(self.confirmed) > MAX_CONFIRMATIONS:
            self.confirmed = {k: v for k, v in self.confirmed.items() if v > now}
        self.confirmed[self._confirmation_key(request, route)] = now + ACCESS_CONFIRMATION_TTL

    async def _ask_upstream(
        self, plan: flow.Plan, request: ClientRequest, response: ClientResponse, route: Route
    ) -> tuple[Access, h11.Response | None]:
        """HEAD the client's path upstream with its credentials: may it read this?"""
        plan = dataclasses.replace(
            plan, method="HEAD", target=route.target.partition("?")[0], follow_redirects=False
        )
        answer: h11.Response | None = None

        async def keep_head(
            conn: UpstreamConnection, head: h11.Response, headers: Headers, stack: AsyncExitStack
        ) -> None:
            nonlocal answer
            answer = head
            await conn.discard_body(PROBE_BODY_LIMIT)

        try:
            await self.proxy.run_flow(
                plan,
                request,
                response,
                upstreams=self.proxy.upstreams_for(route),
                deliver=keep_head,
            )
        except ProxyError:
            return Access.UNAVAILABLE, None
        assert answer is not None
        if 200 <= answer.status_code < 400:
            self._remember_access(request, route)
            if route.blob_digest is not None:
                self.manifests.link(state_name(route), route.blob_digest)
            return Access.ALLOWED, answer
        if upstream_unavailable(answer.status_code):
            return Access.UNAVAILABLE, answer
        return Access.DENIED, answer

    def _stale_allowed(self, route: Route, what: str, digest: str) -> bool:
        """Whether a cached answer may go out unconfirmed: only a digest seen in a repository
        that anyone may read."""
        repository = state_name(route)
        if repository not in self.manifests.anonymous:
            return False
        if not self.manifests.linked(repository, digest):
            return False
        self.stats.stale_answers += 1
        log.warning(
            "upstream unavailable: serving %s of %s from the cache without revalidation (stale)",
            what,
            repository,
        )
        return True

    # -- blobs -------------------------------------------------------------------------------

    async def _serve_blob(
        self,
        plan: flow.Plan,
        request: ClientRequest,
        response: ClientResponse,
        route: Route,
        key: str,
    ) -> None:
        """A hit (after the access check), or a miss whose one upstream fetch fills the cache."""
        store = self.blobs
        while (pending := self.pending.get(key)) is not None:
            await pending.wait()  # another client's miss: let it start the one upstream fetch
        if store.size_of(key) is not None or key in store.fills:
            if await self._serve_blob_hit(plan, request, response, route, key):
                return
        elif request.method == "GET" and get_header(request.headers, b"range") is None:
            store.stats.misses += 1
            self.pending[key] = trio.Event()
            try:
                deliver = functools.partial(self._deliver_blob, plan, request, response, route, key)
                await self.proxy.run_flow(
                    plan,
                    request,
                    response,
                    upstreams=self.proxy.upstreams_for(route),
                    blob_digest=route.blob_digest,
                    deliver=deliver,
                )
            finally:
                self._release_pending(key)
            return
        # uncached probes and resumes, or a hit this client may not have: the upstream answers
        await self.proxy.run_flow(
            plan,
            request,
            response,
            upstreams=self.proxy.upstreams_for(route),
            blob_digest=route.blob_digest,
        )

    def _release_pending(self, key: str) -> None:
        pending = self.pending.pop(key, None)
        if pending is not None:
            pending.set()

    async def _serve_blob_hit(
        self,
        plan: flow.Plan,
        request: ClientRequest,
        response: ClientResponse,
        route: Route,
        key: str,
    ) -> bool:
        if not self._access_confirmed(request, route):
            access, _head = await self._ask_upstream(plan, request, response, route)
            if access is Access.DENIED:
                return False
            if access is Access.UNAVAILABLE and not self._stale_allowed(
                route, "a blob", route.blob_digest or ""
            ):
                return False
        if self.blobs.size_of(key) is None and key not in self.blobs.fills:
            return False  # evicted while we asked
        self.stats.hits += 1
        await self._send_blob(plan, request, response, route, key)
        return True

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
    ) -> None:
        """The upstream's answer to a blob miss: start a fill and serve from it, or stream."""
        store = self.blobs
        length = get_header(head.headers, b"content-length")
        size = int(length) if length is not None else None
        background = self.proxy.background
        if (
            head.status_code == 200
            and size is not None
            and background is not None
            and key not in store.fills
            and store.can_fill(size)
        ):
            try:
                fill = store.start_fill(key, size)
            except OSError as exc:
                log.warning("cache: cannot create a file in %s: %s", store.tmp_dir, exc)
            else:
                self._remember_access(request, route)
                self.manifests.link(state_name(route), route.blob_digest or "")
                background.start_soon(store.run_fill, fill, conn, stack.pop_all())
                self._release_pending(key)
                self._maybe_probe(route, route.target.partition("?")[0])
                await self._send_blob(plan, request, response, route, key)
                return
        if upstream_unavailable(head.status_code) and store.size_of(key) is not None:
            if self._stale_allowed(route, "a blob", route.blob_digest or ""):
                await self._send_blob(plan, request, response, route, key)
                return
        await self.proxy.stream_response(conn, head, headers, response)

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
        fill = store.fills.get(key)
        size = fill.size if fill is not None else store.size_of(key)
        response.record.upstream = "cache" if fill is None else "cache-fill"
        if size is None:
            raise UpstreamUnavailable(f"cached blob {digest} vanished")
        try:
            answer = cached_blob_answer(digest, size, get_header(request.headers, b"range"))
        except RangeNotSatisfiable:
            await response.start(
                416, [(b"content-range", b"bytes */%d" % size), (b"content-length", b"0")]
            )
            await response.finish()
            return
        if request.method == "HEAD":
            await response.start(answer.status, answer.headers)
            await response.finish()
            return
        reader = store.reader(key, answer.start, answer.end)
        try:
            await response.start(answer.status, answer.headers)
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
            await self._finish_from_upstream(plan, request, response, route, key, reader, size)
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
    ) -> None:
        """Send the rest of a blob with a Range request upstream, verifying the whole blob
        (the part already sent is re-read from the partial file) before its last byte."""
        position = reader.position
        digest = route.blob_digest or ""
        log.warning(
            "cache write of %s failed; finishing the transfer from the upstream at byte %d",
            digest,
            position,
        )
        hasher = hashlib.sha256()
        reader.hash_sent(hasher)
        headers = [(k, v) for k, v in request.headers if k != b"range"]
        ranged = dataclasses.replace(
            request, headers=[*headers, (b"range", b"bytes=%d-" % position)]
        )
        plan = dataclasses.replace(plan, replayable=True)

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

        await self.proxy.run_flow(
            plan, ranged, response, upstreams=self.proxy.upstreams_for(route), deliver=relay_rest
        )

    # -- manifests ---------------------------------------------------------------------------

    async def _serve_manifest(
        self, plan: flow.Plan, request: ClientRequest, response: ClientResponse, route: Route
    ) -> None:
        reference = route.manifest_reference or ""
        repository = state_name(route)
        by_digest = reference.startswith("sha256:")
        digest = reference if by_digest else self.manifests.tag(repository, reference)
        cached = self.manifests.get(digest) if digest else None
        if cached is not None and not accepts(
            get_all(request.headers, b"accept"), cached.media_type
        ):
            cached = None  # cached for another media type than this client takes
        if cached is not None:
            served = await self._serve_manifest_hit(
                plan, request, response, route, cached, by_digest
            )
            if served:
                return
        deliver = functools.partial(self._deliver_manifest, request, response, route, cached)
        try:
            await self.proxy.run_flow(
                plan, request, response, upstreams=self.proxy.upstreams_for(route), deliver=deliver
            )
        except ProxyError:
            if (
                response.started
                or cached is None
                or not self._stale_allowed(route, "a manifest", cached.digest)
            ):
                raise
            await self._send_manifest(request, response, cached)

    async def _serve_manifest_hit(
        self,
        plan: flow.Plan,
        request: ClientRequest,
        response: ClientResponse,
        route: Route,
        cached: CachedManifest,
        by_digest: bool,
    ) -> bool:
        """Serve a cached manifest if it is current and this client may read it."""
        repository = state_name(route)
        reference = route.manifest_reference or ""
        checked = self.tag_checked.get((repository, reference), -1e18)
        fresh = by_digest or trio.current_time() - checked < self.manifest_ttl
        if fresh and self._access_confirmed(request, route):
            self.stats.hits += 1
            await self._send_manifest(request, response, cached)
            return True
        access, head = await self._ask_upstream(plan, request, response, route)
        if access is Access.DENIED:
            return False
        if access is Access.UNAVAILABLE:
            if not self._stale_allowed(route, "a manifest", cached.digest):
                return False
        elif not by_digest:
            assert head is not None
            current = get_header(head.headers, b"docker-content-digest")
            if current is None or current.decode("latin-1") != cached.digest:
                return False  # the tag moved: fetch the new manifest (one GET)
            self.tag_checked[(repository, reference)] = trio.current_time()
        self.stats.hits += 1
        await self._send_manifest(request, response, cached)
        return True

    async def _deliver_manifest(
        self,
        request: ClientRequest,
        response: ClientResponse,
        route: Route,
        cached: CachedManifest | None,
        conn: UpstreamConnection,
        head: h11.Response,
        headers: Headers,
        stack: AsyncExitStack,
    ) -> None:
        """The upstream's manifest answer: keep a copy of a 200 GET, serve stale on 429/5xx."""
        if upstream_unavailable(head.status_code) and cached is not None:
            if self._stale_allowed(route, "a manifest", cached.digest):
                await self._send_manifest(request, response, cached)
                return
        length = get_header(head.headers, b"content-length")
        media_type = get_header(head.headers, b"content-type")
        if (
            request.method != "GET"
            or head.status_code != 200
            or length is None
            or int(length) > MAX_MANIFEST
            or media_type is None
        ):
            await self.proxy.stream_response(conn, head, headers, response)
            return
        body = bytearray()
        while (chunk := await conn.receive_body()) is not None:
            body += chunk
        data = bytes(body)
        stored = self.manifests.put(
            state_name(route),
            route.manifest_reference or "",
            media_type.decode("latin-1").split(";")[0].strip(),
            data,
        )
        claimed = get_header(head.headers, b"docker-content-digest")
        if stored is None or (claimed is not None and claimed.decode("latin-1") != stored):
            raise UpstreamUnavailable(
                f"upstream manifest for {route.repository}:{route.manifest_reference} does not "
                "match its digest"
            )
        self._remember_access(request, route)
        if route.manifest_reference and not route.manifest_reference.startswith("sha256:"):
            self.tag_checked[(state_name(route), route.manifest_reference)] = trio.current_time()
        self._maybe_probe(route, f"/v2/{route.repository}/manifests/{stored}")
        await response.start(head.status_code, headers, head.reason)
        await response.send(data)
        await response.finish()

    async def _send_manifest(
        self, request: ClientRequest, response: ClientResponse, cached: CachedManifest
    ) -> None:
        response.record.upstream = "cache"
        headers = [
            (b"content-type", cached.media_type.encode("latin-1")),
            (b"content-length", b"%d" % len(cached.body)),
            (b"docker-content-digest", cached.digest.encode("ascii")),
            (b"etag", b'"%s"' % cached.digest.encode("ascii")),
            (b"docker-distribution-api-version", b"registry/2.0"),
        ]
        await response.start(200, headers)
        if request.method == "GET":
            await response.send(cached.body)
        await response.finish()

    # -- which repositories anyone may read ----------------------------------------------------

    def _maybe_probe(self, route: Route, path: str) -> None:
        repository = state_name(route)
        known = repository in self.manifests.anonymous or repository in self.manifests.private
        background = self.proxy.background
        if known or repository in self.probing or background is None:
            return
        self.probing.add(repository)
        self._probes_idle = trio.Event()
        upstreams = self.proxy.upstreams_for(route)
        background.start_soon(
            self._probe_anonymous, repository, path, upstreams.urls[0], upstreams.profile
        )

    async def wait_probes(self) -> None:
        """Wait until no repository is being probed (tests, and a clean shutdown)."""
        await self._probes_idle.wait()

    async def _probe_anonymous(self, repository: str, path: str, base: Url, profile: str) -> None:
        """Ask the primary upstream, as an anonymous client would, whether ``path`` is public."""
        url = Url(base.origin, base.target.rstrip("/") + path)
        try:
            with trio.fail_after(self.proxy.config.timeouts.upstream_idle):
                readable = await self._anonymous_head(url, profile)
        except (ProxyError, trio.TooSlowError, ValueError, KeyError, AttributeError) as exc:
            log.info("could not learn whether %s is public: %s", repository, exc)
            readable = None
        finally:
            self.probing.discard(repository)
        if readable is not None:
            self.manifests.set_anonymous(repository, readable)
        if not self.probing:
            self._probes_idle.set()

    async def _anonymous_head(self, url: Url, profile: str) -> bool:
        status, headers, _ = await self.proxy.simple_request("HEAD", url, [], profile=profile)
        if status != 401:
            return 200 <= status < 400
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
            return False
        query = urllib.parse.urlencode(
            [(k, v) for k in ("service", "scope") if (v := challenge.param(k) or "")]
        )
        realm = parse_url(challenge.param("realm") or "")
        token_url = Url(realm.origin, realm.target + ("&" if "?" in realm.target else "?") + query)
        status, _, body = await self.proxy.simple_request("GET", token_url, [], profile=profile)
        if status != 200:
            return False
        document = json.loads(body)
        if not isinstance(document, dict):
            return False
        token = document.get("token") or document.get("access_token")
        if not isinstance(token, str):
            return False
        authorization = [(b"authorization", b"Bearer " + token.encode("latin-1"))]
        status, _, _ = await self.proxy.simple_request("HEAD", url, authorization, profile=profile)
        return 200 <= status < 400
