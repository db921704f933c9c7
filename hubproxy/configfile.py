"""A TOML config file for the command line: ``hubproxy --config hubproxy.toml``.

Theory of operation
-------------------
The argparse parser is the one description of hubproxy's settings. The file adds no settings of its
own: every long flag is also a top-level key spelled like the flag without ``--``
(``cache-dir = "/var/cache/hubproxy"``, ``fallback = ["https://a"]``, ``no-cache = true``), and a
key's value is checked and converted by looking at the flag's argparse action (``store`` with its
``type`` and ``choices``, ``append``, ``store_true``, ``BooleanOptionalAction``, ...). So a flag
added to ``build_parser()`` later is a valid key at once, with no list to keep in step.

Anything that is not a flag is refused, never ignored: a misspelt key silently doing nothing is
the classic config-file bug, so an unknown key, a table, or a value of the wrong TOML type stops
hubproxy with one line naming the file, the line and the key (and a close match when there is one).

Line numbers: ``tomllib`` gives positions only for syntax errors, not for the keys of a valid
document. Once ``tomllib`` has accepted the text, finding where a top-level key sits is easy: it is
a line that starts (after blanks) with the key, bare or quoted, then ``=`` (or ``.`` for a dotted
key), outside any multi-line string; and top-level keys can only come before the first ``[table]``
header. :func:`find_key_lines` scans for exactly that, stepping over strings and comments so that a
``key =`` inside a ``\"\"\"`` block is not mistaken for a key. A multi-line array is reported at its
key's line.

Precedence: the file's values take the place of argparse's defaults and the command line wins, dest
by dest. For ``append`` flags the command-line list *replaces* the file's list rather than
extending it: the file is the service's baseline, and ``--fallback X`` typed by an operator means
"these upstreams, this time"; appending would leave no way to drop a file entry from the command
line, and it is how every other flag behaves (the whole value comes from one place). Which dests
the command line set is found by parsing argv a second time with every default switched to
``argparse.SUPPRESS`` (restored in a ``finally``): only the dests argparse actually stored remain,
however the flag was spelt (``--fallback=X``, an abbreviation, ``--no-library-prefix``).

Everything here is pure except reading the one file in :func:`load_config_file`.
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass

# Keys that are long options of the parser but never settings.
RESERVED_KEYS = frozenset({"config", "help", "version"})
CONFIG_FLAG = "--config"


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
    """The settings a config file gave, keyed by argparse dest."""

    path: str
    values: dict[str, object]  # argparse dest -> value, converted like argparse would
    lines: dict[str, int]  # argparse dest -> 1-based line of its key in the file

    def where(self, dest: str) -> str:
        """``path:line`` of ``dest``'s key, for messages (just ``path`` if the line is unknown)."""
        line = self.lines.get(dest)
        return self.path if line is None else f"{self.path}:{line}"


class _BadValue(Exception):
    """A value of the wrong kind; the caller adds the path, line and key."""


# ---------------------------------------------------------------------------------------------
# Keys: the parser's long options


def option_keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Config-file key -> argparse action, for every long option that is a setting.

    ``--help``, ``--version`` and ``--config`` are not settings; for a ``BooleanOptionalAction``
    only the positive spelling is a key (``library-prefix = false``, not ``no-library-prefix``).
    """
    keys: dict[str, argparse.Action] = {}
    # argparse has no public way to list its actions; ``_actions`` is stable since Python 3.2.
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        if CONFIG_FLAG in action.option_strings:
            continue
        for option in action.option_strings:
            if not option.startswith("--"):
                continue
            if isinstance(action, argparse.BooleanOptionalAction) and option.startswith("--no-"):
                continue
            key = option[2:]
            if key not in RESERVED_KEYS:
                keys[key] = action
    return keys


def _negated_keys(parser: argparse.ArgumentParser) -> dict[str, str]:
    """``no-library-prefix`` -> ``library-prefix``: the spellings a file must not use."""
    negated: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse.BooleanOptionalAction):
            positive = [o[2:] for o in action.option_strings if not o.startswith("--no-")]
            for option in action.option_strings:
                if option.startswith("--no-") and positive:
                    negated[option[2:]] = positive[0]
    return negated


# ---------------------------------------------------------------------------------------------
# Line numbers of top-level keys

_BARE_KEY = r"[A-Za-z0-9_-]+"
_BASIC_KEY = r'"(?:[^"\\]|\\.)*"'
_LITERAL_KEY = r"'[^']*'"
_KEY = rf"{_BARE_KEY}|{_BASIC_KEY}|{_LITERAL_KEY}"
# ``key =`` or ``key.sub =`` at the start of a line (TOML blanks are spaces and tabs).
_KEY_LINE = re.compile(rf"[ \t]*({_KEY})[ \t]*[=.]")
# ``[table]``, ``[table.sub]`` or ``[[array-of-tables]]``.
_HEADER_LINE = re.compile(rf"[ \t]*\[\[?[ \t]*({_KEY})[ \t]*[.\]]")


def _unquote(key: str) -> str:
    if key[0] in "\"'":
        # Let tomllib decode escapes in a quoted key rather than re-implementing them.
        return next(iter(tomllib.loads(f"{key} = 0")))
    return key


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


def find_key_lines(text: str) -> dict[str, int]:
    """Top-level key (and table name) -> 1-based line of its first appearance in valid TOML."""
    lines: dict[str, int] = {}
    state: str | None = None
    in_tables = False
    # tomllib counts lines by "\n" (str.splitlines would also split on \x0c, \u2028, ...).
    for number, line in enumerate(text.split("\n"), start=1):
        if state is None:
            header = _HEADER_LINE.match(line)
            if header:
                in_tables = True
                lines.setdefault(_unquote(header.group(1)), number)
            elif not in_tables:
                match = _KEY_LINE.match(line)
                if match:
                    lines.setdefault(_unquote(match.group(1)), number)
        state = _string_state(line, state)
    return lines


# ---------------------------------------------------------------------------------------------
# Values: TOML value -> what argparse would have stored


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


def _expected(action: argparse.Action, what: str) -> str:
    hint = f" ({action.metavar})" if isinstance(action.metavar, str) else ""
    return f"expected {what}{hint}"


def _scalar(action: argparse.Action, value: object) -> object:
    """One value converted by the action's ``type``, then checked against its ``choices``."""
    kind = action.type
    converted: object
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _BadValue(f"{_expected(action, 'an integer')}, got {describe(value)}")
        converted = value
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _BadValue(f"{_expected(action, 'a number')}, got {describe(value)}")
        converted = float(value)
    elif kind is None or kind is str:
        if not isinstance(value, str):
            raise _BadValue(f"{_expected(action, 'a string')}, got {describe(value)}")
        converted = value
    elif callable(kind) and not isinstance(kind, argparse.FileType):
        # A custom converter takes the text argparse would have passed it; a number written
        # bare in TOML is the same text the user would have typed on the command line.
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise _BadValue(f"{_expected(action, 'a string')}, got {describe(value)}")
        text = value if isinstance(value, str) else str(value)
        try:
            converted = kind(text)
        except argparse.ArgumentTypeError as exc:
            raise _BadValue(str(exc)) from None
        except (TypeError, ValueError):
            name = getattr(kind, "__name__", repr(kind))
            raise _BadValue(f"invalid {name} value: {describe(value)}") from None
    else:  # argparse.FileType would open the file here; a registered type name is never used
        raise _BadValue("cannot be set in a config file")
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(repr(c) for c in action.choices)
        raise _BadValue(f"expected one of {choices}, got {describe(value)}")
    return converted


def _array(action: argparse.Action, value: object, *, single_ok: bool) -> list[object]:
    if single_ok and not isinstance(value, list | dict):
        value = [value]
    if not isinstance(value, list):
        raise _BadValue(f"expected an array, got {describe(value)}")
    items: list[object] = []
    for index, item in enumerate(value):
        try:
            items.append(_scalar(action, item))
        except _BadValue as exc:
            raise _BadValue(f"item {index + 1}: {exc}") from None
    return items


def convert(action: argparse.Action, value: object) -> object:
    """What argparse would store for ``action`` given the TOML ``value``; :class:`_BadValue` if
    the value is of the wrong kind."""
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise _BadValue(f"expected a boolean (true or false), got {describe(value)}")
        return value
    if isinstance(action, argparse._StoreConstAction):  # store_true, store_false, store_const
        if not isinstance(value, bool):
            raise _BadValue(f"expected a boolean (true or false), got {describe(value)}")
        # ``flag = false`` means "as if the flag were not given", i.e. the default.
        return action.const if value else action.default
    if isinstance(action, argparse._CountAction):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _BadValue(f"expected an integer of 0 or more, got {describe(value)}")
        return value
    if isinstance(action, argparse._AppendAction):  # append, extend
        if action.nargs is not None:
            raise _BadValue("cannot be set in a config file")
        return _array(action, value, single_ok=True)
    if isinstance(action, argparse._StoreAction):
        nargs = action.nargs
        if nargs is None or nargs == argparse.OPTIONAL:
            return _scalar(action, value)
        items = _array(action, value, single_ok=False)
        if isinstance(nargs, int) and len(items) != nargs:
            raise _BadValue(f"expected an array of {nargs} items, got {len(items)}")
        if nargs == argparse.ONE_OR_MORE and not items:
            raise _BadValue("expected a non-empty array")
        return items
    raise _BadValue("cannot be set in a config file")


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


def _unknown_key(
    parser: argparse.ArgumentParser, keys: dict[str, argparse.Action], key: str, value: object
) -> str:
    if key == "config":
        return "a config file cannot name another config file"
    positive = _negated_keys(parser).get(key)
    if positive is not None:
        opposite = "true" if value is False else "false"
        return f"unknown key; write '{positive} = {opposite}' instead"
    problem = f"unknown key; see {parser.prog} --help"
    if isinstance(value, dict):
        problem += " (there are no tables: write every key at the top level)"
    close = difflib.get_close_matches(key, list(keys), n=1)
    if close:
        problem += f"; did you mean '{close[0]}'?"
    return problem


def settings_from_toml(path: str, text: str, parser: argparse.ArgumentParser) -> FileSettings:
    """Check and convert the TOML ``text`` (read from ``path``) against ``parser``'s options.

    Raises :class:`ConfigFileError` for the first problem in file order.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(path, text, exc) from None
    key_lines = find_key_lines(text)
    keys = option_keys(parser)
    values: dict[str, object] = {}
    lines: dict[str, int] = {}
    first_key: dict[str, str] = {}
    # Report in file order, so the error is the first one a reader meets.
    order = sorted(data, key=lambda k: key_lines.get(k, math.inf))
    for key in order:
        value = data[key]
        line = key_lines.get(key)
        action = keys.get(key)
        if action is None:
            raise ConfigFileError(path, line, key, _unknown_key(parser, keys, key, value))
        dest = action.dest
        if dest in first_key:  # two aliases of one flag
            other = first_key[dest]
            where = f" at line {lines[dest]}" if dest in lines else ""
            raise ConfigFileError(path, line, key, f"already set as '{other}'{where}")
        try:
            values[dest] = convert(action, value)
        except _BadValue as exc:
            raise ConfigFileError(path, line, key, str(exc)) from None
        first_key[dest] = key
        if line is not None:
            lines[dest] = line
    return FileSettings(path=path, values=values, lines=lines)


def load_config_file(path: str, parser: argparse.ArgumentParser) -> FileSettings:
    """Read the TOML file at ``path`` and check it against ``parser``'s options.

    Raises :class:`ConfigFileError` if it cannot be read, is not valid TOML, has a key that is not
    a flag, or a value of the wrong kind.
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
    return settings_from_toml(path, text, parser)


# ---------------------------------------------------------------------------------------------
# The command line on top of the file


def given_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> frozenset[str]:
    """The dests that ``argv`` sets, however spelt: argv parsed again with no defaults at all.

    ``argv`` must already have parsed without error (this one does not report problems twice).
    """
    saved_actions = [(action, action.default) for action in parser._actions]
    saved_defaults = parser._defaults
    try:
        for action, _ in saved_actions:
            action.default = argparse.SUPPRESS
        parser._defaults = {}
        namespace = parser.parse_args(list(argv), argparse.Namespace())
    finally:
        for action, default in saved_actions:
            action.default = default
        parser._defaults = saved_defaults
    return frozenset(vars(namespace))


def _config_action(parser: argparse.ArgumentParser) -> argparse.Action | None:
    for action in parser._actions:
        if CONFIG_FLAG in action.option_strings:
            return action
    return None


def parse_args_with_file(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> tuple[argparse.Namespace, FileSettings | None, frozenset[str]]:
    """Parse argv; if it has --config FILE (or --config=FILE), load the file and use its values
    as defaults below the command line. Returns the namespace, the file settings (None without
    --config), and the set of dests that were given on the command line.

    Command-line errors exit like ``parser.parse_args``; file problems raise
    :class:`ConfigFileError`. A parser without ``--config`` just parses. Options marked
    ``required=True`` must still be on the command line.
    """
    namespace = parser.parse_args(list(argv))
    given = given_dests(parser, argv)
    config = _config_action(parser)
    path = None if config is None else getattr(namespace, config.dest, None)
    if not path:
        return namespace, None, given
    settings = load_config_file(str(path), parser)
    # Overlay rather than parser.set_defaults + a re-parse: argparse would run ``type`` again on
    # string defaults, and the file's values are already converted.
    for dest, value in settings.values.items():
        if dest not in given:
            setattr(namespace, dest, value)
    return namespace, settings, given


def value_origin(dest: str, settings: FileSettings | None, given: frozenset[str]) -> str | None:
    """``path:line`` when ``dest``'s value came from the config file, else None.

    For prefixing a later error about a value (``--cache-size: not a size``) with where it was set.
    """
    if settings is None or dest in given or dest not in settings.values:
        return None
    return settings.where(dest)
