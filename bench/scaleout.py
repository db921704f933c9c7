"""Scale-out: several hubproxy instances, one bucket, many clients, one image (issue 15).

    python -m bench.scaleout              three instances (``--peer`` lists, one shared bucket),
                                          30 clients spread over them round robin, one 256 MiB
                                          image (4 layers): aggregate MB/s, and the bytes the
                                          upstream sent, which must equal the image's size
    python -m bench.scaleout --quick      the same with a 4 MiB image (2 layers): seconds

Everything runs on 127.0.0.1: the origin (one nginx playing Docker Hub: registry 307 -> CDN over
TLS, see :mod:`bench.origin`) with its CDN logging each request's body bytes, moto's S3 server
(``python -m moto.server``, in memory) holding the bucket, and the instances as users run them
(``python -m hubproxy --cert --key --upstream --upstream-ca --no-library-prefix --log-level
warning --cache-dir DIR --cache-store s3://BUCKET/hubproxy --s3-endpoint MOTO --peer URL...
--peer-ca CA``), each with a cache directory of its own on /dev/shm, all starting empty. The
clients are in-process (trio + h11, :mod:`bench.loadclient`), each from a loopback address of
its own (the instances see 30 machines), each pulling every layer as docker does (three at a
time, one connection each), every body sha256-verified as it arrives.

The upstream's bytes are the CDN's own count (nginx ``$body_bytes_sent`` per request), not
hubproxy's: the figure a bill, or a rate limit, would count. Reports go to
``bench/results/scaleout.{md,json}`` (``--out``; ``--quick`` defaults to a temporary directory).

Exit status: 0 when every check passed (every layer to every client verified, the upstream sent
exactly the image's bytes, one CDN GET per layer, the bucket holds each layer, every instance
alive), 1 when one failed (the report is still written), 2 for usage errors or a missing tool.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import ssl
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from bench import procs
from bench.contestants import hubproxy_argv
from bench.env import REPO_ROOT, find_tool
from bench.fixtures import Blob, Fixtures, make_fixtures
from bench.load import (
    FIGURE_HEADER,
    environment,
    parse_size,
    pull_blob,
    render_markdown,
    render_text,
)
from bench.loadclient import Connection, RequestFailed, client_context
from bench.origin import Origin, start_origin
from bench.report import scan_log
from hubproxy.cache.objects import blob_key, open_object_store

KiB = 1024
MiB = 1024 * KiB
DEFAULT_OUT = REPO_ROOT / "bench" / "results"
LAYERS_AT_ONCE = 3  # docker's max-concurrent-downloads
COMMIT_WAIT = 60.0  # seconds the instances get to commit every layer to the bucket
# the instances' credentials for moto (any value does); the operator's own AWS files unread
BENCH_AWS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


def say(text: str) -> None:
    print(f"scaleout: {text}", file=sys.stderr, flush=True)


# --- pure helpers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    size: int  # the image's bytes, all layers
    layers: int
    clients: int
    instances: int
    max_time: float  # seconds the clients may take in all
    peer_timeout: str | None = None  # --peer-timeout for the instances; None: their default

    @property
    def layer_size(self) -> int:
        return self.size // self.layers


def cdn_bytes(log_text: str) -> tuple[dict[str, int], Counter[str]]:
    """From the CDN's log (``nginxconf.CDN_LOG_FORMAT``): body bytes sent per blob (hex
    digest), and GETs per blob."""
    sent: dict[str, int] = {}
    gets: Counter[str] = Counter()
    for line in log_text.splitlines():
        parts = line.split()
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        digest = parts[2].rsplit("/", 1)[-1]
        sent[digest] = sent.get(digest, 0) + int(parts[1])
        gets[digest] += 1
    return sent, gets


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples in a /metrics page whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match or match.group(1) != name:
            continue
        found = dict(_LABEL.findall(match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


def upstream_checks(
    layers: Sequence[Blob], sent: Mapping[str, int], gets: Mapping[str, int]
) -> list[str]:
    """The issue's check: the upstream sent each layer's bytes once and nothing else."""
    failed = []
    image = sum(blob.size for blob in layers)
    total = sum(sent.values())
    if total != image:
        failed.append(f"the upstream sent {total:,} bytes for a {image:,}-byte image")
    for blob in layers:
        if gets.get(blob.digest_hex, 0) != 1:
            failed.append(f"layer {blob.digest_hex[:12]} fetched {gets.get(blob.digest_hex, 0)}x")
    return failed


# --- the pieces --------------------------------------------------------------------------------


@contextlib.contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    """A directory on /dev/shm (blobs, caches, logs), removed afterwards unless ``keep``."""
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="hubproxy-scaleout-", dir=shm if shm.is_dir() else None))
    try:
        yield root
    finally:
        if keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


@dataclass
class Instance:
    name: str
    port: int
    process: procs.Started
    cache_dir: Path
    cpu_start: float = 0.0
    cpu_s: float = 0.0
    peak_rss_kib: int = 0
    metrics: str = ""

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


def start_moto(root: Path, stack: contextlib.ExitStack) -> str:
    """moto's S3 server on a free port (its objects in memory); its URL."""
    port = procs.free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    started = procs.start("moto", argv, root / "moto.log", stack)
    procs.wait_listening(started, [port], timeout=60.0)
    return f"http://127.0.0.1:{port}"


async def create_bucket(moto: str, name: str) -> None:
    port = int(moto.rsplit(":", 1)[1])
    conn = await Connection.open(port, None)
    try:
        head = await conn.start("PUT", f"/{name}", [("content-length", "0")])
        await conn.read_body()
    finally:
        await conn.aclose()
    if head.status != 200:
        raise RuntimeError(f"moto did not create bucket {name}: {head.status}")


def start_instances(
    root: Path,
    fixtures: Fixtures,
    origin: Origin,
    store: str,
    moto: str,
    count: int,
    stack: contextlib.ExitStack,
    peer_timeout: str | None = None,
) -> list[Instance]:
    """``count`` instances, each listing all of them as peers, on one bucket; started together,
    then each waited for (its store check, then its listener)."""
    ports = [procs.free_port() for _ in range(count)]
    peers = [arg for port in ports for arg in ("--peer", f"https://127.0.0.1:{port}")]
    instances = []
    for index, port in enumerate(ports, 1):
        name = f"hubproxy-{index}"
        cache_dir = root / f"cache-{index}"
        argv = [
            *hubproxy_argv(port, "tls", origin.registry_url("tls"), fixtures, cache_dir),
            "--cache-store",
            store,
            "--s3-endpoint",
            moto,
            *peers,
            "--peer-ca",
            str(fixtures.tls.ca_pem),
            *(["--peer-timeout", peer_timeout] if peer_timeout else []),
        ]
        started = procs.start(name, argv, root / f"{name}.log", stack, cwd=REPO_ROOT)
        instances.append(Instance(name, port, started, cache_dir))
    for instance in instances:
        procs.wait_listening(instance.process, [instance.port], timeout=60.0)
    for instance in instances:
        procs.wait_quiet(instance.process)
    return instances


@dataclass
class Pulls:
    """What the clients received, by instance port."""

    bytes_by_port: Counter[int] = field(default_factory=Counter)
    verified: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


async def pull_image(
    port: int,
    source: str,
    layers: Sequence[Blob],
    context: ssl.SSLContext,
    pulls: Pulls,
) -> None:
    """One client: every layer, ``LAYERS_AT_ONCE`` at a time, one new connection each."""
    limiter = trio.CapacityLimiter(LAYERS_AT_ONCE)

    async def layer(blob: Blob) -> None:
        async with limiter:
            try:
                conn = await Connection.open(port, context, source_address=source)
            except RequestFailed as exc:
                pulls.failures.append(f"{source} -> :{port}: {exc}")
                return
            try:
                body = await pull_blob(conn, blob)
                pulls.bytes_by_port[port] += body.size
                pulls.verified += 1
            except RequestFailed as exc:
                pulls.failures.append(f"{source} -> :{port} {blob.digest_hex[:12]}: {exc}")
            finally:
                await conn.aclose()

    async with trio.open_nursery() as nursery:
        for blob in layers:
            nursery.start_soon(layer, blob)


async def run_clients(
    instances: Sequence[Instance], layers: Sequence[Blob], p: Params, context: ssl.SSLContext
) -> Pulls:
    """``p.clients`` clients at once, client n on instance n mod N (round robin), from
    127.0.1.(n+1)."""
    pulls = Pulls()
    began = trio.current_time()
    with trio.move_on_after(p.max_time) as scope:
        async with trio.open_nursery() as nursery:
            for n in range(p.clients):
                port = instances[n % len(instances)].port
                source = f"127.0.1.{n + 1}"
                nursery.start_soon(pull_image, port, source, layers, context, pulls)
    pulls.seconds = trio.current_time() - began
    if scope.cancelled_caught:
        pulls.failures.append(f"the clients took longer than {p.max_time:g}s")
    return pulls


async def read_metrics(instances: Sequence[Instance], context: ssl.SSLContext) -> None:
    for instance in instances:
        conn = await Connection.open(instance.port, context)
        try:
            await conn.start("GET", "/metrics")
            body = await conn.read_body(keep=4 * MiB)
            instance.metrics = body.content.decode(errors="replace")
        finally:
            await conn.aclose()


async def wait_commits(
    instances: Sequence[Instance], layers: int, context: ssl.SSLContext
) -> float:
    """Poll /metrics until the instances committed ``layers`` blobs in all (commits run in the
    background, after the clients were served), at most ``COMMIT_WAIT``; the seconds waited."""
    began = trio.current_time()
    with trio.move_on_after(COMMIT_WAIT):
        while True:
            await read_metrics(instances, context)
            done = sum(metric(i.metrics, "hubproxy_store_commits_total") for i in instances)
            if done >= layers:
                break
            await trio.sleep(0.2)
    return trio.current_time() - began


def bucket_objects(store: str, moto: str) -> list[tuple[str, int]]:
    return open_object_store(store, moto).list("blobs")


# --- the run -----------------------------------------------------------------------------------


def measure(nginx: str, p: Params, keep: bool) -> dict[str, Any]:
    with workspace(keep) as root, contextlib.ExitStack() as stack:
        began = time.monotonic()
        fixtures = make_fixtures(root, [(p.layers, p.layer_size)])
        layers = fixtures.blobs[(p.layers, p.layer_size)]
        say(f"{p.layers} layers of {p.layer_size / MiB:g} MiB in {time.monotonic() - began:.1f}s")
        cdn_log = root / "cdn-bytes.log"
        origin = start_origin(nginx, root, fixtures, stack, cdn_log=cdn_log)
        moto = start_moto(root, stack)
        bucket = f"scaleout-{secrets.token_hex(4)}"
        store = f"s3://{bucket}/hubproxy"
        trio.run(create_bucket, moto, bucket)
        instances = start_instances(
            root, fixtures, origin, store, moto, p.instances, stack, p.peer_timeout
        )
        say(f"{p.instances} instances up on {store} at {moto}; {p.clients} clients pulling")
        context = client_context(fixtures.tls.ca_pem)
        for instance in instances:
            pids = instance.process.pids()
            procs.reset_peak_rss(pids)
            instance.cpu_start = procs.cpu_seconds(pids)
        pulls = trio.run(run_clients, instances, layers, p, context)
        for instance in instances:
            pids = instance.process.pids()
            instance.cpu_s = procs.cpu_seconds(pids) - instance.cpu_start
            instance.peak_rss_kib = procs.peak_rss_kb(pids)
        commit_wait = trio.run(wait_commits, instances, p.layers, context)
        objects = bucket_objects(store, moto)
        alive = [i.name for i in instances if i.process.process.poll() is None]
        stack.close()  # every process stopped: the logs are complete
        sent, gets = cdn_bytes(cdn_log.read_text() if cdn_log.exists() else "")
        image = sum(blob.size for blob in layers)
        received = sum(pulls.bytes_by_port.values())
        logs = [scan_log(i.name, i.process.log, i.process.log.name) for i in instances]
        return {
            "params": {
                "image_bytes": image,
                "layers": p.layers,
                "layer_bytes": p.layer_size,
                "clients": p.clients,
                "instances": p.instances,
                "layers_at_once": LAYERS_AT_ONCE,
                "peer_timeout": p.peer_timeout or "hubproxy's default",
            },
            "seconds": pulls.seconds,
            "client_bytes": received,
            "aggregate_mb_s": received / pulls.seconds / 1e6 if pulls.seconds else 0.0,
            "pulls_verified": pulls.verified,
            "pulls_expected": p.clients * p.layers,
            "client_failures": pulls.failures[:20],
            "upstream_bytes": sum(sent.values()),
            "upstream_ratio": sum(sent.values()) / image,
            "cdn_gets": {blob.digest_hex: gets.get(blob.digest_hex, 0) for blob in layers},
            "upstream_failures": upstream_checks(layers, sent, gets),
            "bucket": {"objects": len(objects), "bytes": sum(size for _, size in objects)},
            "bucket_complete": sorted(objects)
            == sorted((blob_key(b.digest_hex), b.size) for b in layers),
            "commit_wait_s": commit_wait,
            "instances": [
                {
                    "name": i.name,
                    "url": i.url,
                    "client_bytes": pulls.bytes_by_port[i.port],
                    "cpu_s": i.cpu_s,
                    "peak_rss_kib": i.peak_rss_kib,
                    "peer_fetches": {
                        result: metric(i.metrics, "hubproxy_peer_fetches_total", result=result)
                        for result in ("filled", "passed", "upstream")
                    },
                    "store_commits": metric(i.metrics, "hubproxy_store_commits_total"),
                    "store_reads": metric(i.metrics, "hubproxy_store_reads_total"),
                    "alive_at_end": i.name in alive,
                }
                for i in instances
            ],
            "log": {
                "warning_or_error_lines": sum(scan.lines for scan in logs),
                "samples": [f"[{scan.name}] {line}" for scan in logs for line in scan.samples],
            },
        }


def checks(r: Mapping[str, Any]) -> list[str]:
    failed = list(r["upstream_failures"])
    if r["pulls_verified"] != r["pulls_expected"]:
        failed.append(f"{r['pulls_verified']} of {r['pulls_expected']} layer pulls verified")
    failed += [f"client: {line}" for line in r["client_failures"]]
    if not r["bucket_complete"]:
        failed.append(f"the bucket holds {r['bucket']['objects']} objects, not each layer once")
    failed += [f"{i['name']} died" for i in r["instances"] if not i["alive_at_end"]]
    return failed


def _size(size: float) -> str:
    return f"{size / MiB:,.1f} MiB" if size < 10 * 1024 * MiB else f"{size / MiB / 1024:,.2f} GiB"


def rows(r: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    p = r["params"]
    image = p["image_bytes"]
    found = [
        (
            "image",
            _size(image),
            f"{p['layers']} layers of {_size(p['layer_bytes'])}",
        ),
        (
            "clients",
            str(p["clients"]),
            f"round robin over {p['instances']} instances, {p['layers_at_once']} layers at a "
            f"time each; --peer-timeout: {p['peer_timeout']}",
        ),
        ("wall time", f"{r['seconds']:.2f} s", "first request to last byte, all clients"),
        (
            "aggregate throughput",
            f"{r['aggregate_mb_s']:,.0f} MB/s",
            f"{_size(r['client_bytes'])} to clients, {r['pulls_verified']} of "
            f"{r['pulls_expected']} layer pulls sha256-verified",
        ),
        (
            "upstream bytes",
            f"{r['upstream_bytes']:,}",
            f"the CDN's count; image {image:,} bytes: "
            + ("equal" if r["upstream_bytes"] == image else "**not equal**"),
        ),
        ("upstream / image size", f"{r['upstream_ratio']:.3f}", "must be 1.000"),
        (
            "CDN GETs per layer",
            ", ".join(str(n) for n in r["cdn_gets"].values()),
            "must be 1 each",
        ),
        (
            "bucket",
            f"{r['bucket']['objects']} objects",
            f"{_size(r['bucket']['bytes'])}; every layer once: "
            + ("yes" if r["bucket_complete"] else "**no**")
            + f" (commits done {r['commit_wait_s']:.1f} s after the last client)",
        ),
    ]
    for i in r["instances"]:
        fetches = i["peer_fetches"]
        found.append(
            (
                i["name"],
                f"{_size(i['client_bytes'])} served",
                f"{i['url']}; CPU {i['cpu_s']:.1f} s, peak RSS {i['peak_rss_kib'] / KiB:.0f} MiB;"
                f" from its peers {fetches['filled']:.0f} filled, {fetches['passed']:.0f} "
                f"passed, {fetches['upstream']:.0f} upstream instead; bucket commits "
                f"{i['store_commits']:.0f}, reads {i['store_reads']:.0f}",
            )
        )
    return found


METHOD = [
    "Origin: one nginx playing Docker Hub (TLS registry answering blob GETs with a 307 to a TLS "
    "CDN endpoint), files on /dev/shm; the CDN logs `$status $body_bytes_sent $uri` per "
    "request, and the upstream bytes are the sum of `$body_bytes_sent` (every byte the CDN "
    "sent, ranges included).",
    "Bucket: moto's S3 server (`python -m moto.server`, objects in memory), one fresh bucket; "
    "the instances reach it with `--s3-endpoint` and static AWS_* keys.",
    "Instances: `python -m hubproxy` as users run it (TLS listener, the origin as upstream "
    "verified against the bench CA, `--no-library-prefix --log-level warning`), each with its "
    "own empty `--cache-dir` on /dev/shm, `--cache-store s3://BUCKET/hubproxy`, the same "
    "`--peer` list of all three and `--peer-ca`; one process each (default `--workers 1`). "
    "Started together, then each waited for (listening, start-up CPU done).",
    "Clients: in-process trio + `trio.SSLStream` + h11 (the bench process, apart from the "
    "instances), all started at once; client n connects from 127.0.1.(n+1) (each a machine to "
    "hubproxy) to instance n mod 3; each pulls every layer of the image, three at a time "
    "(docker's max-concurrent-downloads), one new TLS connection per layer; every body "
    "sha256-verified and its length checked as it arrives. Blob GETs only: the manifest is a "
    "few KiB and not the point.",
    "Throughput: bytes received by all clients / wall time from the first connection to the "
    "last byte (MB = 10^6 bytes). CPU: utime+stime of each instance during the pulls; peak "
    "RSS: VmHWM reset before them.",
    "After the pulls: each instance's /metrics (peer fetches by result, bucket commits and "
    "reads), polled until the layers are committed (commits run in the background), and the "
    "bucket listed.",
    "All of it shares one machine: the clients' TLS and hashing, three instances, moto and "
    "nginx compete for the same cores, so the MB/s is a floor, not a capacity figure.",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scaleout",
        description="Several hubproxy instances on one bucket (moto) with --peer lists, many "
        "clients round robin, one image: aggregate MB/s and the bytes the upstream sent "
        "(which must equal the image size).",
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="a 4 MiB image in 2 layers: seconds")
    add("--size", help="the image's size (default 256M, quick 4M; K/M/G are 1024-based)")
    add("--layers", type=int, help="layers the image is split into (default 4, quick 2)")
    add("--clients", type=int, default=30, help="clients pulling at once (default 30)")
    add("--instances", type=int, default=3, help="hubproxy instances (default 3)")
    add("--max-time", type=float, default=600.0, help="limit for all the clients, seconds")
    add(
        "--peer-timeout",
        metavar="DURATION",
        help="the instances' --peer-timeout (default: hubproxy's own, as users run it)",
    )
    add(
        "--out",
        type=Path,
        help="output directory (default bench/results; --quick: a temporary directory)",
    )
    add("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    return parser


def missing_packages() -> list[str]:
    return [name for name in ("moto", "obstore") if importlib.util.find_spec(name) is None]


def _on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        size = parse_size(args.size) if args.size else (4 * MiB if args.quick else 256 * MiB)
    except ValueError as exc:
        parser.error(str(exc))
    layers = args.layers or (2 if args.quick else 4)
    if layers < 1 or size < layers or args.clients < 1 or args.instances < 1:
        parser.error("--size, --layers, --clients and --instances must be positive")
    if size % layers:
        parser.error(f"--size {size} does not split into {layers} equal layers")
    if args.clients > 254:
        parser.error("--clients: at most 254 (one loopback address each)")
    p = Params(size, layers, args.clients, args.instances, args.max_time, args.peer_timeout)
    nginx = find_tool("nginx")
    if nginx is None:
        print("bench.scaleout: needs nginx (apt-get install -y nginx-light)", file=sys.stderr)
        return 2
    missing = missing_packages()
    if missing:
        print(
            f"bench.scaleout: needs {', '.join(missing)}: pip install -e '.[bench]'",
            file=sys.stderr,
        )
        return 2
    out: Path = args.out or (
        Path(tempfile.mkdtemp(prefix="hubproxy-scaleout-quick-")) if args.quick else DEFAULT_OUT
    )
    signal.signal(signal.SIGTERM, _on_sigterm)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update(BENCH_AWS)  # for the instances (inherited) and the bucket's listing
    command = shlex.join(
        ["python", "-m", "bench.scaleout", *(sys.argv[1:] if argv is None else argv)]
    )
    env = environment()
    r = measure(nginx, p, args.keep)
    failed = checks(r)
    table = rows(r)
    title = (
        f"hubproxy scale-out: {p.instances} instances, {p.clients} clients, "
        f"one {_size(p.size)} image"
    )
    out.mkdir(parents=True, exist_ok=True)
    result = {**r, "environment": env, "command": command, "failed_checks": failed}
    result["ok"] = not failed
    (out / "scaleout.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "scaleout.md").write_text(
        render_markdown(title, command, env, table, METHOD, result, failed)
    )
    print(render_text([FIGURE_HEADER, *table]), flush=True)
    for failure in failed:
        say(f"FAILED: {failure}")
    say(f"report in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
