"""Kernel TLS (kTLS): whether the kernel can encrypt for clients here, for the startup line.

With kTLS, OpenSSL hands the session keys to the kernel after the handshake and the kernel
encrypts what is written to the socket, so a cache hit goes out with ``os.sendfile`` and no
user-space copy at all. It takes three things: Python 3.12 or later (``ssl.OP_ENABLE_KTLS``), an
OpenSSL built with kTLS, and the kernel's ``tls`` module (listed in
``/proc/sys/net/ipv4/tcp_available_ulp`` once loaded); and a TLS stream on the socket itself,
:class:`~hubproxy.net.sockettls.SocketTLSStream`, which the client side uses when ``--ktls`` asks
for kTLS and the machine offers it. It is off unless asked for, as in nginx (``ssl_conf_command
Options KTLS``): a kernel path is one more thing that can go wrong. Even then the kernel may
refuse a connection's cipher, and that connection stays with OpenSSL
(``SocketTLSStream.kernel_encrypts``).
"""

from __future__ import annotations

import ssl
import sys
from pathlib import Path

ULP_LIST = Path("/proc/sys/net/ipv4/tcp_available_ulp")


def ktls_offered(ulp_list: Path = ULP_LIST) -> bool:
    """Whether this Python can ask for kTLS and this kernel has the ``tls`` module loaded."""
    try:
        return hasattr(ssl, "OP_ENABLE_KTLS") and "tls" in ulp_list.read_text().split()
    except OSError:
        return False


def describe_ktls(
    python: tuple[int, int], python_has_option: bool, ulps: str | None, *, asked: bool = False
) -> str:
    """``kTLS on ...`` or ``kTLS off (...)``: from whether ``--ktls`` asked for it, the Python
    version, whether its ``ssl`` has ``OP_ENABLE_KTLS``, and the kernel's list of TCP upper-layer
    protocols (None: unreadable), what is missing."""
    missing = []
    if not python_has_option:
        missing.append(f"Python {python[0]}.{python[1]} has no ssl.OP_ENABLE_KTLS (3.12 or later)")
    if ulps is None:
        missing.append(f"{ULP_LIST} is unreadable")
    elif "tls" not in ulps.split():
        missing.append("the kernel's tls module is not loaded (modprobe tls)")
    if missing:
        return ("kTLS off despite --ktls: " if asked else "kTLS off: ") + "; ".join(missing)
    if asked:
        return "kTLS on for clients where the kernel takes a connection's cipher (hits: sendfile)"
    return "kTLS off: this machine offers it (--ktls turns it on)"


def ktls_clause(ulp_list: Path = ULP_LIST, *, asked: bool = False) -> str:
    """:func:`describe_ktls` for this process and machine."""
    try:
        ulps: str | None = ulp_list.read_text()
    except OSError:
        ulps = None
    return describe_ktls(
        (sys.version_info.major, sys.version_info.minor),
        hasattr(ssl, "OP_ENABLE_KTLS"),
        ulps,
        asked=asked,
    )
