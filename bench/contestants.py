"""The contestants, each in front of the same origin, started on first use per transport.

- ``hubproxy``: ``python -m hubproxy`` as users run it (TLS listener unless plain HTTP, upstream
  the origin's TLS registry verified against the bench CA, ``--log-level warning``, its blob
  cache on, as by default, in a directory of ours). For every run of a miss case it is
  restarted on an empty cache directory (untimed), so each run is a first pull; for ``-hit``
  cases a separate long-lived instance serves blobs it was primed with;
- ``hubproxy-nocache`` (optional): the same with ``--no-cache``: the pure streaming path;
- ``nginx-recipe`` / ``nginx-tuned``: one nginx instance each (own prefix, config and pid), see
  :mod:`bench.nginxconf`;
- ``direct``: no proxy; the client talks to the origin itself and follows the 307 to the CDN:
  the ceiling on this machine.

Client-to-proxy is TLS or plain HTTP per case; proxy-to-origin is always TLS.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bench import procs
from bench.cases import Case, Transport
from bench.fixtures import Fixtures
from bench.nginxconf import render_contestant
from bench.origin import Origin, nginx_argv, prepare_prefix

Name = Literal["hubproxy", "hubproxy-nocache", "nginx-recipe", "nginx-tuned", "direct"]
CONTESTANTS: tuple[Name, ...] = (
    "hubproxy",
    "hubproxy-nocache",
    "nginx-recipe",
    "nginx-tuned",
    "direct",
)
DEFAULT_CONTESTANTS: tuple[Name, ...] = ("hubproxy", "nginx-recipe", "nginx-tuned", "direct")
# Which instance serves a run: a fresh empty-cache hubproxy per run, a primed one, or the one
# long-lived instance of a contestant.
Instance = Literal["cold", "hit", "steady"]
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Endpoint:
    contestant: Name
    transport: Transport
    base_url: str
    follow_redirects: bool
    process: procs.Started | None
    cache_dir: Path | None = None

    def pids(self) -> list[int]:
        return self.process.pids() if self.process else []


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


def instance_for(name: Name, case: Case) -> Instance | None:
    """The instance serving ``name`` in ``case``; None when the pairing makes no sense (a
    cache-hit case for the contestant without a cache)."""
    if name == "hubproxy":
        return "hit" if case.hit else "cold"
    if name == "hubproxy-nocache" and case.hit:
        return None
    return "steady"


def hubproxy_argv(
    port: int,
    transport: Transport,
    upstream: str,
    fixtures: Fixtures,
    cache_dir: Path | None,
    python: str = sys.executable,
) -> list[str]:
    """The command line users run, pointed at our origin (``cache_dir`` None: ``--no-cache``)."""
    argv = [python, "-m", "hubproxy", "--listen", f"127.0.0.1:{port}"]
    if transport == "tls":
        argv += ["--cert", str(fixtures.tls.cert_pem), "--key", str(fixtures.tls.key_pem)]
    argv += [
        "--upstream",
        upstream,
        "--upstream-ca",
        str(fixtures.tls.ca_pem),
        "--no-library-prefix",
        "--log-level",
        "warning",
    ]
    return [*argv, "--cache-dir", str(cache_dir)] if cache_dir else [*argv, "--no-cache"]


# (contestant, transport, instance, case name for a cache-hit instance: one per case, so that
# its memory is that case's alone)
Key = tuple[Name, Transport, Instance, str]


def instance_key(name: Name, case: Case) -> Key | None:
    instance = instance_for(name, case)
    if instance is None:
        return None
    return (name, case.transport, instance, case.name if instance == "hit" else "")


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
    started: dict[Key, Endpoint] = field(default_factory=dict)
    restarts: int = 0

    def endpoint(self, name: Name, case: Case) -> Endpoint | None:
        """The endpoint for a run of ``case``, started if needed (None: not applicable)."""
        key = instance_key(name, case)
        if key is None:
            return None
        if key not in self.started:
            self.started[key] = self._start(*key)
        return self.started[key]

    def fresh(self, name: Name, case: Case) -> Endpoint | None:
        """Like :meth:`endpoint`, but a ``cold`` hubproxy is restarted on an empty cache."""
        key = instance_key(name, case)
        if key is not None and key[2] == "cold" and key in self.started:
            old = self.started.pop(key)
            assert old.process is not None
            procs.stop(old.process)
            if old.cache_dir is not None:
                shutil.rmtree(old.cache_dir, ignore_errors=True)
            self.restarts += 1
        return self.endpoint(name, case)

    def _start(self, name: Name, transport: Transport, instance: Instance, tag: str) -> Endpoint:
        scheme = "https" if transport == "tls" else "http"
        if name == "direct":
            return Endpoint(name, transport, self.origin.registry_url(transport), True, None)
        port = procs.free_port()
        cache_dir: Path | None = None
        if name in ("hubproxy", "hubproxy-nocache"):
            label = f"{name}-{transport}"
            if name == "hubproxy":
                label += f"-{instance}" + (f"-{tag}" if tag else "")
            if name == "hubproxy":
                cache_dir = self.cache_base / f"cache-{label}-{self.restarts}"
            log = self.root / f"{label}.log"
            upstream = self.origin.registry_url("tls")
            argv = hubproxy_argv(port, transport, upstream, self.fixtures, cache_dir)
            started = procs.start(label, argv, log, self.stack, cwd=REPO_ROOT)
        else:
            prefix = self.root / f"{name}-{transport}"
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
                )
            )
            argv = nginx_argv(self.nginx, prefix, conf)
            started = procs.start(f"{name}-{transport}", argv, prefix / "out.log", self.stack)
        procs.wait_listening(started, [port])
        url = f"{scheme}://127.0.0.1:{port}"
        return Endpoint(name, transport, url, False, started, cache_dir)

    def logs(self) -> dict[str, Path]:
        """Per started instance, the file its warnings and errors go to."""
        out: dict[str, Path] = {}
        for (name, transport, _, _), endpoint in self.started.items():
            if endpoint.process is None:
                continue
            if name.startswith("hubproxy"):
                out[endpoint.process.name] = endpoint.process.log
            else:
                out[endpoint.process.name] = self.root / f"{name}-{transport}" / "error.log"
        return out


def cached_blobs(cache_dir: Path, hex_digests: list[str]) -> int:
    """How many of the blobs have a file named by their digest under ``cache_dir``."""
    wanted = set(hex_digests)
    found = 0
    for _, _, files in os.walk(cache_dir):
        found += len(wanted.intersection(files))
    return found
