"""Tests for ``hubproxy user`` (hubproxy.cli.user_command), run end to end with
``io.StringIO`` streams and a scripted getpass; and once as a real process without a terminal."""

from __future__ import annotations

import getpass
import io
import stat
import subprocess
import sys
import warnings
from pathlib import Path
from typing import TextIO

import pytest

from hubproxy.cli import user_command
from hubproxy.ops.usersfile import MIN_PASSWORD_LENGTH, check_password, load_users
from hubproxy.policy.passwords import hash_password, verify_password


def fast_hash(password: str, salt: bytes | None = None) -> str:
    return hash_password(password, salt=salt, n=2**4, r=8, p=1)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class Terminal(io.StringIO):
    """Standard input that is a terminal (where getpass can ask)."""

    def isatty(self) -> bool:
        return True


NO_TERMINAL = (
    "hubproxy user: error: no terminal to ask for the password on; pipe it in with --password-stdin"
)
TOO_SHORT = "hubproxy user: error: password too short: use at least 8 characters"


class Run:
    """One ``hubproxy user`` invocation with captured streams; ``terminal``: stdin is a TTY."""

    def __init__(self, argv: list[str], stdin: str = "", *, terminal: bool = False) -> None:
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        source = Terminal(stdin) if terminal else io.StringIO(stdin)
        self.code = user_command(argv, stdin=source, stdout=self.stdout, stderr=self.stderr)

    @property
    def out(self) -> str:
        return self.stdout.getvalue()

    @property
    def err(self) -> str:
        return self.stderr.getvalue()


def scripted_getpass(monkeypatch: pytest.MonkeyPatch, answers: list[str]) -> list[str]:
    prompts: list[str] = []

    def fake(prompt: str = "Password: ", stream: TextIO | None = None) -> str:
        prompts.append(prompt)
        if not answers:
            raise EOFError
        return answers.pop(0)

    monkeypatch.setattr(getpass, "getpass", fake)
    return prompts


def one_error(run: Run, fragment: str) -> None:
    assert run.code == 1
    assert run.out == ""
    lines = run.err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("hubproxy user: error: ")
    assert fragment in lines[0]


def the_error(run: Run, line: str) -> None:
    """``run`` failed with exactly ``line`` on stderr and nothing else."""
    assert (run.code, run.out, run.err) == (1, "", line + "\n")


def test_command_add_with_password_stdin(tmp_path: Path) -> None:
    path = tmp_path / "users"
    run = Run(["add", "alice", "--users", str(path), "--password-stdin"], "s3cret-pw\n")
    assert (run.code, run.out, run.err) == (0, "added user alice\n", "")
    assert mode(path) == 0o600
    assert verify_password(load_users(path)["alice"], "s3cret-pw")  # newline not included

    run = Run(["add", "alice", "--users", str(path), "--password-stdin"], "n3w pass\r\nmore\n")
    assert (run.code, run.out) == (0, "changed the password of user alice\n")
    stored = load_users(path)["alice"]
    assert verify_password(stored, "n3w pass") and not verify_password(stored, "s3cret-pw")
    assert "s3cret" not in path.read_text()


def test_command_add_prompts_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "users"
    prompts = scripted_getpass(monkeypatch, ["hunter2-x", "hunter2-x"])
    run = Run(["add", "bob", "--users", str(path)], terminal=True)
    assert (run.code, run.out, run.err) == (0, "added user bob\n", "")
    assert prompts == ["Password: ", "Retype password: "]
    assert verify_password(load_users(path)["bob"], "hunter2-x")


def test_command_add_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "users"
    scripted_getpass(monkeypatch, ["hunter2-x", "hunter3-x"])
    run = Run(["add", "bob", "--users", str(path)], terminal=True)
    one_error(run, "do not match")
    assert "hunter" not in run.err
    assert not path.exists()


def test_command_add_no_terminal_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted_getpass(monkeypatch, [])
    one_error(Run(["add", "bob", "--users", str(tmp_path / "users")], terminal=True), "no password")


def test_command_add_without_a_terminal_says_how_to_pass_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """getpass would warn (GetPassWarning) and read stdin, echoing: refused, with the way out."""
    path = tmp_path / "users"
    prompts = scripted_getpass(monkeypatch, ["hunter2-x", "hunter2-x"])
    the_error(Run(["add", "bob", "--users", str(path)], "hunter2-x\n"), NO_TERMINAL)
    assert prompts == [] and not path.exists()


def test_command_add_when_getpass_cannot_open_the_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stdin a terminal, but getpass cannot control it: its fallback warning is the refusal."""

    def falls_back(prompt: str = "Password: ", stream: TextIO | None = None) -> str:
        warnings.warn("Can not control echo on the terminal.", getpass.GetPassWarning, 2)
        return "hunter2-x"

    monkeypatch.setattr(getpass, "getpass", falls_back)
    path = tmp_path / "users"
    the_error(Run(["add", "bob", "--users", str(path)], terminal=True), NO_TERMINAL)
    assert not path.exists()


def test_command_add_without_a_terminal_as_a_real_process(tmp_path: Path) -> None:
    """No controlling terminal (a new session), stdin a pipe: one line, no GetPassWarning."""
    path = tmp_path / "users"
    result = subprocess.run(
        [sys.executable, "-m", "hubproxy", "user", "add", "bob", "--users", str(path)],
        input="hunter2-x\nhunter2-x\n",
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        start_new_session=True,
    )
    assert (result.returncode, result.stdout, result.stderr) == (1, "", NO_TERMINAL + "\n")
    assert not path.exists()


@pytest.mark.parametrize(
    ("password", "accepted"), [("1", False), ("7-chars", False), ("8-chars!", True)]
)
def test_check_password(password: str, accepted: bool) -> None:
    assert MIN_PASSWORD_LENGTH == 8
    if accepted:
        check_password(password)
    else:
        with pytest.raises(ValueError, match=r"^password too short: use at least 8 characters$"):
            check_password(password)


def test_command_add_refuses_a_short_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "users"
    the_error(Run(["add", "a", "--users", str(path), "--password-stdin"], "1234567\n"), TOO_SHORT)
    prompts = scripted_getpass(monkeypatch, ["x", "x"])
    the_error(Run(["add", "a", "--users", str(path)], terminal=True), TOO_SHORT)
    assert prompts == ["Password: "]  # refused before asking to retype it
    assert not path.exists()
    run = Run(["add", "a", "--users", str(path), "--password-stdin"], "12345678\n")
    assert (run.code, run.out, run.err) == (0, "added user a\n", "")


@pytest.mark.parametrize("stdin", ["", "\n", "\r\n"])
def test_command_add_refuses_empty_password(tmp_path: Path, stdin: str) -> None:
    path = tmp_path / "users"
    run = Run(["add", "alice", "--users", str(path), "--password-stdin"], stdin)
    one_error(run, "empty password refused")
    assert not path.exists()


def test_command_add_refuses_empty_prompted_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scripted_getpass(monkeypatch, ["", ""])
    run = Run(["add", "alice", "--users", str(tmp_path / "u")], terminal=True)
    one_error(run, "empty password refused")


def test_command_add_bad_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = scripted_getpass(monkeypatch, ["pw", "pw"])
    one_error(Run(["add", "bad:name", "--users", str(tmp_path / "u")]), "invalid user name")
    assert prompts == []  # refused before asking for a password


def test_command_add_to_broken_file_fails_before_prompting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "users"
    path.write_text("# users\nalice:hunter2\n")
    prompts = scripted_getpass(monkeypatch, ["pw", "pw"])
    run = Run(["add", "bob", "--users", str(path)])
    one_error(run, f"{path}:2: bad password hash for 'alice'")
    assert prompts == []
    assert "hunter2" not in run.err


def test_command_add_into_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "users"
    one_error(
        Run(["add", "a", "--users", str(path), "--password-stdin"], "pw-long-enough\n"), str(path)
    )


def test_command_list_and_remove(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"# ops\ncarol:{fast_hash('c')}\n\nalice:{fast_hash('a')}\n")

    run = Run(["list", "--users", str(path)])
    assert (run.code, run.out, run.err) == (0, "carol\nalice\n", "")

    run = Run(["remove", "carol", "--users", str(path)])
    assert (run.code, run.out, run.err) == (0, "removed user carol\n", "")
    assert path.read_text().startswith("# ops\n\nalice:")
    assert mode(path) == 0o600

    one_error(Run(["remove", "carol", "--users", str(path)]), "no user 'carol'")
    assert Run(["list", "--users", str(path)]).out == "alice\n"


def test_command_list_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "users"
    one_error(Run(["list", "--users", str(path)]), f"{path}: no such file")
    one_error(Run(["remove", "x", "--users", str(path)]), f"{path}: no such file")


REQUIRED = "the following arguments are required:"


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        ([], f"hubproxy user: error: {REQUIRED} COMMAND (see 'hubproxy user --help')"),
        (
            ["frobnicate"],
            "hubproxy user: error: COMMAND: invalid choice: 'frobnicate' "
            "(choose from 'add', 'remove', 'list')",
        ),
        (["ad"], "hubproxy user: error: COMMAND: invalid choice: 'ad'; did you mean 'add'?"),
        (
            ["add"],
            f"hubproxy user add: error: {REQUIRED} NAME, --users (see 'hubproxy user add --help')",
        ),
        (
            ["add", "alice"],
            f"hubproxy user add: error: {REQUIRED} --users (see 'hubproxy user add --help')",
        ),
        (
            ["list"],
            f"hubproxy user list: error: {REQUIRED} --users (see 'hubproxy user list --help')",
        ),
        (
            ["remove", "--users", "f"],
            f"hubproxy user remove: error: {REQUIRED} NAME (see 'hubproxy user remove --help')",
        ),
        (
            ["list", "--users", "f", "extra"],
            "hubproxy user list: error: unexpected argument 'extra' "
            "(see 'hubproxy user list --help')",
        ),
        (
            ["add", "alice", "--users", "f", "--password", "x"],
            "hubproxy user add: error: unknown flag --password; did you mean --password-stdin?",
        ),
        (
            ["add", "alice", "--user", "f"],
            "hubproxy user add: error: unknown flag --user; did you mean --users?",
        ),
        (["list", "--users"], "hubproxy user list: error: --users needs a value (FILE)"),
    ],
)
def test_command_usage_errors(
    argv: list[str], line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """One line each (no usage block), verbatim."""
    run = Run(argv)
    assert (run.code, run.out, run.err) == (2, "", line + "\n")
    assert capsys.readouterr() == ("", "")  # nothing leaked to the real streams


@pytest.mark.parametrize("argv", [["--help"], ["add", "--help"], ["list", "-h"]])
def test_command_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    run = Run(argv)
    assert run.code == 0
    assert "usage: hubproxy user" in run.out
    assert capsys.readouterr() == ("", "")
