"""The origin: one nginx instance playing Docker Hub's registry and CDN on four ports."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from bench import procs
from bench.cases import Transport
from bench.fixtures import Fixtures
from bench.nginxconf import OriginPorts, render_origin


@dataclass(frozen=True)
class Origin:
    ports: OriginPorts
    process: procs.Started

    def registry_url(self, transport: Transport) -> str:
        if transport == "tls":
            return f"https://127.0.0.1:{self.ports.registry_tls}"
        return f"http://127.0.0.1:{self.ports.registry_http}"


def nginx_argv(nginx: str, prefix: Path, conf: Path) -> list[str]:
    """Foreground nginx (so it is our child) with its own prefix, config and error log."""
    return [
        nginx,
        "-p",
        str(prefix),
        "-c",
        str(conf),
        "-e",
        str(prefix / "error.log"),
        "-g",
        "daemon off;",
    ]


def prepare_prefix(prefix: Path) -> None:
    for sub in ("tmp", "tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    prefix.chmod(0o755)
    (prefix / "tmp").chmod(0o777)


def start_origin(
    nginx: str,
    root: Path,
    fixtures: Fixtures,
    stack: contextlib.ExitStack,
    cdn_log: Path | None = None,
) -> Origin:
    """The origin nginx, started; ``cdn_log``: where its CDN logs each request's bytes
    (:func:`bench.nginxconf.render_origin`)."""
    prefix = root / "origin"
    prepare_prefix(prefix)
    ports = OriginPorts(*(procs.free_port() for _ in range(4)))
    conf = prefix / "nginx.conf"
    conf.write_text(
        render_origin(
            prefix,
            ports,
            fixtures.blob_dir,
            fixtures.manifest_path,
            fixtures.manifest_digest,
            fixtures.tls.cert_pem,
            fixtures.tls.key_pem,
            big_manifest=(
                (fixtures.big_manifest_path, fixtures.big_manifest_digest)
                if fixtures.big_manifest_path is not None
                else None
            ),
            big_manifest_dir=fixtures.big_manifest_dir,
            cdn_log=cdn_log,
        )
    )
    started = procs.start(
        "origin nginx", nginx_argv(nginx, prefix, conf), prefix / "out.log", stack
    )
    procs.wait_listening(
        started, [ports.registry_tls, ports.registry_http, ports.cdn_tls, ports.cdn_http]
    )
    return Origin(ports, started)
