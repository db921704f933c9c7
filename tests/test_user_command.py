"""Tests for ``hubproxy user`` (hubproxy.cli.user_command), run end to end with
``io.StringIO`` streams and a scripted getpass."""

from __future__ import annotations

import getpass
import io
import stat
from pathlib import Path
from typing import TextIO

import pytest

from hubproxy.cli import user_command
from hubproxy.ops.usersfile import load_users
from hubproxy.policy.passwords import hash_password, verify_password


def fast_hash(password: str, salt: bytes | None = None) -> str:
    return hash_password(password, salt=salt, n=2**4, r=8, p=1)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class Run:
    """One ``hubproxy user`` invocation with captured streams."""

    def __init__(self, argv: list[str], stdin: str = "") -> None:
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        self.code = user_command(
            argv, stdin=io.StringIO(stdin), stdout=self.stdout, stderr=self.stderr
        )

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


def test_command_add_with_password_stdin(tmp_path: Path) -> None:
    path = tmp_path / "users"
    run = Run(["add", "alice", "--users", str(path), "--password-stdin"], "s3cret\n")
    assert (run.code, run.out, run.err) == (0, "added user alice\n", "")
    assert mode(path) == 0o600
    assert verify_password(load_users(path)["alice"], "s3cret")  # newline not included

    run = Run(["add", "alice", "--users", str(path), "--password-stdin"], "n3w pass\r\nmore\n")
    assert (run.code, run.out) == (0, "changed the password of user alice\n")
    stored = load_users(path)["alice"]
    assert verify_password(stored, "n3w pass") and not verify_password(stored, "s3cret")
    assert "s3cret" not in path.read_text()


def test_command_add_prompts_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "users"
    prompts = scripted_getpass(monkeypatch, ["hunter2", "hunter2"])
    run = Run(["add", "bob", "--users", str(path)])
    assert (run.code, run.out, run.err) == (0, "added user bob\n", "")
    assert len(prompts) == 2
    assert verify_password(load_users(path)["bob"], "hunter2")


def test_command_add_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "users"
    scripted_getpass(monkeypatch, ["hunter2", "hunter3"])
    run = Run(["add", "bob", "--users", str(path)])
    one_error(run, "do not match")
    assert "hunter" not in run.err
    assert not path.exists()


def test_command_add_no_terminal_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted_getpass(monkeypatch, [])
    one_error(Run(["add", "bob", "--users", str(tmp_path / "users")]), "no password")


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
    one_error(Run(["add", "alice", "--users", str(tmp_path / "u")]), "empty password refused")


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
    one_error(Run(["add", "a", "--users", str(path), "--password-stdin"], "pw\n"), str(path))


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


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["add"],
        ["add", "alice"],
        ["list"],
        ["remove", "--users", "f"],
        ["list", "--users", "f", "extra"],
        ["add", "alice", "--users", "f", "--password", "x"],
    ],
)
def test_command_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    run = Run(argv)
    assert run.code == 2
    assert "usage: hubproxy user" in run.err
    assert run.out == ""
    assert capsys.readouterr() == ("", "")  # nothing leaked to the real streams


@pytest.mark.parametrize("argv", [["--help"], ["add", "--help"], ["list", "-h"]])
def test_command_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    run = Run(argv)
    assert run.code == 0
    assert "usage: hubproxy user" in run.out
    assert capsys.readouterr() == ("", "")
