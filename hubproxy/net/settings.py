"""The numbers the connections run by: timeouts, request limits, and what a listener needs.

Plain frozen values, made by the face (``config``) and handed to the I/O modules, which never
read the configuration themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .pacing import BandwidthCaps


@dataclass(frozen=True)
class Timeouts:
    handshake: float = 10.0  # TLS handshake of a new client connection
    request_head: float = 30.0  # the first request head after connecting (slow-loris guard)
    keepalive_idle: float = 60.0  # between requests on a kept-alive client connection
    client_idle: float = 120.0  # a client that neither sends nor accepts a byte mid-transfer
    connect: float = 10.0  # TCP connect + TLS handshake (+ CONNECT) toward an upstream
    upstream_idle: float = 60.0  # an upstream that sends no byte (head or body) for this long
    upstream_keepalive: float = 30.0  # idle pooled upstream connections are dropped after this
    pool_wait: float = 30.0  # a request waits this long for a slot to an upstream origin
    shutdown_grace: float = 30.0  # in-flight transfers get this long after SIGINT/SIGTERM


@dataclass(frozen=True)
class Limits:
    max_head_size: int = 64 * 1024  # request line + headers, bytes; beyond it: 431
    max_headers: int = 100  # header fields per request; beyond it: 431
    max_target: int = 8 * 1024  # request target, bytes; beyond it: 414


@dataclass(frozen=True)
class ListenerSettings:
    """What ``net.server`` needs: where to listen, the certificate, timeouts and limits."""

    listen_host: str = "127.0.0.1"
    listen_port: int = 5000
    cert: str | None = None
    key: str | None = None
    ktls: bool = False  # offer the session keys to the kernel (net.ktls)
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    max_connections: int = 1024  # client connections; more are refused (503 on plain HTTP)
    max_connections_per_client: int = 128  # from one address (an IPv6 /64); more are refused
    max_pending_per_client: int = 16  # requests of one address worked on before their answer
    # several processes listen on the same port (--workers): SO_REUSEPORT, the kernel spreads
    # new connections over them
    reuse_port: bool = False
    # --client-bandwidth, --total-bandwidth (net.pacing); off by default
    bandwidth: BandwidthCaps = field(default_factory=BandwidthCaps)
