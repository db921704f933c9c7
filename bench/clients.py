"""The clients: curl for blobs, wrk for small requests; their output parsing is pure.

Blobs: one ``curl --parallel`` invocation per run (URLs and output files from a ``--config``
file, HTTP/1.1, keep-alive reuse within the invocation, files on /dev/shm), timed from spawn to
exit; each transfer's status, redirect count and size come from ``--write-out``, and the files
are hashed with hashlib after the timed section. Only the direct client follows redirects
(``--location``): a proxy passing a 307 through fails instead of letting curl do its work.

Small requests: ``wrk --latency`` GETting the manifest (with the manifest ``Accept`` header) over
keep-alive; requests/s, p50/p99, socket errors and non-2xx/3xx counts come from its report. wrk
cannot do keep-alive HEAD (its parser then waits for a body that never comes), so HEAD is checked
with curl instead: after every run, GET (body sha256 + ``Docker-Content-Digest``) and HEAD
(status, ``Content-Length``) of the manifest through the contestant.

The client's own CPU is the ``RUSAGE_CHILDREN`` delta around each invocation.
"""

from __future__ import annotations

import hashlib
import re
import resource
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.fixtures import MANIFEST_TYPE, Blob

WRITE_OUT = "%{http_code} %{num_redirects} %{size_download} %{url}\n"


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Transfer:
    code: int
    redirects: int
    size: int
    url: str


def parse_write_out(text: str) -> list[Transfer]:
    transfers = []
    for line in text.splitlines():
        parts = line.split(" ", 3)
        if len(parts) == 4 and parts[0].isdigit():
            transfers.append(Transfer(int(parts[0]), int(parts[1]), int(parts[2]), parts[3]))
    return transfers


@dataclass
class BlobFetch:
    seconds: float
    client_cpu_s: float
    bytes: int
    problems: list[str] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        return not self.problems


def curl_config(jobs: Sequence[tuple[str, Path]]) -> str:
    return "".join(f'url = "{url}"\noutput = "{path}"\n' for url, path in jobs)


def curl_blob_argv(
    curl: str, config: Path, parallel: int, ca: Path, follow: bool, max_time: float
) -> list[str]:
    argv = [
        curl,
        "--config",
        str(config),
        "--parallel",
        "--parallel-max",
        str(parallel),
        "--parallel-immediate",
        "--silent",
        "--show-error",
        "--fail",
        "--http1.1",
        "--cacert",
        str(ca),
        "--max-time",
        f"{max_time:g}",
        "--write-out",
        WRITE_OUT,
    ]
    return [*argv, "--location"] if follow else argv


def check_transfers(
    transfers: list[Transfer], blobs: Sequence[Blob], url_of: dict[str, Blob], redirects: int
) -> list[str]:
    """Every blob fetched once with 200, the expected size and redirect count."""
    problems = []
    if len(transfers) != len(blobs):
        problems.append(f"{len(transfers)} transfers reported for {len(blobs)} blobs")
    for t in transfers:
        blob = url_of.get(t.url)
        if blob is None:
            problems.append(f"unexpected transfer URL {t.url}")
            continue
        if t.code != 200 or t.size != blob.size or t.redirects != redirects:
            problems.append(
                f"{blob.digest_hex[:12]}: status {t.code}, {t.size} bytes, {t.redirects} "
                f"redirects (want 200, {blob.size}, {redirects})"
            )
    return problems


def verify_files(jobs: Sequence[tuple[Blob, Path]]) -> list[str]:
    """sha256 of every received file against its blob; files are removed afterwards."""
    problems = []
    for blob, path in jobs:
        try:
            with path.open("rb") as handle:
                got = hashlib.file_digest(handle, "sha256").hexdigest()
        except FileNotFoundError:
            problems.append(f"{blob.digest_hex[:12]}: no file received")
            continue
        finally:
            path.unlink(missing_ok=True)
        if got != blob.digest_hex:
            problems.append(f"{blob.digest_hex[:12]}: received bytes hash to {got[:12]}")
    return problems


def fetch_blobs(
    curl: str,
    urls: Sequence[str],
    blobs: Sequence[Blob],
    out_dir: Path,
    parallel: int,
    ca: Path,
    follow: bool,
    redirects: int,
    max_time: float,
) -> BlobFetch:
    """Fetch ``urls`` (one per blob) in one curl run and verify each transfer and file;
    ``redirects`` is how many hops each transfer should report (the direct client's 307)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(url, out_dir / blob.digest_hex) for url, blob in zip(urls, blobs, strict=True)]
    config = out_dir / "curl.config"
    config.write_text(curl_config(jobs))
    argv = curl_blob_argv(curl, config, parallel, ca, follow, max_time)
    cpu0 = children_cpu()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=max_time + 10)
    except subprocess.TimeoutExpired:
        seconds = time.perf_counter() - t0
        verify_files([(b, p) for b, (_, p) in zip(blobs, jobs, strict=True)])
        return BlobFetch(seconds, children_cpu() - cpu0, 0, [f"curl timed out ({max_time}s)"])
    seconds = time.perf_counter() - t0
    client_cpu = children_cpu() - cpu0
    transfers = parse_write_out(proc.stdout.decode(errors="replace"))
    problems = []
    if proc.returncode != 0:
        problems.append(
            f"curl exit {proc.returncode}: {proc.stderr.decode(errors='replace').strip()[:300]}"
        )
    url_of = dict(zip(urls, blobs, strict=True))
    problems += check_transfers(transfers, blobs, url_of, redirects)
    problems += verify_files([(b, p) for b, (_, p) in zip(blobs, jobs, strict=True)])
    config.unlink(missing_ok=True)
    received = sum(t.size for t in transfers)
    return BlobFetch(seconds, client_cpu, received, problems)


# --- wrk ---------------------------------------------------------------------------------------

_DURATION_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_SIZE_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def parse_duration_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(text: str) -> int:
    match = re.fullmatch(r"([\d.]+)(B|KB|MB|GB|TB)", text.strip())
    if not match:
        raise ValueError(f"not a wrk size: {text!r}")
    return round(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


@dataclass(frozen=True)
class WrkReport:
    requests: int
    seconds: float
    read_bytes: int
    rps: float
    p50_ms: float
    p99_ms: float
    socket_errors: dict[str, int]
    non_2xx_3xx: int

    @property
    def errors(self) -> int:
        return sum(self.socket_errors.values()) + self.non_2xx_3xx


def parse_wrk(text: str) -> WrkReport:
    """Parse ``wrk --latency`` output; raises ValueError when a required line is missing."""
    total = re.search(r"^\s*(\d+) requests in ([\d.]+\w+), ([\d.]+\w+) read", text, re.M)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", text, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", text, re.M)
    if not (total and rps and p50 and p99):
        raise ValueError(f"unexpected wrk output:\n{text}")
    socket_errors: dict[str, int] = {}
    errors = re.search(r"Socket errors: (.*)$", text, re.M)
    if errors:
        for item in errors.group(1).split(","):
            kind, _, count = item.strip().partition(" ")
            socket_errors[kind] = int(count)
    non = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkReport(
        requests=int(total.group(1)),
        seconds=parse_duration_ms(total.group(2)) / 1e3,
        read_bytes=parse_size(total.group(3)),
        rps=float(rps.group(1)),
        p50_ms=parse_duration_ms(p50.group(1)),
        p99_ms=parse_duration_ms(p99.group(1)),
        socket_errors=socket_errors,
        non_2xx_3xx=int(non.group(1)) if non else 0,
    )


def wrk_argv(wrk: str, url: str, threads: int, connections: int, seconds: float) -> list[str]:
    return [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--latency",
        "--timeout",
        "5s",
        "-H",
        f"Accept: {MANIFEST_TYPE}",
        url,
    ]


@dataclass
class SmallRun:
    report: WrkReport | None
    client_cpu_s: float
    problems: list[str]


def run_wrk(wrk: str, url: str, threads: int, connections: int, seconds: float) -> SmallRun:
    argv = wrk_argv(wrk, url, threads, connections, seconds)
    cpu0 = children_cpu()
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        return SmallRun(None, children_cpu() - cpu0, ["wrk timed out"])
    client_cpu = children_cpu() - cpu0
    text = proc.stdout.decode(errors="replace")
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        return SmallRun(None, client_cpu, [f"wrk exit {proc.returncode}: {err[:300]}"])
    try:
        report = parse_wrk(text)
    except ValueError as exc:
        return SmallRun(None, client_cpu, [str(exc)[:500]])
    problems = []
    if report.non_2xx_3xx:
        problems.append(f"{report.non_2xx_3xx} non-2xx/3xx responses")
    if report.requests == 0:
        problems.append("no requests completed")
    return SmallRun(report, client_cpu, problems)


# --- one-off manifest check ----------------------------------------------------------------------


def parse_head(text: str) -> tuple[int, dict[str, str]]:
    """Status and headers (lower-cased names) of the last response head in curl's ``-D`` dump."""
    blocks = [b for b in re.split(r"\r?\n\r?\n", text) if b.strip()]
    if not blocks:
        return 0, {}
    lines = blocks[-1].splitlines()
    status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return status, headers


def verify_manifest(
    curl: str, url: str, ca: Path, expected: bytes, digest: str, work: Path
) -> list[str]:
    """GET: 200, the exact bytes, ``Docker-Content-Digest``; HEAD: 200, the same length."""
    work.mkdir(parents=True, exist_ok=True)
    body, head = work / "manifest.body", work / "manifest.head"
    common = [curl, "--silent", "--show-error", "--http1.1", "--cacert", str(ca), "--max-time"]
    common += ["10", "-H", f"Accept: {MANIFEST_TYPE}"]
    problems = []
    get = subprocess.run(
        [*common, "-D", str(head), "-o", str(body), url], capture_output=True, timeout=20
    )
    status, headers = parse_head(head.read_text(errors="replace") if head.exists() else "")
    got = body.read_bytes() if body.exists() else b""
    if get.returncode != 0 or status != 200:
        problems.append(f"manifest GET: curl exit {get.returncode}, status {status}")
    elif hashlib.sha256(got).digest() != hashlib.sha256(expected).digest():
        problems.append(f"manifest GET: {len(got)} bytes differ from the origin's")
    elif headers.get("docker-content-digest") != digest:
        shown = headers.get("docker-content-digest")
        problems.append(f"manifest GET: Docker-Content-Digest {shown}")
    head_run = subprocess.run([*common, "--head", url], capture_output=True, timeout=20)
    status, headers = parse_head(head_run.stdout.decode(errors="replace"))
    if head_run.returncode != 0 or status != 200:
        problems.append(f"manifest HEAD: curl exit {head_run.returncode}, status {status}")
    elif headers.get("content-length") != str(len(expected)):
        problems.append(f"manifest HEAD: Content-Length {headers.get('content-length')}")
    body.unlink(missing_ok=True)
    head.unlink(missing_ok=True)
    return problems
