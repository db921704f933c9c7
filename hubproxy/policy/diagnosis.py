"""``hubproxy doctor``'s judgements and its report, with no I/O: what a certificate, a
rate-limit header or a disk says (OK, WARN or FAIL), and the table, lines or JSON printed.

The checks themselves (:mod:`hubproxy.ops.doctor`) only gather facts and hand them here, so
every threshold can be read, and tested, in one place.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .headers import get_header
from .sizes import format_size
from .trouble import format_duration

__all__ = [
    "CERT_WARN_DAYS",
    "Finding",
    "Verdict",
    "certificate_finding",
    "exit_status",
    "rate_limit_finding",
    "render_json",
    "render_lines",
    "render_table",
]

CERT_WARN_DAYS = 14  # a certificate expiring sooner is a warning: renewal has failed somewhere
RATE_LIMIT_WARN = 0.1  # under a tenth of the limit left: the next CI burst will hit it


class Verdict(enum.Enum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"  # not run: a hop before it failed, or it needs a setting that is not given


@dataclass(frozen=True)
class Finding:
    """One row of the report."""

    check: str  # dns, tcp, tls, v2, token, manifest, cdn, cache, mirror-...
    target: str  # what was checked: host:port, a URL, a directory
    verdict: Verdict
    detail: str
    seconds: float | None = None  # how long the check took; None when it did not run


def certificate_finding(
    target: str, peer: Mapping[str, object], now: float, not_after: float, seconds: float
) -> Finding:
    """The ``tls`` row: subject, issuer and days left of ``peer`` (``getpeercert()``'s dict);
    WARN under :data:`CERT_WARN_DAYS` days, FAIL once expired."""
    days = (not_after - now) / 86400
    subject = _name(peer.get("subject")) or "no subject"
    issuer = _name(peer.get("issuer")) or "no issuer"
    if days < 0:
        return Finding(
            "tls", target, Verdict.FAIL, f"{subject}: expired {-days:.0f} days ago", seconds
        )
    verdict = Verdict.WARN if days < CERT_WARN_DAYS else Verdict.OK
    detail = f"{subject}, issued by {issuer}, expires in {days:.0f} days"
    if verdict is Verdict.WARN:
        detail += " (renew it)"
    return Finding("tls", target, verdict, detail, seconds)


def _name(rdns: object) -> str:
    """``CN=...`` (else ``O=...``) of an ``ssl`` distinguished name: ((("commonName", x),), ...)."""
    if not isinstance(rdns, tuple):
        return ""
    fields: dict[str, str] = {}
    for rdn in rdns:
        for pair in rdn if isinstance(rdn, tuple) else ():
            if isinstance(pair, tuple) and len(pair) == 2:
                fields.setdefault(str(pair[0]), str(pair[1]))
    for key, short in (("commonName", "CN"), ("organizationName", "O")):
        if key in fields:
            return f"{short}={fields[key]}"
    return ""


def rate_limit_finding(
    target: str, status: int, headers: Sequence[tuple[bytes, bytes]], seconds: float
) -> Finding:
    """The ``manifest`` row from a manifest HEAD's answer: its digest and Docker Hub's
    ``ratelimit-remaining: 87;w=21600`` / ``ratelimit-limit: 100;w=21600``; WARN under a
    tenth left, FAIL on 429 or anything but 200."""
    limit = _leading_number(get_header(headers, b"ratelimit-limit"))
    remaining = _leading_number(get_header(headers, b"ratelimit-remaining"))
    window = _window(get_header(headers, b"ratelimit-limit"))
    rate = ""
    if limit is not None and remaining is not None:
        rate = f"rate limit {remaining}/{limit} left" + (f" per {window}" if window else "")
    elif limit is None and remaining is None:
        rate = "no rate-limit headers"
    if status == 429:
        return Finding("manifest", target, Verdict.FAIL, f"429 rate limited; {rate}", seconds)
    if status != 200:
        return Finding("manifest", target, Verdict.FAIL, f"answered {status}", seconds)
    digest = (get_header(headers, b"docker-content-digest") or b"").decode("latin-1")
    shown = f"{digest[:19]}..." if len(digest) > 19 else digest or "no digest header"
    verdict = Verdict.OK
    if limit and remaining is not None and remaining < limit * RATE_LIMIT_WARN:
        verdict = Verdict.WARN
    return Finding("manifest", target, verdict, f"200 {shown}; {rate}", seconds)


def _leading_number(value: bytes | None) -> int | None:
    if value is None:
        return None
    head = value.decode("latin-1").partition(";")[0].strip()
    return int(head) if head.isdigit() else None


def _window(value: bytes | None) -> str:
    if value is None:
        return ""
    for part in value.decode("latin-1").split(";")[1:]:
        name, _, number = part.strip().partition("=")
        if name == "w" and number.isdigit():
            return format_duration(float(number))
    return ""


def cache_space_finding(
    target: str, free: int, cache_size: int, bound: int, blocks_fills: bool
) -> Finding:
    """The ``cache`` space row: WARN when the disk cannot hold ``--cache-size`` (the bound the
    cache's own disk check computes is smaller), FAIL when it is too full to cache at all."""
    said = f"{format_size(free)} free, --cache-size {format_size(cache_size)}"
    if blocks_fills:
        return Finding("cache", target, Verdict.FAIL, f"{said}: too full, nothing gets cached")
    if bound < cache_size:
        detail = f"{said}: the disk bounds the cache to {format_size(bound)}"
        return Finding("cache", target, Verdict.WARN, detail)
    return Finding("cache", target, Verdict.OK, f"writable; {said}")


def exit_status(findings: Iterable[Finding]) -> int:
    """0 when nothing failed (warnings included), 1 when anything did."""
    return 1 if any(f.verdict is Verdict.FAIL for f in findings) else 0


def _took(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


HEADINGS = ("CHECK", "TARGET", "RESULT", "DETAIL", "TIME")


def render_table(findings: Sequence[Finding]) -> str:
    """Aligned columns for a terminal; the detail column is last but one and not padded
    beyond the widest detail."""
    rows = [HEADINGS] + [
        (f.check, f.target, f.verdict.value, f.detail, _took(f.seconds)) for f in findings
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADINGS))]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=False)]
        lines.append("  ".join([*cells, row[-1].rjust(widths[-1])]).rstrip())
    return "\n".join(lines) + "\n"


def render_lines(findings: Sequence[Finding]) -> str:
    """One line per check, for logs and pipes: ``OK tls registry-1.docker.io:443: ... (34 ms)``."""
    return "".join(
        f"{f.verdict.value} {f.check} {f.target}: {f.detail} ({_took(f.seconds)})\n"
        for f in findings
    )


def render_json(findings: Sequence[Finding]) -> str:
    """``{"status": 0|1, "checks": [{"check", "target", "result", "detail", "seconds"}]}``."""
    document = {
        "status": exit_status(findings),
        "checks": [
            {
                "check": f.check,
                "target": f.target,
                "result": f.verdict.value,
                "detail": f.detail,
                "seconds": None if f.seconds is None else round(f.seconds, 4),
            }
            for f in findings
        ],
    }
    return json.dumps(document, indent=2) + "\n"
