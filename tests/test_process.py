"""hubproxy as users run it: a process started from the command line, its startup line, its
access log, and a graceful stop on SIGTERM; plus the in-process shutdown drain."""

from __future__ import annotations

import contextlib
import hashlib
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trustme

from hubproxy.net.buffers import auto_budget
from hubproxy.ops.memory import machine_memory
from hubproxy.policy.sizes import describe_size
from tests.conftest import StartProxy, TLSFiles
from tests.fakehub import FakeHub, make_layer
from tests.registry_client import RegistryClient
from tests.wire import WireClient


async def _read_until(
    stream: trio.abc.ReceiveStream, pattern: re.Pattern[bytes], seen: bytearray
) -> re.Match[bytes]:
    while (match := pattern.search(seen)) is None:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise AssertionError(
                f"process output ended without {pattern.pattern!r}:\n{seen.decode()}"
            )
        seen += chunk
    return match


@dataclass
class HubproxyProcess:
    """``python -m hubproxy`` running on 127.0.0.1, with its log read as it comes."""

    process: trio.Process
    url: str
    output: bytearray

    async def wait_for(self, pattern: bytes) -> re.Match[bytes]:
        assert self.process.stderr is not None
        return await _read_until(self.process.stderr, re.compile(pattern), self.output)


@asynccontextmanager
async def hubproxy_process(*args: str) -> AsyncIterator[HubproxyProcess]:
    """Start hubproxy with ``args`` on an ephemeral port; kill it on the way out if needed."""
    argv = [sys.executable, "-m", "hubproxy", "--listen", "127.0.0.1:0", *args]
    process = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE)
    assert process.stderr is not None
    output = bytearray()
    try:
        with trio.fail_after(30):
            match = await _read_until(
                process.stderr, re.compile(rb"listening on (https?://127\.0\.0\.1:\d+)"), output
            )
        yield HubproxyProcess(process, match.group(1).decode(), output)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await process.stderr.aclose()


async def test_command_line_process_serves_and_stops_on_sigterm(
    hub: FakeHub, ca: trustme.CA, tls_files: TLSFiles, tmp_path: Path
) -> None:
    layer = make_layer(1, 100_000)
    hub.add_image("library/alpine", "3.20", [layer])
    async with hubproxy_process(
        *("--cert", str(tls_files.cert_pem), "--key", str(tls_files.key_pem)),
        *("--upstream", hub.registry_url, "--upstream-ca", str(tls_files.ca_pem)),
        *("--library-prefix", "--cache-dir", str(tmp_path / "cache")),
    ) as running:
        with trio.fail_after(30):
            assert f"upstream {hub.registry_url}".encode() in running.output
            # --body-memory auto: this machine's share, which the process took as its budget
            auto = describe_size(auto_budget(machine_memory()))
            assert f"; body buffers {auto}\n".encode() in running.output
            client = RegistryClient(running.url, ca)
            digest = "sha256:" + hashlib.sha256(layer).hexdigest()
            r = await client.request(f"/v2/alpine/blobs/{digest}")
            assert r.status == 200 and r.body == layer
            await running.wait_for(
                rb"127\.0\.0\.1 GET /v2/alpine/blobs/sha256:\w+ 200 100\d{3}B \d+ms"
            )
            running.process.send_signal(signal.SIGTERM)
            await running.wait_for(rb"SIGTERM: no longer accepting")
            assert await running.process.wait() == 0


async def test_bad_arguments_give_a_clear_error(tls_files: TLSFiles) -> None:
    result = await trio.run_process(
        [sys.executable, "-m", "hubproxy", "--cert", "/nonexistent.pem"],
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 2
    assert b"hubproxy: error: --cert: cannot read '/nonexistent.pem'" in result.stderr
    assert b"Traceback" not in result.stderr


async def test_port_in_use_is_one_clear_line(tls_files: TLSFiles) -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    try:
        result = await trio.run_process(
            [sys.executable, "-m", "hubproxy", "--listen", f"127.0.0.1:{port}", "--no-cache"],
            capture_stderr=True,
            check=False,
        )
    finally:
        await listener.aclose()
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}".encode() in result.stderr
    assert b"Traceback" not in result.stderr


async def test_shutdown_lets_in_flight_transfers_finish(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    big = make_layer(4, 8 * 1024 * 1024)
    hub.add_image("library/alpine", "3.20", [big])
    proxy = await start_proxy()
    reg = RegistryClient(proxy.url, ca)
    assert (await reg.request("/v2/library/alpine/tags/list")).status == 200
    token = reg.tokens[""]
    idle = await WireClient.connect(proxy.url, ca)  # a kept-alive connection, between requests
    _head, _ = await idle.request("GET", "/v2/")
    busy = await WireClient.connect(proxy.url, ca)
    digest = "sha256:" + hashlib.sha256(big).hexdigest()
    await busy.send_request(
        "GET", f"/v2/library/alpine/blobs/{digest}", [("authorization", f"Bearer {token}")]
    )
    assert (await busy.receive_head()).status_code == 200
    first = await busy.receive_body(limit=64 * 1024)
    proxy.server.shutdown()
    with trio.fail_after(20):
        rest = await busy.receive_body()
        assert hashlib.sha256(first + rest).hexdigest() == digest.removeprefix("sha256:")
        while proxy.server.connections:  # the idle one is closed, the busy one finishes
            await proxy.server.wait_connections_changed()
    try:
        await trio.open_tcp_stream("127.0.0.1", proxy.port)
    except OSError:
        pass
    else:
        raise AssertionError("the listener still accepts after shutdown")
    await idle.aclose()
    await busy.aclose()


async def test_unusable_cache_dir_is_one_clear_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = await trio.run_process(
        [sys.executable, "-m", "hubproxy", "--listen", "127.0.0.1:0", "--cache-dir", str(blocker)],
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 1
    assert f"cannot use the cache directory {blocker}".encode() in result.stderr
    assert b"Traceback" not in result.stderr


async def test_a_fill_killed_half_way_leaves_no_blob_and_restart_cleans_up(
    nursery: trio.Nursery, ca: trustme.CA, tmp_path: Path
) -> None:
    """A real crash: SIGKILL while a blob is being cached, then a restart on the same cache."""
    blob = make_layer(5, 4 * 1024 * 1024)
    digest = hashlib.sha256(blob).hexdigest()
    half_sent = trio.Event()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def stalling_upstream(stream: trio.SocketStream) -> None:
        # answers a request with the blob's headers and half its body, then stalls
        with contextlib.suppress(trio.BrokenResourceError):
            request = b""
            while b"\r\n\r\n" not in request:
                request += await stream.receive_some(65536)
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                b"content-length: %d\r\n\r\n" % len(blob) + blob[: len(blob) // 2]
            )
            half_sent.set()
            await trio.sleep_forever()

    nursery.start_soon(trio.serve_listeners, stalling_upstream, listeners)
    cache = tmp_path / "cache"
    argv = [
        sys.executable,
        "-m",
        "hubproxy",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        f"http://127.0.0.1:{port}",
        "--no-library-prefix",
        "--cache-dir",
        str(cache),
    ]
    process = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE)
    assert process.stderr is not None
    output = bytearray()
    try:
        with trio.fail_after(30):
            match = await _read_until(
                process.stderr, re.compile(rb"listening on (http://127\.0\.0\.1:\d+)"), output
            )
            client = await WireClient.connect(match.group(1).decode(), ca)
            await client.send_request("GET", f"/v2/x/blobs/sha256:{digest}")
            assert (await client.receive_head()).status_code == 200
            await half_sent.wait()
            partial = await client.receive_body(limit=1024 * 1024)
            assert 0 < len(partial) < len(blob)
            assert list((cache / "tmp").iterdir())  # the fill's temporary file
            process.kill()
            await process.wait()
            await client.aclose()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await process.stderr.aclose()
    assert not (cache / "blobs" / "sha256" / digest[:2] / digest).exists()
    restarted = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE)
    assert restarted.stderr is not None
    try:
        with trio.fail_after(30):
            await _read_until(restarted.stderr, re.compile(rb"listening on"), bytearray())
        assert list((cache / "tmp").iterdir()) == []  # the crash's leftovers are gone
        assert not (cache / "blobs" / "sha256" / digest[:2] / digest).exists()
    finally:
        restarted.kill()
        await restarted.wait()
        await restarted.stderr.aclose()


async def test_sighup_reloads_the_certificate_without_dropping_connections(
    hub: FakeHub, ca: trustme.CA, tmp_path: Path
) -> None:
    """An ACME renewal: new files + SIGHUP. New handshakes get the new certificate, an open
    keep-alive connection goes on serving, and unusable files keep the old certificate."""
    cert, key = tmp_path / "server.pem", tmp_path / "server-key.pem"
    first = ca.issue_cert("127.0.0.1")
    first.cert_chain_pems[0].write_to_path(str(cert))
    first.private_key_pem.write_to_path(str(key))
    renewed_ca = trustme.CA()  # the renewed certificate is trusted only through this CA
    upstream_ca = tmp_path / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(upstream_ca))
    async with hubproxy_process(
        *("--cert", str(cert), "--key", str(key), "--no-cache"),
        *("--upstream", hub.registry_url, "--upstream-ca", str(upstream_ca)),
    ) as running:
        process, url = running.process, running.url
        with trio.fail_after(30):
            kept = await WireClient.connect(url, ca)
            head, _ = await kept.request("GET", "/v2/")
            assert head.status_code == 401

            renewed = renewed_ca.issue_cert("127.0.0.1")
            renewed.cert_chain_pems[0].write_to_path(str(cert))
            renewed.private_key_pem.write_to_path(str(key))
            process.send_signal(signal.SIGHUP)
            await running.wait_for(rb"SIGHUP: reloaded")

            fresh = await WireClient.connect(url, renewed_ca)
            head, _ = await fresh.request("GET", "/v2/")
            assert head.status_code == 401
            await fresh.aclose()
            with pytest.raises(trio.BrokenResourceError):
                await WireClient.connect(url, ca)  # the old CA no longer vouches for it
            head, _ = await kept.request("GET", "/v2/")  # the old connection still serves
            assert head.status_code == 401

            cert.write_text("not a certificate\n")
            process.send_signal(signal.SIGHUP)
            line = await running.wait_for(rb"SIGHUP: cannot load the certificate[^\n]*")
            assert line.group(0).decode() == (
                f"SIGHUP: cannot load the certificate: {cert} is not a PEM certificate (no "
                "-----BEGIN CERTIFICATE----- line); still serving the old one (fix the files and "
                "send SIGHUP again)"
            )
            fresh = await WireClient.connect(url, renewed_ca)
            head, _ = await fresh.request("GET", "/v2/")
            assert head.status_code == 401
            await fresh.aclose()
            await kept.aclose()
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
