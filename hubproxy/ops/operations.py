"""The operator's paths: ``/healthz``, ``/readyz``, ``/metrics`` and the status page ``/``.

``/healthz`` says the process answers. ``/readyz`` says whether a client pulling now would be
served: the listener accepts (not draining), a registry upstream answered recently (or answers a
probe now), and the cache directory can be written. ``/metrics`` is the Prometheus text format
(``metrics``), the status page is ``statuspage``. Who may read them is admission's ``--ops-allow``.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ..cache.pullthrough import PullThrough
from ..cache.store import shutil_free_bytes
from ..forwarder import Forwarder
from ..net.server import ClientRequest, ClientResponse
from ..policy.errors import ProxyError
from ..policy.headers import Headers
from ..policy.urls import Url
from .metrics import CONTENT_TYPE, cache_figures, manifest_figures
from .statuspage import render_status_page, status_figures

if TYPE_CHECKING:
    from ..net.server import Server

RECENT_ANSWER = 60.0  # an upstream that answered this recently counts as reachable
PROBE_TIMEOUT = 5.0  # a readiness probe of an upstream gives up after this long
PROBE_REUSE = 10.0  # a probe's result answers /readyz for this long (load balancers poll)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def readiness(checks: list[Check]) -> tuple[int, bytes]:
    """The /readyz answer: 200 when every check passed, else 503; JSON naming each check."""
    ready = all(check.ok for check in checks)
    document = {
        "status": "ready" if ready else "not ready",
        "checks": {check.name: {"ok": check.ok, "detail": check.detail} for check in checks},
    }
    return (200 if ready else 503), json.dumps(document, indent=2).encode() + b"\n"


def cache_check(tmp_dir: Path) -> Check:
    """Create and delete a file where fills are written: the one test that means "writable"
    for root too (permission bits do not stop root; a missing or read-only mount does)."""
    try:
        with tempfile.NamedTemporaryFile(dir=tmp_dir, prefix="readyz-"):
            pass
    except OSError as exc:
        return Check("cache", False, f"cannot write in {tmp_dir}: {exc.strerror or exc}")
    return Check("cache", True, f"{tmp_dir} is writable")


class Operations:
    """Answers the operator's paths for one mirror (and, once set, its server)."""

    def __init__(
        self, forwarder: Forwarder, pullthrough: PullThrough | None, server: Server | None
    ) -> None:
        self.forwarder = forwarder
        self.metrics = forwarder.metrics
        self.pullthrough = pullthrough
        self.server = server  # None: no listener to report on (tests of the parts)
        self._probed_at = -1e9
        self._probe: Check | None = None

    async def serve(self, path: str, request: ClientRequest, response: ClientResponse) -> None:
        if path == "/healthz":
            status, body, kind = 200, b'{"status":"ok"}\n', b"application/json"
        elif path == "/readyz":
            status, body = readiness(await self.checks())
            kind = b"application/json"
        elif path == "/metrics":
            self._refresh_gauges()
            status, body, kind = 200, self.metrics.render(), CONTENT_TYPE.encode()
        else:
            self._refresh_gauges()
            figures = status_figures(
                self.metrics,
                url=self._mirror_url(request),
                table=self.forwarder.table,
                now=time.time(),
                monotonic=time.monotonic(),
                disk_free=self._disk_free(),
            )
            status, body, kind = 200, render_status_page(figures), b"text/html; charset=utf-8"
        headers: Headers = [
            (b"content-type", kind),
            (b"content-length", b"%d" % len(body)),
            (b"cache-control", b"no-store"),
        ]
        response.record.upstream = "-"
        await response.start(status, headers)
        if request.method != "HEAD":
            await response.send(body)
        await response.finish()

    def _disk_free(self) -> int | None:
        """Bytes free to us on the cache's file system; None without a cache (or a way to
        ask)."""
        if self.pullthrough is None:
            return None
        try:
            return shutil_free_bytes(self.pullthrough.blobs.root)  # what the fills see
        except OSError:
            return None

    def _mirror_url(self, request: ClientRequest) -> str:
        return self.forwarder.public_base(request)

    def _refresh_gauges(self) -> None:
        metrics = self.metrics
        if self.server is not None and metrics.connections is None:
            metrics.connections = self.server.figures
        pullthrough = self.pullthrough
        if pullthrough is not None and metrics.cache is None:
            blobs = pullthrough.blobs
            metrics.cache = lambda: cache_figures(blobs)
        if pullthrough is not None and metrics.manifests is None:
            manifests = pullthrough.manifests
            metrics.manifests = lambda: manifest_figures(manifests)

    async def checks(self) -> list[Check]:
        server = self.server
        listening = server is not None and not server.draining and bool(server.bound)
        checks = [
            Check(
                "listener",
                listening,
                "accepting connections" if listening else "shutting down or not listening",
            ),
            await self._upstream_check(),
        ]
        pullthrough = self.pullthrough
        if pullthrough is not None:
            checks.append(cache_check(pullthrough.blobs.tmp_dir))
        return checks

    async def _upstream_check(self) -> Check:
        registry = self.forwarder.default
        now = trio.current_time()
        if now - registry.last_answer < RECENT_ANSWER:
            return Check("upstream", True, f"answered {now - registry.last_answer:.0f}s ago")
        if self._probe is not None and now - self._probed_at < PROBE_REUSE:
            return self._probe
        failures = []
        for base in registry.urls:
            try:
                with trio.fail_after(PROBE_TIMEOUT):
                    status, _, _ = await self.forwarder.simple_request(
                        "GET",
                        Url(base.origin, base.target.rstrip("/") + "/v2/"),
                        [],
                        profile=registry.profile,
                    )
            except (ProxyError, trio.TooSlowError) as exc:
                failures.append(f"{base.origin}: {exc or 'no answer'}")
                continue
            if status < 500:
                registry.last_answer = trio.current_time()
                self._probe = Check("upstream", True, f"{base.origin} answered {status}")
                break
            failures.append(f"{base.origin}: answered {status}")
        else:
            self._probe = Check("upstream", False, "; ".join(failures) or "no upstream")
        self._probed_at = now
        return self._probe
