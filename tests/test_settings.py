"""Tests for the settings table (hubproxy.settings): the command line and the config file are both
made from it, so every setting is a flag and a key, and nothing else is either."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hubproxy.cli import check_config, load_settings
from hubproxy.config import Config
from hubproxy.configfile import file_keys, load_config_file, read_settings, registry_keys
from hubproxy.net.buffers import auto_budget
from hubproxy.ops.memory import machine_memory
from hubproxy.settings import (
    SETTINGS,
    Kind,
    Setting,
    UsageError,
    build_config,
    build_parser,
    defaults,
)

# A valid value of each kind, as a command-line argument and as TOML.
SAMPLE = {
    Kind.TEXT: ("x", '"x"'),
    Kind.INT: ("3", "3"),
    Kind.NUMBER: ("2.5", "2.5"),
    Kind.DURATION: ("1m30s", '"1m30s"'),  # the same 90 seconds both ways
    Kind.DURATION_RULES: ("latest=1m30s", '"latest=1m30s"'),
}


def sample(setting: Setting) -> tuple[list[str], str]:
    """(argv, TOML line) setting ``setting`` to a value of its kind."""
    if setting.kind is Kind.SWITCH or setting.kind is Kind.BOOL:
        return [setting.flag], f"{setting.name} = true"
    arg, toml = SAMPLE[setting.kind]
    if setting.choices:
        arg, toml = setting.choices[0], f'"{setting.choices[0]}"'
    if setting.repeatable:
        toml = f"[{toml}]"
    return [setting.flag, arg], f"{setting.name} = {toml}"


def test_names_are_unique_and_spelt_like_flags() -> None:
    names = [setting.name for setting in SETTINGS]
    assert len(names) == len(set(names))
    assert all(re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", name) for name in names)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_every_setting_is_a_flag_and_a_key(setting: Setting, tmp_path: Path) -> None:
    argv, line = sample(setting)
    values, _, given = read_settings(argv)
    assert given == {setting.dest}
    from_command_line = values.raw[setting.dest]
    assert from_command_line != setting.initial()
    path = tmp_path / "hubproxy.toml"
    path.write_text(f"# one key\n{line}\n")
    settings = load_config_file(str(path))
    assert settings.values == {setting.dest: from_command_line}
    assert settings.lines == {setting.dest: 2}


def test_no_flag_outside_the_table() -> None:
    flags = set(build_parser().flags)
    fixed = {"-h", "--help", "--version", "--config"}  # the parser's own, not settings
    negations = {f"--no-{s.name}" for s in SETTINGS if s.kind is Kind.BOOL}
    assert flags - fixed - negations == {setting.flag for setting in SETTINGS}
    assert set(file_keys()) == {setting.name for setting in SETTINGS}


def test_registry_table_keys_are_per_registry_pairs() -> None:
    keys = registry_keys()
    assert set(keys) == {"upstream", "fallback", "upstream-ca", "upstream-proxy", "login", "host"}
    for setting in keys.values():
        assert setting.repeatable and setting.metavar is not None and "=" in setting.metavar


def test_defaults_make_the_default_config() -> None:
    """Nothing given: the table's defaults, checked, make the same Config as ``Config()`` where
    both have a value (``Config()`` has no upstreams and no cache directory of its own)."""
    config = build_config(read_settings([])[0])
    empty = Config()
    for name in ("listen_host", "listen_port", "max_redirects", "max_connections", "limits"):
        assert getattr(config, name) == getattr(empty, name), name
    assert config.timeouts == empty.timeouts and config.cache_size == empty.cache_size
    assert config.allow == empty.allow and config.images == empty.images
    assert defaults()["log_level"] == "info"


def test_every_value_has_a_metavar() -> None:
    """--help shows what a flag takes (SECONDS, DURATION, N), never argparse's HANDSHAKE_TIMEOUT."""
    for setting in SETTINGS:
        if setting.kind not in (Kind.SWITCH, Kind.BOOL):
            assert setting.metavar or setting.choices, setting.name
        if setting.kind is Kind.DURATION:
            assert setting.metavar == "DURATION", setting.name
    timeouts = [s.name for s in SETTINGS if s.name.endswith("-timeout")]
    assert timeouts and all(
        next(s for s in SETTINGS if s.name == name).kind is Kind.DURATION for name in timeouts
    )


def test_help_keeps_the_table_order_and_groups() -> None:
    text = build_parser().format_help()
    lines = text.splitlines()
    positions = [
        next(i for i, line in enumerate(lines) if re.match(rf"  {setting.flag}\b(?!-)", line))
        for setting in SETTINGS
    ]
    grouped = [s for s in SETTINGS if s.group is not None]
    assert positions[: len(grouped)] == sorted(positions[: len(grouped)])
    for title in dict.fromkeys(s.group for s in grouped):
        assert f"\n{title}:\n" in text


# -- sizes: a unit is required, and read as written -----------------------------------------------

NO_UNIT = (
    "'20' has no unit: write 20G or 20GiB for 20 x 2^30 bytes, 20GB for 20 x 10^9 bytes "
    "(M, MB, T, TB likewise; B for bytes)"
)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cache-size", "20"], f"--cache-size: {NO_UNIT}"),
        (
            ["--cache-size", "0"],
            "--cache-size: '0' is less than 1 MiB; to turn the cache off use --no-cache",
        ),
        (
            ["--cache-size", "512K"],
            "--cache-size: '512K' is less than 1 MiB; to turn the cache off use --no-cache",
        ),
        (["--cache-size", "20X"], "--cache-size: not a size: '20X' (try 500M or 20G)"),
        (["--manifest-memory", "20"], f"--manifest-memory: {NO_UNIT}"),
        (["--body-memory", "20"], f"--body-memory: {NO_UNIT}"),
        (["--manifest-cache-size", "0"], "--manifest-cache-size: '0' is less than 1 MiB"),
    ],
)
def test_a_size_without_a_unit_or_below_a_mebibyte_is_refused(
    argv: list[str], message: str
) -> None:
    with pytest.raises(UsageError) as info:
        load_settings(argv)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("argv", "field", "size"),
    [
        (["--cache-size", "20G"], "cache_size", 20 << 30),
        (["--cache-size", "20GiB"], "cache_size", 20 << 30),
        (["--cache-size", "20GB"], "cache_size", 20 * 10**9),
        (["--cache-size", "500MB"], "cache_size", 500 * 10**6),
        (["--manifest-memory", "32MiB"], "manifest_memory", 32 << 20),
        (["--body-memory", "16M"], "body_memory", 16 << 20),
        (["--body-memory", "auto"], "body_memory", auto_budget(machine_memory())),
        ([], "body_memory", auto_budget(machine_memory())),
        (["--manifest-cache-size", "100MB"], "manifest_cache_size", 100 * 10**6),
    ],
)
def test_sizes_are_read_in_binary_and_decimal_units(argv: list[str], field: str, size: int) -> None:
    assert getattr(load_settings(argv)[1], field) == size


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("20", f"--cache-size: {NO_UNIT}"),
        ("0", "--cache-size: '0' is less than 1 MiB; to turn the cache off use --no-cache"),
    ],
)
def test_check_config_refuses_a_size_start_would_refuse(
    value: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "hubproxy.toml"
    path.write_text(f'# the cache\ncache-size = "{value}"\n')
    assert check_config([str(path)]) == 1
    assert capsys.readouterr().err == f"hubproxy check-config: error: {path}:2: {message}\n"
