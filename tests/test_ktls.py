"""kTLS detection: what the startup line says is missing."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from hubproxy.net.ktls import describe_ktls, ktls_clause, ktls_offered


@pytest.mark.parametrize(
    ("python", "option", "ulps", "said"),
    [
        (
            (3, 11),
            False,
            "mptcp",
            "kTLS off: Python 3.11 has no ssl.OP_ENABLE_KTLS (3.12 or later); "
            "the kernel's tls module is not loaded (modprobe tls)",
        ),
        (
            (3, 12),
            True,
            "mptcp\n",
            "kTLS off: the kernel's tls module is not loaded (modprobe tls)",
        ),
        (
            (3, 12),
            True,
            None,
            "kTLS off: /proc/sys/net/ipv4/tcp_available_ulp is unreadable",
        ),
        (
            (3, 13),
            True,
            "espintcp mptcp tls\n",
            "kTLS off: this machine offers it (--ktls turns it on)",
        ),
        (
            (3, 11),
            False,
            "tlsx",  # a token, not a substring
            "kTLS off: Python 3.11 has no ssl.OP_ENABLE_KTLS (3.12 or later); "
            "the kernel's tls module is not loaded (modprobe tls)",
        ),
    ],
)
def test_describe_ktls_names_what_is_missing(
    python: tuple[int, int], option: bool, ulps: str | None, said: str
) -> None:
    assert describe_ktls(python, option, ulps) == said


@pytest.mark.parametrize(
    ("ulps", "said"),
    [
        (
            "tls\n",
            "kTLS on for clients where the kernel takes a connection's cipher (hits: sendfile)",
        ),
        (
            "mptcp\n",
            "kTLS off despite --ktls: the kernel's tls module is not loaded (modprobe tls)",
        ),
    ],
)
def test_asked_for_ktls_says_on_or_why_not(ulps: str, said: str) -> None:
    assert describe_ktls((3, 12), True, ulps, asked=True) == said


def test_ktls_clause_reads_the_kernels_list(tmp_path: Path) -> None:
    listing = tmp_path / "tcp_available_ulp"
    listing.write_text("tls mptcp\n")
    assert "tls module" not in ktls_clause(listing)
    assert "unreadable" in ktls_clause(tmp_path / "missing")
    assert ktls_offered(listing) == hasattr(ssl, "OP_ENABLE_KTLS")
    assert not ktls_offered(tmp_path / "missing")
