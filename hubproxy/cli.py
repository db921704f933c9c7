"""Command line: ``hubproxy`` and its subcommands; logging, and running until a signal.

The flags and the config file are made from the settings table (:mod:`hubproxy.settings`,
:mod:`hubproxy.configfile`); this module only dispatches and reports."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import getpass
import json
import logging
import os
import pwd
import signal
import sqlite3
import ssl
import sys
import time
import warnings
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TextIO

import trio

from .app import CacheDirError, StartupError, build_proxy, listen_problem, serve, share_keys
from .cache.inventory import listing, read_state, remove_in_directory
from .cache.store import verify_store
from .config import Config
from .configfile import ConfigFileError, read_settings
from .net.buffers import BODIES, worker_budget
from .net.malloc import tune_malloc
from .net.streams import certificate_validity, upstream_ssl_context
from .ops.clientconfig import BUILTIN_NAMES, CLIENT_NAMES, snippet
from .ops.doctor import DEFAULT_IMAGE, Doctor, Options
from .ops.usersfile import (
    MIN_PASSWORD_LENGTH,
    UsersFileError,
    add_user,
    check_name,
    check_password,
    load_users,
    remove_user,
)
from .policy.diagnosis import exit_status, render_json, render_lines, render_table
from .policy.errors import ProxyError
from .policy.inventory import Removal, parse_image_ref, table_lines
from .policy.prefetch import Platform, Tally, parse_image, parse_platforms
from .policy.registries import DEFAULT_REGISTRY
from .policy.sizes import format_size
from .policy.urls import parse_url
from .prefetch import (
    DEFAULT_JOBS,
    Display,
    MirrorUnreachable,
    prefetch_in_process,
    prefetch_through_mirror,
)
from .settings import (
    CommandLine,
    UsageError,
    Values,
    build_config,
    default_cache_dir,
    parse_duration,
    this_platform,
)
from .workers import (
    WorkerRole,
    WorkersError,
    prepare_cache,
    receive_keys,
    reserve_port,
    supervise,
)

__all__ = [
    "UsageError",
    "cache_command",
    "check_config",
    "doctor_command",
    "load_settings",
    "main",
    "prefetch_command",
    "print_config",
    "user_command",
]


def setup_logging(level: str, worker: int | None = None) -> None:
    """Log lines to stderr; a worker of ``--workers N`` says which one it is (``hubproxy[w2]``)."""
    tag = "" if worker is None else f"[w{worker}]"
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format=f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s",
        stream=sys.stderr,
    )


def parse_command(
    parser: CommandLine, argv: Sequence[str], *, stdout: TextIO, stderr: TextIO
) -> argparse.Namespace | int:
    """A subcommand's arguments, or its exit status: 0 after --help (printed to ``stdout``), 2
    after a usage error (its one line on ``stderr``, without argparse's usage block)."""
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            return parser.parse_args(list(argv))
        except UsageError as exc:
            print(f"{exc.prog}: error: {exc}", file=stderr)
            return 2
        except SystemExit as exc:  # --help
            return exc.code if isinstance(exc.code, int) else 2


def print_config(argv: Sequence[str]) -> int:
    """``hubproxy print-config CLIENT --url URL [--ca FILE]``: the client's setup snippet."""
    parser = CommandLine(
        prog="hubproxy print-config",
        description="Print what to paste into a client's configuration to use this mirror.",
    )
    parser.add_argument(
        "client",
        choices=CLIENT_NAMES,
        help="docker or dockerd: daemon.json; containerd or nerdctl: hosts.toml; k3s: "
        "registries.yaml; podman (skopeo, buildah), cri-o or crio: registries.conf",
    )
    parser.add_argument("--url", required=True, help="how clients reach the mirror")
    parser.add_argument("--ca", metavar="FILE", help="a private CA the clients must trust")
    parser.add_argument(
        "--registry",
        metavar="NAME",
        action="append",
        default=[],
        help="another registry the mirror serves (besides the built-in ones; repeatable)",
    )
    parser.add_argument(
        "--only-listed-registries",
        action="store_true",
        help="the mirror runs with --only-listed-registries: it serves Docker Hub and the "
        "--registry names only, not the built-in table",
    )
    args = parse_command(parser, argv, stdout=sys.stdout, stderr=sys.stderr)
    if isinstance(args, int):
        return args
    served = (DEFAULT_REGISTRY,) if args.only_listed_registries else BUILTIN_NAMES
    registries = (*served, *(r for r in dict.fromkeys(args.registry) if r not in served))
    try:
        text, hint = snippet(args.client, args.url, args.ca, registries)
    except ValueError as exc:
        print(f"hubproxy print-config: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    print(f"# {hint}", file=sys.stderr)
    return 0


def load_settings(argv: Sequence[str]) -> tuple[Values, Config]:
    """Flags (and the --config file below them) to a Config; raises UsageError or
    ConfigFileError, whose message names the file line when the bad value came from the file."""
    values, _, _ = read_settings(argv)
    return values, build_config(values)


CHECK_CONFIG_HELP = """\
usage: hubproxy check-config FILE [flags]

Check the config file FILE, and any hubproxy flags after it, with every check a start makes,
without starting. Prints 'FILE: ok' and exits 0, or one line naming the problem and exits 1
(2: no FILE given).
"""


def check_config(argv: Sequence[str]) -> int:
    """``hubproxy check-config FILE [flags]``: everything a start would check, without starting."""
    if argv[:1] in (["-h"], ["--help"]):
        sys.stdout.write(CHECK_CONFIG_HELP)
        return 0
    if not argv or argv[0].startswith("-"):
        print(
            "hubproxy check-config: error: the config file comes first: "
            "hubproxy check-config FILE [flags]",
            file=sys.stderr,
        )
        return 2
    path, rest = argv[0], argv[1:]
    try:
        _, config = load_settings(["--config", path, *rest])
    except (UsageError, ConfigFileError) as exc:
        print(f"hubproxy check-config: error: {exc}", file=sys.stderr)
        return 1
    problems = start_problems(config)
    for problem in problems:
        print(f"hubproxy check-config: error: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"{path}: ok")
    return 0


def start_problems(config: Config) -> list[str]:
    """What would stop this user's start of ``config`` (or make every client fail), beyond
    the values themselves: one line each, saying what to do."""
    problems = []
    if config.cert is not None:
        validity = certificate_validity(config.cert)
        problem = validity.problem(time.time(), config.cert) if validity is not None else None
        if problem is not None:
            problems.append(problem)
    if (problem := _port_problem(config.listen_port)) is not None:
        problems.append(problem)
    if config.cache_dir is not None and (problem := _cache_dir_problem(config.cache_dir)):
        problems.append(problem)
    return problems


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _port_problem(port: int) -> str | None:
    """A listen port this process could not bind (below 1024 needs root or
    CAP_NET_BIND_SERVICE, unless the system lowered net.ipv4.ip_unprivileged_port_start)."""
    if port == 0 or port >= 1024 or os.geteuid() == 0:
        return None
    with contextlib.suppress(OSError, ValueError):
        if port >= int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text()):
            return None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:") and int(line.split()[1], 16) >> _CAP_NET_BIND_SERVICE & 1:
                return None
    return (
        f"listen port {port} is below 1024, which user {_user()} may not bind: give hubproxy "
        "the CAP_NET_BIND_SERVICE capability (the systemd unit does, with "
        "AmbientCapabilities=CAP_NET_BIND_SERVICE) or run it as root, or listen on a port "
        "from 1024 up"
    )


_CAP_NET_BIND_SERVICE = 10  # its bit in the capability sets (linux/capability.h)


def _cache_dir_problem(cache_dir: str) -> str | None:
    """Whether this user can create the cache directory, or write in it and in what a start
    writes to inside it (a cache first filled by root is the usual trap)."""
    root = Path(cache_dir)
    existing = root
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    user = _user()
    if existing != root:
        if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
            return None
        return (
            f"cache-dir {cache_dir} does not exist and user {user} cannot create it in "
            f"{existing}: create it for that user (install -d -o {user} {cache_dir}), or pick "
            "another with --cache-dir"
        )
    if not root.is_dir():
        return f"cache-dir {cache_dir} is not a directory: pick another with --cache-dir"
    inside = [root, *(p for p in (root / "blobs", root / "blobs" / "sha256") if p.is_dir())]
    with contextlib.suppress(OSError):
        inside += [p for p in root.iterdir() if p.is_dir() or p.is_file()]
    for path in inside:
        wanted = os.W_OK | os.X_OK if path.is_dir() else os.W_OK
        if not os.access(path, wanted):
            return (
                f"cache-dir {cache_dir}: user {user} cannot write to {path}: give the cache to "
                f"that user (chown -R {user} {cache_dir}), or pick another with --cache-dir"
            )
    return None


# ---------------------------------------------------------------- hubproxy cache ...


def _cache_parser() -> CommandLine:
    parser = CommandLine(
        prog="hubproxy cache", description="Look at, check and trim the cache on disk."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    verify = commands.add_parser(
        "verify", help="hash every cached blob; report and delete those that do not match"
    )
    listing = commands.add_parser(
        "ls",
        help="list the cached images: tags, digest, platforms, size, pulls, last pull",
        description="List the cached images, sorted by registry and repository, with totals. "
        "Safe beside a running mirror (pull counts are at most a minute behind).",
    )
    listing.add_argument("--registry", metavar="R", help="only this registry's (docker.io, ...)")
    listing.add_argument(
        "--repository", metavar="GLOB", help="only repositories matching, e.g. 'library/*'"
    )
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    remove = commands.add_parser(
        "rm",
        help="remove a tag, an image, a repository, or a blob or manifest by digest",
        description="Remove IMAGE from the cache: a tag (nginx:1.27; the image goes with its "
        "last tag), an image by digest (nginx@sha256:...), a whole repository (nginx), or one "
        "blob or manifest by digest alone (sha256:...). Manifests and blobs another cached "
        "image uses stay, except for a bare digest. A running mirror forgets what was "
        "removed within a second; a blob being fetched is left alone.",
    )
    remove.add_argument("image", metavar="IMAGE|DIGEST")
    refresh = commands.add_parser(
        "refresh",
        help="forget a cached tag: the next pull asks the upstream",
        description="Forget IMAGE:TAG (every client kind's answer) so that its next pull asks "
        "the upstream; its manifests and blobs stay. A running mirror sees it within a second.",
    )
    refresh.add_argument("image", metavar="IMAGE:TAG")
    for command in (verify, listing, remove, refresh):
        command.add_argument("--cache-dir", metavar="DIR", default=None, help="the cache directory")
    return parser


def cache_command(argv: Sequence[str], *, stdout: TextIO, stderr: TextIO) -> int:
    """``hubproxy cache verify|ls|rm|refresh [--cache-dir DIR]``: 0 ok, 1 failed (or damaged
    blobs found, or nothing to remove), 2 usage."""
    args = parse_command(_cache_parser(), argv, stdout=stdout, stderr=stderr)
    if isinstance(args, int):
        return args
    root = Path(args.cache_dir or default_cache_dir())
    prog = f"hubproxy cache {args.command}"
    if not (root / "blobs" / "sha256").is_dir():
        print(f"{prog}: error: no blob cache in {root} (--cache-dir)", file=stderr)
        return 1
    try:
        if args.command == "verify":
            return _verify(root, stdout)
        if args.command == "ls":
            return _list(root, args, stdout)
        return _remove(root, args, stdout)
    except ProxyError as exc:  # NotCached, BadImageName
        print(f"{prog}: error: {exc}", file=stderr)
        return 1
    except ValueError as exc:  # a bad --repository glob
        print(f"{prog}: error: {exc}", file=stderr)
        return 2
    except (OSError, sqlite3.Error) as exc:
        print(f"{prog}: error: {root}: {exc}", file=stderr)
        return 1


def _verify(root: Path, stdout: TextIO) -> int:
    check = verify_store(root)
    for path, actual in check.damaged:
        print(f"damaged: {path} holds sha256:{actual}; deleted", file=stdout)
    print(f"{check.checked} blobs checked, {len(check.damaged)} damaged", file=stdout)
    return 1 if check.damaged else 0


# ---------------------------------------------------------------- hubproxy prefetch


def _prefetch_parser() -> CommandLine:
    parser = CommandLine(
        prog="hubproxy prefetch",
        description="Pull images into the mirror's cache: through a running mirror "
        "(--mirror URL), or into the cache directory of the settings a --config file gives "
        "(the mirror built in this process; use it while no mirror runs on that directory). "
        "Every manifest and blob is checked against its digest. Exit status 1 if any image "
        "failed.",
        epilog="examples: hubproxy prefetch nginx:1.27 ghcr.io/owner/app:main --mirror "
        "https://mirror.lan:5443 --cacert ca.pem; hubproxy prefetch --config "
        "/etc/hubproxy/hubproxy.toml --all-platforms redis:7",
    )
    parser.add_argument("images", metavar="IMAGE", nargs="+", help="e.g. nginx:1.27, ghcr.io/o/app")
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--platform",
        metavar="PLATFORMS",
        help="from a multi-platform image, these, e.g. linux/amd64,linux/arm64 "
        f"(default: this machine's, {this_platform()})",
    )
    which.add_argument("--all-platforms", action="store_true", help="every platform of it")
    parser.add_argument("--mirror", metavar="URL", help="pull through the mirror at this URL")
    parser.add_argument(
        "--cacert", metavar="FILE", help="the private CA that signed the mirror's certificate"
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="without --mirror: the mirror's config file (registries, upstream logins, cache dir)",
    )
    parser.add_argument(
        "--cache-dir", metavar="DIR", help="without --mirror: the cache directory (over --config)"
    )
    parser.add_argument(
        "--jobs",
        metavar="N",
        type=int,
        default=DEFAULT_JOBS,
        help=f"blobs (and images) fetched at once (default {DEFAULT_JOBS})",
    )
    return parser


def prefetch_command(argv: Sequence[str], *, stdout: TextIO, stderr: TextIO) -> int:
    """``hubproxy prefetch IMAGE... [--platform P,... | --all-platforms] [--mirror URL]``:
    0 if every image was fetched, 1 if any failed (one line each on ``stderr``), 2 usage."""
    args = parse_command(_prefetch_parser(), argv, stdout=stdout, stderr=stderr)
    if isinstance(args, int):
        return args

    def usage(message: str) -> int:
        print(f"hubproxy prefetch: error: {message}", file=stderr)
        return 2

    try:
        refs = [parse_image(text) for text in args.images]
        platforms: tuple[Platform, ...] | None = None if args.all_platforms else (this_platform(),)
        if args.platform:
            platforms = parse_platforms(args.platform)
    except ValueError as exc:
        return usage(str(exc))
    if args.jobs < 1:
        return usage("--jobs must be at least 1")
    display = Display(stdout, tty=stdout.isatty())
    try:
        if args.mirror is not None:
            if args.config or args.cache_dir:
                return usage("--config and --cache-dir are for prefetching without --mirror")
            try:
                base = parse_url(args.mirror)
                context = upstream_ssl_context(args.cacert)
            except (ValueError, OSError, ssl.SSLError) as exc:
                return usage(f"--mirror/--cacert: {exc}")
            job: Callable[[], Awaitable[Tally]] = functools.partial(
                prefetch_through_mirror,
                base,
                refs,
                platforms,
                jobs=args.jobs,
                context=context,
                display=display,
            )
        else:
            flags = ["--config", args.config] if args.config else []
            flags += ["--cache-dir", args.cache_dir] if args.cache_dir else []
            try:
                _, config = load_settings(flags)
            except (UsageError, ConfigFileError) as exc:
                print(f"hubproxy prefetch: error: {exc}", file=stderr)
                return 2
            if config.cache_dir is None:
                return usage("the settings have no cache (no-cache): nothing to prefetch into")
            chosen = platforms

            async def job() -> Tally:
                proxy = build_proxy(config, shared=True)  # another mirror may share the cache
                return await prefetch_in_process(
                    proxy, config.listener, refs, chosen, jobs=args.jobs, display=display
                )

        tally: Tally = trio.run(job)
    except MirrorUnreachable as exc:
        print(f"hubproxy prefetch: error: {exc}", file=stderr)
        return 1
    except CacheDirError as exc:
        print(
            f"hubproxy prefetch: error: cannot use the cache directory {exc}: "
            f"{exc.__cause__} (pick another with --cache-dir)",
            file=stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 130
    for line in tally.failures:
        print(f"hubproxy prefetch: error: {line}", file=stderr)
    return 1 if tally.failed else 0


def _list(root: Path, args: argparse.Namespace, stdout: TextIO) -> int:
    listed = listing(read_state(root), args.registry, args.repository)
    if args.json:
        document = {
            "images": [image.as_json() for image in listed.images],
            "totals": listed.totals.as_json(),
        }
        print(json.dumps(document, indent=2), file=stdout)
        return 0
    for line in table_lines(listed.images, listed.totals, time.time()):
        print(line, file=stdout)
    return 0


def _remove(root: Path, args: argparse.Namespace, stdout: TextIO) -> int:
    refresh = args.command == "refresh"
    outcome = remove_in_directory(root, parse_image_ref(args.image), refresh=refresh)
    if refresh:
        removed = ", ".join(outcome.plan.removed)
        print(f"refreshed {removed}: its next pull asks the upstream", file=stdout)
        return 0
    line = (
        f"removed {', '.join(outcome.plan.removed)}: {outcome.blobs_removed} blob"
        f"{'' if outcome.blobs_removed == 1 else 's'} ({format_size(outcome.bytes_removed)})"
    )
    manifests = sum(1 for kind, _ in outcome.plan.removals if kind == Removal.MANIFEST)
    line += f", {manifests} manifest{'' if manifests == 1 else 's'}"
    if outcome.plan.kept_blobs:
        line += f"; {outcome.plan.kept_blobs} blobs kept: other cached images use them"
    if outcome.busy:
        line += f"; {len(outcome.busy)} being fetched now, left alone"
    print(line, file=stdout)
    return 0


# ---------------------------------------------------------------- hubproxy user ...


def _user_parser() -> CommandLine:
    parser = CommandLine(prog="hubproxy user", description="Manage the mirror's users file.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = commands.add_parser(
        "add",
        help="add a user, or change the password of one",
        description=f"Add a user, or change the password of one (at least {MIN_PASSWORD_LENGTH} "
        "characters). The password is asked twice on the terminal; without a terminal (a "
        "script, a pipe), pass it with --password-stdin.",
    )
    add.add_argument("name", metavar="NAME")
    add.add_argument("--users", metavar="FILE", required=True, help="the users file")
    add.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from one line of stdin instead of asking on the terminal",
    )
    remove = commands.add_parser("remove", help="remove a user")
    remove.add_argument("name", metavar="NAME")
    remove.add_argument("--users", metavar="FILE", required=True, help="the users file")
    listing = commands.add_parser("list", help="list user names")
    listing.add_argument("--users", metavar="FILE", required=True, help="the users file")
    return parser


class _UserFailure(Exception):
    pass


NO_TERMINAL = "no terminal to ask for the password on; pipe it in with --password-stdin"


def _read_password(args: argparse.Namespace, stdin: TextIO, stderr: TextIO) -> str:
    if args.password_stdin:
        # Like `docker login --password-stdin`: one line, its line ending is not part of it.
        password = stdin.readline().rstrip("\r\n")
        check_password(password)
        return password
    # Without a terminal getpass reads stdin after a GetPassWarning (and echoes what it reads):
    # refuse instead, saying how a script passes a password.
    if not stdin.isatty():
        raise _UserFailure(NO_TERMINAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", getpass.GetPassWarning)
            password = getpass.getpass("Password: ", stream=stderr)
            check_password(password)  # before the retype: no second typing of a refused one
            again = getpass.getpass("Retype password: ", stream=stderr)
    except getpass.GetPassWarning:
        raise _UserFailure(NO_TERMINAL) from None
    except EOFError:
        raise _UserFailure("no password given") from None
    if password != again:
        raise _UserFailure("the passwords do not match")
    return password


def _run_user(args: argparse.Namespace, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> None:
    if args.command == "list":
        for name in load_users(args.users):
            print(name, file=stdout)
    elif args.command == "add":
        try:
            check_name(args.name)
        except ValueError as exc:
            raise _UserFailure(str(exc)) from None
        # Read the file before asking for a password: a broken file fails before any typing.
        load_users(args.users, missing_ok=True)
        password = _read_password(args, stdin, stderr)
        changed = add_user(args.users, args.name, password)
        verb = "changed the password of" if changed else "added"
        print(f"{verb} user {args.name}", file=stdout)
    elif args.command == "remove":
        if not remove_user(args.users, args.name):
            raise _UserFailure(f"no user {args.name!r} in {args.users}")
        print(f"removed user {args.name}", file=stdout)


def user_command(argv: Sequence[str], *, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    """``hubproxy user add|remove|list ...`` (argv without ``user``): 0 ok, 1 failed, 2 usage."""
    args = parse_command(_user_parser(), argv, stdout=stdout, stderr=stderr)
    if isinstance(args, int):
        return args
    try:
        _run_user(args, stdin, stdout, stderr)
    except (_UserFailure, UsersFileError, ValueError) as exc:
        print(f"hubproxy user: error: {exc}", file=stderr)
        return 1
    except OSError as exc:
        print(f"hubproxy user: error: {args.users}: {exc.strerror or exc}", file=stderr)
        return 1
    return 0


# ---------------------------------------------------------------- hubproxy doctor


def _doctor_parser() -> CommandLine:
    parser = CommandLine(
        prog="hubproxy doctor",
        usage="%(prog)s [--mirror URL [--cacert FILE]] [--json] [hubproxy flags or --config FILE]",
        description="Check every hop from this machine with the server's settings (the same "
        "--config file and flags): DNS, TCP (through the configured proxy), TLS, the /v2/ "
        "challenge, an anonymous token, a manifest HEAD with the rate-limit headers and the CDN "
        "redirect of each upstream, fallbacks included; the cache directory; and with --mirror, "
        "the mirror as a client sees it. Exit status 0 when nothing failed (warnings included), "
        "1 when something did, 2 for a usage error.",
    )
    parser.add_argument("--mirror", metavar="URL", help="the mirror's URL, as clients use it")
    parser.add_argument(
        "--cacert", metavar="FILE", help="the private CA the clients trust for --mirror"
    )
    parser.add_argument(
        "--image",
        metavar="NAME=REPOSITORY:TAG",
        action="append",
        default=[],
        help=f"the small image whose manifest and blob are checked on registry NAME (default "
        f"{DEFAULT_IMAGE} on Docker Hub; other registries' manifest and CDN checks need one; "
        "repeatable)",
    )
    parser.add_argument(
        "--all-registries",
        action="store_true",
        help="check the whole built-in registry table too, not only Docker Hub and the "
        "registries the settings name",
    )
    parser.add_argument(
        "--check-timeout",
        metavar="DURATION",
        default="10s",
        help="how long each check may take (default 10s)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON, for scripts")
    return parser


def doctor_command(argv: Sequence[str], *, stdout: TextIO, stderr: TextIO) -> int:
    """``hubproxy doctor [--mirror URL] [--cacert FILE] [--json] [flags]``: 0 nothing failed,
    1 a check failed, 2 usage."""
    parser = _doctor_parser()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            args, rest = parser.parse_known_args(list(argv))
            timeout = parse_duration(args.check_timeout)
            images = {}
            for item in args.image:
                name, sep, image = item.partition("=")
                if not sep or not name or not image:
                    raise UsageError(f"--image wants NAME=REPOSITORY:TAG, got {item!r}")
                images[name.lower()] = image
            mirror = parse_url(args.mirror) if args.mirror else None
            _, config = load_settings(rest)
        except (UsageError, ConfigFileError, ValueError) as exc:
            print(f"hubproxy doctor: error: {exc}", file=stderr)
            return 2
        except SystemExit as exc:  # --help
            return exc.code if isinstance(exc.code, int) else 2
    options = Options(mirror, args.cacert, images, args.all_registries, timeout)
    findings = trio.run(Doctor(config, options).run)
    if args.json:
        stdout.write(render_json(findings))
    elif stdout.isatty():
        stdout.write(render_table(findings))
    else:
        stdout.write(render_lines(findings))
    return exit_status(findings)


# The subcommands, by the name --help lists them under (settings.COMMANDS); argv after the name.
SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "check-config": check_config,
    "print-config": print_config,
    "user": lambda argv: user_command(argv, stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr),
    "cache": lambda argv: cache_command(argv, stdout=sys.stdout, stderr=sys.stderr),
    "prefetch": lambda argv: prefetch_command(argv, stdout=sys.stdout, stderr=sys.stderr),
    "doctor": lambda argv: doctor_command(argv, stdout=sys.stdout, stderr=sys.stderr),
}


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in SUBCOMMANDS:
        return SUBCOMMANDS[args_list[0]](args_list[1:])
    try:
        values, config = load_settings(args_list)
    except (UsageError, ConfigFileError) as exc:
        # One line: the usage block would push it off a small terminal (--help has the flags).
        print(f"hubproxy: error: {exc}", file=sys.stderr)
        return 2
    role = WorkerRole.from_environment()
    setup_logging(str(values.raw["log_level"]), None if role is None else role.index)
    if role is None and config.workers > 1:
        return run_supervisor(config, args_list)
    if role is not None:
        share_keys(receive_keys(role))
        config = dataclasses.replace(config, listen_port=role.port)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor passes it on (app.py)
    if config.body_memory is not None:  # this process's part of the mirror's body buffers
        BODIES.budget = worker_budget(config.body_memory, config.workers)
    # body buffers reuse heap memory instead of faulting in fresh pages
    tune_malloc(trim_threshold=2 * BODIES.budget)
    try:
        trio.run(lambda: serve(config, handle_signals=True, probe_upstreams=True, role=role))
    except CacheDirError as exc:
        logging.getLogger("hubproxy").error(
            "cannot use the cache directory %s: %s (pick another with --cache-dir, or --no-cache)",
            config.cache_dir,
            exc.__cause__,
        )
        return 1
    except StartupError as exc:
        logging.getLogger("hubproxy").error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def run_supervisor(config: Config, argv: list[str]) -> int:
    """``--workers N`` with N > 1: this process supervises N workers (``hubproxy.workers``)."""
    log = logging.getLogger("hubproxy")
    try:
        sockets, port = reserve_port(config)
    except OSError as exc:
        log.error("%s", listen_problem(config.listen_host, config.listen_port, exc))
        return 1
    try:
        prepare_cache(config)
    except OSError as exc:
        log.error(
            "cannot use the cache directory %s: %s (pick another with --cache-dir, or --no-cache)",
            config.cache_dir,
            exc,
        )
        return 1
    try:
        supervise(config, argv, port)
    except WorkersError as exc:
        log.error("%s; not started", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        for sock in sockets:
            sock.close()
    return 0
