"""The contestants, each in front of the same origin, started on first use.

- ``hubproxy-pass``: ``python -m hubproxy --no-cache``: every byte and every request passed on;
- ``hubproxy-miss``: hubproxy with its blob cache on, as by default, restarted on an empty cache
  directory before every run (untimed), so each run is a first pull;
- ``hubproxy-hit``: hubproxy serving blobs (or the manifest) it already holds: one long-lived
  instance per case, primed untimed;
- ``nginx-tuned`` (the baseline of every ratio) / ``nginx-recipe``: one nginx instance each (own
  prefix, config and pid), see :mod:`bench.nginxconf`;
- ``direct``: no proxy; the client talks to the origin itself and follows the 307 to the CDN:
  the ceiling on this machine;
- ``floor-pass`` / ``floor-miss`` / ``floor-hit``: :mod:`bench.floorproxy`, a mirror with
  nothing of hubproxy in it but its stack (trio, h11, net.tls, sha256, the file system), doing
  what the hubproxy contestant of the same suffix does and nothing else: the least any mirror
  on this stack pays on this machine, so each hubproxy figure has its floor beside it. One
  process per CPU (``--processes auto``, as hubproxy's default ``--workers auto``); not in the
  pinned cases. ``floor-miss`` is restarted before each run, as ``hubproxy-miss``.

hubproxy is run as users run it (TLS listener unless plain HTTP, upstream the origin's TLS
registry verified against the bench CA, ``--log-level warning``). In the small-request cases it
gets ``--workers auto``, in the pinned (``-cpu0``) cases ``--workers 1``, either only when its
``--help`` lists ``--workers``; the blob cases take its default. Client-to-proxy is TLS or
plain HTTP per case; proxy-to-origin is always TLS.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from bench import procs
from bench.cases import PINNED_CPU, Case, Transport
from bench.fixtures import Fixtures
from bench.nginxconf import render_contestant
from bench.origin import Origin, nginx_argv, prepare_prefix

Name = Literal[
    "hubproxy-pass",
    "hubproxy-miss",
    "hubproxy-hit",
    "nginx-tuned",
    "nginx-recipe",
    "direct",
    "floor-pass",
    "floor-miss",
    "floor-hit",
]
CONTESTANTS: tuple[Name, ...] = get_args(Name)  # in the order above
DEFAULT_CONTESTANTS = CONTESTANTS
HUBPROXIES: tuple[Name, ...] = ("hubproxy-pass", "hubproxy-miss", "hubproxy-hit")
FLOORS: tuple[Name, ...] = ("floor-pass", "floor-miss", "floor-hit")
# Which instance serves a run: a fresh empty-cache hubproxy per run, a primed one, or a
# long-lived one.
Instance = Literal["cold", "hit", "steady"]
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Spec:
    """How the instance serving one contestant in one case is started (pure data)."""

    key: tuple[str, ...]  # runs with equal keys share one process
    instance: Instance
    cache: bool = False  # hubproxy: blob cache on
    workers: str | None = None  # hubproxy: the --workers value passed, if any
    pinned: bool = False  # on CPU 0 only (and nginx with one worker)


def parse_contestants(text: str) -> list[Name]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    chosen: list[Name] = []
    for name in names:
        match = next((c for c in CONTESTANTS if c == name), None)
        if match is None:
            raise ValueError(f"unknown contestant {name!r}: choose from {', '.join(CONTESTANTS)}")
        if match in chosen:
            raise ValueError(f"contestant {name!r} named twice")
        chosen.append(match)
    if not chosen:
        raise ValueError("no contestants given")
    return chosen


def spec_for(name: Name, case: Case, has_workers: bool) -> Spec | None:
    """The instance serving ``name`` in ``case``; None when the pairing is not measured: a miss
    of small requests (only the first would miss), and in a pinned case anything but the miss,
    the hit and nginx-tuned (the floors too). ``has_workers``: hubproxy's ``--help`` lists
    ``--workers``."""
    if case.pinned and name not in ("hubproxy-miss", "hubproxy-hit", "nginx-tuned"):
        return None
    if case.kind == "small" and name in ("hubproxy-miss", "floor-miss"):
        return None
    if name == "floor-hit":  # as many processes as hubproxy runs (its default: auto)
        return Spec((name, case.name), "hit", cache=True, workers="auto")
    if name == "floor-miss":  # restarted before each run, as hubproxy-miss: its pool cold
        return Spec((name, case.name), "cold", cache=True, workers="auto")
    if name == "floor-pass":
        return Spec((name, case.transport, case.kind), "steady", workers="auto")
    workers: str | None = None
    if has_workers and case.pinned:
        workers = "1"
    elif has_workers and case.kind == "small":
        workers = "auto"
    pin = "cpu0" if case.pinned else ""
    if name == "hubproxy-miss":
        return Spec((name, case.name), "cold", cache=True, workers=workers, pinned=case.pinned)
    if name == "hubproxy-hit":  # one per case: its memory is that case's alone
        return Spec((name, case.name), "hit", cache=True, workers=workers, pinned=case.pinned)
    if name == "hubproxy-pass":
        key = (name, case.transport, case.kind, workers or "", pin)
        return Spec(key, "steady", workers=workers, pinned=case.pinned)
    return Spec((name, case.transport, pin), "steady", pinned=case.pinned)


def instance_for(name: Name, case: Case) -> Instance | None:
    """Which kind of instance serves ``name`` in ``case`` (None: not measured)."""
    spec = spec_for(name, case, has_workers=False)
    return spec.instance if spec else None


def _listener(port: int, transport: Transport, fixtures: Fixtures) -> list[str]:
    """A contestant's listener flags, hubproxy's and the floor's alike: loopback, and the bench
    certificate when the client side is TLS."""
    flags = ["--listen", f"127.0.0.1:{port}"]
    if transport == "tls":
        flags += ["--cert", str(fixtures.tls.cert_pem), "--key", str(fixtures.tls.key_pem)]
    return flags


def floor_argv(
    port: int,
    transport: Transport,
    upstream: str,
    fixtures: Fixtures,
    mode: str,
    directory: Path | None,
    python: str = sys.executable,
    processes: str | None = None,
) -> list[str]:
    """The command line of :mod:`bench.floorproxy` in ``mode`` (pass, miss or hit), as
    :func:`hubproxy_argv`'s: the same listener, certificate and origin (``processes``: its
    ``--processes``, as hubproxy's ``--workers``)."""
    argv = [python, "-m", "bench.floorproxy", *_listener(port, transport, fixtures)]
    argv += ["--upstream", upstream, "--upstream-ca", str(fixtures.tls.ca_pem), "--mode", mode]
    if directory is not None:
        argv += ["--dir", str(directory)]
    if processes is not None:
        argv += ["--processes", processes]
    return argv


def hubproxy_argv(
    port: int,
    transport: Transport,
    upstream: str,
    fixtures: Fixtures,
    cache_dir: Path | None,
    python: str = sys.executable,
    workers: str | None = None,
) -> list[str]:
    """The command line users run, pointed at our origin (``cache_dir`` None: ``--no-cache``;
    ``workers``: ``--workers`` with that value)."""
    argv = [python, "-m", "hubproxy", *_listener(port, transport, fixtures)]
    argv += [
        "--upstream",
        upstream,
        "--upstream-ca",
        str(fixtures.tls.ca_pem),
        "--no-library-prefix",
        "--log-level",
        "warning",
    ]
    if workers is not None:
        argv += ["--workers", workers]
    return [*argv, "--cache-dir", str(cache_dir)] if cache_dir else [*argv, "--no-cache"]


def lists_flag(help_text: str, flag: str) -> bool:
    """Whether ``--help`` output documents ``flag`` (as a whole option, not a prefix)."""
    return any(
        word.rstrip(",") == flag or word.startswith(flag + "=")
        for line in help_text.splitlines()
        for word in line.split()
    )


def hubproxy_has_workers(python: str = sys.executable) -> bool:
    """Whether this checkout's hubproxy takes ``--workers`` (it may predate the flag)."""
    try:
        proc = subprocess.run(
            [python, "-m", "hubproxy", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO_ROOT,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and lists_flag(proc.stdout, "--workers")


@dataclass(frozen=True)
class Endpoint:
    contestant: Name
    transport: Transport
    base_url: str
    follow_redirects: bool
    process: procs.Started | None
    cache_dir: Path | None = None
    argv: tuple[str, ...] = ()

    def pids(self) -> list[int]:
        """The process and all its descendants now (nginx workers, hubproxy workers)."""
        return self.process.pids() if self.process else []


@dataclass
class Contestants:
    """Starts endpoints lazily and keeps them until ``stack`` closes; ``cache_base`` holds
    hubproxy's cache directories."""

    nginx: str
    root: Path
    cache_base: Path
    fixtures: Fixtures
    origin: Origin
    stack: contextlib.ExitStack
    has_workers: bool = False
    started: dict[tuple[str, ...], Endpoint] = field(default_factory=dict)
    restarts: int = 0

    def spec(self, name: Name, case: Case) -> Spec | None:
        return spec_for(name, case, self.has_workers)

    def endpoint(self, name: Name, case: Case) -> Endpoint | None:
        """The endpoint for a run of ``case``, started if needed (None: not applicable)."""
        spec = self.spec(name, case)
        if spec is None:
            return None
        if spec.key not in self.started:
            self.started[spec.key] = self._start(name, case.transport, spec)
        return self.started[spec.key]

    def fresh(self, name: Name, case: Case) -> Endpoint | None:
        """Like :meth:`endpoint`, but a ``cold`` hubproxy is restarted on an empty cache."""
        spec = self.spec(name, case)
        if spec is not None and spec.instance == "cold" and spec.key in self.started:
            old = self.started.pop(spec.key)
            assert old.process is not None
            procs.stop(old.process)
            if old.cache_dir is not None:
                shutil.rmtree(old.cache_dir, ignore_errors=True)
            self.restarts += 1
        return self.endpoint(name, case)

    def _start(self, name: Name, transport: Transport, spec: Spec) -> Endpoint:
        scheme = "https" if transport == "tls" else "http"
        if name == "direct":
            return Endpoint(name, transport, self.origin.registry_url(transport), True, None)
        port = procs.free_port()
        cpus = {PINNED_CPU} if spec.pinned else None
        cache_dir: Path | None = None
        label = "-".join(part for part in spec.key if part)
        if name in HUBPROXIES:
            if spec.cache:
                cache_dir = self.cache_base / f"cache-{label}-{self.restarts}"
            log = self.root / f"{label}.log"
            upstream = self.origin.registry_url("tls")
            argv = hubproxy_argv(
                port, transport, upstream, self.fixtures, cache_dir, workers=spec.workers
            )
            started = procs.start(label, argv, log, self.stack, cwd=REPO_ROOT, cpus=cpus)
        elif name in FLOORS:
            if spec.cache:
                cache_dir = self.cache_base / f"cache-{label}"
            argv = floor_argv(
                port,
                transport,
                self.origin.registry_url("tls"),
                self.fixtures,
                name.removeprefix("floor-"),
                cache_dir,
                processes=spec.workers,
            )
            log = self.root / f"{label}.log"
            started = procs.start(label, argv, log, self.stack, cwd=REPO_ROOT)
        else:
            prefix = self.root / label
            prepare_prefix(prefix)
            conf = prefix / "nginx.conf"
            conf.write_text(
                render_contestant(
                    "recipe" if name == "nginx-recipe" else "tuned",
                    prefix,
                    port,
                    transport == "tls",
                    self.origin.ports.registry_tls,
                    self.fixtures.tls.ca_pem,
                    self.fixtures.tls.cert_pem,
                    self.fixtures.tls.key_pem,
                    # `auto` counts online CPUs, not the ones it may run on
                    workers="1" if spec.pinned else "auto",
                )
            )
            argv = nginx_argv(self.nginx, prefix, conf)
            started = procs.start(label, argv, prefix / "out.log", self.stack, cpus=cpus)
        procs.wait_listening(started, [port])
        url = f"{scheme}://127.0.0.1:{port}"
        if name in HUBPROXIES or name in FLOORS:
            # a miss run follows a restart: its first request and the start-up work still under
            # way (the check of the upstreams) belong to the start, not to the run
            _warm_up(url + "/healthz", self.fixtures.tls.ca_pem)
            procs.wait_quiet(started)
        return Endpoint(name, transport, url, False, started, cache_dir, tuple(argv))

    def logs(self) -> dict[str, Path]:
        """Per started instance, the file its warnings and errors go to."""
        out: dict[str, Path] = {}
        for endpoint in self.started.values():
            if endpoint.process is None:
                continue
            if endpoint.contestant in HUBPROXIES or endpoint.contestant in FLOORS:
                out[endpoint.process.name] = endpoint.process.log
            else:
                out[endpoint.process.name] = endpoint.process.log.parent / "error.log"
        return out


def cached_blobs(cache_dir: Path, hex_digests: Sequence[str]) -> int:
    """How many of the blobs have a file named by their digest under ``cache_dir``."""
    wanted = set(hex_digests)
    found = 0
    for _, _, files in os.walk(cache_dir):
        found += len(wanted.intersection(files))
    return found


def _warm_up(url: str, ca_pem: Path) -> None:
    """One request, answered or not (a fresh process loads what its first request needs)."""
    context = ssl.create_default_context(cafile=str(ca_pem))
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5, context=context):
        pass
