"""Tests for the command line (hubproxy.cli): flags to a Config, and usage errors. No network.

main() is only ever called here with arguments it must refuse (or --help/--version), so it never
reaches trio.run. Valid argument sets go through load_settings(), as main() does.
"""

from __future__ import annotations

import io
import math
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

from hubproxy.cli import CHECK_CONFIG_HELP, SUBCOMMANDS, UsageError, load_settings, main
from hubproxy.config import Config
from hubproxy.ops.usersfile import add_user, load_users
from hubproxy.policy.access import parse_image_rules, parse_networks
from hubproxy.policy.proxies import ProxyKind, UpstreamProxy
from hubproxy.policy.registries import DOCKER_HUB_UPSTREAM
from hubproxy.policy.urls import Origin
from hubproxy.settings import COMMANDS, SETTINGS, parse_duration, parse_listen


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pem(ca: trustme.CA, tmp_path: Path) -> dict[str, Path]:
    """A server certificate, its key, both in one file, a CA bundle and a non-PEM file."""
    leaf = ca.issue_cert("mirror.example.com", "127.0.0.1")
    files = {
        "cert": tmp_path / "server.pem",
        "key": tmp_path / "server-key.pem",
        "both": tmp_path / "both.pem",
        "ca": tmp_path / "ca.pem",
        "junk": tmp_path / "junk.pem",
    }
    leaf.cert_chain_pems[0].write_to_path(str(files["cert"]))
    leaf.private_key_pem.write_to_path(str(files["key"]))
    leaf.private_key_and_cert_chain_pem.write_to_path(str(files["both"]))
    ca.cert_pem.write_to_path(str(files["ca"]))
    files["junk"].write_text("not a certificate\n")
    return files


def config(*argv: str) -> Config:
    return load_settings(argv)[1]


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run main() with arguments it must refuse; return its one line, 'hubproxy: error: ...'
    (nothing else: no usage block above it)."""
    assert main(list(argv)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("hubproxy: error: ")
    assert captured.err == lines[0] + "\n"
    return lines[0]


# ---------------------------------------------------------------- parse_listen


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:443", ("0.0.0.0", 443)),
        ("127.0.0.1:5000", ("127.0.0.1", 5000)),
        ("localhost:8080", ("localhost", 8080)),
        ("mirror.example.com:443", ("mirror.example.com", 443)),
        ("[::1]:5000", ("::1", 5000)),
        ("[::]:443", ("::", 443)),
        ("[2001:db8::1]:80", ("2001:db8::1", 80)),
        (":8080", ("0.0.0.0", 8080)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("127.0.0.1:65535", ("127.0.0.1", 65535)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "443",
        "localhost",
        "localhost:",
        ":",
        "localhost:http",
        "localhost:65536",
        "localhost:-1",
        "localhost: 80",
        "localhost:80 ",
        "localhost:+80",
        "localhost:8.0",
        "::1:5000",  # IPv6 needs brackets
        "::",
        "[::1]",
        "[::1]:",
        "[::1:5000",
        "::1]:5000",
        "http://0.0.0.0:443",
    ],
)
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"HOST:PORT|IPv6"):
        parse_listen(text)


@pytest.mark.parametrize(
    ("text", "example"),
    [
        ("http://0.0.0.0:5000", "0.0.0.0:5000"),
        ("https://0.0.0.0:443", "0.0.0.0:443"),
        ("https://mirror.lan", "mirror.lan:443"),
        ("http://mirror.lan/", "mirror.lan:80"),
        ("http://[::]:5000", "[::]:5000"),
        ("https://[::1]", "[::1]:443"),
        ("HTTP://:5000", ":5000"),
    ],
)
def test_parse_listen_refuses_a_url_and_says_what_to_write(text: str, example: str) -> None:
    """Not the IPv6-brackets advice the colons of ``http://0.0.0.0:5000`` would otherwise get."""
    with pytest.raises(ValueError, match=r"^takes HOST:PORT without a scheme") as info:
        parse_listen(text)
    assert str(info.value) == (
        f"takes HOST:PORT without a scheme, e.g. {example}; it serves HTTPS when --cert and "
        "--key are given, plain HTTP otherwise"
    )
    assert parse_listen(example) is not None  # the example is a valid --listen


def test_parse_listen_rejects_empty_brackets() -> None:
    with pytest.raises(ValueError, match="empty IPv6 address"):
        parse_listen("[]:80")


# ---------------------------------------------------------------- defaults


def test_defaults_without_tls() -> None:
    cfg = config()
    assert (cfg.listen_host, cfg.listen_port) == ("127.0.0.1", 5000)
    assert cfg.cert is None
    assert cfg.key is None
    assert cfg.tls is False
    assert [str(u) for u in cfg.upstreams] == [DOCKER_HUB_UPSTREAM + "/"]
    assert cfg.library_prefix is True
    assert cfg.index_url is not None
    assert cfg.index_url.origin == Origin("https", "index.docker.io", 443)
    assert cfg.upstream_proxy is None
    assert cfg.public_url is None
    assert cfg.max_redirects == 5
    assert cfg.rate_limit_rest == 60.0


def test_defaults_with_tls(pem: dict[str, Path]) -> None:
    cfg = config("--cert", str(pem["cert"]), "--key", str(pem["key"]))
    assert (cfg.listen_host, cfg.listen_port) == ("0.0.0.0", 443)
    assert cfg.cert == str(pem["cert"])
    assert cfg.key == str(pem["key"])
    assert cfg.tls is True


def test_cert_with_the_key_in_the_same_file(pem: dict[str, Path]) -> None:
    cfg = config("--cert", str(pem["both"]))
    assert cfg.tls is True
    assert cfg.key is None
    assert cfg.listen_port == 443


@pytest.mark.parametrize(
    ("listen", "expected"), [("[::]:8443", ("::", 8443)), (":5001", ("0.0.0.0", 5001))]
)
def test_listen_overrides_the_default(
    pem: dict[str, Path], listen: str, expected: tuple[str, int]
) -> None:
    cfg = config("--cert", str(pem["cert"]), "--key", str(pem["key"]), "--listen", listen)
    assert (cfg.listen_host, cfg.listen_port) == expected
    assert (config("--listen", listen).listen_host, config("--listen", listen).listen_port) == (
        expected
    )


def test_upstreams_in_order() -> None:
    cfg = config(
        "--upstream",
        "https://registry-1.docker.io",
        "--fallback",
        "https://one.example.workers.dev",
        "--fallback",
        "http://10.0.0.5:5000/prefix",
    )
    assert [str(u) for u in cfg.upstreams] == [
        "https://registry-1.docker.io/",
        "https://one.example.workers.dev/",
        "http://10.0.0.5:5000/prefix",
    ]


def test_numeric_flags() -> None:
    cfg = config(
        "--max-redirects",
        "3",
        "--rate-limit-cooldown",
        "12.5",
        "--connect-timeout",
        "2",
        "--read-timeout",
        "300",
        "--handshake-timeout",
        "4",
        "--request-timeout",
        "6",
        "--keepalive-timeout",
        "7",
        "--client-idle-timeout",
        "8",
        "--shutdown-grace",
        "9",
    )
    assert cfg.max_redirects == 3
    assert cfg.rate_limit_rest == 12.5
    t = cfg.timeouts
    assert (t.connect, t.upstream_idle, t.handshake, t.request_head) == (2, 300, 4, 6)
    assert (t.keepalive_idle, t.client_idle, t.shutdown_grace) == (7, 8, 9)


def test_upstream_proxy_and_ca_and_public_url(pem: dict[str, Path]) -> None:
    cfg = config(
        "--upstream-proxy",
        "http://192.168.1.1:3128",
        "--upstream-ca",
        str(pem["ca"]),
        "--public-url",
        "https://mirror.example.com/",
    )
    assert cfg.upstream_proxy is not None
    assert cfg.upstream_proxy == UpstreamProxy(ProxyKind.HTTP, "192.168.1.1", 3128)
    assert cfg.upstream_ca == str(pem["ca"])
    assert cfg.public_url == "https://mirror.example.com/"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("socks5://10.0.0.1", UpstreamProxy(ProxyKind.SOCKS5, "10.0.0.1", 1080)),
        ("SOCKS5H://Proxy.LAN:9050", UpstreamProxy(ProxyKind.SOCKS5H, "proxy.lan", 9050)),
        (
            "socks5://me:p%40ss@[::1]:1080/",
            UpstreamProxy(ProxyKind.SOCKS5, "::1", 1080, "me", "p@ss"),
        ),
    ],
)
def test_socks5_upstream_proxy(text: str, expected: UpstreamProxy) -> None:
    cfg = config("--upstream-proxy", text)
    assert cfg.upstream_proxy == expected
    assert "p@ss" not in repr(cfg) and "p%40ss" not in str(cfg.upstream_proxy)


def test_registry_socks5_proxy_keeps_its_login_out_of_print() -> None:
    cfg = config("--registry-proxy", "quay.io=socks5h://bot:hunter22@127.0.0.1:1080")
    quay = cfg.registry_table().find("quay.io")
    assert quay is not None and quay.upstream_proxy is not None
    assert quay.upstream_proxy.password == "hunter22"
    assert str(quay.upstream_proxy) == "socks5h://***@127.0.0.1:1080"
    assert "hunter22" not in repr(quay)


@pytest.mark.parametrize(
    ("argv", "wanted"),
    [
        (["--upstream-proxy", "ftp://u:hunter22@h:1"], "not a proxy URL: 'ftp://***@h:1'"),
        (["--upstream-proxy", "socks5://u:hunter22@h:99999"], "not a proxy URL"),
        (["--upstream-proxy", "http://u:hunter22@h:3128"], "a login for an HTTP proxy"),
        (["--upstream-proxy", "socks5://hunter22@h"], "give the login as user:password@"),
        (["--upstream-proxy", "socks5://u:hunter22@h/path"], "only a scheme, host and port"),
        (["--registry-proxy", "socks5://u:hunter22@h"], "got 'socks5://***@h'"),
    ],
)
def test_bad_proxy_url_is_refused_without_its_login(argv: list[str], wanted: str) -> None:
    with pytest.raises(UsageError) as caught:
        config(*argv)
    assert wanted in str(caught.value)
    assert "hunter22" not in str(caught.value)


# ---------------------------------------------------------------- library/ prefix


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        ("https://registry-1.docker.io", True),
        ("https://registry-1.docker.io/", True),
        ("https://REGISTRY-1.DOCKER.IO:443", True),
        ("https://index.docker.io", True),
        ("https://registry.hub.docker.com", True),
        ("https://ghcr.io", False),
        ("https://quay.io", False),
        ("https://hub-mirror.example.workers.dev", False),
        ("http://127.0.0.1:5001", False),
        ("https://registry-1.docker.io.evil.example", False),
    ],
)
def test_library_prefix_follows_the_upstream(upstream: str, expected: bool) -> None:
    assert config("--upstream", upstream).library_prefix is expected
    assert config("--upstream", upstream, "--library-prefix").library_prefix is True
    assert config("--upstream", upstream, "--no-library-prefix").library_prefix is False


def test_library_prefix_depends_on_the_primary_only() -> None:
    cfg = config("--upstream", "https://ghcr.io", "--fallback", "https://registry-1.docker.io")
    assert cfg.library_prefix is False
    cfg = config("--fallback", "https://hub-mirror.example.workers.dev")
    assert cfg.library_prefix is True


# ---------------------------------------------------------------- usage errors from main()


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        (["--upstream", "ftp://registry.example"], "--upstream"),
        (["--upstream", "registry-1.docker.io"], "--upstream"),
        (["--upstream", "https://user:pw@registry.example"], "--upstream"),
        (["--upstream", "https://registry.example/?x=1"], "--upstream"),
        (["--upstream", "https://registry.example:99999"], "--upstream"),
        (["--fallback", "nope"], "--fallback"),
        (["--index-url", "gopher://index"], "--index-url"),
        (["--cert", "/nonexistent/server.pem"], "--cert"),
        (["--cert", "/nonexistent/server.pem", "--key", "/nonexistent/key.pem"], "--cert"),
        (["--upstream-proxy", "https://proxy.example:3128"], "--upstream-proxy"),
        (["--upstream-proxy", "socks4://proxy.example:1080"], "--upstream-proxy"),
        (["--upstream-proxy", "proxy.example:3128"], "--upstream-proxy"),
        (["--upstream-ca", "/nonexistent/ca.pem"], "--upstream-ca"),
        (["--public-url", "mirror.example.com"], "--public-url"),
        (["--listen", "443"], "--listen"),
        (["--listen", "::1:443"], "IPv6"),
        (["--allow", "10.0.0.1/8"], "--allow"),
        (["--allow", "everyone"], "--allow"),
        (["--ops-allow", "300.1.1.1"], "--ops-allow"),
        (["--images-allow", "Library/*"], "--images-allow"),
        (["--images-deny", ""], "--images-deny"),
        (["--client-rate-limit", "-1"], "--client-rate-limit"),
        (["--client-rate-limit", "nan"], "--client-rate-limit"),
        (["--client-burst", "0"], "--client-burst"),
        (["--users", "/nonexistent/users"], "--users"),
    ],
)
def test_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str], mentions: str) -> None:
    line = usage_error(capsys, *argv)
    assert mentions in line


def test_key_without_cert(capsys: pytest.CaptureFixture[str], pem: dict[str, Path]) -> None:
    line = usage_error(capsys, "--key", str(pem["key"]))
    assert "--key needs --cert" in line


@pytest.mark.parametrize(
    "argv",
    [
        ["--cert", "{junk}", "--key", "{key}"],
        ["--cert", "{cert}"],  # no key anywhere
        ["--cert", "{cert}", "--key", "{junk}"],
        ["--cert", "{cert}", "--key", "{ca}"],
        ["--cert", "{dir}", "--key", "{key}"],
    ],
)
def test_unusable_cert_or_key(
    capsys: pytest.CaptureFixture[str], pem: dict[str, Path], argv: list[str]
) -> None:
    paths = {name: str(path) for name, path in pem.items()}
    paths["dir"] = str(pem["cert"].parent)
    line = usage_error(capsys, *(arg.format(**paths) for arg in argv))
    assert "--cert" in line


def test_upstream_ca_not_pem(capsys: pytest.CaptureFixture[str], pem: dict[str, Path]) -> None:
    line = usage_error(capsys, "--upstream-ca", str(pem["junk"]))
    assert "--upstream-ca" in line


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-redirects", "many"],
        ["--connect-timeout", "soon"],
        ["--log-level", "loud"],
        ["--no-such-flag"],
        ["positional"],
    ],
)
def test_argparse_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    usage_error(capsys, *argv)


DURATION_HELP = "(use seconds, or units: 250ms, 90s, 1m, 1h30m)"
LISTEN_URL = (
    "--listen: takes HOST:PORT without a scheme, e.g. 0.0.0.0:5000; it serves HTTPS when --cert "
    "and --key are given, plain HTTP otherwise"
)


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--lisen", "0.0.0.0:5000"], "unknown flag --lisen; did you mean --listen?"),
        (["--lisen=0.0.0.0:5000"], "unknown flag --lisen; did you mean --listen?"),
        (["--cache_dir", "/srv/cache"], "unknown flag --cache_dir; did you mean --cache-dir?"),
        (
            ["--cache", "/srv"],
            "unknown flag --cache; did you mean --cache-dir or --cache-size or --cache-store?",
        ),
        (["--lib"], "unknown flag --lib; did you mean --library-prefix?"),
        (["--frobnicate"], "unknown flag --frobnicate (see 'hubproxy --help')"),
        (["chek-config", "x.toml"], "unknown command 'chek-config'; did you mean check-config?"),
        (
            ["serve"],
            "unknown command 'serve' (the commands are check-config, print-config, user, "
            "cache, prefetch, doctor; hubproxy with flags only runs the mirror)",
        ),
        (["--listen", ":5000", "extra"], "unexpected argument 'extra' (see 'hubproxy --help')"),
        (["--no-cache", "yes"], "--no-cache takes no value, got 'yes'"),
        (["--no-cache=yes"], "--no-cache takes no value, got 'yes'"),
        (["--cache-dir"], "--cache-dir needs a value (DIR)"),
        (["--max-redirects", "many"], "--max-redirects: not a whole number: 'many'"),
        (["--client-rate-limit", "x"], "--client-rate-limit: not a number: 'x'"),
        (["--read-timeout", "1x"], f"--read-timeout: not a duration: '1x' {DURATION_HELP}"),
        (
            ["--connect-timeout", "soon"],
            f"--connect-timeout: not a duration: 'soon' {DURATION_HELP}",
        ),
        (["--manifest-ttl", "5 m"], f"--manifest-ttl: not a duration: '5 m' {DURATION_HELP}"),
        (["--read-timeout", "0s"], "--read-timeout must be a positive number of seconds"),
        (
            ["--log-level", "loud"],
            "--log-level: invalid choice: 'loud' (choose from 'debug', 'info', 'warning', 'error')",
        ),
        (["--log-level", "debgu"], "--log-level: invalid choice: 'debgu'; did you mean 'debug'?"),
        (["--listen", "http://0.0.0.0:5000"], LISTEN_URL),
    ],
)
def test_usage_error_lines(capsys: pytest.CaptureFixture[str], argv: list[str], line: str) -> None:
    """The line a mistyped command line gets, verbatim, and nothing else (no usage block)."""
    assert usage_error(capsys, *argv) == f"hubproxy: error: {line}"


def test_a_usage_error_is_one_line_from_the_real_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hubproxy", "--lisen", "0.0.0.0:5000"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "hubproxy: error: unknown flag --lisen; did you mean --listen?\n"


# ---------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("2.5", 2.5),
        ("0.25", 0.25),
        ("90s", 90.0),
        ("1m", 60.0),
        ("1h30m", 5400.0),
        ("1m30s", 90.0),
        ("250ms", 0.25),
        ("1.5s", 1.5),
        (".5h", 1800.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1h1m1s1ms", 3661.001),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "1x", "m", "1 m", "1M", "-1m", "1h-30m", "s1", "1m 30s", "1.2.3s", "ms"]
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"^not a duration: ") as info:
        parse_duration(text)
    assert str(info.value) == f"not a duration: {text!r} {DURATION_HELP}"


def test_durations_with_units_reach_the_config() -> None:
    cfg = config(
        "--read-timeout",
        "2m",
        "--connect-timeout",
        "1500ms",
        "--shutdown-grace",
        "1m30s",
        "--manifest-ttl",
        "5m",
        "--rate-limit-cooldown",
        "1h",
        "--pool-wait-timeout",
        "45",
    )
    t = cfg.timeouts
    assert (t.upstream_idle, t.connect, t.shutdown_grace, t.pool_wait) == (120, 1.5, 90, 45)
    assert (cfg.manifest_ttl, cfg.rate_limit_rest) == (300, 3600)


def test_durations_with_units_in_the_config_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "hubproxy.toml"
    path.write_text('read-timeout = "2m"\nconnect-timeout = 4\nmanifest-ttl = 0.5\n')
    cfg = config("--config", str(path))
    assert (cfg.timeouts.upstream_idle, cfg.timeouts.connect, cfg.manifest_ttl) == (120, 4, 0.5)
    path.write_text('listen = ":5000"\nread-timeout = "1x"\n')
    assert usage_error(capsys, "--config", str(path)) == (
        f"hubproxy: error: {path}:2: read-timeout: not a duration: '1x' {DURATION_HELP}"
    )
    path.write_text("read-timeout = true\n")
    assert usage_error(capsys, "--config", str(path)) == (
        f"hubproxy: error: {path}:1: read-timeout: expected a number of seconds or a duration "
        'string like "1m", got a boolean true'
    )
    path.write_text('read-timeout = "0s"\n')
    assert usage_error(capsys, "--config", str(path)) == (
        f"hubproxy: error: {path}:1: --read-timeout must be a positive number of seconds"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--connect-timeout", "-1"],
        ["--read-timeout", "nan"],
        ["--handshake-timeout", "-5"],
        ["--client-idle-timeout", "nan"],
    ],
)
def test_unusable_timeouts_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises((UsageError, SystemExit)):
        config(*argv)


def test_timeouts_are_finite_when_given_sane_values() -> None:
    t = config("--connect-timeout", "0.5").timeouts
    assert math.isfinite(t.connect)
    assert t.connect == 0.5


# ---------------------------------------------------------------- help and version


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(
        "usage: hubproxy [--config FILE] [flags]\n       hubproxy COMMAND [arguments]\n"
    )
    assert "\ncommands:\n" in out
    for name, args, what in COMMANDS:
        assert f"\n  {name} {args}  " in out and f"  {what}\n" in out
    # durations show what they take, not argparse's HANDSHAKE_TIMEOUT
    assert "\n  --handshake-timeout DURATION\n" in out
    assert "\ntimeouts (seconds, or with a unit: 250ms, 90s, 1m, 1h30m):\n" in out
    for setting in SETTINGS:
        assert setting.dest.upper() not in out
    for flag in (
        "--fallback",
        "--upstream-proxy",
        "--upstream",
        "--cert",
        "--key",
        "--listen",
        "--library-prefix",
        "--public-url",
    ):
        assert flag in out


def test_help_lists_every_command_main_runs() -> None:
    assert list(SUBCOMMANDS) == [name for name, _, _ in COMMANDS]


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_command_has_help(capsys: pytest.CaptureFixture[str], name: str, flag: str) -> None:
    assert main([name, flag]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"usage: hubproxy {name} ")
    assert err == ""


def test_check_config_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--help"]) == 0
    assert capsys.readouterr() == (CHECK_CONFIG_HELP, "")


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["print-config", "dockr", "--url", "http://m:5000"],
            "hubproxy print-config: error: client: invalid choice: 'dockr'; did you mean 'docker'?",
        ),
        (
            ["print-config", "docker"],
            "hubproxy print-config: error: the following arguments are required: --url "
            "(see 'hubproxy print-config --help')",
        ),
        (
            ["cache", "verify", "--cachedir", "/srv"],
            "hubproxy cache verify: error: unknown flag --cachedir; did you mean --cache-dir?",
        ),
        (
            ["cache"],
            "hubproxy cache: error: the following arguments are required: COMMAND "
            "(see 'hubproxy cache --help')",
        ),
        (
            ["check-config"],
            "hubproxy check-config: error: the config file comes first: "
            "hubproxy check-config FILE [flags]",
        ),
        (
            ["check-config", "--listen", ":5000", "hubproxy.toml"],
            "hubproxy check-config: error: the config file comes first: "
            "hubproxy check-config FILE [flags]",
        ),
    ],
)
def test_command_usage_error_lines(
    capsys: pytest.CaptureFixture[str], argv: list[str], line: str
) -> None:
    assert main(argv) == 2
    assert capsys.readouterr() == ("", line + "\n")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("hubproxy ")


# ---------------------------------------------------------------- access control flags


def test_access_control_flags_reach_the_config(tmp_path: Path) -> None:
    users = tmp_path / "users"
    add_user(users, "alice", "pw-123")
    cfg = config(
        "--allow",
        "192.168.0.0/16",
        "--allow",
        "fd00::/8",
        "--ops-allow",
        "127.0.0.1",
        "--users",
        str(users),
        "--images-allow",
        "library/*",
        "--images-deny",
        "library/busybox",
        "--client-rate-limit",
        "5",
        "--client-burst",
        "50",
    )
    assert cfg.allow == parse_networks(["192.168.0.0/16", "fd00::/8"])
    assert cfg.ops_allow == parse_networks(["127.0.0.1"])
    assert cfg.users_file == str(users)
    assert cfg.images == parse_image_rules(["library/*"], ["library/busybox"])
    assert cfg.client_rate_limit == 5 and cfg.client_burst == 50
    open_mirror = config()
    assert open_mirror.allow.networks == () and open_mirror.users_file is None
    assert open_mirror.images.allow == () and open_mirror.images.deny == ()
    assert open_mirror.client_rate_limit == 0


def test_empty_users_file_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("# nobody yet\n")
    line = usage_error(capsys, "--users", str(users))
    assert "hubproxy user add NAME" in line


def test_user_command_adds_a_user_main_accepts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    users = tmp_path / "users"
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret-pass\n"))
    assert main(["user", "add", "carol", "--users", str(users), "--password-stdin"]) == 0
    assert load_users(users).keys() == {"carol"}
    assert "s3cret-pass" not in users.read_text()
    assert config("--users", str(users)).users_file == str(users)
    capsys.readouterr()


# ---------------------------------------------------------------- --config and check-config


def test_config_file_errors_name_the_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "hubproxy.toml"
    path.write_text('listen = "127.0.0.1:0"\n\n# why\nread-timeout = -3\n')
    line = usage_error(capsys, "--config", str(path))
    assert line == (
        f"hubproxy: error: {path}:4: --read-timeout must be a positive number of seconds"
    )
    # the same bad value typed on the command line is reported as the flag's
    line = usage_error(capsys, "--read-timeout", "-3")
    assert line == "hubproxy: error: --read-timeout must be a positive number of seconds"
    # and a flag overriding the file's bad value makes it good
    cfg = config("--config", str(path), "--read-timeout", "5")
    assert cfg.timeouts.upstream_idle == 5


def test_check_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('listen = "0.0.0.0:5000"\nfallback = ["https://worker.example"]\n')
    assert main(["check-config", str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: ok\n"
    bad = tmp_path / "bad.toml"
    bad.write_text('listen = "0.0.0.0:5000"\ncache_dir = "/tmp"\n')
    assert main(["check-config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"hubproxy check-config: error: {bad}:2: cache_dir: unknown key")
    assert "cache-dir" in err  # the suggestion
    assert main(["check-config"]) == 2
    capsys.readouterr()
    # a misspelt flag after the file gets the same suggestion as on hubproxy's command line
    assert main(["check-config", str(good), "--lisen", ":5000"]) == 1
    assert capsys.readouterr().err == (
        "hubproxy check-config: error: unknown flag --lisen; did you mean --listen?\n"
    )


# ---------------------------------------------------------------- registries


def test_builtin_registries_and_registry_flags(tmp_path: Path, pem: dict[str, Path]) -> None:
    login = tmp_path / "ghcr.login"
    login.write_text("# the operator's pull token\nbot:ghp_secret\n")
    cfg = config(
        "--registry",
        "registry.example.com=https://registry.example.com:5000",
        "--registry-fallback",
        "ghcr.io=https://ghcr-worker.example.dev",
        "--registry-ca",
        f"registry.example.com={pem['ca']}",
        "--registry-proxy",
        "quay.io=http://192.168.1.1:3128",
        "--registry-login",
        f"ghcr.io={login}",
        "--host-map",
        "ghcr.mirror.lan=ghcr.io",
        "--allow",
        "192.168.0.0/16",
    )
    table = cfg.registry_table()
    names = [r.name for r in table.registries]
    assert names[0] == "docker.io" and table.default == "docker.io"
    for builtin in ("ghcr.io", "quay.io", "registry.k8s.io", "gcr.io", "nvcr.io"):
        assert builtin in names
    assert "mcr.microsoft.com" in names and "registry.example.com" in names
    ghcr = table.find("ghcr.io")
    assert ghcr is not None and ghcr.login == ("bot", "ghp_secret")
    assert [str(u) for u in ghcr.upstreams] == [
        "https://ghcr.io/",
        "https://ghcr-worker.example.dev/",
    ]
    assert "ghp_secret" not in repr(ghcr)  # never printed with the config
    assert table.find("k8s.gcr.io") is table.find("registry.k8s.io")
    internal = table.find("registry.example.com")
    assert internal is not None and internal.upstream_ca == str(pem["ca"])
    quay = table.find("quay.io")
    assert quay is not None and quay.upstream_proxy is not None
    assert cfg.host_map == (("ghcr.mirror.lan", "ghcr.io"),)


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        (["--registry", "ghcr.io"], "--registry"),
        (["--registry", "not-a-host=https://x.example"], "--registry"),
        (["--registry", "docker.io=https://x.example"], "--upstream"),
        (["--registry", "r.example=ftp://x"], "--registry"),
        (["--registry-fallback", "unknown.example=https://x.example"], "--registry-fallback"),
        (["--registry-ca", "ghcr.io=/nonexistent.pem"], "--registry-ca"),
        (["--registry-proxy", "ghcr.io=https://proxy:3128"], "--registry-proxy"),
        (["--host-map", "ghcr.mirror.lan=nowhere.example"], "--host-map"),
        (["--registry-login", "ghcr.io=/nonexistent"], "--registry-login"),
    ],
)
def test_registry_usage_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str], mentions: str
) -> None:
    assert mentions in usage_error(capsys, *argv)


def test_operator_login_needs_access_control(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    login = tmp_path / "hub.login"
    login.write_text("bot:dckr_pat_secret\n")
    line = usage_error(capsys, "--registry-login", f"docker.io={login}")
    assert "--allow or --users" in line and "--allow-shared-login" in line
    assert "dckr_pat_secret" not in line
    assert config("--registry-login", f"docker.io={login}", "--allow-shared-login").default_login
    assert config("--registry-login", f"docker.io={login}", "--allow", "10.0.0.0/8").default_login
    login.write_text("just-a-token\n")
    assert "user:password" in usage_error(
        capsys, "--registry-login", f"docker.io={login}", "--allow-shared-login"
    )
