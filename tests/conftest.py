"""Shared fixtures: a trustme CA, the fake Docker Hub, and hubproxy itself, all in-process on
127.0.0.1 with real sockets and real TLS."""

from __future__ import annotations

import ssl
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from hubproxy.app import App, serve
from hubproxy.config import Config, Timeouts
from hubproxy.net.server import Server
from hubproxy.policy.urls import base_url
from hubproxy.prefetch import wait_fills
from hubproxy.proxy import Proxy
from tests.fakehub import FakeHub


@dataclass(frozen=True)
class TLSFiles:
    ca_pem: Path  # the trustme CA, trusted by clients and by hubproxy for upstreams
    cert_pem: Path  # hubproxy's server certificate for 127.0.0.1 / localhost / ::1
    key_pem: Path
    cert_dir: Path  # a directory holding ca.crt, as skopeo's --src-cert-dir wants


@dataclass
class RunningProxy:
    url: str  # how clients reach it, e.g. "https://127.0.0.1:41234"
    app: App
    config: Config

    @property
    def server(self) -> Server:
        return self.app.server

    @property
    def proxy(self) -> Proxy:
        return self.app.proxy

    @property
    def port(self) -> int:
        return self.server.bound[0][1]

    async def fills_ended(self) -> None:
        """Wait until every blob fill under way committed its file (or failed): a client's
        pull completes once the blob verified, a moment before the cache synced and renamed
        it (and put it in a ``--cache-store``)."""
        with trio.fail_after(10):
            await wait_fills(self.proxy.pullthrough)


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    root = tmp_path_factory.mktemp("tls")
    ca_pem = root / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    cert = ca.issue_cert("127.0.0.1", "localhost", "::1")
    cert_pem = root / "server.pem"
    key_pem = root / "server-key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_pem))
    cert.private_key_pem.write_to_path(str(key_pem))
    cert_dir = root / "certs.d"
    cert_dir.mkdir()
    ca.cert_pem.write_to_path(str(cert_dir / "ca.crt"))
    return TLSFiles(ca_pem, cert_pem, key_pem, cert_dir)


@pytest.fixture
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
async def hub(nursery: trio.Nursery, ca: trustme.CA) -> FakeHub:
    fake = FakeHub(ca)
    await nursery.start(fake.serve)
    return fake


@pytest.fixture
async def ghcr(nursery: trio.Nursery, ca: trustme.CA) -> FakeHub:
    """ghcr.io's layout: the token service on the registry origin, blobs on a CDN."""
    fake = FakeHub(ca, service="ghcr.io", auth_layout="same-host")
    fake.ratelimit_limit = None  # rate-limit headers are Docker Hub's
    await nursery.start(fake.serve)
    return fake


@pytest.fixture
async def htpasswd(nursery: trio.Nursery, ca: trustme.CA) -> FakeHub:
    """registry:2 with htpasswd: Basic auth everywhere, blobs served by the registry."""
    fake = FakeHub(ca, auth_layout="basic")
    fake.ratelimit_limit = None
    await nursery.start(fake.serve)
    return fake


StartProxy = Callable[..., Awaitable[RunningProxy]]


def make_config(hub: FakeHub, tls_files: TLSFiles, *, tls: bool = True, **overrides: Any) -> Config:
    fallbacks = tuple(base_url(u) for u in overrides.pop("fallbacks", ()))
    upstream = base_url(overrides.pop("upstream", hub.registry_url))
    timeouts = replace(Timeouts(), **overrides.pop("timeouts", {}))
    config = Config(
        listen_host="127.0.0.1",
        listen_port=0,
        cert=str(tls_files.cert_pem) if tls else None,
        key=str(tls_files.key_pem) if tls else None,
        upstreams=(upstream, *fallbacks),
        index_url=base_url(hub.registry_url),
        library_prefix=True,
        upstream_ca=str(tls_files.ca_pem),
        timeouts=timeouts,
    )
    return replace(config, **overrides)


# What an AWS tool reads for the test S3 server (moto takes any keys); the shared config files
# point nowhere, so a developer's own profile never leaks into a test
AWS_TEST_ENV: Mapping[str, str] = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
}


def aws_environment(directory: Path) -> dict[str, str]:
    """The AWS variables of a test process, its absent shared files under ``directory``."""
    return {
        **AWS_TEST_ENV,
        "AWS_CONFIG_FILE": str(directory / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(directory / "no-aws-credentials"),
    }


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (an ephemeral port), for the whole session."""
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    found: list[str] = []
    ready = threading.Event()

    def drain(lines: Iterator[str]) -> None:
        # read it all (its request log must never fill the pipe), noting the address once
        for line in lines:
            if not found and "Running on http://" in line:
                found.append(line.split("Running on ", 1)[1].strip())
                ready.set()
        ready.set()

    threading.Thread(target=drain, args=(process.stdout,), daemon=True).start()
    try:
        assert ready.wait(30) and found, "moto's server did not start"
        yield found[0].rstrip("/")
    finally:
        process.terminate()
        process.wait(10)
        process.stdout.close()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """This process reads the test S3 server's keys and region (``aws_environment``)."""
    for name, value in aws_environment(tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
def start_proxy(nursery: trio.Nursery, hub: FakeHub, tls_files: TLSFiles) -> StartProxy:
    """Start hubproxy in front of ``hub``; keyword arguments override Config fields."""

    async def start(*, tls: bool = True, **overrides: Any) -> RunningProxy:
        config = make_config(hub, tls_files, tls=tls, **overrides)
        app: App = await nursery.start(serve, config)
        host, port = app.server.bound[0]
        scheme = "https" if tls else "http"
        return RunningProxy(f"{scheme}://{host}:{port}", app, config)

    return start


class Canary:
    """A listener that only counts connections: where a request must never go."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0

    async def serve(
        self,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]

        async def record(stream: trio.SocketStream) -> None:
            self.connections += 1
            await stream.aclose()

        await trio.serve_listeners(record, listeners, task_status=task_status)


@pytest.fixture
async def canary(nursery: trio.Nursery) -> Canary:
    bird = Canary()
    await nursery.start(bird.serve)
    return bird
