"""Tests for hubproxy.users: password hashes, the users file, Basic checks, sealed tokens and
``hubproxy user``.

Hashes use N=2**4 for speed except where the default cost is the point. File tests run in
``tmp_path``; the command runs end to end with ``io.StringIO`` streams and a scripted getpass.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import io
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hubproxy import users
from hubproxy.users import (
    Authenticator,
    TokenSealer,
    UsersFileError,
    add_user,
    bearer_token,
    hash_password,
    is_sealed,
    load_users,
    parse_basic,
    parse_hash,
    parse_users,
    remove_user,
    user_command,
    verify_password,
)


def fast_hash(password: str, salt: bytes | None = None) -> str:
    return hash_password(password, salt=salt, n=2**4, r=8, p=1)


def basic(credentials: str | bytes, scheme: bytes = b"Basic") -> bytes:
    raw = credentials.encode() if isinstance(credentials, str) else credentials
    return scheme + b" " + base64.b64encode(raw)


@pytest.fixture
def scrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count scrypt runs by wrapping the function the users module calls."""
    calls: list[int] = []
    real = hashlib.scrypt

    def counting(*args: Any, **kwargs: Any) -> bytes:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(users, "scrypt", counting)
    return calls


# --- password hashes -------------------------------------------------------------------------


def test_hash_format_and_verify() -> None:
    stored = fast_hash("correct horse")
    scheme, n, r, p, salt, digest = stored.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16", "8", "1")
    assert len(base64.b64decode(salt)) == 16
    assert len(base64.b64decode(digest)) == 32
    assert verify_password(stored, "correct horse")
    assert not verify_password(stored, "correct horse ")
    assert not verify_password(stored, "")
    assert "correct horse" not in stored


def test_default_cost() -> None:
    stored = hash_password("s3cret")
    assert stored.startswith("scrypt$16384$8$1$")
    assert verify_password(stored, "s3cret")
    assert not verify_password(stored, "s3creT")


def test_salt_is_random_and_explicit_salt_is_deterministic() -> None:
    assert fast_hash("pw") != fast_hash("pw")
    salt = bytes(range(16))
    one = fast_hash("pw", salt)
    assert one == fast_hash("pw", salt)
    expected = hashlib.scrypt(b"pw", salt=salt, n=16, r=8, p=1, dklen=32)
    assert one.endswith("$" + base64.b64encode(expected).decode())


@pytest.mark.parametrize("password", ["päss wörd", "🔑", "a:b:c", " leading", "x" * 1000])
def test_unicode_and_odd_passwords(password: str) -> None:
    stored = fast_hash(password)
    assert verify_password(stored, password)
    assert not verify_password(stored, password + "x")


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "scrypt",
        "plain$16$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$16$8$1$AAAAAAAAAAAAAAAAAAAAAA==",
        "scrypt$15$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$1$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$16$0$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$-16$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$x$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$1073741824$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$16$8$1$not base64!$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$16$8$1$AAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",  # 3-byte salt
        "scrypt$16$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAA",  # 3-byte hash
        "scrypt$16$8$1$AAAAAAAAAAAAAAAAAAAAAA==$ÄÄÄÄ",
    ],
)
def test_malformed_hash_matches_nothing(stored: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        parse_hash(stored)
    assert not verify_password(stored, "")
    assert not verify_password(stored, "anything")


@pytest.mark.parametrize(("n", "r", "p"), [(15, 8, 1), (1, 8, 1), (16, 0, 1), (2**30, 8, 1)])
def test_hash_password_refuses_bad_parameters(n: int, r: int, p: int) -> None:
    with pytest.raises(ValueError, match="scrypt"):
        hash_password("pw", n=n, r=r, p=p)


def test_verify_with_lone_surrogate_is_false() -> None:
    assert not verify_password(fast_hash("pw"), "\udcff")


# --- the users file --------------------------------------------------------------------------


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


# --- Basic credentials and the Authenticator ------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (basic("alice:pw"), ("alice", "pw")),
        (basic("alice:p:w:"), ("alice", "p:w:")),
        (basic("alice:"), ("alice", "")),
        (basic(":pw"), ("", "pw")),
        (basic("alice:pw", b"basic"), ("alice", "pw")),
        (basic("alice:pw", b"BASIC"), ("alice", "pw")),
        (b"  Basic   " + base64.b64encode(b"alice:pw") + b"  ", ("alice", "pw")),
        (basic("jörg:pässword"), ("jörg", "pässword")),
        (b"Basic", None),
        (b"Basic ", None),
        (b"", None),
        (b"Basic !!!!", None),
        (b"Basic YWxpY2U6cHc", None),  # missing padding
        (b"Basic YWxp Y2U6cHc=", None),
        (basic("alicepw"), None),  # no colon
        (basic(b"alice:\xff\xfe"), None),  # not UTF-8
        (basic("alice:pw", b"Bearer"), None),
        (basic("alice:pw", b"Basicx"), None),
        (b"Basic " + b"A" * 5000, None),  # overlong
    ],
)
def test_parse_basic(header: bytes, expected: tuple[str, str] | None) -> None:
    assert parse_basic(header) == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"Bearer abc.def-ghi_jkl", "abc.def-ghi_jkl"),
        (b"bearer hp1.xyz", "hp1.xyz"),
        (b"Bearer a+b/c==", "a+b/c=="),
        (b"Bearer  token ", "token"),
        (b"Bearer", None),
        (b"Bearer ", None),
        (b"Basic abc", None),
        (b"Bearer a b", None),
        (b"Bearer a=b", None),
        (b"Bearer \xff", None),
        (b"Bearer " + b"A" * 5000, None),
    ],
)
def test_bearer_token(header: bytes, expected: str | None) -> None:
    assert bearer_token(header) == expected


@pytest.fixture
def authenticator() -> Authenticator:
    return Authenticator({"alice": fast_hash("wonderland"), "bob": fast_hash("builder")})


def test_authenticator_right_and_wrong(authenticator: Authenticator) -> None:
    assert authenticator.check_basic(basic("alice:wonderland")) == "alice"
    assert authenticator.check_basic(basic("bob:builder")) == "bob"
    assert authenticator.check_basic(basic("alice:builder")) is None
    assert authenticator.check_basic(basic("bob:wonderland")) is None
    assert authenticator.check_basic(basic("carol:wonderland")) is None
    assert authenticator.check_basic(basic("Alice:wonderland")) is None
    assert authenticator.names == frozenset({"alice", "bob"})


@given(st.binary(max_size=200))
def test_authenticator_never_raises(header: bytes) -> None:
    auth = Authenticator({"alice": fast_hash("pw")})
    assert auth.check_basic(header) is None
    assert auth.check_basic(b"Basic " + header) is None


def test_cache_hit_does_not_rerun_scrypt(
    authenticator: Authenticator, scrypt_calls: list[int]
) -> None:
    header = basic("alice:wonderland")
    assert authenticator.cached_user(header) is None
    assert authenticator.check_basic(header) == "alice"
    assert len(scrypt_calls) == 1
    for _ in range(10):
        assert authenticator.check_basic(header) == "alice"
        assert authenticator.cached_user(header) == "alice"
    assert len(scrypt_calls) == 1
    # a different spelling of the same credentials is verified once more, then cached too
    assert authenticator.check_basic(basic("alice:wonderland", b"basic")) == "alice"
    assert len(scrypt_calls) == 2


def test_failures_are_not_cached(authenticator: Authenticator, scrypt_calls: list[int]) -> None:
    for _ in range(3):
        assert authenticator.check_basic(basic("alice:wrong")) is None
    assert len(scrypt_calls) == 3
    # junk and unknown users never reach scrypt
    for header in (b"Basic !!", basic("nobody:x"), basic("nocolon"), b"Bearer x"):
        assert authenticator.check_basic(header) is None
    assert len(scrypt_calls) == 3


def test_cache_is_bounded(scrypt_calls: list[int]) -> None:
    auth = Authenticator({f"u{i}": fast_hash(f"p{i}") for i in range(3)}, cache_size=2)
    headers = [basic(f"u{i}:p{i}") for i in range(3)]
    scrypt_calls.clear()  # the hashes above ran scrypt too
    for header in headers:
        auth.check_basic(header)
    assert len(scrypt_calls) == 3
    assert auth.cached_user(headers[0]) is None  # evicted: least recently used
    assert auth.cached_user(headers[2]) == "u2"
    assert auth.check_basic(headers[0]) == "u0"
    assert len(scrypt_calls) == 4


def test_cache_holds_no_password(authenticator: Authenticator) -> None:
    header = basic("alice:wonderland")
    assert authenticator.check_basic(header) == "alice"
    state = repr(vars(authenticator)).encode()
    for secret in (b"wonderland", header, base64.b64encode(b"alice:wonderland")):
        assert secret not in state


# --- sealed tokens ---------------------------------------------------------------------------

UPSTREAM = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSIsImFjY2VzcyI6W119.c2lnbmF0dXJlLWJ5dGVz"


def test_seal_round_trip() -> None:
    sealer = TokenSealer()
    token = sealer.seal("alice", UPSTREAM, expires_at=1000.0)
    assert token.startswith("hp1.") and is_sealed(token)
    assert bearer_token(b"Bearer " + token.encode()) == token
    assert sealer.open(token, now=999.9) == ("alice", UPSTREAM)
    assert sealer.open(token, now=1000.0) is None  # expired
    assert sealer.open(token, now=5000.0) is None


@pytest.mark.parametrize(
    ("user", "upstream"),
    [("alice", ""), ("jörg@example.com", "x" * 4000), ("a", '{"json": "inside"}'), ("b", "🔑")],
)
def test_seal_round_trip_odd_values(user: str, upstream: str) -> None:
    sealer = TokenSealer()
    assert sealer.open(sealer.seal(user, upstream, 10.0), 0.0) == (user, upstream)


def test_seals_differ_each_time() -> None:
    sealer = TokenSealer()
    assert sealer.seal("alice", UPSTREAM, 10.0) != sealer.seal("alice", UPSTREAM, 10.0)


def test_any_altered_character_is_refused() -> None:
    sealer = TokenSealer()
    token = sealer.seal("alice", UPSTREAM, expires_at=1000.0)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for index, char in enumerate(token):
        for replacement in {alphabet[(alphabet.find(char) + 1) % 64], "A", "_", char.swapcase()}:
            if replacement == char:
                continue
            altered = token[:index] + replacement + token[index + 1 :]
            assert sealer.open(altered, now=0.0) is None, (index, replacement)
    assert sealer.open(token[:-1], now=0.0) is None
    assert sealer.open(token + "A", now=0.0) is None
    assert sealer.open(token + "=", now=0.0) is None
    assert sealer.open(token, now=0.0) == ("alice", UPSTREAM)


def test_any_altered_byte_is_refused() -> None:
    sealer = TokenSealer()
    token = sealer.seal("alice", "up", expires_at=1000.0)
    body = token[4:]
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    for index in range(len(raw)):
        for bit in (0x01, 0x80):
            altered = bytearray(raw)
            altered[index] ^= bit
            spelled = base64.urlsafe_b64encode(bytes(altered)).rstrip(b"=").decode()
            assert sealer.open("hp1." + spelled, now=0.0) is None


def test_other_key_is_refused_and_shared_key_works() -> None:
    key = bytes(range(32))
    token = TokenSealer(key).seal("alice", UPSTREAM, 10.0)
    assert TokenSealer().open(token, 0.0) is None
    assert TokenSealer(bytes(32)).open(token, 0.0) is None
    assert TokenSealer(key).open(token, 0.0) == ("alice", UPSTREAM)


@pytest.mark.parametrize("expires_at", [float("nan"), float("inf"), -float("inf")])
def test_seal_refuses_non_finite_expiry(expires_at: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        TokenSealer().seal("alice", UPSTREAM, expires_at)


def test_seal_refuses_what_open_would_refuse() -> None:
    sealer = TokenSealer()
    long_token = "x" * 11000
    assert sealer.open(sealer.seal("alice", long_token, 10.0), 0.0) == ("alice", long_token)
    with pytest.raises(ValueError, match="too long"):
        sealer.seal("alice", "x" * 13000, 10.0)


def test_short_key_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        TokenSealer(b"short")


def encodings(secret: bytes) -> Iterator[bytes]:
    """The secret as it could show up in a token: raw, hex, and base64 at every alignment."""
    yield secret
    yield secret.hex().encode()
    encoders: list[Callable[[bytes], bytes]] = [base64.b64encode, base64.urlsafe_b64encode]
    for encode in encoders:
        for shift in range(3):
            # Characters fully determined by the secret alone, whatever precedes it.
            encoded = encode(b"\0" * shift + secret).rstrip(b"=")
            yield encoded[shift + 1 : -2]


def test_upstream_token_is_not_readable_in_the_sealed_token() -> None:
    sealer = TokenSealer()
    secret = UPSTREAM.encode()
    for user in ("alice", "x" * 7, "yy"):  # several alignments of the token inside the payload
        token = sealer.seal(user, UPSTREAM, 10.0).encode()
        for form in encodings(secret):
            assert len(form) > 20
            assert form not in token
        # also not recoverable by decoding the body without the key
        body = token[4:]
        raw = base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4))
        assert secret not in raw and b"alice" not in raw


@pytest.mark.parametrize(
    "token",
    [
        "",
        "hp1.",
        "hp1",
        "HP1.AAAA",
        "hp2." + "A" * 100,
        "hp1.!!!!",
        "hp1.AAAA",
        "hp1." + "A" * 200,
        "hp1.AAAA=",
        "hp1.A",
        "hp1." + "A" * 20000,
        "eyJhbGciOiJIUzI1NiJ9.e30.sig",
    ],
)
def test_malformed_tokens_are_refused(token: str) -> None:
    assert TokenSealer().open(token, 0.0) is None


@given(st.text(max_size=300))
def test_open_never_raises(token: str) -> None:
    sealer = TokenSealer(bytes(32))
    assert sealer.open(token, 0.0) is None
    assert sealer.open("hp1." + token, 0.0) is None


# --- hubproxy user ... -----------------------------------------------------------------------


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
