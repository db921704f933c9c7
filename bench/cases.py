"""Benchmark cases, named on the command line (pure).

A blob case is ``[COUNTx]SIZE-TRANSPORT[-noredir][-hit]``: ``COUNT`` blobs of ``SIZE`` (``MiB``
or ``GiB``) fetched with up to 32 (``min(COUNT, 32)``) transfers in flight over keep-alive
connections, through the registry's 307 to the CDN as Docker Hub does, or straight from the
registry with ``-noredir``. Without ``-hit`` every hubproxy run starts on an empty cache (a
miss: the first pull of a layer); with ``-hit`` hubproxy serves blobs it already holds (primed
untimed), while the other contestants, which do not cache, do what they always do.
``small-TRANSPORT`` is manifest GETs (~2 KiB) over 50 keep-alive connections. ``TRANSPORT`` is
the client's side: ``tls`` or ``http`` (plain, a LAN mirror); contestants always reach the
origin over TLS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Transport = Literal["tls", "http"]
Kind = Literal["blobs", "small"]

MiB = 1024 * 1024
GiB = 1024 * MiB
MAX_PARALLEL = 32
SMALL_CONNECTIONS = 50

FULL_CASES = (
    "1GiB-tls",
    "8x64MiB-tls",
    "256x1MiB-tls",
    "256x1MiB-tls-noredir",
    "small-tls",
    "1GiB-http",
    "small-http",
    "1GiB-tls-hit",
    "256x1MiB-tls-hit",
)
QUICK_CASES = ("64MiB-tls", "32x1MiB-tls", "64MiB-tls-hit", "small-tls")

_BLOB_RE = re.compile(r"^(?:(\d+)x)?(\d+)(MiB|GiB)-(tls|http)(-noredir)?(-hit)?$")
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
    hit: bool = False
    connections: int = 0

    @property
    def total_bytes(self) -> int:
        return self.count * self.size

    def describe(self) -> str:
        side = "TLS" if self.transport == "tls" else "plain HTTP"
        if self.kind == "small":
            return (
                f"manifest GETs (~2 KiB; HEAD checked with curl) over {self.connections} "
                f"keep-alive connections; client->proxy {side}, proxy->origin TLS"
            )
        what = (
            f"{self.count} x {human_size(self.size)}"
            if self.count > 1
            else "one " + (human_size(self.size))
        )
        via = "through the registry's 307 to the CDN" if self.redirect else "without redirect"
        cache = (
            "hubproxy cache hit (primed untimed)"
            if self.hit
            else "hubproxy cache empty at the start of every run (miss)"
        )
        return (
            f"{what} blob{'s' if self.count > 1 else ''}, {self.parallel} at a time, {via}; "
            f"client->proxy {side}, proxy->origin TLS; {cache}"
        )


def human_size(size: int) -> str:
    if size % GiB == 0:
        return f"{size // GiB} GiB"
    return f"{size // MiB} MiB"


def parse_case(name: str) -> Case:
    """``"8x64MiB-tls"`` -> a :class:`Case`; raises ValueError for anything else."""
    small = _SMALL_RE.match(name)
    if small:
        transport: Transport = "tls" if small.group(1) == "tls" else "http"
        return Case(name, "small", transport, connections=SMALL_CONNECTIONS)
    blob = _BLOB_RE.match(name)
    if not blob:
        raise ValueError(
            f"unknown case {name!r}: want [COUNTx]SIZE(MiB|GiB)-(tls|http)[-noredir][-hit] "
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
        hit=blob.group(6) is not None,
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
