"""A TOML config file for the command line: ``hubproxy --config hubproxy.toml``.

Theory of operation
-------------------
The settings table (:data:`hubproxy.settings.SETTINGS`) is the one description of hubproxy's
settings; the file adds none of its own. Every setting is a top-level key spelt like its flag
without ``--`` (``cache-dir = "/var/cache/hubproxy"``, ``fallback = ["https://a"]``,
``no-cache = true``), and a key's value is checked against the setting's :class:`Kind`. So a row
added to the table later is a valid key at once, with no list to keep in step.

Per-registry settings can also be written as tables, one per registry::

    [registry."ghcr.io"]
    upstream = "https://ghcr.io"           # registry = ["ghcr.io=https://ghcr.io"]
    fallback = ["https://w.example"]       # registry-fallback = ["ghcr.io=https://w.example"]
    upstream-ca = "/etc/hubproxy/ca.pem"   # registry-ca = ["ghcr.io=/etc/hubproxy/ca.pem"]
    upstream-proxy = "http://proxy:3128"   # registry-proxy = ["ghcr.io=http://proxy:3128"]
    login = "/etc/hubproxy/ghcr.login"     # registry-login = ["ghcr.io=/etc/hubproxy/ghcr.login"]
    host = ["ghcr.mirror.lan"]             # host-map = ["ghcr.mirror.lan=ghcr.io"]

A table is another spelling of the flat keys (the rows with a ``TableKey``): its values become
``NAME=VALUE`` items of those settings, each remembering its own line. A registry may be given
partly by a table and partly by flat keys; the same thing said twice must agree (the same CA,
the same list of fallbacks, a host mapped to one registry only), else the second one is an error
naming both lines.

Anything that is not a setting is refused, never ignored: a misspelt key silently doing nothing is
the classic config-file bug, so an unknown key, table, or a value of the wrong TOML type stops
hubproxy with one line naming the file, the line and the key (and a close match when there is one).

Line numbers: ``tomllib`` gives positions only for syntax errors, not for the keys of a valid
document. Once ``tomllib`` has accepted the text, finding where a key sits is easy: a key is a
line that starts (after blanks) with a key path, bare or quoted parts joined by ``.``, then ``=``,
outside any multi-line string, and it belongs to the last ``[table]`` header above it.
:func:`find_key_lines` scans for exactly that, stepping over strings and comments so that a
``key =`` inside a ``\"\"\"`` block is not mistaken for a key. A multi-line array, and a key inside
an inline table, are reported at the line of the key that holds them.

Precedence: the file's values take the place of the table's defaults and the command line wins,
setting by setting. For repeatable settings the command-line list *replaces* the file's list
(tables included) rather than extending it: the file is the service's baseline, and
``--fallback X`` typed by an operator means "these upstreams, this time"; appending would leave
no way to drop a file entry from the command line, and it is how every other flag behaves (the
whole value comes from one place). The parser is built with every default suppressed, so its
namespace holds exactly the settings the command line gave, however spelt.

Everything here is pure except reading the one file in :func:`load_config_file`.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import cast

from .settings import (
    REGISTRY_TABLE,
    SETTINGS,
    Kind,
    Setting,
    TableKey,
    Values,
    build_parser,
    defaults,
    parse_duration,
    split_pair,
)

# Long options of the parser that are not settings.
RESERVED_KEYS = frozenset({"config", "help", "version"})

KeyPath = tuple[str, ...]


class ConfigFileError(Exception):
    """One clear line: '<path>:<line>: <key>: <problem>' (line omitted only when unknown)."""

    def __init__(self, path: str, line: int | None, key: str | None, problem: str) -> None:
        self.path = path
        self.line = line
        self.key = key
        self.problem = problem
        where = path if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {problem}" if key is None else f"{where}: {key}: {problem}")


@dataclass(frozen=True)
class FileSettings:
    """The settings a config file gave, keyed by dest (``cache_dir``)."""

    path: str
    values: dict[str, object]  # dest -> value, of the setting's kind (a list when repeatable)
    lines: dict[str, int]  # dest -> 1-based line of its first key in the file
    # (dest, index) -> line of the key that gave that item (a flat key or a registry table's)
    item_lines: dict[tuple[str, int], int] = field(default_factory=dict)

    def where(self, dest: str, index: int | None = None) -> str:
        """``path:line`` of ``dest``'s key, for messages (just ``path`` if the line is unknown)."""
        line = self.item_lines.get((dest, index)) if index is not None else None
        if line is None:
            line = self.lines.get(dest)
        return self.path if line is None else f"{self.path}:{line}"


class _BadValue(Exception):
    """A value of the wrong kind; the caller adds the path, line and key."""


def file_keys(table: Sequence[Setting] = SETTINGS) -> dict[str, Setting]:
    """Top-level key -> its setting: every row of the table, by its name."""
    return {setting.name: setting for setting in table if setting.name not in RESERVED_KEYS}


def registry_keys(table: Sequence[Setting] = SETTINGS) -> dict[str, Setting]:
    """Key of a ``[registry."NAME"]`` table -> its setting."""
    return {s.table.key: s for s in table if s.table is not None}


# ---------------------------------------------------------------------------------------------
# Line numbers of keys

_BARE_KEY = r"[A-Za-z0-9_-]+"
_BASIC_KEY = r'"(?:[^"\\]|\\.)*"'
_LITERAL_KEY = r"'[^']*'"
_KEY = rf"{_BARE_KEY}|{_BASIC_KEY}|{_LITERAL_KEY}"
_DOTTED = rf"(?:{_KEY})(?:[ \t]*\.[ \t]*(?:{_KEY}))*"
# ``key =`` or ``key.sub =`` at the start of a line (TOML blanks are spaces and tabs).
_KEY_LINE = re.compile(rf"[ \t]*({_DOTTED})[ \t]*=")
# ``[table]``, ``[table.sub]`` or ``[[array-of-tables]]``.
_HEADER_LINE = re.compile(rf"[ \t]*\[\[?[ \t]*({_DOTTED})[ \t]*\]")


def _unquote(key: str) -> str:
    if key[0] in "\"'":
        # Let tomllib decode escapes in a quoted key rather than re-implementing them.
        return next(iter(tomllib.loads(f"{key} = 0")))
    return key


def _key_path(dotted: str) -> KeyPath:
    return tuple(_unquote(part) for part in re.findall(_KEY, dotted))


def _string_state(line: str, state: str | None) -> str | None:
    """The multi-line string (``\"\"\"`` or ``'''``) still open at the end of ``line``, if any.

    Only valid TOML gets here, so this just needs to step over strings and comments.
    """
    i = 0
    n = len(line)
    while i < n:
        if state is not None:
            if state == '"""' and line[i] == "\\":
                i += 2
                continue
            if line.startswith(state, i):
                # A run of up to five quotes closes with its last three (``""""`` = ``"`` + end).
                run = len(line[i:]) - len(line[i:].lstrip(state[0]))
                i += run
                state = None
                continue
            i += 1
            continue
        char = line[i]
        if char == "#":
            break
        if line.startswith('"""', i) or line.startswith("'''", i):
            state = line[i : i + 3]
            i += 3
        elif char == '"':
            i += 1
            while i < n and line[i] != '"':
                i += 2 if line[i] == "\\" else 1
            i += 1
        elif char == "'":
            end = line.find("'", i + 1)
            i = n if end < 0 else end + 1
        else:
            i += 1
    return state


def find_key_lines(text: str) -> dict[KeyPath, int]:
    """Key path (``("registry", "ghcr.io", "upstream")``; a table's own path for its header)
    -> 1-based line of its first appearance in valid TOML. Every prefix of a path is there too."""
    lines: dict[KeyPath, int] = {}
    state: str | None = None
    table: KeyPath = ()

    def note(path: KeyPath, number: int) -> None:
        for end in range(1, len(path) + 1):
            lines.setdefault(path[:end], number)

    # tomllib counts lines by "\n" (str.splitlines would also split on \x0c, \u2028, ...).
    for number, line in enumerate(text.split("\n"), start=1):
        if state is None:
            header = _HEADER_LINE.match(line)
            if header:
                table = _key_path(header.group(1))
                note(table, number)
            else:
                match = _KEY_LINE.match(line)
                if match:
                    note(table + _key_path(match.group(1)), number)
        state = _string_state(line, state)
    return lines


def _line_of(lines: dict[KeyPath, int], path: KeyPath) -> int | None:
    """The line of ``path``, else of its longest prefix that has one."""
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


# ---------------------------------------------------------------------------------------------
# Values: TOML value -> the setting's raw value


def describe(value: object) -> str:
    """A TOML value for a message: its TOML type and, when short, the value itself."""
    if isinstance(value, bool):
        return f"a boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"an integer {value}"
    if isinstance(value, float):
        return f"a float {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return 'a string "' + shown.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__} {value}"  # datetime, date, time


def _expected(setting: Setting, what: str) -> str:
    hint = f" ({setting.metavar})" if setting.metavar else ""
    return f"expected {what}{hint}"


def _scalar(setting: Setting, value: object) -> object:
    """One value of the setting's kind, checked against its ``choices``."""
    converted: object
    if setting.kind is Kind.INT:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _BadValue(f"{_expected(setting, 'an integer')}, got {describe(value)}")
        converted = value
    elif setting.kind is Kind.NUMBER:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _BadValue(f"{_expected(setting, 'a number')}, got {describe(value)}")
        converted = float(value)
    elif setting.kind is Kind.DURATION:
        # seconds, or a string with units, as on the command line: 90, 2.5, "1m", "1h30m"
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            problem = 'expected a number of seconds or a duration string like "1m"'
            raise _BadValue(f"{problem}, got {describe(value)}")
        try:
            converted = parse_duration(value) if isinstance(value, str) else float(value)
        except ValueError as exc:
            raise _BadValue(str(exc)) from None
    elif setting.numbers_as_text and isinstance(value, int) and not isinstance(value, bool):
        converted = str(value)
    else:
        if not isinstance(value, str):
            raise _BadValue(f"{_expected(setting, 'a string')}, got {describe(value)}")
        converted = value
    if setting.choices and converted not in setting.choices:
        choices = ", ".join(repr(c) for c in setting.choices)
        raise _BadValue(f"expected one of {choices}, got {describe(value)}")
    return converted


def _array(setting: Setting, value: object) -> list[object]:
    """An array of the setting's items; a single item stands for an array of one."""
    if not isinstance(value, list | dict):
        value = [value]
    if not isinstance(value, list):
        raise _BadValue(f"expected an array, got {describe(value)}")
    items: list[object] = []
    for index, item in enumerate(value):
        try:
            items.append(_scalar(setting, item))
        except _BadValue as exc:
            raise _BadValue(f"item {index + 1}: {exc}") from None
    return items


def convert(setting: Setting, value: object) -> object:
    """The raw value ``setting`` gets from the TOML ``value``; :class:`_BadValue` if it is of the
    wrong kind."""
    if setting.kind in (Kind.BOOL, Kind.SWITCH):
        if not isinstance(value, bool):
            raise _BadValue(f"expected a boolean (true or false), got {describe(value)}")
        return value
    if setting.kind is Kind.DURATION_RULES:
        return _duration_rules(value)
    if setting.repeatable:
        return _array(setting, value)
    return _scalar(setting, value)


def _duration_text(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        problem = 'expected a number of seconds or a duration string like "1m"'
        raise _BadValue(f"{problem}, got {describe(value)}")
    return value if isinstance(value, str) else repr(value)


def _duration_rules(value: object) -> list[object]:
    """``[PATTERN=]DURATION`` items from a duration (every tag), an array of items, or a table
    ``{ "latest" = "60s", "*" = "24h" }`` (one item per key, in the file's order)."""
    if isinstance(value, dict):
        items: list[object] = []
        for pattern, duration in value.items():
            try:
                items.append(f"{pattern}={_duration_text(duration)}")
            except _BadValue as exc:
                raise _BadValue(f"{pattern!r}: {exc}") from None
        return items
    if not isinstance(value, list):
        return [_duration_text(value)]
    listed: list[object] = []
    for index, item in enumerate(value):
        try:
            listed.append(_duration_text(item))
        except _BadValue as exc:
            raise _BadValue(f"item {index + 1}: {exc}") from None
    return listed


# ---------------------------------------------------------------------------------------------
# The file


def _syntax_error(path: str, text: str, exc: tomllib.TOMLDecodeError) -> ConfigFileError:
    """``Invalid value (at line 3, column 7)`` -> ``path:3: not valid TOML: Invalid value ...``."""
    message = str(exc)
    at_line = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if at_line:
        problem = f"{message[: at_line.start()]} (column {at_line.group(2)})"
        return ConfigFileError(path, int(at_line.group(1)), None, f"not valid TOML: {problem}")
    at_end = re.search(r"\s*\(at end of document\)$", message)
    if at_end:
        last = text.count("\n") + (0 if text.endswith("\n") else 1)
        problem = f"{message[: at_end.start()]} at the end of the file"
        return ConfigFileError(path, max(last, 1), None, f"not valid TOML: {problem}")
    return ConfigFileError(path, None, None, f"not valid TOML: {message}")


def _unknown_key(keys: dict[str, Setting], key: str, value: object, tables: bool) -> str:
    if key == "config":
        return "a config file cannot name another config file"
    negated = key.removeprefix("no-")
    if negated != key and negated in keys and keys[negated].kind is Kind.BOOL:
        opposite = "true" if value is False else "false"
        return f"unknown key; write '{negated} = {opposite}' instead"
    problem = "unknown key; see hubproxy --help"
    if isinstance(value, dict):
        problem += (
            f' (there are no tables but [{REGISTRY_TABLE}."NAME"]: write every other key at '
            "the top level)"
            if tables
            else " (there are no tables: write every key at the top level)"
        )
    close = difflib.get_close_matches(key, list(keys), n=1)
    if close:
        problem += f"; did you mean '{close[0]}'?"
    return problem


def _table_key_label(name: str, key: str) -> str:
    return f'{REGISTRY_TABLE}."{name}".{key}'


class _Reader:
    """One file's keys turned into FileSettings, in file order."""

    def __init__(self, path: str, text: str, table: Sequence[Setting]) -> None:
        self.path = path
        self.lines_of = find_key_lines(text)
        self.keys = file_keys(table)
        self.table_keys = registry_keys(table)
        self.values: dict[str, object] = {}
        self.lines: dict[str, int] = {}
        self.item_lines: dict[tuple[str, int], int] = {}
        # (dest, index) -> the key that gave the item, for conflict messages
        self.item_keys: dict[tuple[str, int], str] = {}

    def fail(self, path: KeyPath, key: str, problem: str) -> ConfigFileError:
        return ConfigFileError(self.path, _line_of(self.lines_of, path), key, problem)

    def flat(self, key: str, value: object) -> None:
        setting = self.keys.get(key)
        if setting is None:
            problem = _unknown_key(self.keys, key, value, bool(self.table_keys))
            raise self.fail((key,), key, problem)
        try:
            converted = convert(setting, value)
        except _BadValue as exc:
            raise self.fail((key,), key, str(exc)) from None
        line = _line_of(self.lines_of, (key,))
        self.values[setting.dest] = converted
        if line is not None:
            self.lines[setting.dest] = line
        if isinstance(converted, list):
            for index in range(len(converted)):
                if line is not None:
                    self.item_lines[setting.dest, index] = line
                self.item_keys[setting.dest, index] = key

    def registries(self, tables: dict[str, object]) -> None:
        order = sorted(
            tables, key=lambda n: _line_of(self.lines_of, (REGISTRY_TABLE, n)) or math.inf
        )
        for name in order:
            body = tables[name]
            label = f'{REGISTRY_TABLE}."{name}"'
            if not isinstance(body, dict):
                problem = f"expected a table of the registry's settings, got {describe(body)}"
                raise self.fail((REGISTRY_TABLE, name), label, problem)
            keys = sorted(
                body, key=lambda k: _line_of(self.lines_of, (REGISTRY_TABLE, name, k)) or math.inf
            )
            for key in keys:
                self.registry_key(name, key, body[key])

    def registry_key(self, name: str, key: str, value: object) -> None:
        where = (REGISTRY_TABLE, name, key)
        label = _table_key_label(name, key)
        setting = self.table_keys.get(key)
        if setting is None or setting.table is None:
            known = ", ".join(self.table_keys)
            problem = f"unknown key in a registry table (known: {known})"
            close = difflib.get_close_matches(key, list(self.table_keys), n=1)
            if close:
                problem += f"; did you mean '{close[0]}'?"
            raise self.fail(where, label, problem)
        spec = setting.table
        # the table holds the VALUE of NAME=VALUE (the HOST of HOST=NAME): name that in messages
        parts = (setting.metavar or "").split("=")
        single = replace(setting, metavar=parts[0] if spec.name_last else parts[-1])
        try:
            given = _array(single, value) if spec.many else [_scalar(single, value)]
        except _BadValue as exc:
            raise self.fail(where, label, str(exc)) from None
        registry = name.strip().lower()
        pairs = [
            (str(item).strip().lower(), registry) if spec.name_last else (registry, str(item))
            for item in given
        ]
        items = self._new_items(setting, spec, pairs, where, label)
        line = _line_of(self.lines_of, where)
        current = self._items(setting.dest)
        for first, second in items:
            index = len(current)
            current.append(f"{first}={second}")
            if line is not None:
                self.item_lines[setting.dest, index] = line
            self.item_keys[setting.dest, index] = label
        self.values[setting.dest] = current
        if line is not None:
            self.lines.setdefault(setting.dest, line)

    def _items(self, dest: str) -> list[str]:
        return list(cast(list[str], self.values.get(dest, [])))

    def _new_items(
        self,
        setting: Setting,
        spec: TableKey,
        pairs: list[tuple[str, str]],
        where: KeyPath,
        label: str,
    ) -> list[tuple[str, str]]:
        """The pairs a table adds to ``setting``'s items: those already said the same way are
        dropped; one that says something else is a conflict. A pair's left side (the registry,
        or for host names the host) is what must be said one way only."""
        said: dict[str, list[tuple[int, str]]] = {}
        for index, item in enumerate(self._items(setting.dest)):
            pair = split_pair(item)
            if pair is not None:  # a malformed item is reported when it is parsed
                said.setdefault(pair[0], []).append((index, pair[1]))
        if spec.many and not spec.name_last:
            # a list per registry (fallbacks, in order): the same list again, or a conflict
            before = said.get(pairs[0][0], []) if pairs else []
            if not before:
                return pairs
            if [value for _, value in before] != [value for _, value in pairs]:
                raise self._conflict(setting, before[0][0], where, label)
            return []
        new: list[tuple[str, str]] = []
        for left, right in pairs:
            before = said.get(left, [])
            different = [index for index, value in before if value != right]
            if different:
                raise self._conflict(setting, different[0], where, label)
            if not before:
                new.append((left, right))
        return new

    def _conflict(
        self, setting: Setting, index: int, where: KeyPath, label: str
    ) -> ConfigFileError:
        other = self.item_keys.get((setting.dest, index), setting.name)
        line = self.item_lines.get((setting.dest, index))
        at = f" at line {line}" if line is not None else ""
        said = self._items(setting.dest)[index]
        problem = f"conflicts with {other}{at} ({said!r})"
        return self.fail(where, label, problem)


def settings_from_toml(path: str, text: str, table: Sequence[Setting] = SETTINGS) -> FileSettings:
    """Check and convert the TOML ``text`` (read from ``path``) against the settings ``table``.

    Raises :class:`ConfigFileError` for the first problem in file order.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(path, text, exc) from None
    reader = _Reader(path, text, table)
    # Report in file order, so the error is the first one a reader meets.
    order = sorted(data, key=lambda k: _line_of(reader.lines_of, (k,)) or math.inf)
    for key in order:
        value = data[key]
        if key == REGISTRY_TABLE and isinstance(value, dict) and reader.table_keys:
            reader.registries(value)
        else:
            reader.flat(key, value)
    return FileSettings(path, reader.values, reader.lines, reader.item_lines)


def load_config_file(path: str, table: Sequence[Setting] = SETTINGS) -> FileSettings:
    """Read the TOML file at ``path`` and check it against the settings ``table``.

    Raises :class:`ConfigFileError` if it cannot be read, is not valid TOML, has a key that is not
    a setting, or a value of the wrong kind.
    """
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except OSError as exc:
        raise ConfigFileError(path, None, None, f"cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigFileError(path, line, None, "not valid TOML: not UTF-8 text") from None
    return settings_from_toml(path, text, table)


# ---------------------------------------------------------------------------------------------
# The command line on top of the file


def read_settings(
    argv: Sequence[str], table: tuple[Setting, ...] = SETTINGS
) -> tuple[Values, FileSettings | None, frozenset[str]]:
    """Parse ``argv``; with ``--config FILE`` (or ``--config=FILE``) load the file, whose values
    take the place of the defaults below the command line. Returns every setting's raw value,
    the file settings (None without --config), and the dests the command line gave (``config``
    among them).

    Command-line errors raise :class:`~hubproxy.settings.UsageError`; file problems raise
    :class:`ConfigFileError`.
    """
    given = vars(build_parser(table).parse_args(list(argv)))
    path = given.get("config")
    raw = defaults(table)
    origins: dict[str, str] = {}
    item_origins: dict[tuple[str, int], str] = {}
    settings = None
    if path:
        settings = load_config_file(str(path), table)
        for dest, value in settings.values.items():
            if dest in given:
                continue
            raw[dest] = value
            origins[dest] = settings.where(dest)
            if isinstance(value, list):
                for index in range(len(value)):
                    item_origins[dest, index] = settings.where(dest, index)
    raw.update((dest, value) for dest, value in given.items() if dest != "config")
    return Values(raw, origins, item_origins), settings, frozenset(given)
