"""Benchmark cases, named on the command line (pure).

A blob case is ``[COUNTx]SIZE-TRANSPORT[-noredir][-cpu0]``: ``COUNT`` blobs of ``SIZE`` (``MiB``
or ``GiB``) fetched with up to 32 (``min(COUNT, 32)``) transfers in flight over keep-alive
connections, through the registry's 307 to the CDN as Docker Hub does, or straight from the
registry with ``-noredir``. Every blob case is run by every contestant that applies: hubproxy
passing the bytes on (``--no-cache``), hubproxy on an empty cache (a miss: the first pull of a
layer), hubproxy serving blobs it already holds (a hit), and the nginx recipes and the direct
client, which do the same work every time. ``-cpu0`` pins the proxy (only the proxy) to CPU 0,
one worker: the throughput of one core, as on a router.

``small-TRANSPORT`` is GETs of a 1 KiB manifest over 50 keep-alive connections (wrk).
``TRANSPORT`` is the client's side: ``tls`` or ``http`` (plain, a LAN mirror); contestants
always reach the origin over TLS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Transport = Literal["tls", "http"]
Kind = Literal["blobs", "small"]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
MAX_PARALLEL = 32
SMALL_CONNECTIONS = 50
SMALL_BODY = KiB  # the manifest the small-request cases GET: the "1 KiB over TLS"
PINNED_CPU = 0

# The cases (issue 14, Targets): each size as a pass, a miss and a hit against the
# nginx recipes; small requests; and the 1 GiB case again with the proxy on one core.
FULL_CASES = ("1GiB-tls", "64MiB-tls", "100x1MiB-tls", "small-tls", "1GiB-tls-cpu0")
QUICK_CASES = ("64MiB-tls", "32x1MiB-tls", "small-tls", "64MiB-tls-cpu0")

_BLOB_RE = re.compile(r"^(?:(\d+)x)?(\d+)(MiB|GiB)-(tls|http)(-noredir)?(-cpu0)?$")
_SMALL_RE = re.compile(r"^small-(tls|http)$")


@dataclass(frozen=True)
class Case:
    name: str
    kind: Kind
    transport: Transport
    count: int = 0
    size: int = 0
    parallel: int = 0
    redirect: bool = True
    pinned: bool = False  # the proxy runs on CPU 0 alone, one worker
    connections: int = 0

    @property
    def total_bytes(self) -> int:
        return self.count * self.size

    def describe(self) -> str:
        side = "TLS" if self.transport == "tls" else "plain HTTP"
        if self.kind == "small":
            return (
                f"GETs of a {SMALL_BODY // KiB} KiB manifest (HEAD checked with curl) over "
                f"{self.connections} keep-alive connections; client->proxy {side}, "
                "proxy->origin TLS; hubproxy passing every request upstream (`--no-cache`) and "
                "answering from its cache"
            )
        what = (
            f"{self.count} x {human_size(self.size)}"
            if self.count > 1
            else "one " + (human_size(self.size))
        )
        via = "through the registry's 307 to the CDN" if self.redirect else "without redirect"
        pinned = (
            f"; the proxy pinned to CPU {PINNED_CPU} with one worker (client and origin not "
            "pinned): throughput per core"
            if self.pinned
            else ""
        )
        return (
            f"{what} blob{'s' if self.count > 1 else ''}, {self.parallel} at a time, {via}; "
            f"client->proxy {side}, proxy->origin TLS{pinned}"
        )


def human_size(size: int) -> str:
    if size % GiB == 0:
        return f"{size // GiB} GiB"
    return f"{size // MiB} MiB"


def parse_case(name: str) -> Case:
    """``"100x1MiB-tls"`` -> a :class:`Case`; raises ValueError for anything else."""
    small = _SMALL_RE.match(name)
    if small:
        transport: Transport = "tls" if small.group(1) == "tls" else "http"
        return Case(name, "small", transport, connections=SMALL_CONNECTIONS)
    blob = _BLOB_RE.match(name)
    if not blob:
        raise ValueError(
            f"unknown case {name!r}: want [COUNTx]SIZE(MiB|GiB)-(tls|http)[-noredir][-cpu0] "
            "or small-(tls|http)"
        )
    count = int(blob.group(1) or "1")
    size = int(blob.group(2)) * (GiB if blob.group(3) == "GiB" else MiB)
    if count < 1 or size < 1:
        raise ValueError(f"case {name!r}: count and size must be positive")
    transport = "tls" if blob.group(4) == "tls" else "http"
    return Case(
        name,
        "blobs",
        transport,
        count=count,
        size=size,
        parallel=min(count, MAX_PARALLEL),
        redirect=blob.group(5) is None,
        pinned=blob.group(6) is not None,
    )


def parse_cases(text: str) -> list[Case]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ValueError("no cases given")
    if len(set(names)) != len(names):
        raise ValueError("a case is named twice")
    return [parse_case(name) for name in names]


def blob_sets(cases: list[Case]) -> list[tuple[int, int]]:
    """Distinct ``(count, size)`` blob sets the cases need (cases with the same shape share)."""
    seen: list[tuple[int, int]] = []
    for case in cases:
        if case.kind == "blobs" and (case.count, case.size) not in seen:
            seen.append((case.count, case.size))
    return seen
