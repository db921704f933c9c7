"""The operator's paths: ``/healthz``, ``/readyz``, ``/metrics`` and the status page ``/``.

``/healthz`` says the process answers. ``/readyz`` says whether a client pulling now would be
served: the listener accepts (not draining), an upstream of the default registry answers, and the
cache directory can be written. Whether an upstream answers is ``trouble.readiness`` over what
requests saw: one that answered in the last few seconds and has not failed since counts; once
every upstream failed (a request's failed connection or 5xx is enough) it does not, at once;
otherwise a ``GET /v2/`` probe tells. An idle mirror thus probes only while something polls
``/readyz``, at most once per ``RECENT_ANSWER`` seconds, and sees a dead upstream within that.
``/metrics`` is the Prometheus text format (``metrics``), the status page is ``statuspage``.
Who may read them is admission's ``--ops-allow``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ..cache.inventory import Inventory
from ..cache.pullthrough import PullThrough
from ..cache.shared import SharedStore
from ..forwarder import Forwarder
from ..net.server import ClientRequest, ClientResponse
from ..policy import trouble
from ..policy.headers import Headers
from ..policy.inventory import Image
from .admin import Admin
from .metrics import CONTENT_TYPE, cache_figures, manifest_figures
from .statuspage import render_status_page, status_figures
from .trends import Families
from .workermetrics import WorkerMetrics, snapshot

if TYPE_CHECKING:
    from ..net.server import Server

log = logging.getLogger("hubproxy")

# An upstream that answered this recently, and has not failed since, counts as answering: a
# dead upstream shows on an idle mirror this long after its last answer at most (a request that
# fails shows it at once), and a load balancer polling every second costs one probe this often.
RECENT_ANSWER = 5.0
PROBE_TIMEOUT = 5.0  # a readiness probe of an upstream gives up after this long
PROBE_RETRY = 5.0  # once every upstream failed, /readyz says so this long before probing again


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
        self._probing = trio.Lock()  # concurrent /readyz requests share one probe
        self.workers: WorkerMetrics | None = None  # --workers N: /metrics sums them all
        # the cache's images: the admin API, the status page's largest and most pulled
        self.inventory = (
            Inventory(pullthrough.blobs, pullthrough.manifests) if pullthrough else None
        )
        self.admin = Admin(self.inventory, None)  # on with a token (--admin-token-file)

    async def serve(self, path: str, request: ClientRequest, response: ClientResponse) -> None:
        if path == "/healthz":
            status, body, kind = 200, b'{"status":"ok"}\n', b"application/json"
        elif path == "/readyz":
            status, body = readiness(await self.checks())
            kind = b"application/json"
        elif path == "/metrics":
            self.refresh_gauges()
            body = await self.workers.render() if self.workers else self.metrics.render()
            status, kind = 200, CONTENT_TYPE.encode()
        else:
            families = await self.families()
            figures = status_figures(
                self.metrics,
                url=self._mirror_url(request),
                table=self.forwarder.table,
                now=time.time(),
                monotonic=time.monotonic(),
                disk_free=self._disk_free(),
                families=families,
                trend_now=trio.current_time(),
                tops=await self._image_tops(),
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

    async def families(self) -> Families:
        """The metrics as plain values, the whole mirror's under ``--workers`` (summed as
        ``/metrics`` sums them): what the trends sample and the status page's tables show."""
        self.refresh_gauges()
        if self.workers is not None:
            return await self.workers.gather()
        return snapshot(self.metrics)

    async def _image_tops(self) -> tuple[tuple[Image, ...], tuple[Image, ...]]:
        """The status page's largest and most pulled images (computed in a thread, at most
        once a minute); none if the cache cannot be read now (said in the log)."""
        if self.inventory is None:
            return (), ()
        try:
            return await self.inventory.tops(time.monotonic())
        except (OSError, sqlite3.Error) as exc:
            log.info("status page: cannot list the cached images: %s", exc)
            return (), ()

    def _disk_free(self) -> int | None:
        """Bytes free to us on the cache's file system; None without a cache (or a way to
        ask)."""
        if self.pullthrough is None:
            return None
        try:
            return self.pullthrough.blobs.read_disk(self.pullthrough.blobs.root).free
        except OSError:
            return None

    def _mirror_url(self, request: ClientRequest) -> str:
        return self.forwarder.public_base(request)

    def refresh_gauges(self) -> None:
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
        if pullthrough is not None:
            metrics.peers = pullthrough.peers
            shared = pullthrough.blobs.shared
            metrics.store = shared if isinstance(shared, SharedStore) else None

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
        upstreams = self.forwarder.default
        async with self._probing:
            verdict = self._upstream_readiness()
            if verdict.ok is None:
                for index in range(len(upstreams.urls)):
                    probed = await self.forwarder.probe(upstreams, index, patience=PROBE_TIMEOUT)
                    if not isinstance(probed, trouble.Cause) and probed[0] < 500:
                        break  # one upstream answering is enough
                verdict = self._upstream_readiness()
        if verdict.ok is None:  # no upstream, or the mirror's own slots were all taken
            return Check("upstream", False, "no upstream answered a probe")
        return Check("upstream", verdict.ok, verdict.detail)

    def _upstream_readiness(self) -> trouble.Readiness:
        upstreams = self.forwarder.default
        return trouble.readiness(
            [str(url.origin) for url in upstreams.urls],
            upstreams.health,
            trio.current_time(),
            recent=RECENT_ANSWER,
            retry=PROBE_RETRY,
        )
