"""Tests for hubproxy.ops.usersfile: parsing, loading and atomically rewriting the users file.

Files live in ``tmp_path``; hashes use N=2**4 for speed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from hubproxy.ops.usersfile import UsersFileError, add_user, load_users, parse_users, remove_user
from hubproxy.policy.passwords import hash_password, verify_password


def fast_hash(password: str, salt: bytes | None = None) -> str:
    return hash_password(password, salt=salt, n=2**4, r=8, p=1)


def test_parse_users_skips_comments_and_blank_lines() -> None:
    alice, bob = fast_hash("a"), fast_hash("b")
    text = f"# mirror users\n\nalice:{alice}\n   # indented comment\n  bob@example.com:{bob}  \n\n"
    assert parse_users(text, "users.txt") == {"alice": alice, "bob@example.com": bob}


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["alice"], "users.txt:1: expected NAME:scrypt$N$r$p$SALT$HASH"),
        (["# ok", "", "alice hunter2"], "users.txt:3: expected NAME:"),
        (["bad name:{h}"], "users.txt:1: invalid user name 'bad name'"),
        ([":{h}"], "users.txt:1: invalid user name ''"),
        (["{long}:{h}"], "users.txt:1: invalid user name"),
        (["alice:hunter2"], "users.txt:1: bad password hash for 'alice'"),
        (["alice:scrypt$16$8$1$@@$@@"], "users.txt:1: bad password hash for 'alice'"),
        (
            ["alice:{h}", "#", "bob:{h}", "alice:{h}"],
            "users.txt:4: duplicate user 'alice' (first on line 1)",
        ),
        (
            ["ok:{h}", "x:scrypt$1073741824$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 43 + "="],
            "users.txt:2: bad password hash for 'x': scrypt parameters",
        ),
    ],
)
def test_parse_users_errors_name_the_line(lines: list[str], message: str) -> None:
    stored = fast_hash("pw")
    text = "\n".join(line.format(h=stored, long="x" * 65) for line in lines) + "\n"
    with pytest.raises(UsersFileError) as info:
        parse_users(text, "users.txt")
    assert str(info.value).startswith(message)
    # the line itself is never echoed: it may hold a pasted clear password, or a hash
    assert "hunter2" not in str(info.value)
    assert stored not in str(info.value)


def test_user_names_are_case_sensitive_and_accept_the_allowed_characters() -> None:
    stored = fast_hash("pw")
    name = "A.b_c-d@e.F0"
    assert parse_users(f"{name}:{stored}\n{name.lower()}:{stored}\n", "f") == {
        name: stored,
        name.lower(): stored,
    }
    assert parse_users(f"{'x' * 64}:{stored}", "f") == {"x" * 64: stored}


def test_load_users_errors(tmp_path: Path) -> None:
    with pytest.raises(UsersFileError, match="no such file"):
        load_users(tmp_path / "missing")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe:junk\n")
    with pytest.raises(UsersFileError, match="not UTF-8"):
        load_users(binary)
    with pytest.raises(UsersFileError, match=str(tmp_path)):
        load_users(tmp_path)  # a directory


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name != "users")


def test_add_creates_a_0600_file(tmp_path: Path) -> None:
    path = tmp_path / "users"
    assert add_user(path, "alice", "pw1") is False
    assert mode(path) == 0o600
    loaded = load_users(path)
    assert list(loaded) == ["alice"]
    assert verify_password(loaded["alice"], "pw1")
    assert "pw1" not in path.read_text()
    assert leftovers(tmp_path) == []


def test_add_replace_remove_keep_other_lines_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "users"
    bob, carol = fast_hash("b"), fast_hash("c")
    path.write_text(f"# team mirror\nbob:{bob}\n\n# ops\ncarol:{carol}\n")
    path.chmod(0o644)

    assert add_user(path, "alice", "pw1") is False
    lines = path.read_text().splitlines()
    assert lines[:5] == ["# team mirror", f"bob:{bob}", "", "# ops", f"carol:{carol}"]
    assert lines[5].startswith("alice:scrypt$")
    assert mode(path) == 0o600  # tightened on rewrite

    assert add_user(path, "bob", "new") is True  # password changed, same place
    lines = path.read_text().splitlines()
    assert lines[0] == "# team mirror" and lines[1].startswith("bob:scrypt$")
    assert lines[1] != f"bob:{bob}"
    assert lines[2:5] == ["", "# ops", f"carol:{carol}"]
    loaded = load_users(path)
    assert verify_password(loaded["bob"], "new") and not verify_password(loaded["bob"], "b")

    assert remove_user(path, "carol") is True
    assert path.read_text().splitlines()[:4] == ["# team mirror", lines[1], "", "# ops"]
    assert list(load_users(path)) == ["bob", "alice"]
    assert remove_user(path, "carol") is False
    assert mode(path) == 0o600
    assert leftovers(tmp_path) == []


def test_rewrite_keeps_odd_lines_byte_exact(tmp_path: Path) -> None:
    path = tmp_path / "users"
    bob = fast_hash("b")
    kept = f"# windows line\r\n# page\x0cbreak\nbob:{bob}\r\n"
    path.write_text(kept, newline="")
    add_user(path, "alice", "pw")
    text = path.read_bytes().decode()
    assert text.startswith(kept)
    assert text[len(kept) :].startswith("alice:scrypt$")
    assert list(load_users(path)) == ["bob", "alice"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand a file to another user")
def test_root_rewrite_keeps_the_service_users_ownership(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("")
    os.chown(path, 4242, 4343)
    add_user(path, "alice", "pw")
    info = path.stat()
    assert (info.st_uid, info.st_gid, mode(path)) == (4242, 4343, 0o600)


def test_rewrite_refuses_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "users"
    broken = "# users\nalice:hunter2\n"
    path.write_text(broken)
    with pytest.raises(UsersFileError, match=r"users:2: bad password hash"):
        add_user(path, "bob", "pw")
    with pytest.raises(UsersFileError, match=r"users:2: bad password hash"):
        remove_user(path, "alice")
    assert path.read_text() == broken
    assert leftovers(tmp_path) == []


def test_add_refuses_bad_names_and_empty_passwords(tmp_path: Path) -> None:
    path = tmp_path / "users"
    with pytest.raises(ValueError, match="invalid user name"):
        add_user(path, "a:b", "pw")
    with pytest.raises(ValueError, match="empty password"):
        add_user(path, "alice", "")
    assert not path.exists()


def test_failed_write_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "users"
    path.write_text("# keep me\n")

    def failing_replace(src: str, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        add_user(path, "alice", "pw")
    assert path.read_text() == "# keep me\n"
    assert leftovers(tmp_path) == []
