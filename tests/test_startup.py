"""The first minutes of a mirror: certificate and key files explained in words, the lines a
start writes (who may use it, an expired certificate, a port it cannot listen on), what
check-config refuses, and the TLS port's lines about clients that cannot talk to it (a client
that does not trust the certificate, plain HTTP sent to it)."""

from __future__ import annotations

import datetime
import errno
import ipaddress
import json
import logging
import os
import pwd
import shutil
import socket
import ssl
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

from hubproxy.app import listen_problem, reload
from hubproxy.net.server import EPISODE, Server
from hubproxy.net.streams import (
    CertificateError,
    Validity,
    certificate_validity,
    der_validity,
    server_ssl_context,
)
from hubproxy.net.tls import TLSStream
from hubproxy.ops.usersfile import add_user
from hubproxy.policy.access import NetworkList
from tests.conftest import StartProxy, TLSFiles
from tests.fakehub import FakeHub, make_layer
from tests.registry_client import RegistryClient

UTC = datetime.UTC
PAST = datetime.datetime(2020, 1, 1, tzinfo=UTC)
FUTURE = datetime.datetime(2100, 1, 1, tzinfo=UTC)


def write_pair(directory: Path, cert: trustme.LeafCert, name: str = "server") -> tuple[str, str]:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return str(cert_path), str(key_path)


async def hubproxy(*args: str, user: int | None = None) -> tuple[int, str]:
    """Run ``python -m hubproxy ARGS`` (as ``user``, if given); (exit status, stderr)."""
    argv = [sys.executable, "-m", "hubproxy", *args]
    if user is not None:
        if shutil.which("setpriv") is None:
            pytest.skip("running as another user needs setpriv (util-linux)")
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    result = await trio.run_process(argv, capture_stderr=True, check=False, cwd="/")
    return result.returncode, result.stderr.decode()


# ---------------------------------------------------------------- certificate and key files


def test_certificate_and_key_problems_are_said_in_words(
    ca: trustme.CA, tls_files: TLSFiles, tmp_path: Path
) -> None:
    cert, key = str(tls_files.cert_pem), str(tls_files.key_pem)
    _, other_key = write_pair(tmp_path, ca.issue_cert("other.example"), "other")
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    der = tmp_path / "server.der"
    der.write_bytes(ssl.PEM_cert_to_DER_cert(tls_files.cert_pem.read_text()))
    damaged = tmp_path / "damaged.pem"
    damaged.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    encrypted = tmp_path / "encrypted-key.pem"
    encrypted.write_text(
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n"
    )
    missing = "/nonexistent.pem"
    cases = [
        (missing, key, f"cannot read the certificate file {missing}: No such file or directory"),
        (cert, missing, f"cannot read the key file {missing}: No such file or directory"),
        (tmp_path, key, f"cannot read the certificate file {tmp_path}: Is a directory"),
        (junk, key, f"{junk} is not a PEM certificate (no -----BEGIN CERTIFICATE----- line)"),
        (cert, junk, f"{junk} is not a PEM private key (no -----BEGIN PRIVATE KEY----- line)"),
        (
            der,
            key,
            f"{der} is a binary (DER) certificate, not PEM: convert it with openssl x509 "
            f"-inform der -in {der} -out cert.pem",
        ),
        (
            key,
            cert,
            f"{key} holds a private key, not a certificate (are --cert and --key swapped?)",
        ),
        (cert, cert, f"{cert} holds no private key: give the key file with --key"),
        (
            cert,
            other_key,
            f"the key {other_key} does not match the certificate {cert}: give the key that was "
            "made together with that certificate",
        ),
        (
            cert,
            encrypted,
            f"the key {encrypted} is protected by a passphrase, which hubproxy cannot ask for: "
            f"store it without one (openssl pkey -in {encrypted} -out key.pem)",
        ),
        (
            damaged,
            key,
            f"cannot use the certificate {damaged} with the key {key}: damaged or truncated PEM "
            "data",
        ),
    ]
    for cert_file, key_file, message in cases:
        with pytest.raises(CertificateError) as info:
            server_ssl_context(str(cert_file), str(key_file))
        assert str(info.value) == message
    both = tmp_path / "both.pem"
    both.write_text(tls_files.cert_pem.read_text() + tls_files.key_pem.read_text())
    assert server_ssl_context(str(both), str(both))  # one file holding both is fine


async def test_a_key_that_does_not_match_is_one_line_at_start(
    ca: trustme.CA, tls_files: TLSFiles, tmp_path: Path
) -> None:
    """BEFORE: ``--cert/--key: cannot load the certificate and key: [X509: KEY_VALUES_MISMATCH]
    key values mismatch (_ssl.c:3926)``, or ``[SSL] PEM lib (_ssl.c:3895)`` for the rest."""
    _, other_key = write_pair(tmp_path, ca.issue_cert("other.example"), "other")
    cert = tls_files.cert_pem
    status, stderr = await hubproxy("--cert", str(cert), "--key", other_key, "--no-cache")
    assert status == 2
    assert (
        f"hubproxy: error: --cert/--key: the key {other_key} does not match the certificate "
        f"{cert}: give the key that was made together with that certificate\n"
    ) in stderr
    assert "_ssl.c" not in stderr and "Traceback" not in stderr


def test_the_validity_is_read_from_the_certificate(ca: trustme.CA, tmp_path: Path) -> None:
    early = datetime.datetime(1999, 5, 6, 7, 8, 9, tzinfo=UTC)
    for not_before, not_after in [(PAST, FUTURE), (early, PAST)]:
        issued = ca.issue_cert("a.example", not_before=not_before, not_after=not_after)
        cert, _ = write_pair(tmp_path, issued)
        assert certificate_validity(cert) == Validity(not_before.timestamp(), not_after.timestamp())
    # GeneralizedTime (years from 2050 on) as well as UTCTime
    cert, _ = write_pair(tmp_path, ca.issue_cert("a.example", not_after=FUTURE))
    validity = certificate_validity(cert)
    assert validity is not None and validity.not_after == FUTURE.timestamp()
    assert certificate_validity(str(tmp_path / "missing.pem")) is None
    with pytest.raises(ValueError, match="truncated DER"):
        der_validity(ssl.PEM_cert_to_DER_cert(Path(cert).read_text())[:60])


def test_what_an_expired_or_early_certificate_is_told() -> None:
    validity = Validity(PAST.timestamp(), FUTURE.timestamp())

    def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> float:
        return datetime.datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp()

    assert validity.problem(at(2030, 1, 1), "c.pem") is None
    assert validity.problem(at(2101, 2, 3, 4, 5), "c.pem") == (
        "the certificate c.pem expired on 2100-01-01 00:00 UTC: every client will refuse it; "
        "renew it (certs/README.md)"
    )
    assert validity.problem(at(2019, 2, 3, 4, 5), "c.pem") == (
        "the certificate c.pem is not valid until 2020-01-01 00:00 UTC (this machine's clock "
        "says 2019-02-03 04:05 UTC; is it right?): clients will refuse it until then"
    )


async def test_an_expired_certificate_refuses_to_start(ca: trustme.CA, tmp_path: Path) -> None:
    """BEFORE: it started, said nothing, and every client's handshake failed."""
    cert, key = write_pair(tmp_path, ca.issue_cert("localhost", not_after=PAST))
    status, stderr = await hubproxy(
        "--cert", cert, "--key", key, "--listen", "127.0.0.1:0", "--no-cache"
    )
    assert status == 1
    assert stderr.endswith(
        f"ERROR hubproxy: the certificate {cert} expired on 2020-01-01 00:00 UTC: every client "
        "will refuse it; renew it (certs/README.md), then start again\n"
    )
    assert "listening on" not in stderr


async def test_a_certificate_not_valid_yet_starts_with_a_warning(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not valid yet is mostly a clock not set yet (no battery-backed clock, before NTP): it
    heals by itself, so it starts, with a warning."""
    not_before = datetime.datetime.now(UTC).replace(microsecond=0) + datetime.timedelta(days=2)
    cert, key = write_pair(tmp_path, ca.issue_cert("127.0.0.1", not_before=not_before))
    await start_proxy(cert=cert, key=key)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(
        f"the certificate {cert} is not valid until {not_before:%Y-%m-%d %H:%M} UTC (this "
        "machine's clock says "
    )
    assert warnings[0].endswith("is it right?): clients will refuse it until then")


async def test_sighup_keeps_the_old_certificate_instead_of_an_expired_one(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cert, key = write_pair(tmp_path, ca.issue_cert("127.0.0.1"))
    proxy = await start_proxy(cert=cert, key=key)
    old = proxy.server.ssl_context
    write_pair(tmp_path, ca.issue_cert("127.0.0.1", not_after=PAST))
    reload(proxy.server, proxy.proxy)
    assert proxy.server.ssl_context is old
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        f"SIGHUP: cannot load the certificate: the certificate {cert} expired on 2020-01-01 "
        "00:00 UTC: every client will refuse it; renew it (certs/README.md); still serving the "
        "old one (fix the files and send SIGHUP again)"
    ]


# ---------------------------------------------------------------- listening


def test_each_listen_error_gets_only_its_own_advice() -> None:
    """BEFORE, for all of them: ``cannot listen on HOST:PORT: <strerror> (is the port in use,
    or does it need root?)``."""
    cases = [
        (
            ("0.0.0.0", 5000, OSError(errno.EADDRINUSE, "Address already in use")),
            "cannot listen on 0.0.0.0:5000: the port is in use by another program",
        ),
        (
            ("192.168.1.99", 5000, OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")),
            "cannot listen on 192.168.1.99:5000: 192.168.1.99 is not an address of this machine "
            "(listen on one it has, or on 0.0.0.0 for all of them)",
        ),
        (
            ("::", 443, OSError(errno.EACCES, "Permission denied")),
            "cannot listen on [::]:443: ports below 1024 need root or the CAP_NET_BIND_SERVICE "
            "capability (the systemd unit grants it with AmbientCapabilities=CAP_NET_BIND_SERVICE),"
            " or listen on a port from 1024 up",
        ),
        (
            ("0.0.0.0", 8443, OSError(errno.EACCES, "Permission denied")),
            "cannot listen on 0.0.0.0:8443: Permission denied",
        ),
        (
            ("nas.invalid", 5000, socket.gaierror(socket.EAI_NONAME, "Name or service not known")),
            "cannot listen on nas.invalid:5000: nas.invalid is not an address or a name this "
            "machine can resolve",
        ),
    ]
    for (host, port, exc), line in cases:
        assert listen_problem(host, port, exc) == line


async def test_an_address_of_another_machine_is_one_line() -> None:
    status, stderr = await hubproxy("--listen", "192.0.2.1:5000", "--no-cache")  # TEST-NET-1
    assert status == 1
    assert stderr.endswith(
        "ERROR hubproxy: cannot listen on 192.0.2.1:5000: 192.0.2.1 is not an address of this "
        "machine (listen on one it has, or on 0.0.0.0 for all of them)\n"
    )


async def test_a_port_in_use_is_one_line_without_other_advice() -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    try:
        status, stderr = await hubproxy("--listen", f"127.0.0.1:{port}", "--no-cache")
    finally:
        await listener.aclose()
    assert status == 1
    assert stderr.endswith(
        f"ERROR hubproxy: cannot listen on 127.0.0.1:{port}: the port is in use by another "
        "program\n"
    )


def unprivileged() -> int | None:
    """A user id to run as that is not root (nobody, when the tests run as root)."""
    return 65534 if os.geteuid() == 0 else None


def unprivileged_ports_from() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())


async def test_a_low_port_without_privilege_is_one_line() -> None:
    if unprivileged_ports_from() <= 443:
        pytest.skip("this system lets every user bind port 443")
    status, stderr = await hubproxy("--listen", "127.0.0.1:443", "--no-cache", user=unprivileged())
    assert status == 1
    assert stderr.endswith(
        "ERROR hubproxy: cannot listen on 127.0.0.1:443: ports below 1024 need root or the "
        "CAP_NET_BIND_SERVICE capability (the systemd unit grants it with "
        "AmbientCapabilities=CAP_NET_BIND_SERVICE), or listen on a port from 1024 up\n"
    )


# ---------------------------------------------------------------- check-config


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory outside pytest's private tmp (0700): usable by the unprivileged user."""
    path = Path(tempfile.mkdtemp(prefix="hubproxy-startup-"))
    path.chmod(0o755)
    yield path
    for child in path.rglob("*"):
        if child.is_dir():
            child.chmod(0o755)
    shutil.rmtree(path)


async def check_config(
    directory: Path, text: str, *flags: str, user: int | None = None
) -> tuple[int, str]:
    config = directory / "hubproxy.toml"
    config.write_text(text)
    config.chmod(0o644)
    return await hubproxy("check-config", str(config), *flags, user=user)


async def test_check_config_refuses_an_expired_or_early_certificate(
    ca: trustme.CA, shared_dir: Path
) -> None:
    """BEFORE: ``hubproxy.toml: ok``."""
    cert, key = write_pair(shared_dir, ca.issue_cert("localhost", not_after=PAST))
    toml = f'cert = "{cert}"\nkey = "{key}"\nno-cache = true\nlisten = "127.0.0.1:8443"\n'
    status, stderr = await check_config(shared_dir, toml)
    assert (status, stderr) == (
        1,
        f"hubproxy check-config: error: the certificate {cert} expired on 2020-01-01 00:00 UTC: "
        "every client will refuse it; renew it (certs/README.md)\n",
    )
    cert, key = write_pair(shared_dir, ca.issue_cert("localhost", not_before=FUTURE))
    status, stderr = await check_config(shared_dir, toml)
    assert status == 1
    assert stderr.startswith(
        f"hubproxy check-config: error: the certificate {cert} is not valid until 2100-01-01 "
        "00:00 UTC (this machine's clock says "
    )


async def test_check_config_refuses_a_key_that_does_not_match(
    ca: trustme.CA, shared_dir: Path
) -> None:
    cert, _ = write_pair(shared_dir, ca.issue_cert("localhost"))
    _, other_key = write_pair(shared_dir, ca.issue_cert("localhost"), "other")
    toml = f'cert = "{cert}"\nkey = "{other_key}"\nno-cache = true\n'
    status, stderr = await check_config(shared_dir, toml)
    assert (status, stderr) == (
        1,
        f"hubproxy check-config: error: {shared_dir}/hubproxy.toml:1: --cert/--key: the key "
        f"{other_key} does not match the certificate {cert}: give the key that was made "
        "together with that certificate\n",
    )


async def test_check_config_refuses_what_this_user_cannot_do(shared_dir: Path) -> None:
    """Run as an unprivileged user: port 443, a cache directory it cannot create, and one
    it cannot write to (a cache first filled by root). BEFORE: ``hubproxy.toml: ok``."""
    user = unprivileged()
    name = pwd.getpwuid(user if user is not None else os.geteuid()).pw_name
    locked = shared_dir / "locked"
    locked.mkdir(mode=0o755)
    if user is None:
        locked.chmod(0o555)
    status, stderr = await check_config(
        shared_dir,
        f'listen = "127.0.0.1:443"\ncache-dir = "{locked}/cache"\n',
        user=user,
    )
    low_ports = unprivileged_ports_from() > 443
    expected = [
        f"hubproxy check-config: error: listen port 443 is below 1024, which user {name} may not "
        "bind: give hubproxy the CAP_NET_BIND_SERVICE capability (the systemd unit does, with "
        "AmbientCapabilities=CAP_NET_BIND_SERVICE) or run it as root, or listen on a port "
        "from 1024 up"
    ] * low_ports + [
        f"hubproxy check-config: error: cache-dir {locked}/cache does not exist and user {name} "
        f"cannot create it in {locked}: create it for that user (install -d -o {name} "
        f"{locked}/cache), or pick another with --cache-dir"
    ]
    assert (status, stderr.splitlines()) == (1, expected)

    cache = shared_dir / "cache"
    (cache / "blobs").mkdir(parents=True, mode=0o755)
    cache.chmod(0o777)
    (cache / "blobs").chmod(0o755 if user is not None else 0o555)  # root's, from a first run
    status, stderr = await check_config(shared_dir, f'cache-dir = "{cache}"\n', user=user)
    assert (status, stderr) == (
        1,
        f"hubproxy check-config: error: cache-dir {cache}: user {name} cannot write to "
        f"{cache}/blobs: give the cache to that user (chown -R {name} {cache}), or pick another "
        "with --cache-dir\n",
    )
    (cache / "blobs").chmod(0o777)
    status, stderr = await check_config(shared_dir, f'cache-dir = "{cache}"\n', user=user)
    assert (status, stderr) == (0, "")


# ---------------------------------------------------------------- the startup line


def startup_line(caplog: pytest.LogCaptureFixture) -> str:
    (line,) = [r.getMessage() for r in caplog.records if "listening on" in r.getMessage()]
    return line


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


async def test_the_startup_line_says_who_may_use_the_mirror(
    hub: FakeHub, start_proxy: StartProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hubproxy")
    await start_proxy()
    assert "; no cache; access: open to everyone; other registries: none; kTLS off: " in (
        startup_line(caplog)
    )
    assert warnings(caplog) == []  # on 127.0.0.1: nobody else can reach it
    caplog.clear()
    users = tmp_path / "users"
    add_user(users, "alice", "alice-pw")
    add_user(users, "bob", "bob-pw")
    networks = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
    await start_proxy(allow=NetworkList(networks), users_file=str(users))
    assert "; access: allow 10.0.0.0/8, fd00::/8 and mirror users (2); " in startup_line(caplog)
    caplog.clear()
    await start_proxy(users_file=str(users))
    assert "; access: mirror users (2); " in startup_line(caplog)


async def test_a_mirror_open_to_everyone_beyond_this_machine_gets_one_warning(
    hub: FakeHub, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """BEFORE: nothing; it started on 0.0.0.0 open to everyone without a word."""
    proxy = await start_proxy(listen_host="0.0.0.0", tls=False)
    assert warnings(caplog) == [
        f"hubproxy on http://0.0.0.0:{proxy.port} is open to everyone: anyone who can reach it "
        "can pull through it, on this mirror's upstream rate limit; restrict it with --allow "
        "NETWORK or --users FILE"
    ]
    caplog.clear()
    allow = NetworkList((ipaddress.ip_network("10.0.0.0/8"),))
    await start_proxy(listen_host="0.0.0.0", allow=allow)
    assert warnings(caplog) == []


async def test_the_access_line_names_the_mirror_user_never_the_password_or_token(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="hubproxy.access")
    hub.add_image("library/alpine", "3", [make_layer(3, 100)])
    users = tmp_path / "users"
    add_user(users, "alice", "alice-secret-pw")
    proxy = await start_proxy(users_file=str(users))
    alice = RegistryClient(proxy.url, ca, credentials=("alice", "alice-secret-pw"))
    r = await alice.request("/v2/library/alpine/manifests/3")
    assert r.status == 200
    await wait_closed(proxy.server)  # each request's line is written before its socket closes
    lines = [r.getMessage() for r in caplog.records if r.name == "hubproxy.access"]
    token_lines = [line for line in lines if " GET /token/" in line]
    manifest_lines = [line for line in lines if "/manifests/3 200 " in line]
    assert token_lines and all(line.endswith(" user=alice") for line in token_lines)
    assert manifest_lines and manifest_lines[-1].endswith(" user=alice")
    unauthenticated = [line for line in lines if " 401 " in line]
    assert unauthenticated and not any("user=" in line for line in unauthenticated)
    token = alice.tokens[""]
    assert not any("alice-secret-pw" in line or token in line for line in lines)


# ---------------------------------------------------------------- the TLS port's clients


async def wait_closed(server: Server) -> None:
    with trio.fail_after(10):
        while server.open_sockets:
            await server.wait_connections_changed()


async def untrusting_client(
    port: int, *, hostname: str = "localhost", ca: trustme.CA | None = None
) -> None:
    """A client that fails the handshake the way curl or dockerd do (it sends the alert)."""
    context = ssl.create_default_context()
    if ca is not None:
        ca.configure_trust(context)
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    with pytest.raises(trio.BrokenResourceError):
        await TLSStream.wrap_client(tcp, context, hostname)


async def test_a_client_that_does_not_trust_the_certificate_gets_one_warning_per_episode(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    tls_files: TLSFiles,
    caplog: pytest.LogCaptureFixture,
    mock_clock: trio.testing.MockClock,
) -> None:
    """BEFORE: only a debug line, ``TLS handshake with 127.0.0.1 failed:
    BrokenResourceError('TLS handshake failed: [SSL: TLSV1_ALERT_UNKNOWN_CA] ...')``."""
    proxy = await start_proxy()
    expected = (
        "TLS: 127.0.0.1 refused this mirror's certificate (alert unknown_ca): give that client "
        f"the CA that signed {tls_files.cert_pem} (certs/README.md: how each client trusts it)"
    )
    for _ in range(3):
        await untrusting_client(proxy.port)
        await wait_closed(proxy.server)
    assert warnings(caplog) == [expected]
    mock_clock.jump(EPISODE)
    await untrusting_client(proxy.port)
    await wait_closed(proxy.server)
    assert warnings(caplog) == [expected, expected]


async def test_a_client_that_reached_the_mirror_by_another_name_is_told_so(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    tls_files: TLSFiles,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = await start_proxy()
    await untrusting_client(proxy.port, hostname="nas.example", ca=ca)
    await wait_closed(proxy.server)
    assert warnings(caplog) == [
        "TLS: 127.0.0.1 refused this mirror's certificate (alert bad_certificate): it does not "
        f"trust the CA that signed {tls_files.cert_pem}, or reached this mirror by a name the "
        "certificate does not list: give that client the CA (certs/README.md: how each client "
        "trusts it), or use a name the certificate lists"
    ]


async def test_curl_without_the_ca_is_warned_about(
    hub: FakeHub, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await start_proxy()
    result = await trio.run_process(
        ["curl", "-sS", f"{proxy.url}/healthz"], capture_stderr=True, check=False
    )
    assert result.returncode == 60  # curl: the certificate could not be verified
    await wait_closed(proxy.server)
    (line,) = warnings(caplog)
    assert line.startswith("TLS: 127.0.0.1 refused this mirror's certificate (alert unknown_ca)")


async def test_other_handshake_failures_stay_at_debug_in_plain_words(
    hub: FakeHub, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="hubproxy")
    proxy = await start_proxy()
    garbage = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    await garbage.send_all(b"\x00\x01\x02\x03 not a ClientHello\r\n\r\n")
    assert await garbage.receive_some() == b""
    await garbage.aclose()
    gone = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    await gone.send_all(b"\x16\x03\x01")  # the start of a record, then gone
    await gone.aclose()
    await wait_closed(proxy.server)
    assert warnings(caplog) == []
    debug = [r.getMessage() for r in caplog.records if "TLS handshake with" in r.getMessage()]
    assert debug == [
        "TLS handshake with 127.0.0.1 failed: wrong version number",
        "TLS handshake with 127.0.0.1 failed: the client closed the connection",
    ]


async def plain_request(port: int, request: bytes) -> bytes:
    """Send ``request`` on a raw socket to the TLS port; everything the server answers."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(request)
    answer = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some():
            answer += chunk
    await stream.aclose()
    return answer


async def test_plain_http_to_the_tls_port_gets_a_400_naming_the_https_url(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    """BEFORE: an empty reply (the handshake failed on ``GET``, the socket was closed)."""
    proxy = await start_proxy()
    port = proxy.port
    answer = await plain_request(port, b"GET /v2/ HTTP/1.1\r\nHost: localhost:%d\r\n\r\n" % port)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 400 Bad Request"
    assert b"connection: close" in head.lower()
    (error,) = json.loads(body)["errors"]
    assert (error["code"], error["message"]) == (
        "UNSUPPORTED",
        f"this port speaks TLS: use https://localhost:{port}",
    )
    # HTTP/1.0 without a Host: the address the client reached
    answer = await plain_request(port, b"HEAD / HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    await plain_request(port, b"GET /v2/ HTTP/1.1\r\nHost: nas\r\n\r\n")
    await wait_closed(proxy.server)
    assert warnings(caplog) == [
        f"127.0.0.1 sent plain HTTP to this TLS port; it was told to use "
        f"https://localhost:{port} (is it set up with http:// for this mirror?)"
    ]  # once per address and episode
    assert await RegistryClient(proxy.url, ca).request("/v2/") is not None  # TLS still works


async def test_curl_with_http_to_the_tls_port_reads_what_to_do(
    hub: FakeHub, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy()
    result = await trio.run_process(
        ["curl", "-sS", f"http://127.0.0.1:{proxy.port}/healthz"], capture_stdout=True, check=False
    )
    assert json.loads(result.stdout)["errors"][0]["message"] == (
        f"this port speaks TLS: use https://127.0.0.1:{proxy.port}"
    )
