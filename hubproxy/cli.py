"""Command line: flags to a frozen :class:`Config`, logging, and running until a signal."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import getpass
import logging
import math
import os
import re
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import trio

from . import __version__
from .access import parse_image_rules, parse_networks
from .app import CacheDirError, serve
from .cache import parse_size
from .clientconfig import BUILTIN_NAMES, CLIENTS, snippet
from .config import Config, Limits, Timeouts
from .configfile import ConfigFileError, parse_args_with_file, value_origin
from .flow import base_url
from .registries import (
    BUILTIN_REGISTRIES,
    DEFAULT_REGISTRY,
    DOCKER_HUB_INDEX,
    DOCKER_HUB_UPSTREAM,
    Registry,
    is_docker_hub,
    looks_like_host,
)
from .urls import Url, parse_url
from .usersfile import UsersFileError, add_user, check_name, load_users, remove_user

DESCRIPTION = """\
A Docker Hub registry mirror. Point docker, containerd or podman at it and every pull goes through
it: it forwards the registry API to the upstream, rewrites auth challenges so token requests come
back here, follows blob redirects to the CDN itself, streams bodies, and fails over to
--fallback upstreams when Docker Hub answers 429 or cannot be reached.

Examples:
  hubproxy                                   plain HTTP on 127.0.0.1:5000 (docker accepts an
                                             http:// mirror on localhost)
  hubproxy print-config containerd --url https://mirror.lan
                                             what to paste into a client's configuration
  hubproxy --cert server.pem --key key.pem   HTTPS on 0.0.0.0:443
  hubproxy --fallback https://my-worker.example.workers.dev
"""


class UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hubproxy",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--version", action="version", version=f"hubproxy {__version__}")
    add(
        "--config",
        metavar="FILE",
        help="read settings from this TOML file (keys are the long flag names, e.g. "
        'cache-dir = "/var/cache/hubproxy"); flags given here override it',
    )
    listen = parser.add_argument_group("listening")
    listen.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="address to listen on, e.g. 0.0.0.0:443 or [::]:443 "
        "(default 0.0.0.0:443 with TLS, 127.0.0.1:5000 without)",
    )
    listen.add_argument("--cert", metavar="FILE", help="TLS certificate chain (PEM); enables HTTPS")
    listen.add_argument("--key", metavar="FILE", help="TLS private key (PEM) for --cert")
    listen.add_argument(
        "--max-connections",
        metavar="N",
        type=int,
        default=1024,
        help="client connections served at once; more get 503 (plain HTTP) or are closed "
        "(TLS) (default 1024)",
    )
    listen.add_argument(
        "--public-url",
        metavar="URL",
        help="the URL clients use to reach this mirror, for token realms "
        "(default: the scheme and Host of each request)",
    )
    up = parser.add_argument_group("upstreams")
    up.add_argument(
        "--upstream",
        metavar="URL",
        default=DOCKER_HUB_UPSTREAM,
        help=f"registry to mirror (default {DOCKER_HUB_UPSTREAM})",
    )
    up.add_argument(
        "--fallback",
        metavar="URL",
        action="append",
        default=[],
        help="another upstream to try, in order, when the previous one answers 429 or cannot "
        "be reached (repeatable), e.g. a Cloudflare Worker mirror",
    )
    up.add_argument(
        "--index-url",
        metavar="URL",
        default=DOCKER_HUB_INDEX,
        help=f"where /v1/search goes, for 'docker search' (default {DOCKER_HUB_INDEX})",
    )
    up.add_argument(
        "--library-prefix",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="insert library/ before one-component names (default: on when the upstream is "
        "Docker Hub)",
    )
    up.add_argument(
        "--upstream-ca",
        metavar="FILE",
        help="extra CA certificates (PEM) trusted for every upstream, besides the system store",
    )
    up.add_argument(
        "--upstream-proxy",
        metavar="URL",
        help="reach upstreams through this HTTP proxy (CONNECT), e.g. http://192.168.1.1:3128",
    )
    up.add_argument(
        "--rate-limit-cooldown",
        metavar="SECONDS",
        type=float,
        default=60.0,
        help="skip an upstream this long after a 429 without Retry-After (default 60)",
    )
    up.add_argument(
        "--max-redirects",
        metavar="N",
        type=int,
        default=5,
        help="redirects followed per request (default 5)",
    )
    reg = parser.add_argument_group(
        "more registries (built in: "
        + ", ".join(name for name, _, _ in BUILTIN_REGISTRIES)
        + "; clients pick one with ?ns=, a path prefix /v2/ghcr.io/..., or a --host-map name)"
    )
    reg.add_argument(
        "--registry",
        metavar="NAME=URL",
        action="append",
        default=[],
        help="serve another registry, or point a built-in one elsewhere, e.g. "
        "registry.example.com=https://registry.example.com (repeatable)",
    )
    reg.add_argument(
        "--registry-fallback",
        metavar="NAME=URL",
        action="append",
        default=[],
        help="a fallback upstream for registry NAME, tried in order (repeatable)",
    )
    reg.add_argument(
        "--registry-ca",
        metavar="NAME=FILE",
        action="append",
        default=[],
        help="extra CA certificates (PEM) for registry NAME's origins (repeatable)",
    )
    reg.add_argument(
        "--registry-proxy",
        metavar="NAME=URL",
        action="append",
        default=[],
        help="reach registry NAME through this HTTP CONNECT proxy (repeatable)",
    )
    reg.add_argument(
        "--registry-login",
        metavar="NAME=FILE",
        action="append",
        default=[],
        help="pull from registry NAME with the operator's login in FILE ('user:password'; a "
        "token as password works) when the client sends none, to raise rate limits; anyone "
        "who can reach the mirror then pulls what it can read, so it needs --allow or --users "
        "(or --allow-shared-login)",
    )
    reg.add_argument(
        "--allow-shared-login",
        action="store_true",
        help="use --registry-login without --allow or --users: you accept that everyone who "
        "reaches the mirror pulls with those credentials",
    )
    reg.add_argument(
        "--host-map",
        metavar="HOST=NAME",
        action="append",
        default=[],
        help="requests addressed to HOST (the Host header) go to registry NAME, e.g. "
        "ghcr.mirror.example.com=ghcr.io (repeatable)",
    )
    cache = parser.add_argument_group("blob cache")
    cache.add_argument(
        "--cache-dir",
        metavar="DIR",
        default=default_cache_dir(),
        help="where verified blobs are kept (default: %(default)s)",
    )
    cache.add_argument(
        "--cache-size",
        metavar="SIZE",
        default="20G",
        help="evict least recently used blobs beyond this size, e.g. 500M, 20G (default 20G)",
    )
    cache.add_argument(
        "--manifest-ttl",
        metavar="SECONDS",
        type=float,
        default=60.0,
        help="serve a cached tag without asking the upstream (HEAD) for this long (default 60)",
    )
    cache.add_argument("--no-cache", action="store_true", help="do not cache at all")
    acl = parser.add_argument_group("access control (for a mirror reachable by strangers)")
    acl.add_argument(
        "--allow",
        metavar="CIDR",
        action="append",
        default=[],
        help="serve only clients from these networks, e.g. 192.168.0.0/16 (repeatable; "
        "default: everyone); others get 403",
    )
    acl.add_argument(
        "--ops-allow",
        metavar="CIDR",
        action="append",
        default=[],
        help="networks that may read /metrics, /healthz, /readyz and the status page / "
        "(repeatable; default: every client --allow lets in)",
    )
    acl.add_argument(
        "--users",
        metavar="FILE",
        help="require clients to log in to the mirror with a user of this file (made with "
        "'hubproxy user add NAME --users FILE'); upstream pulls are then anonymous",
    )
    acl.add_argument(
        "--images-allow",
        metavar="GLOB",
        action="append",
        default=[],
        help="serve only images matching one of these, e.g. 'library/*', 'myorg/**' "
        "(repeatable; default: all)",
    )
    acl.add_argument(
        "--images-deny",
        metavar="GLOB",
        action="append",
        default=[],
        help="refuse images matching one of these (repeatable; wins over --images-allow)",
    )
    acl.add_argument(
        "--client-rate-limit",
        metavar="N",
        type=float,
        default=0.0,
        help="requests per second each client address may make on average; more get 429 "
        "(default 0: no limit)",
    )
    acl.add_argument(
        "--client-burst",
        metavar="N",
        type=int,
        default=200,
        help="requests a client may make at once before --client-rate-limit applies "
        "(default 200: a large image's pull)",
    )
    limits = Limits()
    lim = parser.add_argument_group("request limits")
    lim.add_argument(
        "--max-header-size",
        metavar="BYTES",
        type=int,
        default=limits.max_head_size,
        help=f"request line and headers; larger requests get 431 (default {limits.max_head_size})",
    )
    lim.add_argument(
        "--max-headers",
        metavar="N",
        type=int,
        default=limits.max_headers,
        help=f"header fields per request; more get 431 (default {limits.max_headers})",
    )
    lim.add_argument(
        "--max-target",
        metavar="BYTES",
        type=int,
        default=limits.max_target,
        help=f"request target length; longer gets 414 (default {limits.max_target})",
    )
    defaults = Timeouts()
    tm = parser.add_argument_group("timeouts (seconds)")
    tm.add_argument(
        "--handshake-timeout",
        type=float,
        default=defaults.handshake,
        help=f"client TLS handshake (default {defaults.handshake:g})",
    )
    tm.add_argument(
        "--request-timeout",
        type=float,
        default=defaults.request_head,
        help=f"first request head after connecting (default {defaults.request_head:g})",
    )
    tm.add_argument(
        "--keepalive-timeout",
        type=float,
        default=defaults.keepalive_idle,
        help=f"idle client connection between requests (default {defaults.keepalive_idle:g})",
    )
    tm.add_argument(
        "--client-idle-timeout",
        type=float,
        default=defaults.client_idle,
        help="client that accepts or sends nothing mid-transfer "
        f"(default {defaults.client_idle:g})",
    )
    tm.add_argument(
        "--connect-timeout",
        type=float,
        default=defaults.connect,
        help=f"connecting to an upstream, TLS included (default {defaults.connect:g})",
    )
    tm.add_argument(
        "--read-timeout",
        type=float,
        default=defaults.upstream_idle,
        help="upstream that sends nothing; there is no total-time limit "
        f"(default {defaults.upstream_idle:g})",
    )
    tm.add_argument(
        "--shutdown-grace",
        type=float,
        default=defaults.shutdown_grace,
        help="time in-flight transfers get after SIGINT/SIGTERM "
        f"(default {defaults.shutdown_grace:g})",
    )
    add(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default info; info logs one access line per request)",
    )
    return parser


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/hubproxy``, else ``~/.cache/hubproxy``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hubproxy")


def parse_listen(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` (all addresses)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen wants HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host:
            raise UsageError(f"--listen: empty IPv6 address in {text!r}")
    elif ":" in host:
        raise UsageError(f"write IPv6 addresses in brackets, e.g. [::1]:{port}")
    return host or "0.0.0.0", int(port)


def _url(flag: str, text: str) -> Url:
    try:
        return base_url(text)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def _readable(flag: str, path: str) -> str:
    if not os.access(path, os.R_OK):
        raise UsageError(f"{flag}: cannot read {path!r}")
    return path


def _pairs(flag: str, values: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise UsageError(f"{flag} wants NAME=VALUE, got {value!r}")
        pairs.append((name.strip().lower(), rest.strip()))
    return pairs


def read_login(flag: str, path: str) -> tuple[str, str]:
    """The ``user:password`` on the first line of ``path`` that is not blank or a comment."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{flag}: cannot read {path!r}: {exc}") from None
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#"):
            user, sep, password = line.strip().partition(":")
            if sep and user and password:
                return user, password
            break
    raise UsageError(f"{flag}: {path!r} must hold one line 'user:password'")


def build_registries(
    args: argparse.Namespace, default: str
) -> tuple[tuple[Registry, ...], tuple[str, str] | None, tuple[tuple[str, str], ...]]:
    """The registries besides the default one (built-ins plus --registry), with their
    fallbacks, CAs, proxies and logins; the default registry's login; the host map."""
    entries: dict[str, Registry] = {}
    for name, url, aliases in BUILTIN_REGISTRIES:
        entries[name] = Registry(name, (base_url(url),), aliases=aliases)
    for name, url in _pairs("--registry", args.registry):
        if not looks_like_host(name):
            raise UsageError(f"--registry: {name!r} is not a registry host name")
        if name == default:
            raise UsageError(f"--registry: set {default}'s upstream with --upstream")
        entries[name] = dataclasses.replace(
            entries.get(name, Registry(name, ())), upstreams=(_url("--registry", url),)
        )

    def entry(flag: str, name: str) -> Registry:
        if name not in entries:
            raise UsageError(f"{flag}: no registry {name!r} (add it with --registry NAME=URL)")
        return entries[name]

    default_login = None
    for name, url in _pairs("--registry-fallback", args.registry_fallback):
        if name != default:
            found = entry("--registry-fallback", name)
            upstreams = (*found.upstreams, _url("--registry-fallback", url))
            entries[name] = dataclasses.replace(found, upstreams=upstreams)
    for name, path in _pairs("--registry-ca", args.registry_ca):
        if name == default:
            raise UsageError(f"--registry-ca: use --upstream-ca for {default}")
        _readable("--registry-ca", path)
        try:
            ssl.create_default_context().load_verify_locations(cafile=path)
        except (ssl.SSLError, OSError) as exc:
            raise UsageError(f"--registry-ca: not a PEM CA file: {exc}") from None
        entries[name] = dataclasses.replace(entry("--registry-ca", name), upstream_ca=path)
    for name, url in _pairs("--registry-proxy", args.registry_proxy):
        if name == default:
            raise UsageError(f"--registry-proxy: use --upstream-proxy for {default}")
        via = _proxy_url("--registry-proxy", url)
        entries[name] = dataclasses.replace(entry("--registry-proxy", name), upstream_proxy=via)
    for name, path in _pairs("--registry-login", args.registry_login):
        login = read_login("--registry-login", path)
        if name == default:
            default_login = login
        else:
            entries[name] = dataclasses.replace(entry("--registry-login", name), login=login)
    host_map = []
    for host, name in _pairs("--host-map", args.host_map):
        if name != default and name not in entries:
            raise UsageError(f"--host-map: no registry {name!r}")
        host_map.append((host, name))
    others = tuple(r for r in entries.values() if r.name != default)
    return others, default_login, tuple(host_map)


def _proxy_url(flag: str, text: str) -> Url:
    try:
        proxy = parse_url(text)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None
    if proxy.origin.scheme != "http":
        raise UsageError(f"{flag} must be an http:// proxy that supports CONNECT")
    return proxy


def config_from_args(args: argparse.Namespace) -> Config:
    cert = _readable("--cert", args.cert) if args.cert else None
    key = _readable("--key", args.key) if args.key else None
    if key and not cert:
        raise UsageError("--key needs --cert")
    if cert:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise UsageError(f"--cert/--key: cannot load the certificate and key: {exc}") from None
    if args.listen:
        host, port = parse_listen(args.listen)
    else:
        host, port = ("0.0.0.0", 443) if cert else ("127.0.0.1", 5000)
    upstreams = (
        _url("--upstream", args.upstream),
        *(_url("--fallback", f) for f in args.fallback),
    )
    proxy = _proxy_url("--upstream-proxy", args.upstream_proxy) if args.upstream_proxy else None
    if args.upstream_ca:
        _readable("--upstream-ca", args.upstream_ca)
        try:
            ssl.create_default_context().load_verify_locations(cafile=args.upstream_ca)
        except (ssl.SSLError, OSError) as exc:
            raise UsageError(f"--upstream-ca: not a PEM CA file: {exc}") from None
    if args.public_url:
        try:
            parse_url(args.public_url)
        except ValueError as exc:
            raise UsageError(f"--public-url: {exc}") from None
    library_prefix = args.library_prefix
    if library_prefix is None:
        library_prefix = is_docker_hub(upstreams[0])
    for flag in (
        "handshake_timeout",
        "request_timeout",
        "keepalive_timeout",
        "client_idle_timeout",
        "connect_timeout",
        "read_timeout",
        "shutdown_grace",
        "rate_limit_cooldown",
    ):
        value = getattr(args, flag)
        if not math.isfinite(value) or value <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be a positive number of seconds")
    if not math.isfinite(args.manifest_ttl) or args.manifest_ttl < 0:
        raise UsageError("--manifest-ttl must be 0 or more seconds")
    for flag in ("max_header_size", "max_headers", "max_target"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.max_connections < 1:
        raise UsageError("--max-connections must be at least 1")
    if args.max_redirects < 0:
        raise UsageError("--max-redirects must be 0 or more")
    try:
        parse_networks(args.allow)
    except ValueError as exc:
        raise UsageError(f"--allow: {exc}") from None
    try:
        parse_networks(args.ops_allow)
    except ValueError as exc:
        raise UsageError(f"--ops-allow: {exc}") from None
    try:
        parse_image_rules(args.images_allow, args.images_deny)
    except ValueError as exc:
        raise UsageError(f"--images-allow/--images-deny: {exc}") from None
    if not math.isfinite(args.client_rate_limit) or args.client_rate_limit < 0:
        raise UsageError("--client-rate-limit must be 0 (off) or more requests per second")
    if args.client_burst < 1:
        raise UsageError("--client-burst must be at least 1")
    if args.users:
        try:
            if not load_users(args.users):
                raise UsageError(
                    f"--users: {args.users} has no users yet; add one with "
                    f"'hubproxy user add NAME --users {args.users}'"
                )
        except (UsersFileError, OSError) as exc:
            raise UsageError(f"--users: {exc}") from None
    registries, default_login, host_map = build_registries(args, DEFAULT_REGISTRY)
    has_login = default_login is not None or any(r.login for r in registries)
    if has_login and not (args.allow or args.users or args.allow_shared_login):
        raise UsageError(
            "--registry-login: anyone who can reach this mirror would pull with that login; "
            "limit who can with --allow or --users, or pass --allow-shared-login"
        )
    timeouts = Timeouts(
        handshake=args.handshake_timeout,
        request_head=args.request_timeout,
        keepalive_idle=args.keepalive_timeout,
        client_idle=args.client_idle_timeout,
        connect=args.connect_timeout,
        upstream_idle=args.read_timeout,
        shutdown_grace=args.shutdown_grace,
    )
    try:
        cache_size = parse_size(args.cache_size)
    except ValueError:
        raise UsageError(
            f"--cache-size: not a size: {args.cache_size!r} (try 500M or 20G)"
        ) from None
    return Config(
        cache_dir=None if args.no_cache else args.cache_dir,
        cache_size=cache_size,
        manifest_ttl=args.manifest_ttl,
        listen_host=host,
        listen_port=port,
        cert=cert,
        key=key,
        upstreams=upstreams,
        index_url=_url("--index-url", args.index_url),
        library_prefix=library_prefix,
        public_url=args.public_url,
        upstream_ca=args.upstream_ca,
        upstream_proxy=proxy,
        max_redirects=args.max_redirects,
        max_connections=args.max_connections,
        limits=Limits(
            max_head_size=args.max_header_size,
            max_headers=args.max_headers,
            max_target=args.max_target,
        ),
        rate_limit_rest=args.rate_limit_cooldown,
        timeouts=timeouts,
        allow=tuple(args.allow),
        ops_allow=tuple(args.ops_allow),
        users_file=args.users,
        images_allow=tuple(args.images_allow),
        images_deny=tuple(args.images_deny),
        client_rate_limit=args.client_rate_limit,
        client_burst=args.client_burst,
        registries=registries,
        default_login=default_login,
        host_map=host_map,
        allow_shared_login=args.allow_shared_login,
    )


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def print_config(argv: Sequence[str]) -> int:
    """``hubproxy print-config CLIENT --url URL [--ca FILE]``: the client's setup snippet."""
    parser = argparse.ArgumentParser(
        prog="hubproxy print-config",
        description="Print what to paste into a client's configuration to use this mirror.",
    )
    parser.add_argument("client", choices=CLIENTS)
    parser.add_argument("--url", required=True, help="how clients reach the mirror")
    parser.add_argument("--ca", metavar="FILE", help="a private CA the clients must trust")
    parser.add_argument(
        "--registry",
        metavar="NAME",
        action="append",
        default=[],
        help="another registry the mirror serves (besides the built-in ones; repeatable)",
    )
    args = parser.parse_args(argv)
    registries = (*BUILTIN_NAMES, *(r for r in args.registry if r not in BUILTIN_NAMES))
    try:
        text, hint = snippet(args.client, args.url, args.ca, registries)
    except ValueError as exc:
        print(f"hubproxy print-config: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    print(f"# {hint}", file=sys.stderr)
    return 0


def load_settings(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> tuple[argparse.Namespace, Config]:
    """Flags (and the --config file below them) to a Config; raises UsageError or
    ConfigFileError, whose message names the file line when the bad value came from the file."""
    args, settings, given = parse_args_with_file(parser, argv)
    try:
        return args, config_from_args(args)
    except UsageError as exc:
        flag = re.match(r"--([a-z0-9-]+)", str(exc))
        where = flag and value_origin(flag.group(1).replace("-", "_"), settings, given)
        if where:
            raise UsageError(f"{where}: {exc}") from None
        raise


def check_config(argv: Sequence[str]) -> int:
    """``hubproxy check-config FILE [flags]``: everything a start would check, without starting."""
    if not argv or argv[0].startswith("-"):
        print("usage: hubproxy check-config FILE [flags]", file=sys.stderr)
        return 2
    path, rest = argv[0], argv[1:]
    try:
        load_settings(build_parser(), ["--config", path, *rest])
    except (UsageError, ConfigFileError) as exc:
        print(f"hubproxy check-config: error: {exc}", file=sys.stderr)
        return 1
    print(f"{path}: ok")
    return 0


# ---------------------------------------------------------------- hubproxy user ...


def _user_parser() -> argparse.ArgumentParser:
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


class _UserFailure(Exception):
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
            raise _UserFailure("no password given") from None
        if password != again:
            raise _UserFailure("the passwords do not match")
    if not password:
        raise _UserFailure("empty password refused")
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
    parser = _user_parser()
    # argparse prints to sys.stdout/sys.stderr and exits; point it at our streams instead.
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            args = parser.parse_args(list(argv))
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 2
    try:
        _run_user(args, stdin, stdout, stderr)
    except (_UserFailure, UsersFileError, ValueError) as exc:
        print(f"hubproxy user: error: {exc}", file=stderr)
        return 1
    except OSError as exc:
        print(f"hubproxy user: error: {args.users}: {exc.strerror or exc}", file=stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["print-config"]:
        return print_config(args_list[1:])
    if args_list[:1] == ["check-config"]:
        return check_config(args_list[1:])
    if args_list[:1] == ["user"]:
        return user_command(args_list[1:], stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr)
    parser = build_parser()
    try:
        args, config = load_settings(parser, args_list)
    except (UsageError, ConfigFileError) as exc:
        parser.print_usage(sys.stderr)
        print(f"hubproxy: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level)
    try:
        trio.run(lambda: serve(config, handle_signals=True))
    except CacheDirError as exc:
        logging.getLogger("hubproxy").error(
            "cannot use the cache directory %s: %s (pick another with --cache-dir, or --no-cache)",
            config.cache_dir,
            exc.__cause__,
        )
        return 1
    except OSError as exc:
        logging.getLogger("hubproxy").error(
            "cannot listen on %s:%s: %s (is the port in use, or does it need root?)",
            config.listen_host,
            config.listen_port,
            exc.strerror or exc,
        )
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
