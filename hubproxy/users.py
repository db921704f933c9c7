"""Mirror users: the users file, password checks, and the tokens the mirror hands its clients.

Theory of operation. An exposed mirror may require its own users. Registry clients (docker,
containerd, skopeo) only know one way to log in: they follow the ``401`` challenge to the token
realm and send their registry credentials there as ``Authorization: Basic``. So the mirror checks
those Basic credentials against the users file at its token endpoint, fetches the upstream token
itself (anonymously or with its own upstream credentials), and answers with a *sealed* token that
proves both who the mirror user is and what to send upstream. Clients then present that token as
``Authorization: Bearer hp1.…`` on ``/v2/`` requests; the proxy opens it and forwards the upstream
token inside. The sealed token is encrypted and authenticated with a per-process key, so clients
never see the upstream token and cannot forge or extend one; a restart simply makes clients fetch
a new token (they do so on any 401).

Passwords are stored as ``name:scrypt$N$r$p$<salt b64>$<hash b64>``; scrypt costs ~50 ms per check,
so :class:`Authenticator` remembers successful checks under an HMAC of the header value (never the
password itself). Nothing here logs or stores a password or token in clear.

Only :func:`load_users`, :func:`add_user`, :func:`remove_user` and :func:`user_command` do I/O.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import getpass
import hmac
import json
import math
import os
import re
import secrets
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from hashlib import scrypt, shake_256
from pathlib import Path
from typing import TextIO

NAME_RE = re.compile(r"[A-Za-z0-9._@-]{1,64}")

DEFAULT_N = 2**14  # ~16 MiB and ~50 ms per check with r=8: the cost OWASP suggests as a minimum
DEFAULT_R = 8
DEFAULT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
# A users file is trusted configuration, but a typo like N=2**30 would still try to allocate
# 128 GiB on every login; refuse parameters needing more than this.
MAX_SCRYPT_MEMORY = 256 << 20

MAX_AUTHORIZATION = 4096  # longer Authorization values are refused before decoding anything

SEALED_PREFIX = "hp1."


class UsersFileError(ValueError):
    """A users file that cannot be read or used; the message starts with ``path:line:``."""


# --- password hashes -------------------------------------------------------------------------


@dataclass(frozen=True)
class ScryptHash:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def _scrypt_memory(n: int, r: int, p: int) -> int:
    # What OpenSSL's scrypt allocates: 128*r*p for B plus 128*r*(N+2) for V (EVP_PBE_scrypt).
    return 128 * r * p + 128 * r * (n + 2)


def _check_params(n: int, r: int, p: int) -> None:
    if n < 2 or n & (n - 1):
        raise ValueError(f"scrypt N must be a power of two above 1, not {n}")
    if r < 1 or p < 1:
        raise ValueError("scrypt r and p must be at least 1")
    if _scrypt_memory(n, r, p) > MAX_SCRYPT_MEMORY:
        raise ValueError(f"scrypt parameters N={n} r={r} p={p} need too much memory")


_PARAM = re.compile(r"[0-9]{1,10}")


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def parse_hash(stored: str) -> ScryptHash:
    """Parse ``scrypt$N$r$p$salt$hash``; raise ValueError (never quoting the hash) if malformed."""
    fields = stored.split("$")
    if len(fields) != 6 or fields[0] != "scrypt":
        raise ValueError("expected scrypt$N$r$p$SALT$HASH")
    if not all(_PARAM.fullmatch(field) for field in fields[1:4]):
        raise ValueError("scrypt N, r and p must be decimal numbers")
    n, r, p = (int(field) for field in fields[1:4])
    _check_params(n, r, p)
    try:
        salt, digest = _b64decode(fields[4]), _b64decode(fields[5])
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("salt and hash must be base64") from None
    if len(salt) < 8 or not 16 <= len(digest) <= 64:
        raise ValueError("salt or hash has the wrong length")
    return ScryptHash(n, r, p, salt, digest)


def _derive(password: str, n: int, r: int, p: int, salt: bytes, dklen: int) -> bytes:
    return scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        maxmem=_scrypt_memory(n, r, p) + (1 << 20),
        dklen=dklen,
    )


def hash_password(
    password: str,
    *,
    salt: bytes | None = None,
    n: int = DEFAULT_N,
    r: int = DEFAULT_R,
    p: int = DEFAULT_P,
) -> str:
    """Return ``scrypt$N$r$p$<salt b64>$<hash b64>`` for ``password`` (random 16-byte salt)."""
    _check_params(n, r, p)
    if salt is None:
        salt = secrets.token_bytes(SALT_BYTES)
    digest = _derive(password, n, r, p, salt, HASH_BYTES)
    encode = base64.b64encode
    return f"scrypt${n}${r}${p}${encode(salt).decode()}${encode(digest).decode()}"


def verify_password(stored: str, password: str) -> bool:
    """Does ``password`` match the stored hash? A malformed hash matches nothing."""
    try:
        parsed = parse_hash(stored)
        derived = _derive(password, parsed.n, parsed.r, parsed.p, parsed.salt, len(parsed.digest))
    except ValueError:  # includes UnicodeEncodeError (a lone surrogate)
        return False
    return hmac.compare_digest(derived, parsed.digest)


# --- the users file --------------------------------------------------------------------------


def check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise ValueError(f"invalid user name {name!r}: use 1 to 64 letters, digits and . _ @ -")


def _lines(text: str) -> list[str]:
    # Only "\n" ends a line (str.splitlines would also split at form feeds and the like, and a
    # rewrite would then change comments it should keep); a "\r" before it is kept as it was.
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def _entries(text: str, path: str | os.PathLike[str]) -> list[tuple[int, str, str]]:
    """``(line index, name, stored hash)`` for every user line, validated; comments skipped.

    Error messages never quote a line: someone may have pasted a clear password into it.
    """
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


def load_users(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read and parse a users file; every failure is a :class:`UsersFileError`."""
    return parse_users(_read(path), path)


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


# --- Basic credentials -----------------------------------------------------------------------


def _credentials(authorization: bytes, scheme: bytes) -> bytes | None:
    """The credentials after ``scheme`` (case-insensitive, RFC 9110 section 11.1), or None."""
    if len(authorization) > MAX_AUTHORIZATION:
        return None
    found, space, rest = authorization.strip(b" \t").partition(b" ")
    if not space or found.lower() != scheme:
        return None
    rest = rest.strip(b" \t")
    return rest or None


def parse_basic(authorization: bytes) -> tuple[str, str] | None:
    """``Basic base64(user:password)`` (RFC 7617) to ``(user, password)``; None if malformed."""
    credentials = _credentials(authorization, b"basic")
    if credentials is None:
        return None
    try:
        decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
    except ValueError:  # binascii.Error (bad base64) and UnicodeDecodeError are both ValueErrors
        return None
    user, colon, password = decoded.partition(":")
    if not colon:
        return None
    return user, password


def bearer_token(authorization: bytes) -> str | None:
    """The token of ``Authorization: Bearer <token>`` (RFC 6750 section 2.1), or None."""
    credentials = _credentials(authorization, b"bearer")
    if credentials is None or not re.fullmatch(rb"[A-Za-z0-9._~+/-]+=*", credentials):
        return None
    return credentials.decode("ascii")


class Authenticator:
    """Checks ``Authorization: Basic`` values against the users, remembering recent successes.

    The cache key is an HMAC of the whole header value under a random per-process key: equal
    headers hit, the password is never kept, and a memory dump reveals nothing that could be
    replayed elsewhere. Failures are not cached (a wrong password costs a full scrypt, which the
    rate limiter bounds). Unknown users are refused without running scrypt: that tells a timing
    observer which names exist, a small leak traded for not burning CPU on junk.

    :meth:`check_basic` may run in a worker thread (``trio.to_thread.run_sync``) so scrypt does
    not stall the event loop; :meth:`cached_user` is the cheap path to try first.
    """

    def __init__(self, users: Mapping[str, str], *, cache_size: int = 1024) -> None:
        self._users = dict(users)
        self._cache_size = cache_size
        self._key = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, str] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._users)

    def _cache_key(self, authorization: bytes) -> bytes:
        return hmac.digest(self._key, authorization, "sha256")

    def cached_user(self, authorization: bytes) -> str | None:
        """The user if this exact header value was verified recently; never runs scrypt."""
        key = self._cache_key(authorization)
        with self._lock:
            user = self._cache.get(key)
            if user is not None:
                self._cache.move_to_end(key)
            return user

    def check_basic(self, authorization: bytes) -> str | None:
        """The user name if the Basic credentials are right, else None. Never raises."""
        user = self.cached_user(authorization)
        if user is not None:
            return user
        parsed = parse_basic(authorization)
        if parsed is None:
            return None
        name, password = parsed
        stored = self._users.get(name)
        if stored is None or not verify_password(stored, password):
            return None
        with self._lock:
            self._cache[self._cache_key(authorization)] = name
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return name


# --- sealed mirror tokens --------------------------------------------------------------------

_NONCE_BYTES = 16
_TAG_BYTES = 32
MAX_SEALED = 16384  # upstream tokens are JWTs of a few KB; anything much longer is junk
_SEALED_BODY = re.compile(r"[A-Za-z0-9_-]+")


def _xor(data: bytes, keystream: bytes) -> bytes:
    return (int.from_bytes(data) ^ int.from_bytes(keystream)).to_bytes(len(data))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class TokenSealer:
    """Seals ``(user, upstream token, expiry)`` into an opaque ``hp1.`` token and opens it again.

    Format: ``hp1.`` + unpadded url-safe base64 of ``nonce(16) || ciphertext || tag(32)``. The
    plaintext is compact JSON ``{"u": user, "t": upstream token, "e": expiry}``; the keystream is
    SHAKE-256 of (encryption key || nonce), a keyed XOF used as a stream cipher; the tag is
    HMAC-SHA256 over prefix, nonce and ciphertext (encrypt-then-MAC), checked before anything is
    decrypted or parsed. Encryption and MAC keys are derived from one random 32-byte key that
    lives only in this process; pass ``key`` to share it (several processes) or in tests.
    """

    def __init__(self, key: bytes | None = None) -> None:
        if key is None:
            key = secrets.token_bytes(32)
        if len(key) < 32:
            raise ValueError("a token sealing key needs at least 32 bytes")
        # Separate keys for cipher and MAC, so neither use can help an attack on the other.
        self._enc_key = hmac.digest(key, b"hubproxy token encryption", "sha256")
        self._mac_key = hmac.digest(key, b"hubproxy token authentication", "sha256")

    def _keystream(self, nonce: bytes, length: int) -> bytes:
        return shake_256(self._enc_key + nonce).digest(length)

    def _tag(self, nonce: bytes, ciphertext: bytes) -> bytes:
        return hmac.digest(self._mac_key, SEALED_PREFIX.encode() + nonce + ciphertext, "sha256")

    def seal(self, user: str, upstream_token: str, expires_at: float) -> str:
        """An ``hp1.`` token for ``user`` carrying ``upstream_token`` until ``expires_at``.

        Raise ValueError if ``expires_at`` is not finite or the result would be longer than
        :meth:`open` accepts (an upstream token of more than ~12 KB).
        """
        if not math.isfinite(expires_at):
            raise ValueError("a sealed token needs a finite expiry")
        plaintext = json.dumps(
            {"u": user, "t": upstream_token, "e": expires_at}, separators=(",", ":")
        ).encode("utf-8")
        nonce = secrets.token_bytes(_NONCE_BYTES)
        ciphertext = _xor(plaintext, self._keystream(nonce, len(plaintext)))
        token = SEALED_PREFIX + _b64url(nonce + ciphertext + self._tag(nonce, ciphertext))
        if len(token) > MAX_SEALED:
            raise ValueError("upstream token too long to seal")
        return token

    def open(self, token: str, now: float) -> tuple[str, str] | None:
        """``(user, upstream token)`` if ``token`` is ours, intact and not expired, else None."""
        if len(token) > MAX_SEALED or not token.startswith(SEALED_PREFIX):
            return None
        body = token[len(SEALED_PREFIX) :]
        if not _SEALED_BODY.fullmatch(body):
            return None
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except ValueError:  # binascii.Error
            return None
        # Only the canonical spelling: the last base64 digit can carry unused bits, and a token
        # that differs from what we issued must not be accepted as the same token.
        if _b64url(raw) != body or len(raw) <= _NONCE_BYTES + _TAG_BYTES:
            return None
        nonce = raw[:_NONCE_BYTES]
        ciphertext = raw[_NONCE_BYTES:-_TAG_BYTES]
        if not hmac.compare_digest(raw[-_TAG_BYTES:], self._tag(nonce, ciphertext)):
            return None
        plaintext = _xor(ciphertext, self._keystream(nonce, len(ciphertext)))
        try:
            payload = json.loads(plaintext)
        except ValueError:
            return None
        if not isinstance(payload, dict):
            return None
        user, upstream_token, expires_at = payload.get("u"), payload.get("t"), payload.get("e")
        if not (isinstance(user, str) and isinstance(upstream_token, str)):
            return None
        if not isinstance(expires_at, int | float) or isinstance(expires_at, bool):
            return None
        if not math.isfinite(expires_at) or now >= expires_at:
            return None
        return user, upstream_token


def is_sealed(token: str) -> bool:
    """Is this a mirror token (to open) rather than an upstream one (to pass through)?"""
    return token.startswith(SEALED_PREFIX)


# --- hubproxy user ... -----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hubproxy user", description="Manage the mirror's users file."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = commands.add_parser("add", help="add a user, or change the password of one")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--users", metavar="FILE", required=True, help="the users file")
    add.add_argument(
        "--password-stdin", action="store_true", help="read the password from one line of stdin"
    )
    remove = commands.add_parser("remove", help="remove a user")
    remove.add_argument("name", metavar="NAME")
    remove.add_argument("--users", metavar="FILE", required=True, help="the users file")
    listing = commands.add_parser("list", help="list user names")
    listing.add_argument("--users", metavar="FILE", required=True, help="the users file")
    return parser


class _Failure(Exception):
    pass


def _read_password(args: argparse.Namespace, stdin: TextIO, stderr: TextIO) -> str:
    if args.password_stdin:
        # Like `docker login --password-stdin`: one line, its line ending is not part of it.
        password = stdin.readline().rstrip("\r\n")
    else:
        try:
            password = getpass.getpass("Password: ", stream=stderr)
            again = getpass.getpass("Retype password: ", stream=stderr)
        except EOFError:
            raise _Failure("no password given") from None
        if password != again:
            raise _Failure("the passwords do not match")
    if not password:
        raise _Failure("empty password refused")
    return password


def _run(args: argparse.Namespace, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> None:
    if args.command == "list":
        for name in load_users(args.users):
            print(name, file=stdout)
    elif args.command == "add":
        try:
            check_name(args.name)
        except ValueError as exc:
            raise _Failure(str(exc)) from None
        # Read the file before asking for a password: a broken file fails before any typing.
        _entries(_read(args.users, missing_ok=True), args.users)
        password = _read_password(args, stdin, stderr)
        changed = add_user(args.users, args.name, password)
        verb = "changed the password of" if changed else "added"
        print(f"{verb} user {args.name}", file=stdout)
    elif args.command == "remove":
        if not remove_user(args.users, args.name):
            raise _Failure(f"no user {args.name!r} in {args.users}")
        print(f"removed user {args.name}", file=stdout)


def user_command(argv: Sequence[str], *, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    """``hubproxy user add|remove|list ...`` (argv without ``user``): 0 ok, 1 failed, 2 usage."""
    parser = _parser()
    # argparse prints to sys.stdout/sys.stderr and exits; point it at our streams instead.
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            args = parser.parse_args(list(argv))
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 2
    try:
        _run(args, stdin, stdout, stderr)
    except (_Failure, UsersFileError, ValueError) as exc:
        print(f"hubproxy user: error: {exc}", file=stderr)
        return 1
    except OSError as exc:
        print(f"hubproxy user: error: {args.users}: {exc.strerror or exc}", file=stderr)
        return 1
    return 0
