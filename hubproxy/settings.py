"""Every setting of hubproxy, declared once; the command line and the config file are made from it.

Theory of operation
-------------------
:data:`SETTINGS` is a table of frozen :class:`Setting` rows, one per flag, in ``--help`` order.
Three things are generated from it and from nothing else:

* :func:`build_parser`: the argparse parser (flag, kind, metavar, help, group, choices). Its
  defaults are all ``argparse.SUPPRESS``, so the namespace it returns holds exactly the settings
  the command line gave, however spelt: that is how the command line overrides the file, with no
  second parse and no private argparse API.
* ``configfile.load_config_file``: the TOML reader. Every setting is a top-level key spelt like its
  flag without ``--``; a row with a :class:`TableKey` is also a key of ``[registry."NAME"]`` tables.
* :func:`build_config`: raw values (after defaults, the file and the command line, see
  :class:`Values`) to a frozen :class:`~hubproxy.config.Config`. Each value is checked by its row
  (``bound`` for numbers, ``parse`` for text, per item for repeatable ones) and the parsed value
  is what the Config keeps, so nothing downstream parses it again. Checks that involve several
  settings (``--key`` needs ``--cert``, registries, operator logins) follow.

Errors are :class:`UsageError` lines naming the flag; when the bad value came from the config
file they start with ``path:line:``, the line of that very key (or array item's key). So are the
command line's own mistakes (:class:`CommandLine`: a misspelt flag or command gets the closest
one, never argparse's usage block); durations (:func:`parse_duration`) take ``90s``, ``1m``...
"""

from __future__ import annotations

import argparse
import difflib
import enum
import math
import os
import platform
import re
import ssl
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn, cast

from . import __version__
from .cache.objects import parse_store_url
from .config import Config, Limits, Timeouts
from .net.buffers import auto_budget
from .net.streams import CertificateError, server_ssl_context
from .ops.admintoken import AdminTokenError, read_admin_token
from .ops.memory import machine_memory
from .ops.peersecret import read_peer_keys
from .ops.usersfile import UsersFileError, load_users
from .policy.access import (
    ImagePattern,
    ImageRules,
    Network,
    NetworkList,
    parse_image_pattern,
    parse_network,
)
from .policy.accounting import DEFAULT_TOP, DEFAULT_WINDOW
from .policy.cachepolicy import (
    DEFAULT_MANIFEST_TTL,
    DEFAULT_NEGATIVE_TTL,
    TtlRule,
    check_tag_pattern,
)
from .policy.pacing import MIN_RATE
from .policy.prefetch import (
    ImageRef,
    Platform,
    machine_platform,
    parse_image,
    parse_platforms,
)
from .policy.proxies import UpstreamProxy, hide_userinfo, parse_proxy_url
from .policy.redirecthits import PRESIGN_EXPIRY
from .policy.registries import (
    BUILTIN_REGISTRIES,
    DEFAULT_REGISTRY,
    DOCKER_HUB_INDEX,
    DOCKER_HUB_UPSTREAM,
    Registry,
    is_docker_hub,
    listed_registries,
    looks_like_host,
)
from .policy.sizes import SizeTooSmall, parse_size
from .policy.urls import Url, base_url, parse_url

# The subcommands (hubproxy.cli dispatches them): name, arguments, what it does. --help lists them.
COMMANDS: tuple[tuple[str, str, str], ...] = (
    (
        "check-config",
        "FILE [flags]",
        "check a config file and flags as a start would, not starting",
    ),
    ("print-config", "CLIENT --url URL", "what to paste into a client's config to use the mirror"),
    ("user", "add|remove|list ...", "manage the mirror users of a --users file"),
    (
        "cache",
        "ls|rm|refresh|verify ...",
        "list, remove or refresh (re-ask upstream) cached images; verify every blob",
    ),
    (
        "prefetch",
        "IMAGE... [--mirror URL]",
        "pull images into the cache (a mirror's, or a --config's)",
    ),
    ("doctor", "[--mirror URL] [flags]", "check every hop to the upstreams, and the mirror"),
)

USAGE = "%(prog)s [--config FILE] [flags]\n       %(prog)s COMMAND [arguments]"


def _commands_help() -> str:
    width = max(len(f"{name} {args}") for name, args, _ in COMMANDS)
    lines = [f"  {f'{name} {args}':<{width}}  {what}" for name, args, what in COMMANDS]
    more = "  ('hubproxy COMMAND --help' shows a command's arguments)"
    return "\n".join(["commands:", *lines, more])


DESCRIPTION = f"""\
A Docker Hub registry mirror. Point docker, containerd or podman at it and every pull goes through
it: it forwards the registry API to the upstream, rewrites auth challenges so token requests come
back here, follows blob redirects to the CDN itself, streams bodies, and fails over to
--fallback upstreams when Docker Hub answers 429 or cannot be reached.

{_commands_help()}

Examples:
  hubproxy                                   plain HTTP on 127.0.0.1:5000 (docker accepts an
                                             http:// mirror on localhost)
  hubproxy print-config containerd --url https://mirror.lan
                                             what to paste into a client's configuration
  hubproxy --cert server.pem --key key.pem   HTTPS on 0.0.0.0:443
  hubproxy --fallback https://my-worker.example.workers.dev
"""

# The name of the config file's per-registry tables: [registry."ghcr.io"].
REGISTRY_TABLE = "registry"


class UsageError(Exception):
    """A setting hubproxy cannot start with, or a command line it cannot read: one line naming
    the flag (and the file line). ``prog`` is the command that refuses (``hubproxy user add``)."""

    def __init__(self, message: str, prog: str = "hubproxy") -> None:
        super().__init__(message)
        self.prog = prog


class Kind(enum.Enum):
    """What a setting holds, on the command line and in the file."""

    TEXT = "a string"
    INT = "an integer"
    NUMBER = "a number"
    DURATION = "a duration"  # seconds, or text with units: "90s", "1m", "1h30m", "250ms"
    SWITCH = "a switch"  # --flag (store_true); ``key = true`` in the file
    BOOL = "a boolean"  # --flag / --no-flag, unset by default; ``key = true|false``
    # a duration per pattern: [PATTERN=]DURATION items, repeatable on the command line; in the file
    # a duration, an array of such items, or a table { PATTERN = duration }
    DURATION_RULES = "durations by pattern"


@dataclass(frozen=True)
class Bound:
    """The lower limit of a number, and how an error names what is wanted."""

    low: float
    inclusive: bool
    wording: str  # "--read-timeout must be <wording>"

    def admits(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        return value >= self.low if self.inclusive else value > self.low


@dataclass(frozen=True)
class TableKey:
    """How a per-registry ``NAME=VALUE`` setting is spelt in a ``[registry."NAME"]`` table."""

    key: str  # the key inside the table
    many: bool = False  # a list per registry (fallbacks, host names), else one value
    name_last: bool = False  # the pair is VALUE=NAME (--host-map HOST=NAME)


@dataclass(frozen=True)
class Setting:
    """One flag (``--name``), which is also the config-file key ``name``."""

    name: str
    help: str  # argparse help; ``%(default)s`` is the setting's default
    group: str | None = None  # the --help section; None: the top "options" section
    kind: Kind = Kind.TEXT
    default: object = None
    default_factory: Callable[[], object] | None = None  # a default read from the environment
    metavar: str | None = None
    repeatable: bool = False  # may be given many times; a list in the file
    choices: tuple[str, ...] = ()
    bound: Bound | None = None  # numbers
    # text (each item when repeatable; the VALUE of a NAME=VALUE pair): the parsed value, or
    # ValueError whose message follows "--name: "
    parse: Callable[[str], object] | None = None
    table: TableKey | None = None  # a NAME=VALUE pair that a [registry."NAME"] table can hold
    # text that is often a bare number (N|auto, a size): a TOML integer in the file is taken as
    # its digits and parsed like the flag's text (``workers = 4``; ``cache-size = 20`` is then
    # told it needs a unit, not that it should have been a string)
    numbers_as_text: bool = False

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    def initial(self) -> object:
        """The value when neither the file nor the command line gives one."""
        if self.repeatable:
            return []
        if self.default_factory is not None:
            return self.default_factory()
        return self.default


# --------------------------------------------------------------------------------- parsers
# Each takes the text of one value and returns what Config keeps; ValueError says what is wrong.


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/hubproxy``, else ``~/.cache/hubproxy``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hubproxy")


def parse_listen(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` (all addresses)."""
    scheme, sep, rest = text.partition("://")
    if sep:
        # A URL where an address belongs: say so, rather than what its colons look like.
        address = rest.split("/", 1)[0] or "0.0.0.0"
        if not address.rpartition(":")[2].isdigit() or address.endswith("]"):
            address += ":443" if scheme.lower() == "https" else ":80"
        raise ValueError(
            f"takes HOST:PORT without a scheme, e.g. {address}; it serves HTTPS when --cert "
            "and --key are given, plain HTTP otherwise"
        )
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"wants HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host:
            raise ValueError(f"empty IPv6 address in {text!r}")
    elif ":" in host:
        raise ValueError(f"write IPv6 addresses in brackets, e.g. [::1]:{port}")
    return host or "0.0.0.0", int(port)


MAX_WORKERS = 128  # a typo (--workers 1000) should not fork a thousand interpreters


def parse_workers(text: str) -> int:
    """``--workers``: a number of processes, or ``auto``: the CPUs this process may run on
    (its affinity mask, which ``taskset`` and cgroup cpusets narrow; not the machine's count)."""
    if text.strip().lower() == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"wants a number of processes or auto, got {text!r}") from None
    if not 1 <= count <= MAX_WORKERS:
        raise ValueError(f"must be from 1 to {MAX_WORKERS}, or auto")
    return count


def parse_body_memory(text: str) -> int:
    """``--body-memory``: a size, or ``auto``: :func:`~hubproxy.net.buffers.auto_budget` of
    the memory this process may use (the machine's, or its cgroup's limit)."""
    if text.strip().lower() == "auto":
        return auto_budget(machine_memory())
    return parse_size(text)


def readable(path: str) -> str:
    if not os.access(path, os.R_OK):
        raise ValueError(f"cannot read {path!r}")
    return path


def ca_file(path: str) -> str:
    """A PEM file of CA certificates, checked by loading it."""
    readable(path)
    try:
        ssl.create_default_context().load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"not a PEM CA file: {exc}") from None
    return path


def proxy_url(text: str) -> UpstreamProxy:
    """``--upstream-proxy``: http:// (CONNECT), socks5:// or socks5h:// (policy.proxies); the
    error never repeats a login."""
    return parse_proxy_url(text)


def checked_url(text: str) -> str:
    """A URL kept as text (``--public-url``), checked here so a bad one stops the start."""
    parse_url(text)
    return text


def checked_store_url(text: str) -> str:
    """``--cache-store``: s3://BUCKET[/PREFIX], checked here so a bad one stops the start."""
    parse_store_url(text)
    return text


def size(text: str) -> int:
    """A size with its unit, at least 1 MiB (``policy.sizes``: ``20G`` binary, ``20GB``
    decimal, a bare number refused)."""
    return parse_size(text)


def cache_size(text: str) -> int:
    """``--cache-size``: a :func:`size`; too small says how to turn the cache off instead."""
    try:
        return parse_size(text)
    except SizeTooSmall as exc:
        raise SizeTooSmall(f"{exc}; to turn the cache off use --no-cache") from None


def bandwidth(text: str) -> int | None:
    """``--client-bandwidth``, ``--total-bandwidth``: bytes per second written as a size
    (``50M`` is 50 MiB/s, ``50MB`` 50 x 10^6 bytes/s; ``/s`` may follow), or ``off``."""
    text = text.strip()
    if text.lower() == "off":
        return None
    if re.fullmatch(r"\d+(?:\.\d*)?", text):
        raise ValueError(
            f"{text!r} has no unit: write {text}M for {text} MiB/s, {text}MB for {text} x 10^6 "
            f"bytes/s (G, GB likewise; a {text} Mbit/s line is {float(text) / 8:g}MB)"
        )
    try:
        return parse_size(text.strip().removesuffix("/s"), minimum=MIN_RATE)
    except SizeTooSmall as exc:
        raise SizeTooSmall(
            f"{exc}/s, the slowest cap; for no cap leave it unset (or write off)"
        ) from None


# Go's time.ParseDuration units, plus days: ``1h30m``, ``250ms``, ``1.5s``.
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h|d)"
_DURATION = re.compile(rf"(?:{_DURATION_PART})+")


def parse_duration(text: str) -> float:
    """Seconds from a plain number (``90``, ``2.5``) or numbers with units (``90s``, ``1m``,
    ``1h30m``, ``250ms``, ``1d``). Negative, zero, NaN and infinite plain numbers pass: each
    setting's :class:`Bound` says what it needs."""
    try:
        return float(text)
    except ValueError:
        pass
    if not _DURATION.fullmatch(text):
        raise ValueError(f"not a duration: {text!r} (use seconds, or units: 250ms, 90s, 1m, 1h30m)")
    return sum(
        float(number) * _DURATION_UNITS[unit] for number, unit in re.findall(_DURATION_PART, text)
    )


def ttl_rule(text: str) -> TtlRule:
    """``--manifest-ttl``: ``PATTERN=DURATION`` for the tags matching a glob, or ``DURATION``
    alone for every tag (the ``*`` rule); 0 or more seconds."""
    pattern, sep, duration = text.partition("=")
    if not sep:
        pattern, duration = "*", text
    seconds = parse_duration(duration.strip())
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"wants 0 or more seconds, got {duration.strip()!r}")
    return TtlRule(check_tag_pattern(pattern.strip()), seconds)


def ttl_rules(rules: Sequence[TtlRule]) -> tuple[float, tuple[TtlRule, ...]]:
    """The ``*`` rule's seconds (:data:`DEFAULT_MANIFEST_TTL` without one) and the other rules
    in the order first given; a pattern given twice keeps its last duration."""
    by_pattern: dict[str, float] = {}
    for rule in rules:
        by_pattern[rule.pattern] = rule.seconds
    default = by_pattern.pop("*", DEFAULT_MANIFEST_TTL)
    return default, tuple(TtlRule(pattern, seconds) for pattern, seconds in by_pattern.items())


def whole_number(text: str) -> int:
    """``int(text)``, with an error that says what was wanted."""
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"not a whole number: {text!r}") from None


def number(text: str) -> float:
    """``float(text)``, with an error that says what was wanted."""
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None


def _argument(convert: Callable[[str], object]) -> Callable[[str], object]:
    """``convert`` as an argparse ``type``: its ValueError's message is the error (argparse would
    say ``invalid float value: '1m'``)."""

    def argument(text: str) -> object:
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return argument


def read_login(path: str) -> tuple[str, str]:
    """The ``user:password`` on the first line of ``path`` that is not blank or a comment."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path!r}: {exc}") from None
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#"):
            user, sep, password = line.strip().partition(":")
            if sep and user and password:
                return user, password
            break
    raise ValueError(f"{path!r} must hold one line 'user:password'")


def users_file(path: str) -> str:
    """A users file with at least one user. Only checked: the proxy reads it when it starts and
    again on SIGHUP, so the Config keeps the path."""
    try:
        users = load_users(path)
    except (UsersFileError, OSError) as exc:
        raise ValueError(str(exc)) from None
    if not users:
        raise ValueError(
            f"{path} has no users yet; add one with 'hubproxy user add NAME --users {path}'"
        )
    return path


def secret_file(reader: Callable[[str], object]) -> Callable[[str], str]:
    """A flag's parser for a secret file that ``reader`` must be able to use (the proxy reads
    it again at start and keeps only what it derives)."""

    def parse(path: str) -> str:
        try:
            reader(path)
        except AdminTokenError as exc:
            raise ValueError(str(exc)) from None
        return path

    return parse


def split_pair(text: str) -> tuple[str, str] | None:
    """``NAME=VALUE`` -> (name lowercased, value), both stripped; None if either is missing."""
    name, sep, rest = text.partition("=")
    name, rest = name.strip().lower(), rest.strip()
    if not sep or not name or not rest:
        return None
    return name, rest


def parse_platform_choice(text: str) -> tuple[Platform, ...] | None:
    """``--prefetch-platforms``: platforms (``linux/amd64,linux/arm64``), or ``all`` (None)."""
    if text.strip().lower() == "all":
        return None
    return parse_platforms(text)


def this_platform() -> Platform:
    """The platform ``docker pull`` picks on this machine."""
    return machine_platform(platform.system(), platform.machine())


# --------------------------------------------------------------------------------- the table

LISTEN = "listening"
UPSTREAMS = "upstreams"
REGISTRIES = (
    "more registries (built in: "
    + ", ".join(name for name, _, _ in BUILTIN_REGISTRIES)
    + "; clients pick one with ?ns=, a path prefix /v2/ghcr.io/..., or a --host-map name)"
)
CACHE = "blob cache"
PREFETCH = "prefetch (images the mirror keeps cached; see also 'hubproxy prefetch')"
DEFAULT_PREFETCH_INTERVAL = 6 * 3600.0
ACCESS = "access control (for a mirror reachable by strangers)"
LIMITS = "request limits"
TIMEOUTS = "timeouts (seconds, or with a unit: 250ms, 90s, 1m, 1h30m)"

POSITIVE_SECONDS = Bound(0.0, inclusive=False, wording="a positive number of seconds")
AT_LEAST_ONE = Bound(1, inclusive=True, wording="at least 1")
_LIMITS = Limits()
_TIMEOUTS = Timeouts()


def _timeout(name: str, default: float, what: str) -> Setting:
    return Setting(
        name,
        f"{what} (default {default:g}s)",
        TIMEOUTS,
        Kind.DURATION,
        default,
        metavar="DURATION",
        bound=POSITIVE_SECONDS,
    )


SETTINGS: tuple[Setting, ...] = (
    # --- listening
    Setting(
        "listen",
        "address to listen on, e.g. 0.0.0.0:443 or [::]:443 "
        "(default 0.0.0.0:443 with TLS, 127.0.0.1:5000 without)",
        LISTEN,
        metavar="HOST:PORT",
        parse=parse_listen,
    ),
    Setting(
        "cert",
        "TLS certificate chain (PEM); enables HTTPS",
        LISTEN,
        metavar="FILE",
        parse=readable,
    ),
    Setting("key", "TLS private key (PEM) for --cert", LISTEN, metavar="FILE", parse=readable),
    Setting(
        "ktls",
        "let the kernel encrypt what goes to clients (kTLS), so cache hits go out with "
        "sendfile: needs Python 3.12 or later and the kernel's tls module (modprobe tls); "
        "where either is missing TLS stays in OpenSSL, as the startup line says (default: off)",
        LISTEN,
        Kind.SWITCH,
        False,
    ),
    Setting(
        "max-connections",
        "client connections served at once; more get 503 (plain HTTP) or are closed "
        "(TLS) (default 1024)",
        LISTEN,
        Kind.INT,
        1024,
        metavar="N",
        bound=AT_LEAST_ONE,
    ),
    Setting(
        "max-connections-per-client",
        "client connections one address (an IPv6 client: its /64) may hold at once; more get "
        "503 (plain HTTP) or are closed (TLS), other addresses are unaffected (default 128)",
        LISTEN,
        Kind.INT,
        128,
        metavar="N",
        bound=AT_LEAST_ONE,
    ),
    Setting(
        "max-pending-per-client",
        "requests of one address (an IPv6 client: its /64) worked on at once before their "
        "answers start; more wait their turn in order (503 after --pool-wait-timeout), so a burst "
        "from one address never slows everyone else's requests (default 16)",
        LISTEN,
        Kind.INT,
        16,
        metavar="N",
        bound=AT_LEAST_ONE,
    ),
    Setting(
        "client-bandwidth",
        "bytes per second sent to one client address (an IPv6 client: its /64), e.g. 50M "
        "(M, G: MiB/s, GiB/s; MB, GB: 10^6, 10^9 bytes/s): cache hits, misses and everything "
        "else, paced (never dropped); a miss slows its upstream download with it, never a "
        "cache fill other clients follow (default: no cap)",
        LISTEN,
        metavar="RATE",
        parse=bandwidth,
    ),
    Setting(
        "total-bandwidth",
        "bytes per second sent to all clients together, e.g. 200M (units as "
        "--client-bandwidth), shared fairly between the addresses that want it: one using "
        "less than its share leaves the rest to the others; with --workers N each process "
        "takes 1/N (default: no cap)",
        LISTEN,
        metavar="RATE",
        parse=bandwidth,
    ),
    Setting(
        "workers",
        "processes serving on the one listening port (the kernel spreads connections over "
        "them, SO_REUSEPORT) and sharing the cache directory: a number, or auto for one per "
        "usable CPU (default 1: one process, no supervisor)",
        LISTEN,
        default="1",
        metavar="N|auto",
        parse=parse_workers,
        numbers_as_text=True,
    ),
    Setting(
        "body-memory",
        "memory for blob bodies in flight, all workers together: each transfer's chunks are "
        "256K while the buffers of all those running fit it, smaller as more run at once "
        "(never under 16K, so it bounds chunk sizes, not transfers); auto: a 64th of the "
        "machine's memory, or its container's, from 8M to 64M (default auto)",
        LISTEN,
        default="auto",
        metavar="SIZE|auto",
        parse=parse_body_memory,
        numbers_as_text=True,
    ),
    Setting(
        "public-url",
        "the URL clients use to reach this mirror, for token realms "
        "(default: the scheme and Host of each request)",
        LISTEN,
        metavar="URL",
        parse=checked_url,
    ),
    # --- upstreams
    Setting(
        "upstream",
        f"registry to mirror (default {DOCKER_HUB_UPSTREAM})",
        UPSTREAMS,
        default=DOCKER_HUB_UPSTREAM,
        metavar="URL",
        parse=base_url,
    ),
    Setting(
        "fallback",
        "another upstream to try, in order, when the previous one answers 429 or cannot "
        "be reached (repeatable), e.g. a Cloudflare Worker mirror",
        UPSTREAMS,
        metavar="URL",
        repeatable=True,
        parse=base_url,
    ),
    Setting(
        "index-url",
        f"where /v1/search goes, for 'docker search' (default {DOCKER_HUB_INDEX})",
        UPSTREAMS,
        default=DOCKER_HUB_INDEX,
        metavar="URL",
        parse=base_url,
    ),
    Setting(
        "library-prefix",
        "insert library/ before one-component names (default: on when the upstream is Docker Hub)",
        UPSTREAMS,
        Kind.BOOL,
    ),
    Setting(
        "upstream-ca",
        "extra CA certificates (PEM) trusted for every upstream, besides the system store",
        UPSTREAMS,
        metavar="FILE",
        parse=ca_file,
    ),
    Setting(
        "upstream-proxy",
        "reach upstreams through this proxy: http://HOST:PORT (HTTP CONNECT), "
        "socks5://[USER:PASSWORD@]HOST:PORT (SOCKS5, names resolved here) or socks5h://... "
        "(names resolved by the proxy), e.g. http://192.168.1.1:3128",
        UPSTREAMS,
        metavar="URL",
        parse=proxy_url,
    ),
    Setting(
        "rate-limit-cooldown",
        "skip an upstream this long after a 429 without Retry-After, e.g. 90s or 2m (default 60s)",
        UPSTREAMS,
        Kind.DURATION,
        60.0,
        metavar="DURATION",
        bound=POSITIVE_SECONDS,
    ),
    Setting(
        "max-redirects",
        "redirects followed per request (default 5)",
        UPSTREAMS,
        Kind.INT,
        5,
        metavar="N",
        bound=Bound(0, inclusive=True, wording="0 or more"),
    ),
    Setting(
        "pool-max-per-origin",
        "connections open at once to one upstream origin (registry, token service, CDN); "
        "more requests wait for one (default 100)",
        UPSTREAMS,
        Kind.INT,
        100,
        metavar="N",
        bound=AT_LEAST_ONE,
    ),
    Setting(
        "pool-max-per-client",
        "of those, how many one client address (an IPv6 /64) may hold "
        "(default 0: a quarter of --pool-max-per-origin)",
        UPSTREAMS,
        Kind.INT,
        0,
        metavar="N",
        bound=Bound(0, inclusive=True, wording="0 (a quarter of --pool-max-per-origin) or more"),
    ),
    Setting(
        "pool-reserve-small",
        "of those, how many blob transfers may never take, kept for tokens, manifests and "
        "pings (default 0: a tenth of --pool-max-per-origin, at least 1)",
        UPSTREAMS,
        Kind.INT,
        0,
        metavar="N",
        bound=Bound(0, inclusive=True, wording="0 (a tenth of --pool-max-per-origin) or more"),
    ),
    # --- more registries
    Setting(
        "registry",
        "serve another registry, or point a built-in one elsewhere, e.g. "
        "registry.example.com=https://registry.example.com (repeatable)",
        REGISTRIES,
        metavar="NAME=URL",
        repeatable=True,
        parse=base_url,
        table=TableKey("upstream"),
    ),
    Setting(
        "registry-fallback",
        "a fallback upstream for registry NAME, tried in order (repeatable)",
        REGISTRIES,
        metavar="NAME=URL",
        repeatable=True,
        parse=base_url,
        table=TableKey("fallback", many=True),
    ),
    Setting(
        "registry-ca",
        "extra CA certificates (PEM) for registry NAME's origins (repeatable)",
        REGISTRIES,
        metavar="NAME=FILE",
        repeatable=True,
        parse=ca_file,
        table=TableKey("upstream-ca"),
    ),
    Setting(
        "registry-proxy",
        "reach registry NAME through this proxy (http://, socks5:// or socks5h://, as "
        "--upstream-proxy; repeatable)",
        REGISTRIES,
        metavar="NAME=URL",
        repeatable=True,
        parse=proxy_url,
        table=TableKey("upstream-proxy"),
    ),
    Setting(
        "registry-login",
        "pull from registry NAME with the operator's login in FILE ('user:password'; a "
        "token as password works) when the client sends none, to raise rate limits; anyone "
        "who can reach the mirror then pulls what it can read, so it needs --allow or --users "
        "(or --allow-shared-login)",
        REGISTRIES,
        metavar="NAME=FILE",
        repeatable=True,
        parse=read_login,
        table=TableKey("login"),
    ),
    Setting(
        "allow-shared-login",
        "use --registry-login without --allow or --users: you accept that everyone who "
        "reaches the mirror pulls with those credentials",
        REGISTRIES,
        Kind.SWITCH,
        False,
    ),
    Setting(
        "host-map",
        "requests addressed to HOST (the Host header) go to registry NAME, e.g. "
        "ghcr.mirror.example.com=ghcr.io (repeatable)",
        REGISTRIES,
        metavar="HOST=NAME",
        repeatable=True,
        table=TableKey("host", many=True, name_last=True),
    ),
    Setting(
        "only-listed-registries",
        "serve only the default registry (--upstream) and those that --registry, "
        "--registry-fallback, --registry-ca, --registry-proxy, --registry-login or --host-map "
        'names (or a [registry."NAME"] table): the other built-in registries are off, and a '
        "request for one gets 404 NAME_UNKNOWN like any registry the mirror does not serve",
        REGISTRIES,
        Kind.SWITCH,
        False,
    ),
    # --- blob cache
    Setting(
        "cache-dir",
        "where verified blobs are kept (default: %(default)s)",
        CACHE,
        default_factory=default_cache_dir,
        metavar="DIR",
    ),
    Setting(
        "cache-size",
        "evict least recently used blobs beyond this size, e.g. 500M, 20G (G, M: GiB, "
        "MiB; GB, MB: 10^9, 10^6 bytes; a unit is required) (default 20G)",
        CACHE,
        default="20G",
        metavar="SIZE",
        parse=cache_size,
        numbers_as_text=True,
    ),
    Setting(
        "reverify-after",
        "hash a whole cached blob again as it is served once its last verification is this "
        "old (every file is verified when fetched and on its first read after a start, and "
        "again at once if anything changed it on disk; 0: hash every hit, about 0.6 "
        "CPU-seconds per GiB) (default 24h)",
        CACHE,
        Kind.DURATION,
        24 * 3600.0,
        metavar="DURATION",
        bound=Bound(0.0, inclusive=True, wording="0 or more seconds"),
    ),
    Setting(
        "cache-store",
        "also commit verified blobs (and, when stopping, the manifest state) to S3-compatible "
        "storage shared by several instances, e.g. s3://bucket/hubproxy; credentials and "
        "region the AWS way (AWS_* variables, AWS_PROFILE, ~/.aws); needs "
        "pip install 'hubproxy[s3]' (default: none)",
        CACHE,
        metavar="URL",
        parse=checked_store_url,
    ),
    Setting(
        "cache-store-size",
        "keep the --cache-store's blobs within this size, e.g. 500G: above it, the least "
        "recently used are evicted (every instance's accesses count, kept in the store), never "
        "one an instance is reading; give every instance the same (default: off, unbounded)",
        CACHE,
        metavar="SIZE",
        parse=size,
        numbers_as_text=True,
    ),
    Setting(
        "s3-endpoint",
        "the endpoint of a non-AWS S3-compatible store for --cache-store (MinIO, Ceph RGW, "
        "R2, SeaweedFS), e.g. http://127.0.0.1:9000 (default: AWS)",
        CACHE,
        metavar="URL",
        parse=checked_url,
    ),
    Setting(
        "peer",
        "the mirror URL of an instance sharing the upstream fetches (repeatable; list every "
        "instance, this one too, the same on each): a blob missing here is fetched from the "
        "instance that owns its digest, which fetches it from the upstream once for all "
        "(default: none)",
        CACHE,
        metavar="URL",
        repeatable=True,
        parse=base_url,
    ),
    Setting(
        "peer-timeout",
        "how long a peer may take to connect and answer before this instance fetches from "
        "the upstream itself (and skips that peer for 30s) (default 2s)",
        CACHE,
        Kind.DURATION,
        2.0,
        metavar="DURATION",
        bound=Bound(0.0, inclusive=False, wording="more than 0 seconds"),
    ),
    Setting(
        "peer-ca",
        "extra CA certificates (PEM) trusted for the peers' TLS, besides the system store",
        CACHE,
        metavar="FILE",
        parse=ca_file,
    ),
    Setting(
        "peer-secret-file",
        "a secret shared by every --peer instance (one word of 32 characters or more; the "
        "same file on each): the keys sealing mirror tokens (--users) come from it, so a "
        "client logged in on one instance is let in by the others (needed with --users and "
        "--peer; default: none)",
        CACHE,
        metavar="FILE",
        parse=secret_file(read_peer_keys),
    ),
    Setting(
        "redirect-hits",
        "answer a GET of a blob held in the --cache-store, once the client passed the access "
        f"rules, with a 307 to a presigned URL of the store valid for {PRESIGN_EXPIRY / 60:g} "
        "minutes, so its bytes "
        "bypass the mirror (clients verify every blob's digest themselves; the mirror no "
        "longer sees the bytes); the store's endpoint must be reachable by the clients; needs "
        "--cache-store (default: off, hits are streamed through the mirror)",
        CACHE,
        Kind.SWITCH,
        False,
    ),
    Setting(
        "manifest-cache-size",
        "evict least recently used manifests (and the tags naming them) beyond this size "
        "(default 64M)",
        CACHE,
        default="64M",
        metavar="SIZE",
        parse=size,
        numbers_as_text=True,
    ),
    Setting(
        "manifest-cache-entries",
        "keep at most this many manifests, tags, repository links, repositories' "
        "public/private answers and upstream 404s (each; least recently used go first) "
        "(default 50000)",
        CACHE,
        Kind.INT,
        50_000,
        metavar="N",
        bound=AT_LEAST_ONE,
    ),
    Setting(
        "manifest-ttl",
        "serve a cached tag without asking the upstream (HEAD) for this long: DURATION for every "
        "tag, or PATTERN=DURATION for the tags a glob matches (* is any characters), e.g. "
        "--manifest-ttl 24h --manifest-ttl latest=60s --manifest-ttl 'nightly*=5m' "
        "(repeatable; a whole tag wins over a glob, a longer glob over a shorter) "
        f"(default {DEFAULT_MANIFEST_TTL:g}s for every tag)",
        CACHE,
        Kind.DURATION_RULES,
        metavar="[PATTERN=]DURATION",
        repeatable=True,
        parse=ttl_rule,
    ),
    Setting(
        "negative-ttl",
        "answer 404 from memory for this long to a manifest or tag the upstream just answered "
        "404 (the same request: registry, Accept, and credentials, or anyone's for a repository "
        "anyone may read); never 401, 403, 429 or 5xx; 0 turns it off "
        f"(default {DEFAULT_NEGATIVE_TTL:g}s)",
        CACHE,
        Kind.DURATION,
        DEFAULT_NEGATIVE_TTL,
        metavar="DURATION",
        bound=Bound(0.0, inclusive=True, wording="0 (off) or more seconds"),
    ),
    Setting(
        "manifest-memory",
        "manifest bytes buffered from upstreams at once, and again held while being sent "
        "(a quarter, at least 4M, per client address); beyond it a request waits (up to "
        "--read-timeout), then gets 503 (default 32M; one larger manifest still works alone)",
        CACHE,
        default="32M",
        metavar="SIZE",
        parse=size,
        numbers_as_text=True,
    ),
    Setting("no-cache", "do not cache at all", CACHE, Kind.SWITCH, False),
    # --- the prefetch list
    Setting(
        "prefetch",
        "an image to keep cached, e.g. nginx:1.27 or ghcr.io/owner/app:main: fetched at start "
        "and again every --prefetch-interval, its tag asked of the upstream each time "
        "(repeatable; default: none)",
        PREFETCH,
        metavar="IMAGE",
        repeatable=True,
        parse=parse_image,
    ),
    Setting(
        "prefetch-interval",
        "how often the --prefetch list is fetched again; 0 turns the list off "
        f"(default {DEFAULT_PREFETCH_INTERVAL / 3600:g}h)",
        PREFETCH,
        Kind.DURATION,
        DEFAULT_PREFETCH_INTERVAL,
        metavar="DURATION",
        bound=Bound(0.0, inclusive=True, wording="0 (off) or more seconds"),
    ),
    Setting(
        "prefetch-platforms",
        "the platforms of the --prefetch images fetched from a multi-platform image, e.g. "
        "linux/amd64,linux/arm64, or 'all' (default: this machine's, "
        f"{machine_platform(platform.system(), platform.machine())})",
        PREFETCH,
        metavar="PLATFORMS",
        parse=parse_platform_choice,
    ),
    # --- access control
    Setting(
        "allow",
        "serve only clients from these networks, e.g. 192.168.0.0/16 (repeatable; "
        "default: everyone); others get 403",
        ACCESS,
        metavar="CIDR",
        repeatable=True,
        parse=parse_network,
    ),
    Setting(
        "ops-allow",
        "networks that may read /metrics, /healthz, /readyz and the status page / "
        "(repeatable; default: every client --allow lets in)",
        ACCESS,
        metavar="CIDR",
        repeatable=True,
        parse=parse_network,
    ),
    Setting(
        "admin-token-file",
        "turn on the admin API (/admin/cache: list, remove, refresh cached images) for "
        "requests from --ops-allow (default: from this machine only) with "
        "'Authorization: Bearer' and the token in this file (default: off)",
        ACCESS,
        metavar="FILE",
        parse=secret_file(read_admin_token),
    ),
    Setting(
        "users",
        "require clients to log in to the mirror with a user of this file (made with "
        "'hubproxy user add NAME --users FILE'); upstream pulls are then anonymous",
        ACCESS,
        metavar="FILE",
        parse=users_file,
    ),
    Setting(
        "images-allow",
        "serve only images matching one of these, e.g. 'library/*', 'myorg/**' "
        "(repeatable; default: all)",
        ACCESS,
        metavar="GLOB",
        repeatable=True,
        parse=parse_image_pattern,
    ),
    Setting(
        "images-deny",
        "refuse images matching one of these (repeatable; wins over --images-allow)",
        ACCESS,
        metavar="GLOB",
        repeatable=True,
        parse=parse_image_pattern,
    ),
    Setting(
        "client-rate-limit",
        "requests per second each client address may make on average; more get 429 "
        "(default 0: no limit)",
        ACCESS,
        Kind.NUMBER,
        0.0,
        metavar="N",
        bound=Bound(0.0, inclusive=True, wording="0 (off) or more requests per second"),
    ),
    Setting(
        "client-burst",
        "requests a client may make at once before --client-rate-limit applies "
        "(default 200: a large image's pull)",
        ACCESS,
        Kind.INT,
        200,
        metavar="N",
        bound=AT_LEAST_ONE,
    ),
    Setting(
        "login-failures",
        "wrong mirror passwords an address may send per minute (in a burst or spread out); "
        "beyond them its logins get 429 without a password check (default 10; 0: no limit)",
        ACCESS,
        Kind.INT,
        10,
        metavar="N",
        bound=Bound(0, inclusive=True, wording="0 (off) or more"),
    ),
    # --- request limits
    Setting(
        "max-header-size",
        f"request line and headers; larger requests get 431 (default {_LIMITS.max_head_size})",
        LIMITS,
        Kind.INT,
        _LIMITS.max_head_size,
        metavar="BYTES",
        bound=AT_LEAST_ONE,
    ),
    Setting(
        "max-headers",
        f"header fields per request; more get 431 (default {_LIMITS.max_headers})",
        LIMITS,
        Kind.INT,
        _LIMITS.max_headers,
        metavar="N",
        bound=AT_LEAST_ONE,
    ),
    Setting(
        "max-target",
        f"request target length; longer gets 414 (default {_LIMITS.max_target})",
        LIMITS,
        Kind.INT,
        _LIMITS.max_target,
        metavar="BYTES",
        bound=AT_LEAST_ONE,
    ),
    # --- timeouts
    _timeout("handshake-timeout", _TIMEOUTS.handshake, "client TLS handshake"),
    _timeout("request-timeout", _TIMEOUTS.request_head, "first request head after connecting"),
    _timeout(
        "keepalive-timeout", _TIMEOUTS.keepalive_idle, "idle client connection between requests"
    ),
    _timeout(
        "client-idle-timeout",
        _TIMEOUTS.client_idle,
        "client that accepts or sends nothing mid-transfer",
    ),
    _timeout("connect-timeout", _TIMEOUTS.connect, "connecting to an upstream, TLS included"),
    _timeout(
        "read-timeout",
        _TIMEOUTS.upstream_idle,
        "upstream that sends nothing; there is no total-time limit",
    ),
    _timeout(
        "upstream-keepalive",
        _TIMEOUTS.upstream_keepalive,
        "idle pooled upstream connection before it is closed",
    ),
    _timeout(
        "pool-wait-timeout",
        _TIMEOUTS.pool_wait,
        "waiting for a free connection to an upstream origin; then 503 (the mirror is busy)",
    ),
    _timeout(
        "shutdown-grace",
        _TIMEOUTS.shutdown_grace,
        "time in-flight transfers get after SIGINT/SIGTERM",
    ),
    Setting(
        "accounting-window",
        "pull accounting: count pulls (manifest GETs) per client, per image and upstream over "
        "this long, for the status page's 'who spent the rate limit' and /metrics "
        f"(default {DEFAULT_WINDOW / 3600:g}h: Docker Hub's window)",
        kind=Kind.DURATION,
        default=DEFAULT_WINDOW,
        metavar="DURATION",
        bound=Bound(60.0, inclusive=True, wording="at least 60 seconds"),
    ),
    Setting(
        "accounting-top",
        "clients and images named per pull table, on the status page and as /metrics labels; "
        "the rest are summed as 'other', so hubproxy_client_pulls and hubproxy_image_pulls "
        f"have at most N+1 series (default {DEFAULT_TOP})",
        kind=Kind.INT,
        default=DEFAULT_TOP,
        metavar="N",
        bound=AT_LEAST_ONE,
    ),
    Setting(
        "log-level",
        "log verbosity (default info; info logs one access line per request)",
        default="info",
        choices=("debug", "info", "warning", "error"),
    ),
)


# --------------------------------------------------------------------------------- the parser

CONFIG_HELP = (
    "read settings from this TOML file (keys are the long flag names, e.g. "
    'cache-dir = "/var/cache/hubproxy"); flags given here override it'
)


@dataclass(frozen=True)
class _Flag:
    metavar: str | None
    takes_value: bool


class CommandLine(argparse.ArgumentParser):
    """An ArgumentParser whose every mistake is one :class:`UsageError` line instead of the usage
    block and an exit (``unknown flag --lisen; did you mean --listen?``); --help and --version
    still print and exit 0.

    It remembers its flags, to name the closest one to a misspelt flag, and ``commands``, the
    words that may come first (the subcommands :mod:`hubproxy.cli` dispatches before this parser
    runs), to name the closest one to a misspelt command."""

    def __init__(self, *args: Any, commands: Sequence[str] = (), **kwargs: Any) -> None:
        self.flags: dict[str, _Flag] = {}
        self.commands = tuple(commands)
        self.subcommands: Any = None  # the add_subparsers action: .dest, .choices (name -> parser)
        self.argv: list[str] = []  # the arguments being parsed, for error messages
        # No abbreviations: "--cache" would mean --cache-dir today and be ambiguous once
        # another --cache-* flag exists; a misspelt flag gets a suggestion instead.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def add_subparsers(self, **kwargs: Any) -> Any:
        self.subcommands = super().add_subparsers(**kwargs)
        return self.subcommands

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.remember(action)
        return action

    def remember(self, action: argparse.Action) -> None:
        """Know ``action``'s flags (add_argument does this; call it for a group's arguments)."""
        metavar = action.metavar if isinstance(action.metavar, str) else None
        for flag in action.option_strings:
            self.flags[flag] = _Flag(metavar, action.nargs != 0)

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: None = None
    ) -> argparse.Namespace:
        argv = list(sys.argv[1:] if args is None else args)
        parsed, extras = self.parse_known_args(argv, namespace)
        if extras:
            # A subcommand's parser hands its leftovers up here: let it judge them, it knows
            # its own flags (``hubproxy user add --pasword-stdin``).
            owner = self
            if self.subcommands is not None:
                owner = self.subcommands.choices.get(getattr(parsed, self.subcommands.dest), self)
            raise UsageError(owner.unexpected(argv, extras[0]), owner.prog)
        return parsed

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self.argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self.argv, namespace)

    def error(self, message: str) -> NoReturn:
        if message.startswith("the following arguments are required"):
            # "--user f" leaves --users missing: the misspelt flag is the news, not the missing one
            unknown = [word for word in self.argv if word.startswith("--") and word != "--"]
            unknown = [word for word in unknown if word.partition("=")[0] not in self.flags]
            if unknown:
                raise UsageError(self.unexpected(self.argv, unknown[0]), self.prog)
        raise UsageError(self.explain(message), self.prog)

    def unexpected(self, argv: list[str], word: str) -> str:
        """What is wrong with ``word``, the first argument no flag or positional took."""
        if word.startswith("-") and word != "-":
            flag = word.partition("=")[0]
            known = [name for name in self.flags if name.startswith("--")]
            # the start of a flag (abbreviations are off): the flags it starts, else the closest
            close = [name for name in known if name.startswith(flag)][:3]
            close = close or difflib.get_close_matches(flag, known, n=1)
            if close:
                return f"unknown flag {flag}; did you mean {' or '.join(close)}?"
            return f"unknown flag {flag} (see '{self.prog} --help')"
        position = argv.index(word) if word in argv else -1
        if position == 0 and self.commands:
            close = difflib.get_close_matches(word, self.commands, n=1, cutoff=0.75)
            if close:
                return f"unknown command {word!r}; did you mean {close[0]}?"
            listed = ", ".join(self.commands)
            return (
                f"unknown command {word!r} (the commands are {listed}; "
                f"{self.prog} with flags only runs the mirror)"
            )
        before = self.flags.get(argv[position - 1]) if position > 0 else None
        if before is not None and not before.takes_value:
            return f"{argv[position - 1]} takes no value, got {word!r}"
        return f"unexpected argument {word!r} (see '{self.prog} --help')"

    def explain(self, message: str) -> str:
        """argparse's error ``message`` as our line: ``--read-timeout: ...`` rather than
        ``argument --read-timeout: ...``, and what a flag missing its value wants."""
        match = re.fullmatch(r"argument (\S+): (.*)", message, re.DOTALL)
        if match is None:
            if message.startswith("the following arguments are required"):
                return f"{message} (see '{self.prog} --help')"
            return message
        name, problem = match.groups()
        if problem == "expected one argument":
            flag = self.flags.get(name)
            wants = f" ({flag.metavar})" if flag is not None and flag.metavar else ""
            return f"{name} needs a value{wants}"
        ignored = re.fullmatch(r"ignored explicit argument (.*)", problem)
        if ignored:
            return f"{name} takes no value, got {ignored.group(1)}"
        choice = re.fullmatch(r"invalid choice: '(.*)' \(choose from (.*)\)", problem)
        if choice:
            close = difflib.get_close_matches(
                choice.group(1), re.findall(r"'([^']*)'", choice.group(2)), n=1
            )
            if close:
                return f"{name}: invalid choice: {choice.group(1)!r}; did you mean {close[0]!r}?"
        return f"{name}: {problem}"


def build_parser(table: tuple[Setting, ...] = SETTINGS) -> CommandLine:
    """The ``hubproxy`` command line, made from ``table``. Every setting's default is
    ``argparse.SUPPRESS``: the namespace holds only what the command line gave (``config``
    included); :func:`~hubproxy.configfile.read_settings` adds the file and the defaults.
    Its mistakes are :class:`UsageError` (see :class:`CommandLine`)."""
    parser = CommandLine(
        prog="hubproxy",
        usage=USAGE,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        commands=[name for name, _, _ in COMMANDS],
    )
    parser.add_argument("--version", action="version", version=f"hubproxy {__version__}")
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help=CONFIG_HELP)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for setting in table:
        target: argparse.ArgumentParser | argparse._ArgumentGroup = parser
        if setting.group is not None:
            if setting.group not in groups:
                groups[setting.group] = parser.add_argument_group(setting.group)
            target = groups[setting.group]
        shown = str(setting.initial()).replace("%", "%%")
        options: dict[str, object] = {
            "default": argparse.SUPPRESS,
            "help": setting.help.replace("%(default)s", shown),
        }
        if setting.kind is Kind.SWITCH:
            options["action"] = "store_true"
        elif setting.kind is Kind.BOOL:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["metavar"] = setting.metavar
            if setting.repeatable:
                options["action"] = "append"
            if setting.kind is Kind.INT:
                options["type"] = _argument(whole_number)
            elif setting.kind is Kind.NUMBER:
                options["type"] = _argument(number)
            elif setting.kind is Kind.DURATION:
                options["type"] = _argument(parse_duration)
            if setting.choices:
                options["choices"] = list(setting.choices)
        parser.remember(target.add_argument(setting.flag, **options))  # type: ignore[arg-type]
    return parser


# --------------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Values:
    """Every setting's raw value by dest (the table's default, under the config file, under the
    command line), and where the file's values sit, for error messages."""

    raw: Mapping[str, object]
    origins: Mapping[str, str] = field(default_factory=dict)  # dest -> "path:line"
    item_origins: Mapping[tuple[str, int], str] = field(default_factory=dict)  # (dest, index)

    def where(self, dest: str, index: int | None = None) -> str | None:
        """``path:line`` of the value (or item) when it came from the config file."""
        if index is not None and (dest, index) in self.item_origins:
            return self.item_origins[dest, index]
        return self.origins.get(dest)

    def error(self, setting: str, message: str, index: int | None = None) -> UsageError:
        """A UsageError about ``setting``'s value, prefixed with its file line if it has one."""
        where = self.where(setting.replace("-", "_"), index)
        return UsageError(f"{where}: {message}" if where else message)


def defaults(table: tuple[Setting, ...] = SETTINGS) -> dict[str, object]:
    """dest -> the value each setting has when nothing sets it."""
    return {setting.dest: setting.initial() for setting in table}


def _parse_value(setting: Setting, values: Values) -> object:
    raw = values.raw[setting.dest]
    if setting.bound is not None:
        number = cast(float, raw)
        if not setting.bound.admits(number):
            raise values.error(setting.name, f"{setting.flag} must be {setting.bound.wording}")
        return raw
    if setting.repeatable:
        items: list[object] = []
        for index, item in enumerate(cast(list[str], raw)):
            items.append(_parse_item(setting, values, item, index))
        return items
    if raw is None or setting.parse is None:
        return raw
    try:
        return setting.parse(cast(str, raw))
    except ValueError as exc:
        raise values.error(setting.name, f"{setting.flag}: {exc}") from None


def _parse_item(setting: Setting, values: Values, item: str, index: int) -> object:
    text: str = item
    pair = None
    if setting.table is not None:
        pair = split_pair(item)
        if pair is None:
            message = f"{setting.flag} wants {setting.metavar}, got {hide_userinfo(item)!r}"
            raise values.error(setting.name, message, index)
        text = pair[1]
    parsed: object = text
    if setting.parse is not None:
        try:
            parsed = setting.parse(text)
        except ValueError as exc:
            raise values.error(setting.name, f"{setting.flag}: {exc}", index) from None
    return parsed if pair is None else (pair[0], parsed)


def parse_values(values: Values, table: tuple[Setting, ...] = SETTINGS) -> dict[str, object]:
    """dest -> parsed value, each checked by its own row; the first problem, in table order, is
    a UsageError."""
    return {setting.dest: _parse_value(setting, values) for setting in table}


# --------------------------------------------------------------------------------- the Config


def build_config(values: Values) -> Config:
    """The frozen Config from raw values; UsageError (with the file line) if one is unusable."""
    p = parse_values(values)
    cert = cast(str | None, p["cert"])
    key = cast(str | None, p["key"])
    if key and not cert:
        raise values.error("key", "--key needs --cert")
    if cert:
        try:
            server_ssl_context(cert, key or cert)
        except CertificateError as exc:
            raise values.error("cert", f"--cert/--key: {exc}") from None
    listen = cast(tuple[str, int] | None, p["listen"])
    if listen is None:
        listen = ("0.0.0.0", 443) if cert else ("127.0.0.1", 5000)
    upstreams = (cast(Url, p["upstream"]), *cast(list[Url], p["fallback"]))
    library_prefix = cast(bool | None, p["library_prefix"])
    if library_prefix is None:
        library_prefix = is_docker_hub(upstreams[0])
    allow = NetworkList(tuple(cast(list[Network], p["allow"])))
    manifest_ttl, manifest_ttl_rules = ttl_rules(cast(list[TtlRule], p["manifest_ttl"]))
    users = cast(str | None, p["users"])
    registries, default_login, host_map = build_registries(values, p)
    has_login = default_login is not None or any(r.login for r in registries)
    if p["cache_store_size"] is not None and p["cache_store"] is None:
        raise values.error("cache-store-size", "--cache-store-size needs --cache-store")
    if has_login and not (allow.networks or users or p["allow_shared_login"]):
        raise values.error(
            "registry-login",
            "--registry-login: anyone who can reach this mirror would pull with that login; "
            "limit who can with --allow or --users, or pass --allow-shared-login",
        )
    if users and len(cast(list[Url], p["peer"])) > 1 and not p["peer_secret_file"]:
        # a client logs in on one instance and sends its token to another (a load balancer):
        # without one secret, that instance cannot open it and the client loops on 401s
        raise values.error(
            "users",
            "--users with --peer needs --peer-secret-file, the same file on every instance "
            "(a mirror token one instance issued must open on the others); make one with: "
            "openssl rand -hex 32 > FILE",
        )
    if p["redirect_hits"] and (p["cache_store"] is None or p["no_cache"]):
        raise values.error(
            "redirect-hits",
            "--redirect-hits: needs --cache-store s3://BUCKET/PREFIX (hits are redirected to "
            "presigned URLs of that store, and without it there are none); add one or drop "
            "--redirect-hits",
        )
    return Config(
        cache_dir=None if p["no_cache"] else cast(str, p["cache_dir"]),
        cache_size=cast(int, p["cache_size"]),
        cache_store=cast(str | None, p["cache_store"]),
        reverify_after=cast(float, p["reverify_after"]),
        cache_store_size=cast(int | None, p["cache_store_size"]),
        s3_endpoint=cast(str | None, p["s3_endpoint"]),
        peers=tuple(cast(list[Url], p["peer"])),
        peer_timeout=cast(float, p["peer_timeout"]),
        peer_ca=cast(str | None, p["peer_ca"]),
        peer_secret_file=cast(str | None, p["peer_secret_file"]),
        redirect_hits=cast(bool, p["redirect_hits"]),
        manifest_cache_size=cast(int, p["manifest_cache_size"]),
        manifest_cache_entries=cast(int, p["manifest_cache_entries"]),
        manifest_ttl=manifest_ttl,
        manifest_ttl_rules=manifest_ttl_rules,
        negative_ttl=cast(float, p["negative_ttl"]),
        manifest_memory=cast(int, p["manifest_memory"]),
        body_memory=cast(int, p["body_memory"]),
        listen_host=listen[0],
        listen_port=listen[1],
        cert=cert,
        key=key,
        ktls=cast(bool, p["ktls"]),
        upstreams=upstreams,
        index_url=cast(Url, p["index_url"]),
        library_prefix=library_prefix,
        public_url=cast(str | None, p["public_url"]),
        upstream_ca=cast(str | None, p["upstream_ca"]),
        upstream_proxy=cast(UpstreamProxy | None, p["upstream_proxy"]),
        max_redirects=cast(int, p["max_redirects"]),
        max_connections=cast(int, p["max_connections"]),
        max_connections_per_client=cast(int, p["max_connections_per_client"]),
        max_pending_per_client=cast(int, p["max_pending_per_client"]),
        workers=cast(int, p["workers"]),
        client_bandwidth=cast(int | None, p["client_bandwidth"]),
        total_bandwidth=cast(int | None, p["total_bandwidth"]),
        pool_max_per_origin=cast(int, p["pool_max_per_origin"]),
        pool_max_per_client=cast(int, p["pool_max_per_client"]),
        pool_reserve_small=cast(int, p["pool_reserve_small"]),
        limits=Limits(
            max_head_size=cast(int, p["max_header_size"]),
            max_headers=cast(int, p["max_headers"]),
            max_target=cast(int, p["max_target"]),
        ),
        rate_limit_rest=cast(float, p["rate_limit_cooldown"]),
        timeouts=Timeouts(
            handshake=cast(float, p["handshake_timeout"]),
            request_head=cast(float, p["request_timeout"]),
            keepalive_idle=cast(float, p["keepalive_timeout"]),
            client_idle=cast(float, p["client_idle_timeout"]),
            connect=cast(float, p["connect_timeout"]),
            upstream_idle=cast(float, p["read_timeout"]),
            upstream_keepalive=cast(float, p["upstream_keepalive"]),
            pool_wait=cast(float, p["pool_wait_timeout"]),
            shutdown_grace=cast(float, p["shutdown_grace"]),
        ),
        allow=allow,
        ops_allow=NetworkList(tuple(cast(list[Network], p["ops_allow"]))),
        users_file=users,
        admin_token_file=cast(str | None, p["admin_token_file"]),
        images=ImageRules(
            allow=tuple(cast(list[ImagePattern], p["images_allow"])),
            deny=tuple(cast(list[ImagePattern], p["images_deny"])),
        ),
        client_rate_limit=cast(float, p["client_rate_limit"]),
        client_burst=cast(int, p["client_burst"]),
        login_failures=cast(int, p["login_failures"]),
        registries=registries,
        default_login=default_login,
        host_map=host_map,
        allow_shared_login=bool(p["allow_shared_login"]),
        only_listed_registries=bool(p["only_listed_registries"]),
        prefetch=tuple(cast(list[ImageRef], p["prefetch"])),
        prefetch_interval=cast(float, p["prefetch_interval"]),
        prefetch_platforms=(
            (this_platform(),)
            if values.raw["prefetch_platforms"] is None
            else cast(tuple[Platform, ...] | None, p["prefetch_platforms"])
        ),
        accounting_window=cast(float, p["accounting_window"]),
        accounting_top=cast(int, p["accounting_top"]),
    )


def _pairs(parsed: Mapping[str, object], dest: str) -> list[tuple[str, object]]:
    return cast(list[tuple[str, object]], parsed[dest])


def build_registries(
    values: Values, parsed: Mapping[str, object], default: str = DEFAULT_REGISTRY
) -> tuple[tuple[Registry, ...], tuple[str, str] | None, tuple[tuple[str, str], ...]]:
    """The registries besides the default one (built-ins plus --registry; with
    --only-listed-registries only the built-ins some registry setting names), with their
    fallbacks, CAs, proxies and logins; the default registry's login; the host map."""
    entries: dict[str, Registry] = {}
    # every registry a registry setting (or [registry."NAME"] table) names, by its table name
    named = {name for dest in _REGISTRY_DESTS for name, _ in _pairs(parsed, dest)}
    named |= {str(target) for _, target in _pairs(parsed, "host_map")}
    for name, url, aliases in BUILTIN_REGISTRIES:
        entries[name] = Registry(name, (base_url(url),), aliases=aliases)
    for index, (name, upstream) in enumerate(_pairs(parsed, "registry")):
        if not looks_like_host(name):
            message = f"--registry: {name!r} is not a registry host name"
            raise values.error("registry", message, index)
        if name == default:
            message = f"--registry: set {default}'s upstream with --upstream"
            raise values.error("registry", message, index)
        entries[name] = replace(
            entries.get(name, Registry(name, ())), upstreams=(cast(Url, upstream),)
        )

    def entry(setting: str, name: str, index: int) -> Registry:
        if name not in entries:
            message = f"--{setting}: no registry {name!r} (add it with --registry NAME=URL)"
            raise values.error(setting, message, index)
        return entries[name]

    for index, (name, fallback) in enumerate(_pairs(parsed, "registry_fallback")):
        if name != default:
            found = entry("registry-fallback", name, index)
            entries[name] = replace(found, upstreams=(*found.upstreams, cast(Url, fallback)))
    for index, (name, path) in enumerate(_pairs(parsed, "registry_ca")):
        if name == default:
            message = f"--registry-ca: use --upstream-ca for {default}"
            raise values.error("registry-ca", message, index)
        found = entry("registry-ca", name, index)
        entries[name] = replace(found, upstream_ca=cast(str, path))
    for index, (name, via) in enumerate(_pairs(parsed, "registry_proxy")):
        if name == default:
            message = f"--registry-proxy: use --upstream-proxy for {default}"
            raise values.error("registry-proxy", message, index)
        found = entry("registry-proxy", name, index)
        entries[name] = replace(found, upstream_proxy=cast(UpstreamProxy, via))
    default_login = None
    for index, (name, login) in enumerate(_pairs(parsed, "registry_login")):
        if name == default:
            default_login = cast(tuple[str, str], login)
        else:
            found = entry("registry-login", name, index)
            entries[name] = replace(found, login=cast(tuple[str, str], login))
    host_map = []
    for index, (host, target) in enumerate(_pairs(parsed, "host_map")):
        if target != default and target not in entries:
            raise values.error("host-map", f"--host-map: no registry {target!r}", index)
        host_map.append((host, str(target)))
    served = list(entries.values())
    if parsed.get("only_listed_registries"):
        builtin = (name for name, _, _ in BUILTIN_REGISTRIES)
        served = listed_registries(builtin, named, served)
    others = tuple(r for r in served if r.name != default)
    return others, default_login, tuple(host_map)


# the NAME=VALUE settings whose NAME is a registry (--host-map's is a host name)
_REGISTRY_DESTS = (
    "registry",
    "registry_fallback",
    "registry_ca",
    "registry_proxy",
    "registry_login",
)
