"""``hubproxy doctor``: every hop from this machine to the upstreams, and the mirror as a client
sees it, each checked on its own and reported as a row (policy.diagnosis judges and prints).

Theory of operation
-------------------
For each registry checked (the default one and each one the settings name; the rest of the
built-in table with ``--all-registries``) and each of its upstreams (fallbacks too), one chain
runs: DNS, TCP (through the configured proxy), TLS (the certificate), ``GET /v2/`` (the
challenge), an anonymous token from the realm it named, a manifest ``HEAD`` (the rate-limit
headers), and a blob ``GET`` whose redirect is followed to the CDN for its first bytes only.
A hop that fails marks the rest of its chain SKIP; the other chains run on (all at once), and
every check has its own timeout. Then the cache directory and, with ``--mirror``, the mirror.

The connections are the server's own: :func:`hubproxy.net.streams.open_upstream` (proxy,
TLS context with ``--upstream-ca``/``--registry-ca``, connect timeout) and
:class:`hubproxy.net.upstream.UpstreamConnection` (h11), so what doctor finds is what the
server will meet. A blob GET through Docker Hub counts no pull; the one manifest ``GET`` (to
learn a blob digest) does, as one pull of a 1 KiB manifest.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlencode

import trio

from ..cache.store import judge_disk, read_disk
from ..config import Config
from ..forwarder import describe_failure
from ..net.streams import ByteStream, close_forcefully, open_upstream, upstream_ssl_context
from ..net.upstream import UpstreamConnection
from ..policy.auth import parse_challenges
from ..policy.diagnosis import (
    Finding,
    Verdict,
    cache_space_finding,
    certificate_finding,
    rate_limit_finding,
)
from ..policy.errors import ProxyError
from ..policy.headers import get_header
from ..policy.proxies import ProxyKind, UpstreamProxy
from ..policy.registries import Registry
from ..policy.trouble import probed_registries
from ..policy.urls import Origin, Url, is_ip_literal, parse_url, resolve

__all__ = ["DEFAULT_IMAGE", "Doctor", "Options"]

DEFAULT_IMAGE = "library/hello-world:latest"  # small, always there, on Docker Hub
MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json, "
    "application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json"
)
# for the GET that finds a blob: single-platform manifests only (Docker Hub then serves the
# linux/amd64 one of a multi-platform tag), so one GET is enough
SINGLE_MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json"
)
SMALL_BODY = 1 << 20  # a /v2/ answer, a token, a manifest: read up to this much
FIRST_BYTES = 4096  # of a blob from the CDN: enough to see it flows, then close


@dataclass(frozen=True)
class Options:
    mirror: Url | None = None  # --mirror: the mirror as a client sees it
    mirror_ca: str | None = None  # --cacert: the CA the clients trust for it
    images: dict[str, str] = field(default_factory=dict)  # registry -> "repo:tag" (--image)
    all_registries: bool = False  # the built-in table's registries too
    timeout: float = 10.0  # per check


class _Skip(Exception):
    """The check cannot run: the message says what it needs."""


class _Failed(Exception):
    """The check ran and failed: the message is the detail."""


class _Warn(Exception):
    """The check ran and found something to warn about."""


class Doctor:
    """Runs the checks of one configuration; :meth:`run` returns the rows in a stable order."""

    def __init__(self, config: Config, options: Options) -> None:
        self.config = config
        self.options = options
        self.table = config.registry_table()

    async def run(self) -> list[Finding]:
        """Every check; none stops another."""
        registries = (
            list(self.table.registries)
            if self.options.all_registries
            else probed_registries(self.table)
        )
        chains: list[list[Finding]] = [[] for _ in range(sum(len(r.upstreams) for r in registries))]
        async with trio.open_nursery() as nursery:
            slot = 0
            for registry in registries:
                for index, base in enumerate(registry.upstreams):
                    nursery.start_soon(self._chain, registry, index, base, chains[slot])
                    slot += 1
        findings = [finding for chain in chains for finding in chain]
        findings.append(self._cache())
        if self.options.mirror is not None:
            findings.extend(await self._mirror(self.options.mirror))
        return findings

    # -- one upstream -------------------------------------------------------------------------

    def _image(self, registry: Registry) -> str | None:
        given = self.options.images.get(registry.name)
        if given is not None:
            return given
        return DEFAULT_IMAGE if registry.name == self.table.default else None

    async def _chain(self, registry: Registry, index: int, base: Url, out: list[Finding]) -> None:
        proxy = registry.upstream_proxy or self.config.upstream_proxy
        context = upstream_ssl_context(registry.upstream_ca or self.config.upstream_ca)
        origin = base.origin
        target = f"{origin.host}:{origin.port}"
        if index:
            target += f" (fallback {index})"
        image = self._image(registry)
        state: dict[str, object] = {}
        steps: list[tuple[str, str, Callable[[], Awaitable[str]]]] = [
            ("dns", target, lambda: self._dns(origin, proxy)),
            ("tcp", target, lambda: self._tcp(origin, proxy)),
        ]
        if origin.tls:
            steps.append(("tls", target, lambda: self._tls(origin, context, proxy, state)))
        steps += [
            ("v2", str(base), lambda: self._v2(base, context, proxy, state)),
            ("token", registry.name, lambda: self._token(registry, image, context, proxy, state)),
            (
                "manifest",
                f"{registry.name}/{image}" if image else registry.name,
                lambda: self._manifest(base, image, context, proxy, state),
            ),
            (
                "cdn",
                f"{registry.name}/{image}" if image else registry.name,
                lambda: self._cdn(base, image, context, proxy, state),
            ),
        ]
        failed: str | None = None
        for check, where, step in steps:
            if failed is not None:
                out.append(Finding(check, where, Verdict.SKIP, f"not run: {failed} failed"))
                continue
            finding = await self._timed(check, where, step, origin)
            out.append(finding)
            if finding.verdict is Verdict.FAIL and check in ("dns", "tcp", "tls", "v2"):
                failed = check

    async def _timed(
        self, check: str, target: str, step: Callable[[], Awaitable[str]], origin: Origin
    ) -> Finding:
        """Run one check within its timeout; its result, or why it failed, as a row."""
        started = trio.current_time()

        def took() -> float:
            return trio.current_time() - started

        try:
            with trio.fail_after(self.options.timeout):
                detail = await step()
        except trio.TooSlowError:
            detail = f"no answer within {self.options.timeout:g}s"
            return Finding(check, target, Verdict.FAIL, detail, took())
        except _Skip as skip:
            return Finding(check, target, Verdict.SKIP, str(skip))
        except _Warn as warn:
            return Finding(check, target, Verdict.WARN, str(warn), took())
        except _Failed as failure:
            return Finding(check, target, Verdict.FAIL, str(failure), took())
        except _Certificate as found:
            row = found.finding(check, target, took())
            if check == "mirror-tls" and row.verdict is not Verdict.FAIL:
                # verified with check_hostname on: the certificate does name the URL's host
                row = replace(row, detail=f"names {origin.host}; {row.detail}")
            return row
        except ProxyError as error:
            words = describe_failure(error, origin).words
            return Finding(check, target, Verdict.FAIL, words, took())
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a peer's odd answer
            return Finding(check, target, Verdict.FAIL, f"{type(exc).__name__}: {exc}", took())
        return Finding(check, target, Verdict.OK, detail, took())

    async def _dns(self, origin: Origin, proxy: UpstreamProxy | None) -> str:
        host, via = origin.host, ""
        if is_ip_literal(origin.host):
            return f"{origin.host} is an address: nothing to resolve"
        if proxy is not None and proxy.kind is not ProxyKind.SOCKS5:
            # the proxy resolves the upstream's name: what this machine needs is the proxy's
            host, via = proxy.host, f" (the {proxy.label} resolves {origin.host})"
        found = await _resolve(host)
        return f"{host}: {', '.join(found[:3])}" + (" ..." if len(found) > 3 else "") + via

    async def _tcp(self, origin: Origin, proxy: UpstreamProxy | None) -> str:
        # the server's own connect (proxy handshake included), without TLS: an http origin
        plain = Origin("http", origin.host, origin.port)
        stream = await open_upstream(
            plain,
            context=upstream_ssl_context(None),
            proxy=proxy,
            connect_timeout=self.config.timeouts.connect,
        )
        await close_forcefully(stream)
        return "connected" + (f" through the {proxy.label} ({proxy.kind.value})" if proxy else "")

    async def _tls(
        self,
        origin: Origin,
        context: ssl.SSLContext,
        proxy: UpstreamProxy | None,
        state: dict[str, object],
    ) -> str:
        stream = await self._open(origin, context, proxy)
        try:
            raise _Certificate.of(stream, origin)
        finally:
            await close_forcefully(stream)

    async def _open(
        self, origin: Origin, context: ssl.SSLContext, proxy: UpstreamProxy | None
    ) -> ByteStream:
        return await open_upstream(
            origin, context=context, proxy=proxy, connect_timeout=self.config.timeouts.connect
        )

    async def _exchange(
        self,
        url: Url,
        context: ssl.SSLContext,
        proxy: UpstreamProxy | None,
        *,
        method: str = "GET",
        headers: Sequence[tuple[str, str]] = (),
        body_limit: int = SMALL_BODY,
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """One request on a fresh connection: status, headers and (up to ``body_limit``) body."""
        stream = await self._open(url.origin, context, proxy)
        try:
            conn = UpstreamConnection(
                url.origin, stream, idle_timeout=self.config.timeouts.upstream_idle
            )
            request_headers = [
                (b"host", url.origin.authority.encode()),
                (b"user-agent", b"hubproxy-doctor"),
                *((k.encode(), v.encode()) for k, v in headers),
            ]
            await conn.send_request(method, url.target, request_headers)
            response = await conn.receive_head(method)
            body = b""
            while len(body) < body_limit and (chunk := await conn.receive_body()) is not None:
                body += chunk
            return response.status_code, conn.head_headers, body[:body_limit]
        finally:
            await close_forcefully(stream)

    async def _v2(
        self,
        base: Url,
        context: ssl.SSLContext,
        proxy: UpstreamProxy | None,
        state: dict[str, object],
    ) -> str:
        status, headers, _ = await self._exchange(_v2_url(base), context, proxy)
        if status == 200:
            state["open"] = True
            return "200: open, no login needed"
        if status != 401:
            raise _Failed(f"answered {status} (a registry answers 200 or 401)")
        value = (get_header(headers, b"www-authenticate") or b"").decode("latin-1")
        challenges = parse_challenges(value) if value else []
        bearer = next((c for c in challenges if c.scheme.lower() == "bearer"), None)
        if bearer is None:
            scheme = challenges[0].scheme if challenges else "no"
            state["basic"] = True
            return f"401: {scheme} challenge (the client's own login is passed on)"
        realm = bearer.param("realm") or ""
        service = bearer.param("service") or ""
        state["realm"], state["service"] = realm, service
        return f"401 Bearer realm={realm} service={service or '-'}"

    async def _token(
        self,
        registry: Registry,
        image: str | None,
        context: ssl.SSLContext,
        proxy: UpstreamProxy | None,
        state: dict[str, object],
    ) -> str:
        if state.get("open"):
            raise _Skip("the registry needs no token")
        if state.get("basic"):
            raise _Skip("Basic auth: no token service")
        realm = parse_url(str(state["realm"]))
        query: list[tuple[str, str]] = []
        if state.get("service"):
            query.append(("service", str(state["service"])))
        if image is not None:
            query.append(("scope", f"repository:{_repository(image)}:pull"))
        sep = "&" if "?" in realm.target else "?"
        url = Url(realm.origin, realm.target + (sep + urlencode(query) if query else ""))
        status, _, body = await self._exchange(url, context, proxy)
        if status != 200:
            raise _Failed(f"{realm.origin} answered {status} to an anonymous token request")
        document = json.loads(body)
        token = document.get("token") or document.get("access_token")
        if not isinstance(token, str) or not token:
            raise _Failed(f"{realm.origin} answered 200 without a token")
        state["token"] = token  # kept in memory for the next two checks only, never printed
        lifetime = document.get("expires_in")
        return f"anonymous token from {realm.origin}" + (
            f", valid {lifetime}s" if isinstance(lifetime, int) else ""
        )

    def _auth(self, state: dict[str, object]) -> list[tuple[str, str]]:
        token = state.get("token")
        return [("authorization", f"Bearer {token}")] if isinstance(token, str) else []

    async def _manifest(
        self,
        base: Url,
        image: str | None,
        context: ssl.SSLContext,
        proxy: UpstreamProxy | None,
        state: dict[str, object],
    ) -> str:
        repository, reference = _image_checked(image, state)
        url = _under(base, f"/v2/{repository}/manifests/{reference}")
        headers = [("accept", MANIFEST_TYPES), *self._auth(state)]
        status, answer, _ = await self._exchange(
            url, context, proxy, method="HEAD", headers=headers
        )
        finding = rate_limit_finding("", status, answer, 0.0)
        if finding.verdict is Verdict.FAIL:
            raise _Failed(finding.detail)
        if finding.verdict is Verdict.WARN:
            raise _Warn(finding.detail)
        return finding.detail

    async def _cdn(
        self,
        base: Url,
        image: str | None,
        context: ssl.SSLContext,
        proxy: UpstreamProxy | None,
        state: dict[str, object],
    ) -> str:
        repository, reference = _image_checked(image, state)
        url = _under(base, f"/v2/{repository}/manifests/{reference}")
        headers = [("accept", SINGLE_MANIFEST_TYPES), *self._auth(state)]
        status, _, body = await self._exchange(url, context, proxy, headers=headers)
        if status != 200:
            raise _Failed(f"the manifest GET answered {status}")
        digest = _a_blob(json.loads(body))
        blob = _under(base, f"/v2/{repository}/blobs/{digest}")
        status, answer, _ = await self._exchange(
            blob, context, proxy, headers=self._auth(state), body_limit=FIRST_BYTES
        )
        if status == 200:
            return f"blob {digest[:19]}... served by the registry itself (no redirect)"
        location = get_header(answer, b"location")
        if status not in (301, 302, 303, 307, 308) or location is None:
            raise _Failed(f"the blob GET answered {status}")
        cdn = resolve(blob, location.decode("latin-1"))
        started = trio.current_time()
        cdn_status, _, first = await self._exchange(cdn, context, proxy, body_limit=FIRST_BYTES)
        if cdn_status not in (200, 206):
            raise _Failed(f"{status} to {cdn.origin.host}, which answered {cdn_status}")
        took = (trio.current_time() - started) * 1000
        return (
            f"{status} to {cdn.origin.host}: {cdn_status}, first {len(first)} bytes in "
            f"{took:.0f} ms"
        )

    # -- the cache directory ------------------------------------------------------------------

    def _cache(self) -> Finding:
        root = self.config.cache_dir
        if root is None:
            return Finding("cache", "-", Verdict.SKIP, "no cache (--no-cache)")
        path = Path(root)
        if not path.exists():
            return Finding("cache", root, Verdict.WARN, "does not exist yet (a start creates it)")
        if not path.is_dir():
            return Finding("cache", root, Verdict.FAIL, "not a directory")
        try:
            probe = path / f".doctor-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            return Finding("cache", root, Verdict.FAIL, f"not writable: {exc.strerror}")
        try:
            disk = read_disk(path)
        except OSError as exc:
            return Finding("cache", root, Verdict.WARN, f"free space unknown: {exc.strerror}")
        verdict = judge_disk(self.config.cache_size, _cached_bytes(path), disk)
        return cache_space_finding(
            root, disk.free, self.config.cache_size, verdict.bound, verdict.blocks_fills
        )

    # -- the mirror ---------------------------------------------------------------------------

    async def _mirror(self, mirror: Url) -> list[Finding]:
        context = upstream_ssl_context(self.options.mirror_ca)
        origin = mirror.origin
        target = str(origin)
        findings: list[Finding] = []
        if origin.tls:
            findings.append(
                await self._timed(
                    "mirror-tls", target, lambda: self._tls(origin, context, None, {}), origin
                )
            )
        state: dict[str, object] = {}
        v2 = await self._timed(
            "mirror-v2", target, lambda: self._mirror_v2(mirror, context, state), origin
        )
        findings.append(v2)
        image = self._image(self.table.find(self.table.default) or self.table.registries[0])
        pull_target = f"{target} {image or DEFAULT_IMAGE}"
        if v2.verdict is Verdict.FAIL or (findings and findings[0].verdict is Verdict.FAIL):
            findings.append(Finding("mirror-pull", pull_target, Verdict.SKIP, "not run"))
            return findings
        findings.append(
            await self._timed(
                "mirror-pull",
                pull_target,
                lambda: self._mirror_pull(mirror, image or DEFAULT_IMAGE, context, state),
                origin,
            )
        )
        return findings

    async def _mirror_v2(
        self, mirror: Url, context: ssl.SSLContext, state: dict[str, object]
    ) -> str:
        status, headers, _ = await self._exchange(_v2_url(mirror), context, None)
        if status == 200:
            return "200: open"
        if status == 401:
            value = (get_header(headers, b"www-authenticate") or b"").decode("latin-1")
            bearer = next(
                (c for c in parse_challenges(value) if c.scheme.lower() == "bearer"), None
            )
            if bearer is not None:
                state["realm"] = bearer.param("realm") or ""
                state["service"] = bearer.param("service") or ""
            return f"401: {value or 'no challenge'}"
        raise _Failed(f"answered {status}")

    async def _mirror_pull(
        self, mirror: Url, image: str, context: ssl.SSLContext, state: dict[str, object]
    ) -> str:
        repository, reference = _split_image(image)
        headers: list[tuple[str, str]] = [("accept", MANIFEST_TYPES)]
        if state.get("realm"):
            realm = parse_url(str(state["realm"]))
            query = urlencode(
                [
                    ("service", str(state.get("service") or "")),
                    ("scope", f"repository:{repository}:pull"),
                ]
            )
            sep = "&" if "?" in realm.target else "?"
            status, _, body = await self._exchange(
                Url(realm.origin, realm.target + sep + query), context, None
            )
            if status != 200:
                raise _Failed(f"the mirror's token endpoint answered {status}")
            document = json.loads(body)
            token = document.get("token") or document.get("access_token")
            headers.append(("authorization", f"Bearer {token}"))
        url = _under(mirror, f"/v2/{repository}/manifests/{reference}")
        status, answer, body = await self._exchange(url, context, None, headers=headers)
        if status != 200:
            raise _Failed(f"the manifest of {image} answered {status}")
        digest = (get_header(answer, b"docker-content-digest") or b"?").decode("latin-1")
        return f"200, {len(body)} bytes, {digest[:19]}..."


class _Certificate(Exception):
    """Carries a connected TLS stream's certificate out of the check (the row is built once
    the check's time is known)."""

    def __init__(self, peer: dict[str, object], not_after: float) -> None:
        super().__init__("certificate")
        self.peer = peer
        self.not_after = not_after

    @classmethod
    def of(cls, stream: ByteStream, origin: Origin) -> _Certificate:
        ssl_object = getattr(stream, "ssl_object", None)
        if not isinstance(ssl_object, ssl.SSLObject):
            raise _Failed(f"{origin} is not TLS")
        peer = ssl_object.getpeercert() or {}
        expiry = peer.get("notAfter")
        if not isinstance(expiry, str):
            raise _Failed(f"{origin} sent a certificate without an expiry date")
        return cls(dict(peer), ssl.cert_time_to_seconds(expiry))

    def finding(self, check: str, target: str, seconds: float) -> Finding:
        found = certificate_finding(target, self.peer, time.time(), self.not_after, seconds)
        return Finding(check, target, found.verdict, found.detail, seconds)


async def _resolve(host: str) -> list[str]:
    try:
        found = await trio.socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise _Failed(f"cannot resolve {host}: {exc.strerror or exc}") from exc
    return list(dict.fromkeys(str(info[4][0]) for info in found))


def _v2_url(base: Url) -> Url:
    return Url(base.origin, base.target.rstrip("/") + "/v2/")


def _under(base: Url, path: str) -> Url:
    return Url(base.origin, base.target.rstrip("/") + path)


def _split_image(image: str) -> tuple[str, str]:
    """``repo:tag`` or ``repo@digest`` -> (repository, reference); the tag defaults to latest."""
    if "@" in image:
        repository, _, digest = image.partition("@")
        return repository, digest
    repository, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return image, "latest"
    return repository, tag


def _repository(image: str) -> str:
    return _split_image(image)[0]


def _a_blob(manifest: object) -> str:
    """A blob digest named by a manifest: its config (small), else its first layer."""
    if isinstance(manifest, dict):
        for descriptor in (manifest.get("config"), *(manifest.get("layers") or [])):
            if isinstance(descriptor, dict) and isinstance(descriptor.get("digest"), str):
                return str(descriptor["digest"])
    raise _Failed("the manifest names no blob (an index? give a single-platform tag)")


def _cached_bytes(root: Path) -> int:
    """What the cache holds (blobs/sha256/ab/abcd...), as the store counts it at start."""
    total = 0
    with contextlib.suppress(OSError):
        for prefix in os.scandir(root / "blobs" / "sha256"):
            if not prefix.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(prefix.path):
                with contextlib.suppress(OSError):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


def _image_checked(image: str | None, state: dict[str, object]) -> tuple[str, str]:
    """(repository, reference) of the image checked on this registry; a skip when there is
    none to check, or when only a login would be let in."""
    if image is None:
        raise _Skip("give --image NAME=REPOSITORY:TAG for this registry")
    if state.get("basic"):
        raise _Skip("Basic auth: needs a login")
    return _split_image(image)
