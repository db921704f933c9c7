"""Kernel TLS (kTLS): whether this machine could let the kernel encrypt, for the startup line.

With kTLS, OpenSSL hands the session keys to the kernel after the handshake and the kernel
encrypts what is written to the socket, so a cache hit could go out with ``os.sendfile`` and no
user-space copy at all. It takes three things: Python 3.12 or later (``ssl.OP_ENABLE_KTLS``), an
OpenSSL built with kTLS, and the kernel's ``tls`` module (listed in
``/proc/sys/net/ipv4/tcp_available_ulp`` once loaded). It also takes a TLS stream over the socket
itself: hubproxy's :class:`~hubproxy.net.tls.TLSStream` drives ``ssl.SSLObject`` over memory
BIOs, which the kernel cannot take over, so hubproxy reports what is missing and uses kTLS
nowhere yet; the report tells an operator what a kTLS path would need on their machine.
"""

from __future__ import annotations

import ssl
import sys
from pathlib import Path

ULP_LIST = Path("/proc/sys/net/ipv4/tcp_available_ulp")


def describe_ktls(python: tuple[int, int], python_has_option: bool, ulps: str | None) -> str:
    """``kTLS off (...)``: what is missing, from the Python version, whether its ``ssl`` has
    ``OP_ENABLE_KTLS``, and the kernel's list of TCP upper-layer protocols (None: unreadable)."""
    missing = []
    if not python_has_option:
        missing.append(f"Python {python[0]}.{python[1]} has no ssl.OP_ENABLE_KTLS (3.12 or later)")
    if ulps is None:
        missing.append(f"{ULP_LIST} is unreadable")
    elif "tls" not in ulps.split():
        missing.append("the kernel's tls module is not loaded (modprobe tls)")
    if missing:
        return "kTLS off: " + "; ".join(missing)
    return "kTLS off: this machine offers it, hubproxy's TLS streams do not use it yet"


def ktls_clause(ulp_list: Path = ULP_LIST) -> str:
    """:func:`describe_ktls` for this process and machine."""
    try:
        ulps: str | None = ulp_list.read_text()
    except OSError:
        ulps = None
    return describe_ktls(
        (sys.version_info.major, sys.version_info.minor), hasattr(ssl, "OP_ENABLE_KTLS"), ulps
    )
