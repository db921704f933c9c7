"""The mirror's users file: one ``NAME:scrypt$N$r$p$SALT$HASH`` line per user.

Blank lines and ``#`` comments are allowed and kept when ``hubproxy user`` rewrites the file.
A rewrite is atomic (a 0600 temp file in the same directory, fsync, rename), so a running
mirror reloading on SIGHUP reads the old file or the new one, never half of each. A file that
does not parse is never rewritten: the typo is reported with ``path:line:`` instead of being
silently "fixed". Messages never quote a line: someone may have pasted a clear password into it.

This is the only module that reads or writes the users file (the hashes are in
:mod:`hubproxy.policy.passwords`, the checks against them in :mod:`hubproxy.policy.credentials`).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

from ..policy.passwords import hash_password, parse_hash

NAME_RE = re.compile(r"[A-Za-z0-9._@-]{1,64}")
# The shortest password ``hubproxy user add`` accepts. A mirror user guards pulls, often on a
# public address, and a wrong-password limit (--login-failures) only slows guessing down.
MIN_PASSWORD_LENGTH = 8


class UsersFileError(ValueError):
    """A users file that cannot be read or used; the message starts with ``path:line:``."""


def check_name(name: str) -> None:
    """Raise ValueError unless ``name`` is 1 to 64 letters, digits and ``. _ @ -``."""
    if not NAME_RE.fullmatch(name):
        raise ValueError(f"invalid user name {name!r}: use 1 to 64 letters, digits and . _ @ -")


def check_password(password: str) -> None:
    """Raise ValueError unless ``password`` has at least :data:`MIN_PASSWORD_LENGTH` characters.

    ``hubproxy user add`` asks this of a password a person chose; :func:`add_user` itself only
    refuses an empty one (a file may hold any hash)."""
    if not password:
        raise ValueError("empty password refused")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"password too short: use at least {MIN_PASSWORD_LENGTH} characters")


def _lines(text: str) -> list[str]:
    # Only "\n" ends a line (str.splitlines would also split at form feeds and the like, and a
    # rewrite would then change comments it should keep); a "\r" before it is kept as it was.
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def _entries(text: str, path: str | os.PathLike[str]) -> list[tuple[int, str, str]]:
    """``(line index, name, stored hash)`` for every user line, validated; comments skipped."""
    entries: list[tuple[int, str, str]] = []
    first_line: dict[str, int] = {}
    for index, raw in enumerate(_lines(text)):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{os.fspath(path)}:{index + 1}"
        name, colon, stored = line.partition(":")
        if not colon:
            raise UsersFileError(f"{where}: expected NAME:scrypt$N$r$p$SALT$HASH")
        try:
            check_name(name)
        except ValueError as exc:
            raise UsersFileError(f"{where}: {exc}") from None
        try:
            parse_hash(stored)
        except ValueError as exc:
            raise UsersFileError(f"{where}: bad password hash for {name!r}: {exc}") from None
        if name in first_line:
            raise UsersFileError(
                f"{where}: duplicate user {name!r} (first on line {first_line[name]})"
            )
        first_line[name] = index + 1
        entries.append((index, name, stored))
    return entries


def parse_users(text: str, path: str | os.PathLike[str]) -> dict[str, str]:
    """Map user name to stored hash; raise :class:`UsersFileError` ``path:line: problem``."""
    return {name: stored for _, name, stored in _entries(text, path)}


def _read(path: str | os.PathLike[str], *, missing_ok: bool = False) -> str:
    try:
        # Bytes, then decode: read_text would turn "\r\n" into "\n" and rewrites must keep lines.
        return Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        if missing_ok:
            return ""
        raise UsersFileError(f"{os.fspath(path)}: no such file") from None
    except UnicodeDecodeError:
        raise UsersFileError(f"{os.fspath(path)}: not UTF-8 text") from None
    except OSError as exc:
        raise UsersFileError(f"{os.fspath(path)}: {exc.strerror or exc}") from exc


def load_users(path: str | os.PathLike[str], *, missing_ok: bool = False) -> dict[str, str]:
    """Read and parse a users file; every failure is a :class:`UsersFileError`.

    ``missing_ok``: a file that does not exist yet has no users (``hubproxy user add`` checks
    the file this way before asking for a password)."""
    return parse_users(_read(path, missing_ok=missing_ok), path)


def _write_atomically(path: str | os.PathLike[str], text: str) -> None:
    """Replace ``path`` with ``text``: a 0600 temp file in the same directory, fsync, rename.

    A reader (a running hubproxy reloading the file) sees the old or the new file, never half.
    """
    target = Path(path)
    try:
        previous: os.stat_result | None = target.stat()
    except FileNotFoundError:
        previous = None
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as file:
            os.fchmod(fd, 0o600)  # mkstemp's mode already, but say it: the file holds hashes
            owner = (os.geteuid(), os.getegid())
            if previous is not None and (previous.st_uid, previous.st_gid) != owner:
                # Run as root to edit a file the service user reads: keep the service's
                # ownership, or the restarted mirror could no longer read its own users file.
                with contextlib.suppress(PermissionError):
                    os.fchown(fd, previous.st_uid, previous.st_gid)
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    # The rename itself is durable only once the directory is synced (POSIX).
    with contextlib.suppress(OSError):
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _render(lines: list[str]) -> str:
    return "".join(f"{line}\n" for line in lines)


def add_user(path: str | os.PathLike[str], name: str, password: str) -> bool:
    """Add ``name`` or replace its password; return True if it existed (password changed).

    Other lines, comments included, are kept as they are. A file that does not parse is not
    rewritten (:class:`UsersFileError`), so a typo is reported instead of silently "fixed".
    """
    check_name(name)
    if not password:
        raise ValueError("empty password refused")
    text = _read(path, missing_ok=True)
    entries = _entries(text, path)
    stored = hash_password(password)
    lines = _lines(text)
    for index, existing, _ in entries:
        if existing == name:
            lines[index] = f"{name}:{stored}"
            _write_atomically(path, _render(lines))
            return True
    lines.append(f"{name}:{stored}")
    _write_atomically(path, _render(lines))
    return False


def remove_user(path: str | os.PathLike[str], name: str) -> bool:
    """Remove ``name``; return False (and leave the file alone) if there was no such user."""
    text = _read(path)
    for index, existing, _ in _entries(text, path):
        if existing == name:
            lines = _lines(text)
            del lines[index]
            _write_atomically(path, _render(lines))
            return True
    return False
