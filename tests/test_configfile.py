"""Tests for the TOML config file (hubproxy.configfile): values, errors with their lines, and the
command line on top of the file. Pure apart from reading files under tmp_path.

Most tests use a small settings table of their own with every kind of setting the real table
(hubproxy.settings.SETTINGS) has; a few run against the real one and the shipped example file.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest
import trustme

from hubproxy.configfile import (
    ConfigFileError,
    FileSettings,
    file_keys,
    find_key_lines,
    load_config_file,
    read_settings,
)
from hubproxy.settings import Kind, Setting, UsageError, Values, build_config

EXAMPLE = Path(__file__).resolve().parent.parent / "hubproxy" / "service" / "hubproxy.toml"


def small_table() -> tuple[Setting, ...]:
    """The kinds of settings the real table has."""
    group = "listening"
    return (
        Setting("listen", "", group, metavar="HOST:PORT"),
        Setting("max-connections", "", group, Kind.INT, 1024, metavar="N"),
        Setting("read-timeout", "", group, Kind.NUMBER, 60.0),
        Setting("cache-dir", "", group, default="/tmp/cache", metavar="DIR"),
        Setting("fallback", "", group, metavar="URL", repeatable=True),
        Setting("library-prefix", "", group, Kind.BOOL),
        Setting("no-cache", "", group, Kind.SWITCH, False),
        Setting("log-level", "", default="info", choices=("debug", "info", "warning")),
    )


def parse(
    table: tuple[Setting, ...], argv: list[str]
) -> tuple[argparse.Namespace, FileSettings | None, frozenset[str], Values]:
    """read_settings, with the raw values as a namespace to read them as attributes."""
    values, settings, given = read_settings(argv, table)
    return argparse.Namespace(**values.raw), settings, given, values


def top_level(lines: dict[tuple[str, ...], int]) -> dict[str, int]:
    return {path[0]: line for path, line in lines.items() if len(path) == 1}


def write(tmp_path: Path, text: str, name: str = "hubproxy.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def load(tmp_path: Path, text: str) -> FileSettings:
    return load_config_file(write(tmp_path, text), small_table())


# --- values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "dest", "expected"),
    [
        ('listen = "0.0.0.0:443"', "listen", "0.0.0.0:443"),
        ("'cache-dir' = '/var/cache/hubproxy'", "cache_dir", "/var/cache/hubproxy"),
        ('"cache-dir" = "/srv"', "cache_dir", "/srv"),
        ("max-connections = 10", "max_connections", 10),
        ("read-timeout = 2.5", "read_timeout", 2.5),
        ("read-timeout = 7", "read_timeout", 7.0),
        ('fallback = ["https://a", "https://b"]', "fallback", ["https://a", "https://b"]),
        ('fallback = "https://a"', "fallback", ["https://a"]),
        ("fallback = []", "fallback", []),
        ("library-prefix = true", "library_prefix", True),
        ("library-prefix = false", "library_prefix", False),
        ("no-cache = true", "no_cache", True),
        ("no-cache = false", "no_cache", False),
        ('log-level = "debug"', "log_level", "debug"),
    ],
)
def test_value(tmp_path: Path, text: str, dest: str, expected: object) -> None:
    settings = load(tmp_path, f"# hubproxy\n\n{text}\n")
    assert settings.values == {dest: expected}
    assert type(settings.values[dest]) is type(expected)
    assert settings.lines == {dest: 3}
    assert settings.where(dest) == f"{settings.path}:3"


def test_empty_file(tmp_path: Path) -> None:
    settings = load(tmp_path, "# nothing set\n")
    assert settings.values == {} and settings.lines == {}


def test_lines_of_several_keys(tmp_path: Path) -> None:
    text = """\
# a comment with listen = "x"
listen = "0.0.0.0:443"   # trailing comment

fallback = [
  "https://a",   # primary = no
  "https://b",
]
cache-dir = '''
read-timeout = 1
'''
  read-timeout = 3.0
max-connections=5
"""
    settings = load(tmp_path, text)
    assert settings.values == {
        "listen": "0.0.0.0:443",
        "fallback": ["https://a", "https://b"],
        "cache_dir": "read-timeout = 1\n",
        "read_timeout": 3.0,
        "max_connections": 5,
    }
    assert settings.lines == {
        "listen": 2,
        "fallback": 4,
        "cache_dir": 8,
        "read_timeout": 11,
        "max_connections": 12,
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a = 1\n\"b\" = 2\n'c' = 3\n", {"a": 1, "b": 2, "c": 3}),
        ('a = """\nb = 1\n"""\nc = 2\n', {"a": 1, "c": 4}),
        ('a = """x\\"""\nb = 1"""\nc = 2\n', {"a": 1, "c": 3}),
        ('a = """x""""\nb = 1\n', {"a": 1, "b": 2}),
        ("a = 'x\\'\nb = 1\n", {"a": 1, "b": 2}),
        ('a = "#"\nb = 1\n', {"a": 1, "b": 2}),
        ('a = 1 # """\nb = 2\n', {"a": 1, "b": 2}),
        ("a.x = 1\nb = 2\n", {"a": 1, "b": 2}),
        ("a = 1\n[t]\nb = 2\n[[u]]\nc = 3\n", {"a": 1, "t": 2, "u": 4}),
        ('[ "t" . x ]\n', {"t": 1}),
        ('"a\\u0062" = 1\n', {"ab": 1}),
        ("a = 1\r\nb = 2\r\n", {"a": 1, "b": 2}),
    ],
)
def test_find_key_lines(text: str, expected: dict[str, int]) -> None:
    assert top_level(find_key_lines(text)) == expected


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "key", "problem"),
    [
        ('listen = "a"\n\ncahce-dir = "/x"\n', 3, "cahce-dir", "did you mean 'cache-dir'?"),
        ("\nfrobnicate = 1\n", 2, "frobnicate", "unknown key; see hubproxy --help"),
        ('config = "other.toml"\n', 1, "config", "cannot name another config file"),
        ("help = true\n", 1, "help", "unknown key"),
        ('version = "1"\n', 1, "version", "unknown key"),
        ("no-library-prefix = true\n", 1, "no-library-prefix", "'library-prefix = false'"),
        ("no-library-prefix = false\n", 1, "no-library-prefix", "'library-prefix = true'"),
        ("listen = 'x'\n[listening]\ncert = 'c'\n", 2, "listening", "there are no tables"),
        ("[[cache-dir]]\n", 1, "cache-dir", "expected a string (DIR), got an array"),
        ("cache.dir = '/x'\n", 1, "cache", "unknown key"),
        ("\n\nread-timeout = 'ten'\n", 3, "read-timeout", 'expected a number, got a string "ten"'),
        ("read-timeout = true\n", 1, "read-timeout", "expected a number, got a boolean true"),
        ("max-connections = 1.5\n", 1, "max-connections", "expected an integer (N), got a float"),
        ("max-connections = false\n", 1, "max-connections", "got a boolean false"),
        ('max-connections = "10"\n', 1, "max-connections", 'got a string "10"'),
        ("listen = 443\n", 1, "listen", "expected a string (HOST:PORT), got an integer 443"),
        ("listen = 2024-01-01\n", 1, "listen", "got a date 2024-01-01"),
        ("listen = {host = 'x'}\n", 1, "listen", "got a table"),
        ("fallback = 5\n", 1, "fallback", "expected a string (URL), got an integer 5"),
        ('fallback = [\n  "a",\n  1,\n]\n', 1, "fallback", "item 2: expected a string"),
        ("fallback = {a = 1}\n", 1, "fallback", "expected an array, got a table"),
        ('library-prefix = "yes"\n', 1, "library-prefix", "expected a boolean (true or false)"),
        ("no-cache = 1\n", 1, "no-cache", "expected a boolean (true or false), got an integer 1"),
        ('log-level = "loud"\n', 1, "log-level", "expected one of 'debug', 'info', 'warning'"),
        ("# first\nlisten = 1\nfrob = 2\n", 2, "listen", "got an integer 1"),
        ("frob = 2\nlisten = 1\n", 1, "frob", "unknown key"),
    ],
)
def test_bad_key_or_value(tmp_path: Path, text: str, line: int, key: str, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigFileError) as info:
        load_config_file(path, small_table())
    error = info.value
    assert (error.path, error.line, error.key) == (path, line, key)
    assert problem in error.problem
    assert str(error) == f"{path}:{line}: {key}: {error.problem}"
    assert "\n" not in str(error)


def test_unknown_key_without_close_match(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError) as info:
        load(tmp_path, "zzzzzz = 1\n")
    assert info.value.problem == "unknown key; see hubproxy --help"


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("listen = 'a'\nread-timeout = \n", 2, "Invalid value (column 16)"),
        ("a = 1\n\na = 2\n", 3, "Cannot overwrite a value"),
        ("[t]\n[t]\n", 2, "Cannot declare"),
        ('a = 1\nb = "open\n', 2, "Illegal character"),
        ('a = 1\nb = """open\n', 2, "Unterminated string at the end of the file"),
        ("a = [\n1,\n", 2, "at the end of the file"),
    ],
)
def test_not_toml(tmp_path: Path, text: str, line: int, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigFileError) as info:
        load_config_file(path, small_table())
    assert info.value.line == line and info.value.key is None
    assert str(info.value).startswith(f"{path}:{line}: not valid TOML: ")
    assert problem in str(info.value)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "hubproxy.toml"
    path.write_bytes(b'listen = "a"\ncache-dir = "\xff"\n')
    with pytest.raises(ConfigFileError, match=r":2: not valid TOML: not UTF-8 text$"):
        load_config_file(str(path), small_table())


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigFileError) as info:
        load_config_file(path, small_table())
    assert str(info.value) == f"{path}: cannot read: No such file or directory"
    assert info.value.line is None


@pytest.mark.parametrize(
    ("name", "strerror"), [(".", "Is a directory"), ("plain/hubproxy.toml", "Not a directory")]
)
def test_unreadable_path(tmp_path: Path, name: str, strerror: str) -> None:
    (tmp_path / "plain").write_text("")
    path = str(tmp_path / name)
    with pytest.raises(ConfigFileError) as info:
        load_config_file(path, small_table())
    assert str(info.value) == f"{path}: cannot read: {strerror}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'listen = "a"\n')
    os.chmod(path, 0)
    with pytest.raises(ConfigFileError) as info:
        load_config_file(path, small_table())
    assert str(info.value) == f"{path}: cannot read: Permission denied"


def test_a_parse_error_names_the_file_line(tmp_path: Path) -> None:
    path = write(tmp_path, "listen = ':5000'\n\ncache-size = '20X'\n")
    values, _, _ = read_settings(["--config", path])
    with pytest.raises(UsageError) as info:
        build_config(values)
    assert str(info.value) == f"{path}:3: --cache-size: not a size: '20X' (try 500M or 20G)"


def test_file_keys_skip_help_version_config_and_negations() -> None:
    keys = file_keys(small_table())
    assert "cache-dir" in keys and "library-prefix" in keys and "no-cache" in keys
    assert not {"help", "version", "config", "no-library-prefix"} & set(keys)


# --- the command line on top of the file ----------------------------------------------------------

FILE = """\
listen = "0.0.0.0:443"
max-connections = 10
read-timeout = 5.0
fallback = ["https://file-a", "https://file-b"]
library-prefix = false
no-cache = true
log-level = "warning"
"""


def test_file_values_below_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, FILE)
    args, settings, given, _ = parse(small_table(), ["--config", path])
    assert settings is not None and settings.path == path
    assert given == {"config"}
    assert args.listen == "0.0.0.0:443"
    assert args.max_connections == 10
    assert args.read_timeout == 5.0
    assert args.fallback == ["https://file-a", "https://file-b"]
    assert args.library_prefix is False
    assert args.no_cache is True
    assert args.log_level == "warning"
    assert args.cache_dir == "/tmp/cache"  # not in the file: the parser's default


def test_flags_override_file(tmp_path: Path) -> None:
    path = write(tmp_path, FILE)
    argv = [
        f"--config={path}",
        "--max-connections",
        "20",
        "--read-timeout=1.5",
        "--fallback",
        "https://cli",
        "--library-prefix",
        "--log-level",
        "debug",
    ]
    args, settings, given, values = parse(small_table(), argv)
    assert given == {
        "config",
        "max_connections",
        "read_timeout",
        "fallback",
        "library_prefix",
        "log_level",
    }
    assert args.max_connections == 20
    assert args.read_timeout == 1.5
    assert args.fallback == ["https://cli"]  # replaces the file's list, is not appended to it
    assert args.library_prefix is True
    assert args.log_level == "debug"
    assert args.listen == "0.0.0.0:443" and args.no_cache is True  # still from the file
    assert settings is not None
    assert values.where("max_connections") is None
    assert values.where("listen") == f"{path}:1"
    assert values.where("cache_dir") is None


@pytest.mark.parametrize(
    ("file_value", "argv", "expected"),
    [
        ("true", [], True),
        ("false", [], False),
        ("true", ["--no-library-prefix"], False),
        ("false", ["--library-prefix"], True),
    ],
)
def test_boolean_optional_both_ways(
    tmp_path: Path, file_value: str, argv: list[str], expected: bool
) -> None:
    path = write(tmp_path, f"library-prefix = {file_value}\n")
    args, _, _, _ = parse(small_table(), ["--config", path, *argv])
    assert args.library_prefix is expected


@pytest.mark.parametrize(
    ("file_value", "argv", "expected"),
    [("true", [], True), ("false", [], False), ("false", ["--no-cache"], True)],
)
def test_store_true_both_ways(
    tmp_path: Path, file_value: str, argv: list[str], expected: bool
) -> None:
    path = write(tmp_path, f"no-cache = {file_value}\n")
    args, _, _, _ = parse(small_table(), ["--config", path, *argv])
    assert args.no_cache is expected


def test_append_from_file_only_when_not_on_command_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'fallback = "https://file"\n')
    table = small_table()
    args, _, _, _ = parse(table, ["--config", path])
    assert args.fallback == ["https://file"]
    args, _, _, _ = parse(table, ["--fallback", "https://x", "--config", path])
    assert args.fallback == ["https://x"]


def test_without_config() -> None:
    args, settings, given, _ = parse(small_table(), ["--max-connections", "3"])
    assert settings is None and given == {"max_connections"}
    assert args.max_connections == 3 and args.fallback == [] and not hasattr(args, "config")


def test_defaults_stay_the_tables_after_parsing(tmp_path: Path) -> None:
    table = small_table()
    path = write(tmp_path, FILE)
    parse(table, ["--config", path, "--listen", "a:1"])
    args, _, given, _ = parse(table, [])
    assert given == frozenset()
    assert args.max_connections == 1024 and args.fallback == [] and args.listen is None


def test_bad_file_raises(tmp_path: Path) -> None:
    path = write(tmp_path, "max-connections = 'many'\n")
    with pytest.raises(ConfigFileError, match=r":1: max-connections: "):
        read_settings(["--config", path, "--max-connections", "3"], small_table())


# --- the real parser and the shipped example --------------------------------------------------


def test_real_parser(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
cache-dir = "/var/cache/hubproxy"
fallback = ["https://worker.example.com"]
read-timeout = 90
library-prefix = false
no-cache = true
""",
    )
    settings = load_config_file(path)
    assert settings.values == {
        "cache_dir": "/var/cache/hubproxy",
        "fallback": ["https://worker.example.com"],
        "read_timeout": 90.0,
        "library_prefix": False,
        "no_cache": True,
    }
    assert settings.lines == {
        "cache_dir": 1,
        "fallback": 2,
        "read_timeout": 3,
        "library_prefix": 4,
        "no_cache": 5,
    }
    values, _, given = read_settings(["--config", path, "--read-timeout", "7"])
    assert "read_timeout" in given
    config = build_config(values)
    assert config.timeouts.upstream_idle == 7.0
    assert config.cache_dir is None  # no-cache from the file
    assert config.library_prefix is False
    assert [u.origin.host for u in config.upstreams] == [
        "registry-1.docker.io",
        "worker.example.com",
    ]


def test_bare_numbers_for_counts_and_sizes_are_read_as_the_flag_would(tmp_path: Path) -> None:
    """``workers = 4`` is what anyone writes; before, it was refused as not a string. A size
    written as a bare number gets the size's own message (no unit), not a type error."""
    path = write(tmp_path, 'workers = 3\nmanifest-memory = "16M"\n')
    values, _, _ = read_settings(["--config", path])
    assert build_config(values).workers == 3
    for text, line, problem in [
        ("workers = 1000\n", 1, "--workers: must be from 1 to 128, or auto"),
        ("workers = 0\n", 1, "--workers: must be from 1 to 128, or auto"),
        ("\ncache-size = 20\n", 2, "--cache-size: '20' has no unit: write 20G or 20GiB"),
        ("body-memory = 16\n", 1, "--body-memory: '16' has no unit"),
    ]:
        path = write(tmp_path, text)
        with pytest.raises(UsageError, match=re.escape(f"{path}:{line}: {problem}")):
            build_config(read_settings(["--config", path])[0])
    # only where the value is a count or a size: an address stays a string
    path = write(tmp_path, "listen = 443\n")
    with pytest.raises(ConfigFileError, match="expected a string"):
        read_settings(["--config", path])


def test_real_parser_unknown_key(tmp_path: Path) -> None:
    path = write(tmp_path, "listen = ':5000'\nread-timout = 5\n")
    with pytest.raises(ConfigFileError) as info:
        load_config_file(path)
    assert info.value.line == 2
    assert info.value.problem.endswith("did you mean 'read-timeout'?")


def test_example_file_is_valid() -> None:
    settings = load_config_file(str(EXAMPLE))
    assert settings.values["listen"] == "0.0.0.0:443"
    assert settings.values["cache_dir"] == "/var/cache/hubproxy"
    assert {"cert", "key"} <= set(settings.values)


def test_example_file_is_valid_uncommented(tmp_path: Path) -> None:
    """The commented-out defaults are valid values too, once uncommented."""
    text = EXAMPLE.read_text()
    uncommented = re.sub(r"(?m)^# ([a-z][a-z0-9-]* = )", r"\1", text)
    keys = set(top_level(find_key_lines(uncommented)))
    settings = load_config_file(write(tmp_path, uncommented))
    assert len(settings.values) == len(keys)


def test_example_file_names_every_flag() -> None:
    text = EXAMPLE.read_text()
    named = set(re.findall(r"(?m)^[ \t]*(?:#[ \t]*)?([a-z][a-z0-9-]*)[ \t]*=", text))
    missing = set(file_keys()) - named
    assert not missing, f"add these keys to {EXAMPLE.name}: {sorted(missing)}"


# --- per-registry tables ------------------------------------------------------------------------

REGISTRY_TABLES = """\
allow = ["10.0.0.0/8"]
registry-fallback = ["ghcr.io=https://ghcr-worker.example"]
host-map = ["ghcr.lan=ghcr.io"]

[registry."ghcr.io"]
fallback = ["https://ghcr-worker.example"]  # the same list as the flat key: fine
login = "{login}"
host = ["ghcr.lan", "GHCR2.lan"]

[registry."Registry.Example.com"]
upstream = "https://registry.example.com:5000"
upstream-ca = "{ca}"
upstream-proxy = "http://192.168.1.1:3128"
fallback = "https://registry-worker.example"
"""


@pytest.fixture
def registry_files(tmp_path: Path) -> dict[str, str]:
    login = tmp_path / "ghcr.login"
    login.write_text("bot:ghp_secret\n")
    ca = tmp_path / "ca.pem"
    ca.write_text(trustme.CA().cert_pem.bytes().decode())
    return {"login": str(login), "ca": str(ca)}


def test_registry_tables_are_the_flat_keys_per_registry(
    tmp_path: Path, registry_files: dict[str, str]
) -> None:
    path = write(tmp_path, REGISTRY_TABLES.format(**registry_files))
    settings = load_config_file(path)
    assert settings.values == {
        "allow": ["10.0.0.0/8"],
        "registry_fallback": [
            "ghcr.io=https://ghcr-worker.example",
            "registry.example.com=https://registry-worker.example",
        ],
        "host_map": ["ghcr.lan=ghcr.io", "ghcr2.lan=ghcr.io"],
        "registry_login": [f"ghcr.io={registry_files['login']}"],
        "registry": ["registry.example.com=https://registry.example.com:5000"],
        "registry_ca": [f"registry.example.com={registry_files['ca']}"],
        "registry_proxy": ["registry.example.com=http://192.168.1.1:3128"],
    }
    # every item remembers the line of the key that gave it
    assert settings.where("registry_fallback", 0) == f"{path}:2"
    assert settings.where("registry_fallback", 1) == f"{path}:14"
    assert settings.where("host_map", 1) == f"{path}:8"
    assert settings.where("registry", 0) == f"{path}:11"
    config = build_config(read_settings(["--config", path])[0])
    table = config.registry_table()
    ghcr = table.find("ghcr.io")
    assert ghcr is not None and ghcr.login == ("bot", "ghp_secret")
    assert [str(u) for u in ghcr.upstreams] == ["https://ghcr.io/", "https://ghcr-worker.example/"]
    internal = table.find("registry.example.com")
    assert internal is not None
    assert [str(u) for u in internal.upstreams] == [
        "https://registry.example.com:5000/",
        "https://registry-worker.example/",
    ]
    assert internal.upstream_ca == registry_files["ca"]
    assert str(internal.upstream_proxy) == "http://192.168.1.1:3128"
    assert config.host_map == (("ghcr.lan", "ghcr.io"), ("ghcr2.lan", "ghcr.io"))


def test_command_line_replaces_what_tables_gave(
    tmp_path: Path, registry_files: dict[str, str]
) -> None:
    path = write(tmp_path, REGISTRY_TABLES.format(**registry_files))
    argv = ["--config", path, "--registry-fallback", "ghcr.io=https://cli.example"]
    values, _, _ = read_settings(argv)
    assert values.raw["registry_fallback"] == ["ghcr.io=https://cli.example"]
    assert values.where("registry_fallback", 0) is None
    ghcr = build_config(values).registry_table().find("ghcr.io")
    assert ghcr is not None
    assert [u.origin.host for u in ghcr.upstreams] == ["ghcr.io", "cli.example"]


@pytest.mark.parametrize(
    ("text", "line", "key", "problem"),
    [
        (
            'registry-fallback = ["ghcr.io=https://a"]\n[registry."ghcr.io"]\nfallback = "https://b"\n',
            3,
            'registry."ghcr.io".fallback',
            "conflicts with registry-fallback at line 1 ('ghcr.io=https://a')",
        ),
        (
            'registry-fallback = ["ghcr.io=https://a", "ghcr.io=https://b"]\n'
            '[registry."ghcr.io"]\nfallback = ["https://b", "https://a"]\n',
            3,
            'registry."ghcr.io".fallback',
            "conflicts with registry-fallback at line 1",
        ),
        (
            'registry-proxy = ["GHCR.io=http://p:1"]\n\n[registry."ghcr.io"]\n'
            'upstream-proxy = "http://q:1"\n',
            4,
            'registry."ghcr.io".upstream-proxy',
            "conflicts with registry-proxy at line 1 ('GHCR.io=http://p:1')",
        ),
        (
            'registry-login = ["ghcr.io=/a"]\n[registry."ghcr.io"]\nlogin = "/b"\n',
            3,
            'registry."ghcr.io".login',
            "conflicts with registry-login at line 1",
        ),
        (
            'host-map = ["x.lan=quay.io"]\n[registry."ghcr.io"]\nhost = ["y.lan", "X.lan"]\n',
            3,
            'registry."ghcr.io".host',
            "conflicts with host-map at line 1 ('x.lan=quay.io')",
        ),
        (
            '[registry."ghcr.io"]\nhost = "x.lan"\n[registry."quay.io"]\nhost = "x.lan"\n',
            4,
            'registry."quay.io".host',
            """conflicts with registry."ghcr.io".host at line 2 ('x.lan=ghcr.io')""",
        ),
        (
            '[registry."ghcr.io"]\n\nupstrem = "https://x"\n',
            3,
            'registry."ghcr.io".upstrem',
            "unknown key in a registry table (known: upstream, fallback, upstream-ca, "
            "upstream-proxy, login, host); did you mean 'upstream'?",
        ),
        (
            '[registry."ghcr.io"]\nfallback = 5\n',
            2,
            'registry."ghcr.io".fallback',
            "expected a string (URL), got an integer 5",
        ),
        (
            '[registry."ghcr.io"]\nhost = [true]\n',
            2,
            'registry."ghcr.io".host',
            "item 1: expected a string (HOST), got a boolean true",
        ),
        (
            '[registry."ghcr.io"]\nupstream = ["https://a"]\n',
            2,
            'registry."ghcr.io".upstream',
            "expected a string (URL), got an array",
        ),
        ('[registry]\n"ghcr.io" = "https://x"\n', 2, 'registry."ghcr.io"', "expected a table"),
        (
            "listen = 'x'\n[listening]\n",
            2,
            "listening",
            'there are no tables but [registry."NAME"]',
        ),
    ],
)
def test_registry_table_errors(
    tmp_path: Path, text: str, line: int, key: str, problem: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigFileError) as info:
        load_config_file(path)
    error = info.value
    assert (error.line, error.key) == (line, key), str(error)
    assert problem in error.problem


def test_a_bad_value_in_a_registry_table_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'listen = ":5000"\n[registry."ghcr.io"]\n\nupstream = "ftp://x"\n')
    values, _, _ = read_settings(["--config", path])
    with pytest.raises(UsageError) as info:
        build_config(values)
    assert str(info.value) == f"{path}:4: --registry: not an http or https URL: 'ftp://x'"
    path = write(
        tmp_path,
        '[registry."quay.io"]\nhost = ["q.lan"]\n[registry."nowhere.example"]\nhost = "n.lan"\n',
    )
    values, _, _ = read_settings(["--config", path])
    with pytest.raises(UsageError, match=r":4: --host-map: no registry 'nowhere.example'$"):
        build_config(values)


def test_the_example_registry_table_is_valid(tmp_path: Path) -> None:
    block = re.findall(r"(?m)^#   (.*)$", EXAMPLE.read_text())
    assert block and block[0] == '[registry."ghcr.io"]'
    settings = load_config_file(write(tmp_path, "\n".join(block) + "\n"))
    assert settings.values["registry_fallback"] == [
        "ghcr.io=https://ghcr-worker.example.workers.dev"
    ]
    assert settings.values["host_map"] == ["ghcr.mirror.example.com=ghcr.io"]
    assert settings.values["registry"] == [
        "ghcr.io=https://ghcr.io",
        "registry.example.com=https://registry.example.com:5000",
    ]
    assert {"registry_ca", "registry_proxy", "registry_login"} <= set(settings.values)
