"""Tests for the service files shipped in hubproxy/service/: the systemd unit, the OpenWrt procd
init script, and that both are package data.

The unit is parsed with configparser (close enough to systemd's syntax for the files we write:
no line continuations, no inline comments) and, when systemd-analyze is installed, verified by
systemd itself. The init script is checked by the shells that will run it and then sourced with
procd's and OpenWrt's helper functions replaced by stubs that record their calls.
"""

from __future__ import annotations

import configparser
import contextlib
import re
import shutil
import ssl
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICE_DIR = ROOT / "hubproxy" / "service"
UNIT = SERVICE_DIR / "hubproxy.service"
INIT = SERVICE_DIR / "hubproxy.init"
SHUTDOWN_GRACE_DEFAULT = 30.0  # hubproxy.config.Timeouts.shutdown_grace


class _UnitParser(configparser.ConfigParser):
    """Keys keep their case (systemd's are case-sensitive); a repeated key keeps its last value."""

    def __init__(self) -> None:
        super().__init__(strict=False, interpolation=None, delimiters=("=",))

    def optionxform(self, optionstr: str) -> str:
        return optionstr


def parse_unit(text: str) -> _UnitParser:
    parser = _UnitParser()
    parser.read_string(text, source=str(UNIT))
    return parser


def timespan_seconds(value: str) -> float:
    """A systemd time span ("45", "45s", "1min 30s", "2m") in seconds."""
    units = {
        "": 1.0, "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
        "ms": 0.001, "msec": 0.001,
        "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
        "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
    }  # fmt: skip
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value.strip())
    assert parts and re.fullmatch(r"(\s*\d+(\.\d+)?\s*[a-z]*)+\s*", value), value
    return sum(float(number) * units[unit] for number, unit in parts)


@pytest.fixture(scope="module")
def unit() -> _UnitParser:
    return parse_unit(UNIT.read_text())


def test_timespan_parser() -> None:
    assert timespan_seconds("45") == 45
    assert timespan_seconds("45s") == 45
    assert timespan_seconds("1min 30s") == 90
    assert timespan_seconds("2m") == 120


def test_unit_runs_unprivileged_with_the_config_file(unit: _UnitParser) -> None:
    service = unit["Service"]
    assert service.get("User") == "hubproxy" or service.get("DynamicUser") == "yes"
    assert service.get("User") != "root"
    exec_start = service["ExecStart"].split()
    assert exec_start[0].startswith("/") and exec_start[0].endswith("/hubproxy")
    assert exec_start[1:] == ["--config", "/etc/hubproxy/hubproxy.toml"]
    assert service.get("Type") in (None, "simple", "exec")  # hubproxy does not fork


def test_unit_reload_sends_sighup(unit: _UnitParser) -> None:
    reload = unit["Service"]["ExecReload"].split()
    assert reload[0].endswith("kill")
    assert reload[1] in ("-HUP", "-SIGHUP", "-1", "-s HUP")
    assert reload[-1] == "$MAINPID"


def test_unit_restart_and_stop(unit: _UnitParser) -> None:
    service = unit["Service"]
    assert service["Restart"] in ("on-failure", "always", "on-abnormal")
    assert service.get("KillSignal", "SIGTERM") == "SIGTERM"
    # systemd must not SIGKILL hubproxy while in-flight transfers drain
    assert timespan_seconds(service["TimeoutStopSec"]) > SHUTDOWN_GRACE_DEFAULT


def test_unit_capabilities_and_hardening(unit: _UnitParser) -> None:
    service = unit["Service"]
    assert service["AmbientCapabilities"].split() == ["CAP_NET_BIND_SERVICE"]
    assert service["CapabilityBoundingSet"].split() == ["CAP_NET_BIND_SERVICE"]
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["ProtectHome"] == "yes"
    assert service["PrivateTmp"] == "yes"
    assert service["PrivateDevices"] == "yes"
    assert service["ProtectKernelTunables"] == "yes"
    assert service["ProtectControlGroups"] == "yes"
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert int(service["LimitNOFILE"]) >= 65536
    assert service["CacheDirectory"] == "hubproxy"  # /var/cache/hubproxy, writable by User=


def test_unit_is_installable(unit: _UnitParser) -> None:
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert "network-online.target" in unit["Unit"]["After"].split()


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # /usr/local/bin/hubproxy may not exist here: point ExecStart at a binary that does, so that
    # everything else in the unit is what gets checked.
    text, count = re.subn(
        r"^ExecStart=\S+", f"ExecStart={sys.executable}", UNIT.read_text(), flags=re.M
    )
    assert count == 1
    copy = tmp_path / "hubproxy.service"
    copy.write_text(text)
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=120, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert [line for line in output.splitlines() if "hubproxy.service" in line] == [], output


# --- the OpenWrt procd init script ---------------------------------------------------------------


def test_init_script_parses() -> None:
    text = INIT.read_text()
    assert text.startswith("#!/bin/sh /etc/rc.common\n")
    assert INIT.stat().st_mode & 0o111, "the init script must be executable"
    shells = [shell for shell in ("sh", "dash", "busybox") if shutil.which(shell)]
    assert shells, "no POSIX shell found"
    for shell in shells:
        args = [shell, "sh", "-n"] if shell == "busybox" else [shell, "-n"]
        result = subprocess.run([*args, str(INIT)], capture_output=True, text=True, check=False)
        assert result.returncode == 0, (shell, result.stderr)


def test_init_script_defines_the_procd_service() -> None:
    text = INIT.read_text()
    assert re.search(r"^USE_PROCD=1$", text, re.M)
    assert re.search(r"^START=\d+$", text, re.M)
    assert re.search(r"^start_service\(\) \{$", text, re.M)
    assert re.search(r"^reload_service\(\) \{$", text, re.M)
    command = re.search(r"procd_set_param command (.*)", text)
    assert command is not None and "--config" in command.group(1)
    assert "procd_send_signal hubproxy '*' HUP" in text
    for param in ("user", "file", "respawn", "stderr", "term_timeout"):
        assert re.search(rf"procd_set_param {param}\b", text), param


# Sources the init script with procd's and OpenWrt's functions stubbed out; every stub prints
# what it was called with. $1: the init script, $2: the config, $3: what to run after sourcing.
_HARNESS = r"""
. "$1"
CONFIG="$2"
CONFIG_SUM="${2%/*}/config.md5"
procd_open_instance() { echo "procd_open_instance $*"; }
procd_set_param() { echo "procd_set_param $*"; }
procd_close_instance() { echo "procd_close_instance"; }
procd_send_signal() { echo "procd_send_signal $*"; }
start() { echo "start"; }
user_exists() { return 1; }
group_add_next() { echo "group_add_next $*" >&2; echo 32768; }
user_add() { echo "user_add $*"; }
chown() { echo "chown $*"; }
logger() { echo "logger $*"; }
eval "$3"
"""


def run_init(tmp_path: Path, config: str, script: str) -> list[str]:
    config_file = tmp_path / "hubproxy.toml"
    config_file.write_text(config)
    result = subprocess.run(
        ["sh", "-c", _HARNESS, "harness", str(INIT), str(config_file), script],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return [*result.stdout.splitlines(), f"exit {result.returncode}"]


def test_init_start_service_registers_the_instance(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    config = tmp_path / "hubproxy.toml"
    lines = run_init(
        tmp_path,
        f'listen = "[::]:5443"\ncache-dir = "{cache}"\n',
        'start_service; echo "exit $?"',
    )
    assert f"procd_set_param command /usr/bin/python3 -m hubproxy --config {config}" in lines
    assert "procd_set_param user hubproxy" in lines
    assert f"procd_set_param file {config}" in lines
    assert "procd_set_param respawn" in lines
    timeout = next(line for line in lines if line.startswith("procd_set_param term_timeout "))
    assert int(timeout.split()[-1]) > SHUTDOWN_GRACE_DEFAULT
    assert any(line.startswith("user_add hubproxy  32768") for line in lines), lines
    assert f"chown hubproxy:hubproxy {cache}" in lines
    assert cache.is_dir()
    assert lines.index("procd_open_instance ") < lines.index("procd_close_instance")
    assert lines[-2:] == ["exit 0", "exit 0"], lines


def test_init_start_service_refuses_a_cache_in_nowhere(tmp_path: Path) -> None:
    lines = run_init(tmp_path, 'listen = "[::]:5443"\n', 'start_service; echo "exit $?"')
    assert not any(line.startswith("procd_open_instance") for line in lines), lines
    assert any("cache-dir" in line for line in lines if line.startswith("logger")), lines
    assert lines[-2] == "exit 1"
    lines = run_init(tmp_path, "no-cache = true\n", 'start_service; echo "exit $?"')
    assert "procd_close_instance" in lines and lines[-2] == "exit 0", lines


def test_init_reload_sends_hup_or_restarts_on_a_changed_config(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    script = 'start_service >/dev/null; reload_service; echo "x = 1" >> "$CONFIG"; reload_service'
    lines = run_init(tmp_path, f'cache-dir = "{cache}"\n', script)
    # unchanged: SIGHUP to every instance (re-read --cert/--key); changed: register again, and
    # procd restarts the instance because the "file" checksum differs
    assert lines == ["procd_send_signal hubproxy * HUP", "start", "exit 0"], lines


# --- packaging ----------------------------------------------------------------------------------


def test_service_files_are_package_data() -> None:
    """Both files ship in the wheel: pyproject.toml needs
    [tool.setuptools.package-data] hubproxy = ["service/*"]."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        pyproject = tomllib.load(f)
    setuptools = pyproject["tool"]["setuptools"]
    assert "hubproxy" in setuptools["packages"]
    patterns = setuptools.get("package-data", {}).get("hubproxy", [])
    shipped = {
        path.relative_to(ROOT / "hubproxy").as_posix()
        for pattern in patterns
        for path in (ROOT / "hubproxy").glob(pattern)
    }
    assert {
        "service/hubproxy.service",
        "service/hubproxy.init",
        "service/hubproxy.toml",
        "service/make-self-signed.sh",
    } <= shipped, 'add to pyproject.toml: [tool.setuptools.package-data] hubproxy = ["service/*"]'


def test_service_directory_is_data_not_a_package() -> None:
    # package-data reaches hubproxy/service/ through the glob; it must not become a package
    # (it would then have to be listed in [tool.setuptools] packages, and holds no code)
    assert not (SERVICE_DIR / "__init__.py").exists()
    assert not list(SERVICE_DIR.glob("*.py"))


# --- the private CA script ---------------------------------------------------------------------

MAKE_CERT = SERVICE_DIR / "make-self-signed.sh"


def _handshake(tmp_path: Path, server_name: str) -> None:
    """A TLS handshake between the script's certificate and a client trusting only its ca.pem."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "server.pem", tmp_path / "server-key.pem")
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    bios = [ssl.MemoryBIO() for _ in range(4)]
    s_in, s_out, c_in, c_out = bios
    server_side = server.wrap_bio(s_in, s_out, server_side=True)
    client_side = client.wrap_bio(c_in, c_out, server_hostname=server_name)
    for _ in range(10):
        for side in (client_side, server_side):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    assert client_side.version() is not None and server_side.version() is not None


def test_make_self_signed_writes_the_files_the_service_reads(tmp_path: Path) -> None:
    """The script writes into the current directory (not next to itself: installed, that is
    site-packages) the names hubproxy.toml points at, and a client trusting ca.pem accepts the
    certificate for each name given."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    run = subprocess.run(
        ["bash", str(MAKE_CERT), "mirror.lan", "192.168.1.10", "::1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert run.stderr == ""
    assert run.stdout.splitlines() == [
        f"wrote {tmp_path}/server.pem and {tmp_path}/server-key.pem for "
        f"DNS:mirror.lan,IP:192.168.1.10,IP:::1 (825 days), signed by {tmp_path}/ca.pem",
        f"serve with: hubproxy --cert {tmp_path}/server.pem --key {tmp_path}/server-key.pem; "
        f"clients trust {tmp_path}/ca.pem (hubproxy print-config CLIENT --url "
        f"https://mirror.lan --ca {tmp_path}/ca.pem)",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ca-key.pem",
        "ca.pem",
        "server-key.pem",
        "server.pem",
    ]
    config = tomllib.loads((SERVICE_DIR / "hubproxy.toml").read_text())
    assert (Path(config["cert"]).name, Path(config["key"]).name) == ("server.pem", "server-key.pem")
    assert (tmp_path / "server-key.pem").stat().st_mode & 0o077 == 0
    _handshake(tmp_path, "mirror.lan")
    _handshake(tmp_path, "192.168.1.10")
    # a second run (a renewal) keeps the CA, so clients need no change
    ca = (tmp_path / "ca.pem").read_bytes()
    subprocess.run(
        ["bash", str(MAKE_CERT), "mirror.lan"], cwd=tmp_path, capture_output=True, check=True
    )
    assert (tmp_path / "ca.pem").read_bytes() == ca
    _handshake(tmp_path, "mirror.lan")


def test_make_self_signed_usage_and_failure(tmp_path: Path) -> None:
    usage = subprocess.run(["bash", str(MAKE_CERT)], capture_output=True, text=True, check=False)
    assert (usage.returncode, usage.stdout) == (2, "")
    assert usage.stderr == (
        "usage: bash make-self-signed.sh HOSTNAME [NAME-OR-IP...] (writes ca.pem, ca-key.pem, "
        "server.pem and server-key.pem here)\n"
    )
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    (tmp_path / "ca.pem").mkdir()  # openssl cannot read it: one line naming the directory
    failed = subprocess.run(
        ["bash", str(MAKE_CERT), "mirror.lan"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert failed.returncode == 1
    assert failed.stderr.startswith(f"make-self-signed.sh: openssl failed in {tmp_path}: ")
    assert failed.stderr.count("\n") == 1


def test_repository_path_of_the_script_still_works() -> None:
    """certs/README.md and the TLS section say certs/make-self-signed.sh: a link to the
    installed copy, so there is one script."""
    link = ROOT / "certs" / "make-self-signed.sh"
    assert link.is_symlink() and link.resolve() == MAKE_CERT.resolve()
