"""The peers of this instance (``--peer``): who they are, which one is this instance, and which
are resting after a failure. The decisions are ``policy/peers.py``'s.

This instance finds itself in the list at start: a URL names it when its port is the port this
instance listens on and its host resolves to an address of this machine (one a socket can be
bound to: the kernel's own answer, with no list of interfaces to keep) that this instance's
listener takes (any, for a wildcard listener). Two instances on one machine then differ by
port, or by the address each listens on.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections import Counter

import trio

from ..config import Config
from ..policy.errors import ProxyError
from ..policy.peers import PEER_REST, owner, self_index
from ..policy.urls import Url
from .store import BodySource

log = logging.getLogger("hubproxy.peers")


class Peers:
    """The peer list, this instance's place in it, and each peer's rest after a failure (one
    entry per configured peer: bounded by the list)."""

    def __init__(self, urls: tuple[Url, ...], me: int, timeout: float) -> None:
        self.urls = urls
        self.names = tuple(str(url.origin) for url in urls)
        self.me = me
        self.timeout = timeout
        self.resting_until = [0.0] * len(urls)
        # (peer, what came of asking it): filled, passed (its 403/404), upstream (asked there
        # instead): bounded by the list times three (/metrics)
        self.asked: Counter[tuple[str, str]] = Counter()

    def note(self, index: int, result: str) -> None:
        """What came of asking peer ``index`` for a blob (``asked``)."""
        self.asked[(self.names[index], result)] += 1

    def fetches(self) -> dict[tuple[str, ...], float]:
        """``asked`` as /metrics reads it."""
        return {key: float(count) for key, count in self.asked.items()}

    def resting(self) -> dict[tuple[str, ...], float]:
        """1 for each peer resting after a failure now, 0 for the others (this one left out)."""
        now = trio.current_time()
        return {
            (name,): float(self.resting_until[index] > now)
            for index, name in enumerate(self.names)
            if index != self.me
        }

    def owner_of(self, key: str) -> int | None:
        """The peer to ask for blob ``key``: its owner, unless that is this instance or resting
        (None: fetch from the upstream)."""
        index = owner(key, self.names)
        if index == self.me or self.resting_until[index] > trio.current_time():
            return None
        return index

    def failed(self, index: int, why: str) -> None:
        """Peer ``index`` could not serve: skip it for a while; one line per episode (a failure
        while it rests is another request that had set out before the rest began)."""
        now = trio.current_time()
        if self.resting_until[index] <= now:
            log.warning(
                "peer %s %s: fetching its blobs from the upstream for %gs",
                self.names[index],
                why,
                PEER_REST,
            )
        self.resting_until[index] = now + PEER_REST


class PeerReadFailed(OSError):
    """The owner peer broke off a blob it was sending (killed, restarted, its own upstream
    failing). An OSError, as a failed disk write is: the fill's failure is not the upstream's,
    so its readers finish from the upstream with a Range request, still verified
    (``Fill.disk_failed``), rather than every client of this instance losing its transfer."""


class PeerBody:
    """A blob's bytes from its owner peer, as a fill's body source (``BlobStore.run_fill``)."""

    def __init__(self, body: BodySource) -> None:
        self._body = body

    async def receive_body(self) -> bytes | bytearray | None:
        """The next chunk, None at the end; PeerReadFailed if the peer's transfer breaks."""
        try:
            return await self._body.receive_body()
        except ProxyError as exc:  # the connection's failures (closed, timed out, bad framing)
            raise PeerReadFailed(f"the peer broke off: {exc}") from exc


def _listen_addresses(host: str) -> set[str] | None:
    """The addresses the listener takes; None: all (a wildcard)."""
    if host in ("", "0.0.0.0", "::"):
        return None
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
        return {str(info[4][0]).split("%")[0] for info in infos}
    except OSError:
        return {host}


def _is_local(address: str) -> bool:
    """Whether this machine has ``address``: the kernel lets a socket be bound to it."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True


def names_this_instance(url: Url, port: int, listening: set[str] | None) -> bool:
    """Whether ``url`` is this instance's mirror URL (see the module's docstring)."""
    if url.origin.port != port:
        return False
    try:
        infos = socket.getaddrinfo(url.origin.host, port, type=socket.SOCK_DGRAM)
    except OSError:
        return False
    addresses = {str(info[4][0]).split("%")[0] for info in infos}
    return any(
        _is_local(address) and (listening is None or address in listening) for address in addresses
    )


async def find_peers(config: Config) -> Peers:
    """The peers of ``config``, with this instance found in them; ValueError (one line) if it is
    not there, or more than once."""
    port = config.listen_port
    listening = await trio.to_thread.run_sync(_listen_addresses, config.listen_host)
    matches = [
        await trio.to_thread.run_sync(names_this_instance, url, port, listening)
        for url in config.peers
    ]
    names = [str(url.origin) for url in config.peers]
    host = config.listen_host
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    me = self_index(names, matches, listen)
    return Peers(config.peers, me, config.peer_timeout)
