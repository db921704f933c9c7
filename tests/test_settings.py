"""Tests for the settings table (hubproxy.settings): the command line and the config file are both
made from it, so every setting is a flag and a key, and nothing else is either."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hubproxy.config import Config
from hubproxy.configfile import file_keys, load_config_file, read_settings, registry_keys
from hubproxy.settings import SETTINGS, Kind, Setting, build_config, build_parser, defaults

# A valid value of each kind, as a command-line argument and as TOML.
SAMPLE = {
    Kind.TEXT: ("x", '"x"'),
    Kind.INT: ("3", "3"),
    Kind.NUMBER: ("2.5", "2.5"),
    Kind.DURATION: ("1m30s", '"1m30s"'),  # the same 90 seconds both ways
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
