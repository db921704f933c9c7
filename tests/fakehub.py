"""A fake Docker Hub: registry, token service and CDN, each a real TLS server on 127.0.0.1.

Theory of operation: written from the public protocol (see shared/PROTOCOL.md), never from a
proxy implementation, so tests of hubproxy meet the same surprises a real Docker Hub would give:

* ``registry`` answers ``/v2/...`` with Bearer challenges that point at ``auth``, serves
  manifests byte-exact with rate-limit headers, and 307-redirects every blob to ``cdn``;
* ``auth`` hands out opaque tokens for the scopes it can grant and silently drops the rest;
* ``cdn`` serves pre-signed blob URLs, refuses any ``Authorization`` like S3 does, and answers
  ``Range`` requests.

Other registries lay auth out differently, so ``auth_layout`` picks which servers exist:

* ``"separate"`` (Docker Hub, the default): the three servers above;
* ``"same-host"`` (ghcr.io, quay.io): the registry origin also serves the token service at
  ``/token``, so the realm is ``<registry_url>/token`` and ``auth_url == registry_url``; blobs
  still redirect to a separate ``cdn`` (ghcr.io: pkg-containers.githubusercontent.com);
* ``"basic"`` (registry:2 with htpasswd): no token service and no CDN; the registry answers
  ``Basic`` challenges, checks ``Authorization: Basic`` on every request, and serves blobs itself.

Manifests are negotiated as distribution does: a client whose ``Accept`` does not take a manifest
list, asking by tag, gets the list's linux/amd64 manifest instead; ``If-None-Match`` with the
manifest's digest gets a 304.

Each request is decided by a plain method over a parsed request (``_Request`` -> ``_Response``);
the only awaiting code is the per-connection h11 loop. Faults (429s, forced statuses, truncated or
corrupted bodies, lying digests, swapped manifests, redirect loops) are switched on per test.
``fetch`` is a one-shot h11 client for tests.
"""

from __future__ import annotations

import base64
import binascii
import functools
import gzip
import hashlib
import hmac
import io
import json
import logging
import random
import re
import secrets
import ssl
import tarfile
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, get_args

import h11
import trio
import trustme

__all__ = [
    "BASIC_REALM",
    "MEDIA_CONFIG",
    "MEDIA_DOCKER_LIST",
    "MEDIA_DOCKER_MANIFEST",
    "MEDIA_LAYER_GZIP",
    "MEDIA_LAYER_TAR",
    "MEDIA_OCI_INDEX",
    "MEDIA_OCI_MANIFEST",
    "AuthLayout",
    "ConnectFailed",
    "FakeHub",
    "FetchResult",
    "RangeNotSatisfiable",
    "Seen",
    "Stall",
    "fetch",
    "make_layer",
    "parse_range",
    "sha256_digest",
]

log = logging.getLogger(__name__)

MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"

AuthLayout = Literal["separate", "same-host", "basic"]
DigestHeader = Literal["asked", "body", "none"]
BASIC_REALM = "fake-registry"  # the realm of the "basic" layout's challenges

_CHUNK = 256 * 1024
_TOKEN_PATH = "/token"
_TOKEN_TTL = 300
_BLOB_URL_TTL = 3600
_WINDOW = 21600
_API_VERSION = ("docker-distribution-api-version", "registry/2.0")
_RATELIMIT_MESSAGE = (
    "You have reached your pull rate limit. You may increase the limit by authenticating "
    "and upgrading: https://www.docker.com/increase-rate-limit"
)

# The distribution spec's repository name grammar; anything else falls through to 404.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = rf"{_COMPONENT}(?:/{_COMPONENT})*"
_ROUTES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("manifest", re.compile(rf"/v2/(?P<name>{_NAME})/manifests/(?P<ref>[^/]+)")),
    ("upload_start", re.compile(rf"/v2/(?P<name>{_NAME})/blobs/uploads/?")),
    ("upload", re.compile(rf"/v2/(?P<name>{_NAME})/blobs/uploads/(?P<upload>[^/]+)")),
    ("blob", re.compile(rf"/v2/(?P<name>{_NAME})/blobs/(?P<digest>[^/]+)")),
    ("tags", re.compile(rf"/v2/(?P<name>{_NAME})/tags/list")),
)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_CDN_PATH = re.compile(
    r"/registry-v2/docker/registry/v2/blobs/sha256/(?P<prefix>[0-9a-f]{2})/(?P<hex>[0-9a-f]{64})/data"
)
_RANGE = re.compile(r"bytes\s*=\s*(?P<first>[0-9]*)\s*-\s*(?P<last>[0-9]*)", re.IGNORECASE)
_DECIMAL = re.compile(r"[0-9]+")
_LOOP_PATH = re.compile(r"/redirect-loop/(?P<hop>[0-9]+)/(?P<digest>sha256:[0-9a-f]{64})")


def sha256_digest(data: bytes | bytearray | memoryview) -> str:
    """Return the registry digest string ``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_layer(seed: int, size: int) -> bytes:
    """Return a deterministic gzipped tar holding one file of ``size`` pseudo-random bytes.

    Random bytes do not compress, so the result is roughly ``size`` bytes long; fixed mtimes
    (tar and gzip) make the same seed give the same digest on every run.
    """
    content = random.Random(seed).randbytes(size)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(f"layer-{seed}/data.bin")
        info.size = len(content)
        info.mtime = 0
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(content))
    return gzip.compress(raw.getvalue(), mtime=0)


class RangeNotSatisfiable(Exception):
    """A ``Range`` header that is well formed but selects nothing (RFC 9110 15.5.17)."""


def parse_range(value: str | None, total: int) -> tuple[int, int] | None:
    """Return ``(start, stop)`` (stop exclusive) for a single byte range, None to ignore it.

    RFC 9110 14.2 lets a server ignore a Range it does not understand, so malformed values and
    multi-range requests give None (a full 200). A satisfiable-looking but empty selection
    raises RangeNotSatisfiable (416).
    """
    match = _RANGE.fullmatch(value.strip()) if value is not None else None
    if match is None:
        return None
    first, last = match["first"], match["last"]
    if first == "":
        if last == "":
            return None
        suffix = int(last)
        if suffix == 0 or total == 0:
            raise RangeNotSatisfiable(value)
        return max(0, total - suffix), total
    start = int(first)
    if last != "" and int(last) < start:
        return None
    if start >= total:
        raise RangeNotSatisfiable(value)
    stop = total if last == "" else min(int(last) + 1, total)
    return start, stop


def _number(text: str) -> int | None:
    # str.isdigit() accepts "²", which int() refuses: only ASCII digits are numbers on the wire.
    return int(text) if _DECIMAL.fullmatch(text) else None


@dataclass(frozen=True)
class Seen:
    """One request as a fake server received it."""

    # "registry" | "auth" | "cdn". In the "same-host" layout a request for the token path of the
    # registry origin is recorded as "auth", so tests filter token requests the same way in
    # every layout.
    server: str
    method: str
    target: str  # path and query, exactly as received
    headers: dict[str, str]  # lowercased names; repeated headers joined with ", "


@dataclass(frozen=True)
class _Request:
    method: str
    target: str
    path: str
    query: dict[str, list[str]]
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        return ", ".join(values) if values else None


@dataclass
class Stall:
    """A blob transfer held by the fake: ``reached`` is set when a held response gets to the
    point (``after`` body bytes sent, or before its head when ``after`` is None); it goes on
    once the test sets ``release``."""

    after: int | None
    times: int
    reached: trio.Event = field(default_factory=trio.Event)
    release: trio.Event = field(default_factory=trio.Event)


@dataclass
class _Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | memoryview = b""
    # Send only this many body bytes, then drop the connection (a broken transfer).
    truncate_at: int | None = None
    stall: Stall | None = None  # hold the response where the stall says
    # Send the head, then wait for this event before the body (a slow upstream, held by a test).
    hold: trio.Event | None = None


@dataclass
class _Manifest:
    media_type: str
    body: bytes


@dataclass
class _Repo:
    manifests: dict[str, _Manifest] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    private: bool = False
    users: set[str] = field(default_factory=set)
    blobs: set[str] = field(default_factory=set)  # blobs linked to this repository


@dataclass
class _Token:
    user: str | None
    grants: dict[str, frozenset[str]]
    expires_at: float


@dataclass
class _Upload:
    name: str
    data: bytearray = field(default_factory=bytearray)


@dataclass
class _Forced:
    target: str  # a route kind ("manifest", "blob", "tags", "ping", ...) or an exact path
    status: int
    times: int
    method: str | None
    headers: list[tuple[str, str]]


class _Abort(Exception):
    """Drop the connection without finishing the response (a fault, not an error)."""


def _json(status: int, doc: object, headers: Iterable[tuple[str, str]] = ()) -> _Response:
    body = json.dumps(doc).encode()
    return _Response(status, [("content-type", "application/json"), *headers], body)


def _registry_error(
    status: int,
    code: str,
    message: str,
    detail: object = None,
    headers: Iterable[tuple[str, str]] = (),
) -> _Response:
    doc = {"errors": [{"code": code, "message": message, "detail": detail}]}
    return _json(status, doc, headers)


def _xml_error(status: int, code: str, message: str) -> _Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    ).encode()
    return _Response(status, [("content-type", "application/xml")], body)


def _accepts(accept: str | None, media_type: str) -> bool:
    # No Accept at all means "anything"; otherwise the stored type (or */*) must be listed.
    if accept is None or not accept.strip():
        return True
    listed = {item.split(";")[0].strip().lower() for item in accept.split(",")}
    return media_type.lower() in listed or "*/*" in listed


def _default_platform(body: bytes) -> str | None:
    """The digest of a manifest list's linux/amd64 entry, if it has one."""
    for entry in json.loads(body).get("manifests", []):
        platform = entry.get("platform", {})
        if platform.get("architecture") == "amd64" and platform.get("os") == "linux":
            digest: str = entry["digest"]
            return digest
    return None


def _references(doc: dict[str, Any]) -> tuple[list[str], list[str]] | None:
    """The blob and child-manifest digests a manifest points at; None if it is malformed."""
    config = doc.get("config")
    layers = doc.get("layers", [])
    children = doc.get("manifests", [])
    if not isinstance(layers, list) or not isinstance(children, list):
        return None
    blobs = layers if config is None else [config, *layers]
    if not all(isinstance(d, dict) and isinstance(d.get("digest"), str) for d in blobs + children):
        return None
    return [d["digest"] for d in blobs], [d["digest"] for d in children]


def _server_context(ca: trustme.CA, not_after: datetime | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost", not_after=not_after).configure_cert(ctx)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def _send(stream: trio.abc.SendStream, conn: h11.Connection, event: h11.Event) -> None:
    data = conn.send(event)
    try:
        if data:
            await stream.send_all(data)
    except BaseException:
        conn.send_failed()
        raise


async def _next_event(
    stream: trio.abc.Stream, conn: h11.Connection
) -> h11.Event | type[h11.PAUSED]:
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Event):
            return event
        if event is h11.PAUSED:
            return h11.PAUSED
        if conn.they_are_waiting_for_100_continue:
            await _send(stream, conn, h11.InformationalResponse(status_code=100, headers=[]))
        try:
            data = await stream.receive_some(_CHUNK)
        except trio.BrokenResourceError:
            data = b""  # a reset is just an early EOF to h11
        conn.receive_data(bytes(data))


class FakeHub:
    """Docker Hub's registry, token service and CDN as three TLS servers on 127.0.0.1.

    Content is added with add_blob/add_image/add_index, users with add_user, and faults with
    force_429/force_status/truncate_blob/corrupt_blob/stall_blob/lie_digest/
    swap_manifest_body/redirect_loop/hold_manifest. Every request lands in ``requests``.

    ``auth_layout`` fakes other registries (see the module docstring). In ``"same-host"``
    ``auth_url`` equals ``registry_url``; in ``"basic"`` both ``auth_url`` and ``cdn_url`` are
    ``""`` because those servers do not exist. ``service`` is the Bearer challenge's service
    (pass e.g. ``"ghcr.io"``); the token service refuses any other with 400.

    ``basic_anonymous`` (``"basic"`` only): False, the default, is registry:2 with htpasswd, where
    every request, ``/v2/`` included, needs valid Basic credentials. True lets anyone ping
    ``/v2/`` (200) and pull repositories not made private; pushes and private or unknown
    repositories still answer the Basic challenge.

    Rate-limit headers are Docker Hub's: set ``ratelimit_limit = None`` to fake a registry
    that sends none.
    """

    ratelimit_limit: int | None = 100  # None: send no rate-limit headers, never 429
    # distribution's default (no "relativeurls"): Location headers are absolute URLs built from
    # X-Forwarded-Proto and Host, which is what a plain-HTTP mirror in front of it runs into
    absolute_locations: bool = False
    # a CDN that answers every request with 401 and this challenge (a hostile or misconfigured
    # storage host naming a realm of its own); None: the CDN serves blobs
    cdn_challenge: str | None = None
    # a registry that hides private repositories: a valid token that does not grant one gets 404
    # NAME_UNKNOWN instead of 401, as if it did not exist (some registries do this)
    hide_private: bool = False

    def __init__(
        self,
        ca: trustme.CA,
        *,
        service: str = "registry.docker.io",
        auth_layout: AuthLayout = "separate",
        basic_anonymous: bool = False,
        cert_not_after: datetime | None = None,  # when its certificates expire
    ) -> None:
        if auth_layout not in get_args(AuthLayout):
            raise ValueError(f"unknown auth_layout {auth_layout!r}")
        if basic_anonymous and auth_layout != "basic":
            raise ValueError("basic_anonymous applies only to auth_layout='basic'")
        self.service = service
        self.auth_layout: AuthLayout = auth_layout
        self.basic_anonymous = basic_anonymous
        self.registry_url = ""
        self.auth_url = ""
        self.cdn_url = ""
        self.requests: list[Seen] = []
        self.refresh_tokens: dict[str, str] = {}  # refresh token -> the user it was issued to
        servers = {
            "separate": ("registry", "auth", "cdn"),
            "same-host": ("registry", "cdn"),
            "basic": ("registry",),
        }[auth_layout]
        self._contexts = {name: _server_context(ca, cert_not_after) for name in servers}
        self._secret = secrets.token_bytes(32)
        self._blobs: dict[str, bytes] = {}
        self._etags: dict[str, str] = {}
        self._repos: dict[str, _Repo] = {}
        self._users: dict[str, str] = {}
        self._tokens: dict[str, _Token] = {}
        self._uploads: dict[str, _Upload] = {}
        self._pulls = 0
        self._forced_429: list[int | None] = []
        self._truncated: dict[str, int | None] = {}
        self._corrupted: dict[str, int] = {}
        self._loops: set[str] = set()
        self._stalls: dict[str, Stall] = {}
        self._forced_statuses: list[_Forced] = []
        self._lies: dict[tuple[str, str], str] = {}  # (repo, reference) -> digest header
        self._swaps: dict[str, tuple[bytes, DigestHeader]] = {}  # digest -> body, its header
        self._holds: dict[str, trio.Event] = {}  # manifest digest -> its body's gate

    # -- serving -------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on one ephemeral port per server of the layout and serve until cancelled."""
        handlers: dict[str, Callable[[_Request], _Response]] = {
            "registry": self._registry,
            "auth": self._auth,
            "cdn": self._cdn,
        }
        listeners: dict[str, trio.SSLListener[trio.SocketStream]] = {}
        for name, ctx in self._contexts.items():
            (tcp,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = tcp.socket.getsockname()[1]
            setattr(self, f"{name}_url", f"https://127.0.0.1:{port}")
            listeners[name] = trio.SSLListener(tcp, ctx, https_compatible=True)
        if self.auth_layout == "same-host":
            self.auth_url = self.registry_url  # the token service lives on the registry origin
        async with trio.open_nursery() as nursery:
            for name, listener in listeners.items():
                handler = functools.partial(self._connection, name, handlers[name])
                nursery.start_soon(trio.serve_listeners, handler, [listener])
            # open_tcp_listeners already called listen(): connections queue from here on.
            task_status.started()

    async def _connection(
        self,
        server: str,
        handler: Callable[[_Request], _Response],
        stream: trio.SSLStream[trio.SocketStream],
    ) -> None:
        """One keep-alive h11 loop; any failure closes this connection, never the server."""
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = await _next_event(stream, conn)
                if not isinstance(event, h11.Request):
                    return  # ConnectionClosed (or PAUSED, which cannot happen for a server)
                request = await self._read_request(server, stream, conn, event)
                response: _Response = handler(request)
                await self._respond(stream, conn, request.method, response)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            await self._refuse(stream, conn, exc.error_status_hint)
        except (_Abort, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("fakehub %s: handler failed", server)
        finally:
            await trio.aclose_forcefully(stream)

    async def _refuse(self, stream: trio.abc.Stream, conn: h11.Connection, status: int) -> None:
        """Answer a request h11 could not parse, if a response can still be sent (hypercorn)."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        bad = _Response(status, [("connection", "close")], b"bad request\n")
        # The peer already broke the protocol: it may be gone too, and that is fine.
        with trio.move_on_after(5):
            try:
                await self._respond(stream, conn, "GET", bad)
            except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _read_request(
        self,
        server: str,
        stream: trio.abc.Stream,
        conn: h11.Connection,
        event: h11.Request,
    ) -> _Request:
        headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers)
        method = event.method.decode("latin-1")
        target = event.target.decode("latin-1")
        joined: dict[str, str] = {}
        for k, v in headers:
            joined[k] = f"{joined[k]}, {v}" if k in joined else v
        split = urllib.parse.urlsplit(target)
        path = urllib.parse.unquote(split.path)
        if server == "registry" and self._serves_token(path):
            server = "auth"
        self.requests.append(Seen(server, method, target, joined))
        body = bytearray()
        while True:
            part = await _next_event(stream, conn)
            if isinstance(part, h11.Data):
                body += part.data
            elif isinstance(part, h11.EndOfMessage):
                break
            else:
                raise h11.RemoteProtocolError("request ended early", error_status_hint=400)
        return _Request(
            method=method,
            target=target,
            path=path,
            query=urllib.parse.parse_qs(split.query, keep_blank_values=True),
            headers=headers,
            body=bytes(body),
        )

    async def _respond(
        self,
        stream: trio.abc.Stream,
        conn: h11.Connection,
        method: str,
        response: _Response,
    ) -> None:
        body = memoryview(response.body)
        headers = [*response.headers, ("content-length", str(len(body)))]
        stall = response.stall
        if stall is not None and stall.after is None:
            stall.reached.set()
            await stall.release.wait()
        await _send(stream, conn, h11.Response(status_code=response.status, headers=headers))
        if method == "HEAD":  # same headers as GET, never a body (RFC 9110 9.3.2)
            await _send(stream, conn, h11.EndOfMessage())
            return
        if response.hold is not None:
            await response.hold.wait()
        stop = len(body) if response.truncate_at is None else response.truncate_at
        held = stall.after if stall is not None and stall.after is not None else None
        offset = 0
        while offset < stop:
            end = min(offset + _CHUNK, stop)
            if held is not None and offset < held <= end:
                end = held
            # One chunk in flight: send_all returns only once the kernel took it.
            await _send(stream, conn, h11.Data(data=bytes(body[offset:end])))
            offset = end
            if stall is not None and offset == held:
                stall.reached.set()
                await stall.release.wait()
        if response.truncate_at is not None:
            raise _Abort
        await _send(stream, conn, h11.EndOfMessage())

    # -- content -------------------------------------------------------------------------

    def add_blob(self, data: bytes) -> str:
        """Store a blob (reachable from every repository that exists); return its digest."""
        digest = sha256_digest(data)
        self._blobs[digest] = bytes(data)
        return digest

    def add_image(
        self,
        repo: str,
        tag: str | None,
        layers: list[bytes],
        *,
        arch: str = "amd64",
        os: str = "linux",
    ) -> str:
        """Build a schema2 image (config with real diff_ids) in ``repo``; return its digest."""
        descriptors = []
        diff_ids = []
        for layer in layers:
            gzipped = layer[:2] == b"\x1f\x8b"
            # diff_ids name the uncompressed tar; a layer not gzipped is its own diff.
            diff_ids.append(sha256_digest(gzip.decompress(layer) if gzipped else layer))
            descriptors.append(
                {
                    "mediaType": MEDIA_LAYER_GZIP if gzipped else MEDIA_LAYER_TAR,
                    "size": len(layer),
                    "digest": self._link(repo, self.add_blob(layer)),
                }
            )
        config = {
            "architecture": arch,
            "os": os,
            "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": f"fakehub layer {i}"} for i in range(len(layers))],
        }
        config_bytes = json.dumps(config, indent=3).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": MEDIA_DOCKER_MANIFEST,
            "config": {
                "mediaType": MEDIA_CONFIG,
                "size": len(config_bytes),
                "digest": self._link(repo, self.add_blob(config_bytes)),
            },
            "layers": descriptors,
        }
        return self._put_manifest(repo, tag, MEDIA_DOCKER_MANIFEST, json.dumps(manifest, indent=3))

    def add_index(self, repo: str, tag: str, manifests: list[tuple[str, str, str]]) -> str:
        """Build a manifest list over ``(digest, arch, os)`` entries of ``repo``; return its digest.

        The children must already be in ``repo`` (added with add_image).
        """
        stored = self._repo(repo).manifests
        entries = [
            {
                "mediaType": stored[digest].media_type,
                "size": len(stored[digest].body),
                "digest": digest,
                "platform": {"architecture": arch, "os": os},
            }
            for digest, arch, os in manifests
        ]
        doc = {"schemaVersion": 2, "mediaType": MEDIA_DOCKER_LIST, "manifests": entries}
        return self._put_manifest(repo, tag, MEDIA_DOCKER_LIST, json.dumps(doc, indent=3))

    def add_user(self, username: str, password: str) -> None:
        """Accept ``username:password`` as Basic credentials at the token service (in the
        ``"basic"`` layout: on every registry request)."""
        self._users[username] = password

    def make_private(self, repo: str, *users: str) -> None:
        """Only ``users`` may pull (and push) ``repo`` from now on."""
        state = self._repo(repo)
        state.private = True
        state.users = set(users)

    def expire_tokens(self) -> None:
        """Invalidate every token handed out so far (as if their 300 s had passed)."""
        self._tokens.clear()

    def signed_blob_url(self, digest: str, *, ttl: int = _BLOB_URL_TTL) -> str:
        """Return a CDN URL for ``digest`` valid for ``ttl`` seconds (negative: already expired)."""
        if "cdn" not in self._contexts:
            raise ValueError("the 'basic' layout has no CDN: the registry serves blobs itself")
        hexpart = digest.removeprefix("sha256:")
        path = f"/registry-v2/docker/registry/v2/blobs/sha256/{hexpart[:2]}/{hexpart}/data"
        expiry = int(time.time()) + ttl
        return f"{self.cdn_url}{path}?verify={expiry}-{self._sign(path, expiry)}"

    @property
    def ratelimit_remaining(self) -> int:
        """Manifest GETs left in the window (HEADs never count)."""
        return max(0, (self.ratelimit_limit or 0) - self._pulls)

    @ratelimit_remaining.setter
    def ratelimit_remaining(self, value: int) -> None:
        self._pulls = (self.ratelimit_limit or 0) - value

    # -- faults --------------------------------------------------------------------------

    def force_429(self, count: int, retry_after: int | None = 60) -> None:
        """Answer the next ``count`` authorised manifest/blob requests with 429."""
        self._forced_429.extend([retry_after] * count)

    def force_status(
        self,
        target: str,
        status: int,
        *,
        times: int = 1,
        method: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Answer the next ``times`` registry requests for ``target`` with ``status``.

        ``target`` is a route kind (``"manifest"``, ``"blob"``, ``"tags"``, ``"upload_start"``,
        ``"upload"``, ``"ping"`` for ``/v2/``) or an exact path (``/v2/library/alpine/manifests/
        3.20``); ``method`` limits it to one method. The answer comes before any authorisation,
        as from a broken front of the registry (or a fallback that answers what it likes): a
        registry JSON error for 4xx/5xx, no body otherwise, plus ``headers``.
        """
        self._forced_statuses.append(_Forced(target, status, times, method, list(headers)))

    def lie_digest(self, repo: str, ref: str, digest: str) -> None:
        """Make manifest GET/HEAD of ``repo`` by ``ref`` (a tag or digest) carry this
        ``Docker-Content-Digest``, whatever the body hashes to: a header that disagrees with it."""
        self._lies[(repo, ref)] = digest

    def swap_manifest_body(
        self, digest: str, body: bytes, *, digest_header: DigestHeader = "asked"
    ) -> None:
        """Serve ``body`` for manifest ``digest`` (in every repository, by digest or by a tag
        naming it): a storage fault only a hash check catches. ``digest_header`` says which
        ``Docker-Content-Digest`` goes with it: ``"asked"`` (distribution takes it from the
        descriptor), ``"body"`` (the body's own, so that only the asked digest reveals the swap)
        or ``"none"``."""
        self._swaps[digest] = (bytes(body), digest_header)

    def truncate_blob(self, digest: str, *, times: int | None = None) -> None:
        """Make the CDN (the registry in the ``"basic"`` layout) drop the connection halfway
        through ``digest``.

        Applies to the next ``times`` GETs of it, or to all of them when ``times`` is None.
        """
        self._truncated[digest] = times

    def corrupt_blob(self, digest: str, *, times: int = 1) -> None:
        """Make the CDN (the registry in the ``"basic"`` layout) serve ``digest`` with one byte
        flipped (same length) ``times`` times: a storage fault no status code reveals, which
        only a digest check catches."""
        self._corrupted[digest] = times

    def stall_blob(self, digest: str, *, after: int | None = None, times: int = 1) -> Stall:
        """Make the next ``times`` GETs of ``digest`` from the CDN (the registry in the
        ``"basic"`` layout) stop after ``after`` body bytes, or before the response head when
        ``after`` is None (a black-holed upstream), until the test sets ``release``."""
        stall = self._stalls[digest] = Stall(after, times)
        return stall

    def hold_manifest(self, digest: str) -> trio.Event:
        """Make GETs of manifest ``digest`` send their head, then stall the body until the
        returned event is set."""
        return self._holds.setdefault(digest, trio.Event())

    def redirect_loop(self, digest: str) -> None:
        """Make blob GET/HEAD of ``digest`` redirect to the registry itself, forever."""
        self._loops.add(digest)

    # -- helpers -------------------------------------------------------------------------

    def _link(self, repo: str, digest: str) -> str:
        # As in distribution, a blob is served only under a repository that links it (an image
        # that uses it, a push or a mount): holding a digest is no key to other repositories.
        self._repo(repo).blobs.add(digest)
        return digest

    def _repo(self, name: str) -> _Repo:
        if "/" not in name:
            # Docker Hub has no one-component names: official images are library/<name>.
            raise ValueError(f"{name!r} is unreachable on Docker Hub; use 'library/{name}'")
        return self._repos.setdefault(name, _Repo())

    def _put_manifest(self, repo: str, tag: str | None, media_type: str, text: str) -> str:
        body = text.encode()
        digest = sha256_digest(body)
        state = self._repo(repo)
        state.manifests[digest] = _Manifest(media_type, body)
        if tag is not None:
            state.tags[tag] = digest
        return digest

    def _sign(self, path: str, expiry: int) -> str:
        return hmac.new(self._secret, f"{path}{expiry}".encode(), hashlib.sha256).hexdigest()

    def _ratelimit_headers(self) -> list[tuple[str, str]]:
        if self.ratelimit_limit is None:
            return []
        return [
            ("ratelimit-limit", f"{self.ratelimit_limit};w={_WINDOW}"),
            ("ratelimit-remaining", f"{self.ratelimit_remaining};w={_WINDOW}"),
            ("docker-ratelimit-source", "127.0.0.1"),
        ]

    def _too_many(self, retry_after: int | None) -> _Response:
        headers = self._ratelimit_headers()
        if retry_after is not None:
            headers.append(("retry-after", str(retry_after)))
        return _registry_error(429, "TOOMANYREQUESTS", _RATELIMIT_MESSAGE, None, headers)

    def _bearer(self, request: _Request) -> tuple[_Token | None, bool]:
        """Return (valid token or None, whether a Bearer credential was presented at all)."""
        value = request.header("authorization")
        if value is None:
            return None, False
        scheme, _, credential = value.partition(" ")
        if scheme.lower() != "bearer":
            return None, True
        token = self._tokens.get(credential.strip())
        if token is None or token.expires_at < time.monotonic():
            return None, True
        return token, True

    def _serves_token(self, path: str) -> bool:
        """Whether ``path`` on the registry origin is the token service ("same-host" layout)."""
        return self.auth_layout == "same-host" and path == _TOKEN_PATH

    def _challenge(self, scope: str | None, error: str | None, detail: object = None) -> _Response:
        if self.auth_layout == "basic":
            # distribution's htpasswd access controller: no scope, no error parameter.
            basic = ("www-authenticate", f'Basic realm="{BASIC_REALM}"')
            return _registry_error(401, "UNAUTHORIZED", "authentication required", detail, [basic])
        params = [f'realm="{self.auth_url}/token"', f'service="{self.service}"']
        if scope is not None:
            params.append(f'scope="{scope}"')
        if error is not None:
            params.append(f'error="{error}"')
        challenge = ("www-authenticate", "Bearer " + ",".join(params))
        return _registry_error(401, "UNAUTHORIZED", "authentication required", detail, [challenge])

    def _authorize(self, request: _Request, name: str, push: bool) -> _Response | None:
        """None if the request's token grants pull (or push) on ``name``, else the 401."""
        action = "push" if push else "pull"
        detail = [{"Type": "repository", "Class": "", "Name": name, "Action": action}]
        if self.auth_layout == "basic":
            return self._authorize_basic(request, name, push, detail)
        token, presented = self._bearer(request)
        if token is not None and action in token.grants.get(name, frozenset()):
            return None
        if self.hide_private and token is not None:
            repo = self._repos.get(name)
            if repo is not None and repo.private:
                return _registry_error(
                    404, "NAME_UNKNOWN", "repository name not known to registry", {"name": name}
                )
        # distribution's token auth: invalid_token for a bad one, insufficient_scope for a weak one.
        error = (
            "insufficient_scope" if token is not None else "invalid_token" if presented else None
        )
        scope = f"repository:{name}:{'pull,push' if push else 'pull'}"
        return self._challenge(scope, error, detail)

    def _authorize_basic(
        self, request: _Request, name: str, push: bool, detail: object
    ) -> _Response | None:
        """The "basic" layout: None if the request's Basic credentials (or, with
        ``basic_anonymous``, nobody's) may pull or push ``name``, else the 401 or 403."""
        user, error = self._basic_user(request)
        if error is not None:
            return self._challenge(None, None, detail)
        repo = self._repos.get(name)
        if user is None:
            public = repo is not None and not repo.private
            if self.basic_anonymous and public and not push:
                return None
            return self._challenge(None, None, detail)
        # htpasswd alone lets every user do everything; a private repository's member list is
        # the access control of registries like Harbor or Nexus, which refuse others with 403.
        if repo is not None and repo.private and user not in repo.users:
            return _registry_error(
                403, "DENIED", "requested access to the resource is denied", detail
            )
        return None

    def _ping_allowed(self, request: _Request) -> _Response | None:
        """None if ``GET /v2/`` may answer 200, else the 401."""
        if self.auth_layout == "basic":
            user, error = self._basic_user(request)
            if error is None and (user is not None or self.basic_anonymous):
                return None
            return self._challenge(None, None)
        token, presented = self._bearer(request)
        if token is None:
            return self._challenge(None, "invalid_token" if presented else None)
        return None

    # -- registry ------------------------------------------------------------------------

    def _registry(self, request: _Request) -> _Response:
        if self._serves_token(request.path):
            return self._auth(request)
        response = self._route_registry(request)
        response.headers.append(_API_VERSION)
        if self.absolute_locations:
            scheme = request.header("x-forwarded-proto") or "https"
            base = f"{scheme}://{request.header('host')}"
            response.headers = [
                (k, base + v if k == "location" and v.startswith("/") else v)
                for k, v in response.headers
            ]
        return response

    def _route_registry(self, request: _Request) -> _Response:
        forced = self._forced_status(request)
        if forced is not None:
            return forced
        if request.path == "/v1/search":
            return self._search(request)
        loop = _LOOP_PATH.fullmatch(request.path)
        if loop is not None:
            return self._loop_redirect(int(loop["hop"]) + 1, loop["digest"])
        if request.path in ("/v2", "/v2/"):
            if request.method not in ("GET", "HEAD"):
                return _registry_error(405, "UNSUPPORTED", "The operation is unsupported.")
            denied = self._ping_allowed(request)
            return _json(200, {}) if denied is None else denied
        for kind, pattern in _ROUTES:
            match = pattern.fullmatch(request.path)
            if match is None:
                continue
            name = match["name"]
            push = request.method not in ("GET", "HEAD")
            denied = self._authorize(request, name, push)
            if denied is not None:
                return denied
            repo = self._repos.get(name)
            if repo is None and push:
                repo = self._repos.setdefault(name, _Repo())  # a push creates the repository
            if repo is None:
                return _registry_error(
                    404, "NAME_UNKNOWN", "repository name not known to registry", {"name": name}
                )
            if kind == "manifest":
                return self._manifest(request, name, repo, match["ref"])
            if kind == "blob":
                return self._blob(request, name, match["digest"])
            if kind == "tags":
                return self._tags(request, name, repo)
            if kind == "upload_start":
                return self._upload_start(request, name)
            return self._upload(request, name, match["upload"])
        return _registry_error(404, "NOT_FOUND", "not found")

    def _route_kind(self, path: str) -> str | None:
        if path in ("/v2", "/v2/"):
            return "ping"
        for kind, pattern in _ROUTES:
            if pattern.fullmatch(path):
                return kind
        return None

    def _forced_status(self, request: _Request) -> _Response | None:
        kind = self._route_kind(request.path)
        for forced in self._forced_statuses:
            if forced.target not in (request.path, kind):
                continue
            if forced.method is not None and forced.method != request.method:
                continue
            forced.times -= 1
            if forced.times <= 0:
                self._forced_statuses.remove(forced)
            if forced.status >= 400:
                return _registry_error(
                    forced.status, "FORCED", f"forced {forced.status}", None, forced.headers
                )
            return _Response(forced.status, list(forced.headers))
        return None

    def _forced(self) -> _Response | None:
        if self._forced_429:
            return self._too_many(self._forced_429.pop(0))
        return None

    def _manifest(self, request: _Request, name: str, repo: _Repo, ref: str) -> _Response:
        if request.method == "PUT":
            return self._manifest_put(request, name, repo, ref)
        if request.method not in ("GET", "HEAD"):
            return _registry_error(405, "UNSUPPORTED", "The operation is unsupported.")
        forced = self._forced()
        if forced is not None:
            return forced
        counted = request.method == "GET" and self.ratelimit_limit is not None
        if counted and self.ratelimit_remaining <= 0:
            return self._too_many(60)
        by_digest = _DIGEST.fullmatch(ref) is not None
        digest = ref if by_digest else repo.tags.get(ref)
        manifest = repo.manifests.get(digest) if digest is not None else None
        if digest is None or manifest is None:
            return _registry_error(
                404,
                "MANIFEST_UNKNOWN",
                "manifest unknown",
                {"Tag": ref} if digest is None else None,
            )
        accept = request.header("accept")
        if (
            not by_digest
            and manifest.media_type == MEDIA_DOCKER_LIST
            and not _accepts(accept, MEDIA_DOCKER_LIST)
        ):
            # distribution: a client that takes no manifest list, asking by tag, gets the
            # manifest of the default platform (linux/amd64) from the list
            digest = _default_platform(manifest.body)
            manifest = repo.manifests.get(digest) if digest is not None else None
            if digest is None or manifest is None:
                return _registry_error(404, "MANIFEST_UNKNOWN", "manifest unknown", None)
        if not _accepts(accept, manifest.media_type):
            return _registry_error(404, "MANIFEST_UNKNOWN", "manifest unknown", None)
        if f'"{digest}"' in (request.header("if-none-match") or ""):
            # distribution answers a matching ETag before anything else, without headers
            return _Response(304, [("etag", f'"{digest}"')])
        if counted:
            self._pulls += 1  # only GETs count, and only those that deliver a manifest
        body = manifest.body
        header: str | None = digest
        swapped = self._swaps.get(digest)
        if swapped is not None:
            body, which = swapped
            header = {"asked": digest, "body": sha256_digest(body), "none": None}[which]
        header = self._lies.get((name, ref), header)
        headers = [
            ("content-type", manifest.media_type),
            ("etag", f'"{digest}"'),
            *self._ratelimit_headers(),
        ]
        if header is not None:
            headers.append(("docker-content-digest", header))
        return _Response(200, headers, body, hold=self._holds.get(digest))

    def _manifest_put(self, request: _Request, name: str, repo: _Repo, ref: str) -> _Response:
        try:
            doc = json.loads(request.body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            return _registry_error(400, "MANIFEST_INVALID", "manifest invalid")
        content_type = (request.header("content-type") or "").split(";")[0].strip()
        media_type = content_type or str(doc.get("mediaType", ""))
        if not media_type:
            return _registry_error(400, "MANIFEST_INVALID", "manifest invalid")
        digest = sha256_digest(request.body)
        if _DIGEST.fullmatch(ref) and ref != digest:
            return _registry_error(
                400, "DIGEST_INVALID", "provided digest did not match uploaded content"
            )
        if not _DIGEST.fullmatch(ref) and not _TAG.fullmatch(ref):
            return _registry_error(400, "TAG_INVALID", "manifest tag did not match URI")
        references = _references(doc)
        if references is None:
            return _registry_error(400, "MANIFEST_INVALID", "manifest invalid")
        # A registry refuses a manifest that points at content it does not hold.
        blobs, children = references
        missing = [d for d in blobs if d not in self._blobs]
        missing += [d for d in children if d not in repo.manifests]
        if missing:
            return _registry_error(
                400, "MANIFEST_BLOB_UNKNOWN", "blob unknown to registry", {"digest": missing[0]}
            )
        repo.manifests[digest] = _Manifest(media_type, request.body)
        if not _DIGEST.fullmatch(ref):
            repo.tags[ref] = digest
        headers = [
            ("location", f"/v2/{name}/manifests/{digest}"),
            ("docker-content-digest", digest),
        ]
        return _Response(201, headers)

    def _blob(self, request: _Request, name: str, digest: str) -> _Response:
        if request.method not in ("GET", "HEAD"):
            return _registry_error(405, "UNSUPPORTED", "The operation is unsupported.")
        forced = self._forced()
        if forced is not None:
            return forced
        if not _DIGEST.fullmatch(digest):
            return _registry_error(
                400, "DIGEST_INVALID", "provided digest did not match uploaded content"
            )
        if digest in self._loops:
            return self._loop_redirect(0, digest)
        if digest not in self._blobs or digest not in self._repo(name).blobs:
            return _registry_error(404, "BLOB_UNKNOWN", "blob unknown to registry", digest)
        if "cdn" in self._contexts:
            return self._redirect(self.signed_blob_url(digest))
        # No CDN: distribution serves the blob itself (http.ServeContent, so Range works too).
        headers = [
            ("content-type", "application/octet-stream"),
            ("docker-content-digest", digest),
            ("etag", f'"{digest}"'),
            ("cache-control", "max-age=31536000"),
            ("accept-ranges", "bytes"),
        ]
        refused = _Response(
            416, [("content-type", "text/plain; charset=utf-8")], b"invalid range\n"
        )
        return self._blob_body(request, digest, headers, refused)

    def _redirect(self, location: str) -> _Response:
        # Docker Hub's 307 carries a tiny HTML body, which a client must drain or discard.
        body = f'<a href="{location}">Temporary Redirect</a>.\n\n'.encode()
        headers = [("content-type", "text/html; charset=utf-8"), ("location", location)]
        return _Response(307, headers, body)

    def _loop_redirect(self, hop: int, digest: str) -> _Response:
        return self._redirect(f"{self.registry_url}/redirect-loop/{hop}/{digest}")

    def _tags(self, request: _Request, name: str, repo: _Repo) -> _Response:
        if request.method not in ("GET", "HEAD"):
            return _registry_error(405, "UNSUPPORTED", "The operation is unsupported.")
        tags = sorted(repo.tags)
        last = request.query.get("last", [""])[0]
        if last:
            tags = [t for t in tags if t > last]
        headers: list[tuple[str, str]] = []
        count = _number(request.query.get("n", [""])[0])
        if count is not None and count < len(tags):
            tags = tags[:count]
            link = f"/v2/{name}/tags/list?n={count}&last={tags[-1] if tags else ''}"
            headers.append(("link", f'<{link}>; rel="next"'))
        return _json(200, {"name": name, "tags": tags}, headers)

    def _store_upload(self, name: str, data: bytes, expected: str) -> _Response:
        if sha256_digest(data) != expected:
            return _registry_error(
                400, "DIGEST_INVALID", "provided digest did not match uploaded content"
            )
        self._blobs[expected] = data
        self._link(name, expected)
        return _Response(
            201,
            [("location", f"/v2/{name}/blobs/{expected}"), ("docker-content-digest", expected)],
        )

    def _upload_state(self, name: str, upload_id: str, status: int) -> _Response:
        size = len(self._uploads[upload_id].data)
        headers = [
            ("location", f"/v2/{name}/blobs/uploads/{upload_id}"),
            ("docker-upload-uuid", upload_id),
            ("range", f"0-{max(size - 1, 0)}"),
        ]
        return _Response(status, headers)

    def _upload_start(self, request: _Request, name: str) -> _Response:
        if request.method != "POST":
            return _registry_error(405, "UNSUPPORTED", "The operation is unsupported.")
        mount = request.query.get("mount", [""])[0]
        if mount in self._blobs:  # cross-repository mount: the blob store is shared
            self._link(name, mount)
            return _Response(
                201, [("location", f"/v2/{name}/blobs/{mount}"), ("docker-content-digest", mount)]
            )
        digest = request.query.get("digest", [""])[0]
        if digest:  # monolithic upload in one POST
            return self._store_upload(name, request.body, digest)
        upload_id = str(uuid.uuid4())
        self._uploads[upload_id] = _Upload(name, bytearray(request.body))
        return self._upload_state(name, upload_id, 202)

    def _upload(self, request: _Request, name: str, upload_id: str) -> _Response:
        upload = self._uploads.get(upload_id)
        if upload is None or upload.name != name:
            return _registry_error(404, "BLOB_UPLOAD_UNKNOWN", "blob upload unknown to registry")
        if request.method == "GET":
            return self._upload_state(name, upload_id, 204)
        if request.method == "DELETE":
            del self._uploads[upload_id]
            return _Response(204)
        if request.method == "PATCH":
            content_range = request.header("content-range")
            if content_range is not None:
                start = _number(content_range.partition("-")[0].strip())
                if start != len(upload.data):
                    return _registry_error(416, "BLOB_UPLOAD_INVALID", "blob upload invalid")
            upload.data += request.body
            return self._upload_state(name, upload_id, 202)
        if request.method == "PUT":
            upload.data += request.body
            # A failed commit cancels the upload, as distribution does.
            del self._uploads[upload_id]
            return self._store_upload(
                name, bytes(upload.data), request.query.get("digest", [""])[0]
            )
        return _registry_error(405, "UNSUPPORTED", "The operation is unsupported.")

    def _search(self, request: _Request) -> _Response:
        term = request.query.get("q", [""])[0].lower()
        count = _number(request.query.get("n", ["25"])[0]) or 25
        limit = min(count, 100)
        found = [
            name
            for name, repo in sorted(self._repos.items())
            if not repo.private and term in name.lower()
        ]
        results = [
            {
                "name": name.removeprefix("library/"),
                "description": "",
                "star_count": 0,
                "is_official": name.startswith("library/"),
                "is_automated": False,
            }
            for name in found[:limit]
        ]
        return _json(200, {"num_results": len(found), "query": term, "results": results})

    # -- token service -------------------------------------------------------------------

    def _auth(self, request: _Request) -> _Response:
        if request.path != "/token":
            return _json(404, {"details": "not found"})
        if request.method == "GET":
            params = request.query
            user, error = self._basic_user(request)
        elif request.method == "POST":
            # OAuth2 password grant (containerd tries it first when it has credentials).
            params = urllib.parse.parse_qs(request.body.decode("latin-1"), keep_blank_values=True)
            if params.get("grant_type", [""])[0] != "password":
                return _json(400, {"error": "unsupported_grant_type"})
            user, error = self._check_user(
                params.get("username", [""])[0], params.get("password", [""])[0]
            )
        else:
            return _json(405, {"details": "method not allowed"})
        if params.get("service", [""])[0] != self.service:
            return _json(400, {"details": "invalid service"})
        if error is not None:
            return error
        grants: dict[str, frozenset[str]] = {}
        for value in params.get("scope", []):
            for scope in value.split():  # OAuth style: one parameter may hold several scopes
                kind, _, rest = scope.partition(":")
                name, _, actions = rest.rpartition(":")
                if kind == "repository" and name:
                    granted = self._grant(user, name, set(actions.split(",")))
                    if granted:
                        grants[name] = grants.get(name, frozenset()) | granted
        token = secrets.token_urlsafe(32)
        self._tokens[token] = _Token(user, grants, time.monotonic() + _TOKEN_TTL)
        issued = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        doc = {"token": token, "access_token": token, "expires_in": _TOKEN_TTL, "issued_at": issued}
        if params.get("offline_token", [""])[0] == "true" and user is not None:
            # docker login's flow: a long-lived refresh token for the account (Docker Hub's
            # token service issues one for offline_token=true to a logged-in user)
            refresh = secrets.token_urlsafe(32)
            self.refresh_tokens[refresh] = user
            doc["refresh_token"] = refresh
        return _json(200, doc)

    def _check_user(self, username: str, password: str) -> tuple[str | None, _Response | None]:
        expected = self._users.get(username)
        if expected is None or not hmac.compare_digest(expected, password):
            return None, _json(401, {"details": "incorrect username or password"})
        return username, None

    def _basic_user(self, request: _Request) -> tuple[str | None, _Response | None]:
        value = request.header("authorization")
        if value is None:
            return None, None
        scheme, _, credential = value.partition(" ")
        try:
            decoded = base64.b64decode(credential.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            decoded = ""
        username, sep, password = decoded.partition(":")
        if scheme.lower() != "basic" or not sep:
            return None, _json(401, {"details": "incorrect username or password"})
        return self._check_user(username, password)

    def _grant(self, user: str | None, name: str, wanted: set[str]) -> frozenset[str]:
        """Docker Hub's rules: what ``user`` (None: anonymous) may do with ``name``."""
        if "/" not in name:
            return frozenset()  # "nginx" is not a repository; "library/nginx" is
        repo = self._repos.get(name)
        if repo is None:
            # A push by a logged-in user creates the repository; nobody can pull it yet.
            may = {"pull", "push"} if user is not None and "push" in wanted else set()
        elif repo.private:
            may = {"pull", "push"} if user in repo.users else set()
        else:
            may = {"pull", "push"} if user is not None else {"pull"}
        return frozenset(may & wanted)

    # -- CDN -----------------------------------------------------------------------------

    def _cdn(self, request: _Request) -> _Response:
        if self.cdn_challenge is not None:
            refused = _xml_error(401, "AccessDenied", "Access Denied")
            refused.headers.append(("www-authenticate", self.cdn_challenge))
            return refused
        if request.header("authorization") is not None:
            # What S3/R2 answer when a registry token leaks to them (PROTOCOL.md).
            return _xml_error(400, "InvalidArgument", "Missing x-amz-content-sha256")
        if request.method not in ("GET", "HEAD"):
            return _xml_error(405, "MethodNotAllowed", "Method Not Allowed")
        match = _CDN_PATH.fullmatch(request.path)
        if match is None or match["prefix"] != match["hex"][:2]:
            return _xml_error(404, "NoSuchKey", "The specified key does not exist.")
        if not self._verified(request):
            return _xml_error(403, "AccessDenied", "Access Denied")
        digest = "sha256:" + match["hex"]
        data = self._blobs.get(digest)
        if data is None:
            return _xml_error(404, "NoSuchKey", "The specified key does not exist.")
        etag = self._etags.get(digest)
        if etag is None:
            etag = self._etags[digest] = hashlib.md5(data, usedforsecurity=False).hexdigest()
        headers = [
            ("content-type", "application/octet-stream"),
            ("etag", f'"{etag}"'),
            ("accept-ranges", "bytes"),
        ]
        refused = _xml_error(416, "InvalidRange", "The requested range is not satisfiable")
        return self._blob_body(request, digest, headers, refused)

    def _blob_body(
        self,
        request: _Request,
        digest: str,
        headers: list[tuple[str, str]],
        unsatisfiable: _Response,
    ) -> _Response:
        """Serve a stored blob with ``headers``, honouring Range and the corrupt/truncate faults;
        ``unsatisfiable`` is this server's 416 (it gains the Content-Range)."""
        data = self._blobs[digest]
        try:
            selected = parse_range(request.header("range"), len(data))
        except RangeNotSatisfiable:
            unsatisfiable.headers.append(("content-range", f"bytes */{len(data)}"))
            return unsatisfiable
        status, body = 200, memoryview(data)
        if request.method == "GET" and self._corrupted.get(digest, 0) > 0:
            self._corrupted[digest] -= 1
            flipped = bytearray(data)
            flipped[len(flipped) // 2] ^= 0xFF
            body = memoryview(bytes(flipped))
        if selected is not None:
            start, stop = selected
            status, body = 206, body[start:stop]
            headers.append(("content-range", f"bytes {start}-{stop - 1}/{len(data)}"))
        response = _Response(status, headers, body)
        stall = self._stalls.get(digest)
        if request.method == "GET" and stall is not None:
            stall.times -= 1
            if stall.times <= 0:
                del self._stalls[digest]
            response.stall = stall
        if request.method == "GET" and digest in self._truncated:
            times = self._truncated[digest]
            if times is not None:
                if times <= 1:
                    del self._truncated[digest]
                else:
                    self._truncated[digest] = times - 1
            response.truncate_at = len(body) // 2
        return response

    def _verified(self, request: _Request) -> bool:
        text, _, signature = request.query.get("verify", [""])[0].partition("-")
        expiry = _number(text)
        if expiry is None or expiry < time.time():
            return False
        return hmac.compare_digest(signature, self._sign(request.path, expiry))


# -- a one-shot client for tests ---------------------------------------------------------


@dataclass(frozen=True)
class FetchResult:
    """One response as ``fetch`` received it."""

    status: int
    headers: dict[str, str]  # lowercased names; repeated headers joined with ", "
    body: bytes
    raw_headers: tuple[tuple[str, str], ...] = ()
    complete: bool = True  # False: the peer closed before the framing said the body ended
    reason: str = ""

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


class ConnectFailed(Exception):
    """The CONNECT proxy did not open a tunnel; ``result`` is its answer."""

    def __init__(self, result: FetchResult) -> None:
        super().__init__(f"proxy answered {result.status}")
        self.result = result


class _PrefixedStream(trio.abc.Stream):
    """A stream that first yields bytes already read from it (h11's trailing data)."""

    def __init__(self, prefix: bytes, stream: trio.abc.Stream) -> None:
        self._prefix = prefix
        self._stream = stream

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            size = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            return data
        return await self._stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._stream.aclose()


def _header_list(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(k, v) for k, v in items]


async def _exchange(
    stream: trio.abc.Stream,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes | Sequence[bytes],
) -> tuple[FetchResult, h11.Connection]:
    conn = h11.Connection(h11.CLIENT)
    names = {k.lower() for k, _ in headers}
    if "content-length" not in names and "transfer-encoding" not in names:
        if not isinstance(body, bytes | bytearray | memoryview):
            headers.append(("transfer-encoding", "chunked"))
        elif body or method in ("POST", "PUT", "PATCH"):
            headers.append(("content-length", str(len(body))))
    await _send(stream, conn, h11.Request(method=method, target=target, headers=headers))
    for chunk in [body] if isinstance(body, bytes | bytearray | memoryview) else body:
        if chunk:
            await _send(stream, conn, h11.Data(data=bytes(chunk)))
    await _send(stream, conn, h11.EndOfMessage())
    event = await _next_event(stream, conn)
    while isinstance(event, h11.InformationalResponse):
        event = await _next_event(stream, conn)
    if not isinstance(event, h11.Response):
        raise h11.RemoteProtocolError(f"expected a response, got {event!r}", error_status_hint=502)
    raw = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers)
    joined: dict[str, str] = {}
    for k, v in raw:
        joined[k] = f"{joined[k]}, {v}" if k in joined else v
    received = bytearray()
    complete = True
    if conn.their_state is not h11.SWITCHED_PROTOCOL:
        try:
            while True:
                part = await _next_event(stream, conn)
                if isinstance(part, h11.Data):
                    received += part.data
                elif isinstance(part, h11.EndOfMessage):
                    break
        except h11.RemoteProtocolError:
            complete = False  # EOF before Content-Length was reached: a truncated body
    result = FetchResult(
        status=event.status_code,
        headers=joined,
        body=bytes(received),
        raw_headers=raw,
        complete=complete,
        reason=event.reason.decode("latin-1"),
    )
    return result, conn


async def fetch(
    url: str,
    ca: trustme.CA | None,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    body: bytes | Sequence[bytes] = b"",
    proxy: str | None = None,
    proxy_headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    local_address: str | None = None,
) -> FetchResult:
    """Send one request over a fresh connection and return the response; never follow redirects.

    ``url`` may be http or https (trusting ``ca``). A ``body`` given as a sequence of chunks is
    sent with chunked encoding. With ``proxy`` ("http://host:port") the connection goes through
    an HTTP CONNECT tunnel; if the proxy refuses, ConnectFailed carries its answer. A body cut
    short by the server gives ``complete=False`` rather than an exception. There is no timeout
    here: wrap the call in ``trio.fail_after``.
    """
    split = urllib.parse.urlsplit(url)
    if split.hostname is None or split.scheme not in ("http", "https"):
        raise ValueError(f"unsupported URL {url!r}")
    host = split.hostname
    port = split.port or (443 if split.scheme == "https" else 80)
    target = urllib.parse.urlunsplit(("", "", split.path or "/", split.query, ""))
    request_headers = _header_list(headers)
    if not any(k.lower() == "host" for k, _ in request_headers):
        request_headers.insert(0, ("host", split.netloc))
    stream: trio.abc.Stream
    if proxy is None:
        stream = await trio.open_tcp_stream(host, port, local_address=local_address)
    else:
        proxy_split = urllib.parse.urlsplit(proxy)
        if proxy_split.hostname is None or proxy_split.port is None:
            raise ValueError(f"unsupported proxy URL {proxy!r}")
        stream = await trio.open_tcp_stream(proxy_split.hostname, proxy_split.port)
    try:
        if proxy is not None:
            authority = f"{host}:{port}"
            connect_headers = [("host", authority), *_header_list(proxy_headers)]
            answer, tunnel = await _exchange(stream, "CONNECT", authority, connect_headers, b"")
            if tunnel.their_state is not h11.SWITCHED_PROTOCOL:
                raise ConnectFailed(answer)
            leftover, _ = tunnel.trailing_data
            if leftover:
                stream = _PrefixedStream(leftover, stream)
        if split.scheme == "https":
            if ca is None:
                raise ValueError("an https URL needs a CA to trust")
            ctx = ssl.create_default_context()
            ca.configure_trust(ctx)
            ctx.set_alpn_protocols(["http/1.1"])
            stream = trio.SSLStream(stream, ctx, server_hostname=host, https_compatible=True)
        result, _ = await _exchange(stream, method, target, request_headers, body)
        return result
    finally:
        await trio.aclose_forcefully(stream)
