"""Sizes in settings and log lines: ``20G`` read as people mean it, bytes shown as people read them.

A size setting needs a unit. A bare ``20`` used to mean 20 bytes, which made ``--cache-size 20``
a cache of nothing that deleted every cached blob at start; no one means bytes there, so a bare
number is refused with a line that says how to write it. Both unit families are read as their
standards define them: ``GB``, ``MB`` are decimal (10^9, 10^6 bytes: what disks are sold in),
``GiB``, ``MiB`` (and Kubernetes' ``Gi``, ``Mi``) binary. The short ``G``, ``M``, ``K``, ``T``
are binary, as in docker (``--memory 512m``, ``--shm-size``) and this program's defaults.

Plain functions over text and integers: no I/O.
"""

from __future__ import annotations

import re
from fractions import Fraction

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# the smallest size a size setting takes: less is a mistake (a missing unit, ``20B``)
MIN_SIZE = MiB

_UNITS = {
    "B": 1,
    **{
        prefix + tail: 1 << (10 * power)
        for power, prefix in enumerate("KMGT", 1)
        for tail in ("", "I", "IB")
    },
    **{prefix + "B": 1000**power for power, prefix in enumerate("KMGT", 1)},
}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)")
_BINARY_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
_DECIMAL_UNITS = ((10**12, "TB"), (10**9, "GB"), (10**6, "MB"))


class SizeTooSmall(ValueError):
    """A size below the setting's minimum (zero included): the caller may add how to turn the
    thing off instead."""


def parse_size(text: str, minimum: int = MIN_SIZE) -> int:
    """Bytes meant by ``20G``, ``20GiB``, ``20GB``, ``1.5T``, ``500 MB``; ValueError (its message
    follows ``--flag: ``) for a bare number, an unknown unit, or less than ``minimum``."""
    match = _SIZE.fullmatch(text.strip())
    if match is None or (match[2] and match[2].upper() not in _UNITS):
        raise ValueError(f"not a size: {text!r} (try 500M or 20G)")
    number, unit = Fraction(match[1]), match[2].upper()
    if not unit and number != 0:  # a bare 0 is too small in any unit: say that instead
        n = match[1]
        raise ValueError(
            f"{text!r} has no unit: write {n}G or {n}GiB for {n} x 2^30 bytes, "
            f"{n}GB for {n} x 10^9 bytes (M, MB, T, TB likewise; B for bytes)"
        )
    size = int(number * _UNITS[unit or "B"])
    if size < minimum:
        raise SizeTooSmall(f"{text!r} is less than {format_size(minimum)}")
    return size


def format_size(size: int) -> str:
    """A byte count for people: ``677 B``, ``7.9 MiB``, ``18.6 GiB``, ``64 MiB``, ``410 KiB``
    (binary units, three significant digits, none after the point when it would read .0)."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in _BINARY_UNITS:
        value /= 1024
        # round first, then decide: 1023.7 KiB reads better as "1.0 MiB" than as "1024 KiB"
        if value < 1023.5 or unit == _BINARY_UNITS[-1]:
            shown = f"{value:.1f}" if value < 99.95 else f"{value:.0f}"
            return f"{shown.removesuffix('.0')} {unit}"
    raise AssertionError("unreachable")


def describe_size(size: int) -> str:
    """A configured size as it was most likely written: ``20 GiB``, ``1.5 GiB``, and a whole
    number of decimal units with its binary value, ``20 GB (18.6 GiB)``, so that the startup line
    shows which way a setting was read."""
    for unit_size, unit in _DECIMAL_UNITS:
        if size % unit_size == 0 and size % MiB != 0:
            return f"{size // unit_size} {unit} ({format_size(size)})"
    return format_size(size)


_PULL_UNITS = ("kB", "MB", "GB", "TB")


def format_decimal_size(size: int) -> str:
    """A byte count as ``docker pull`` shows one: decimal units, one decimal (``3.5 MB``)."""
    if size < 1000:
        return f"{size} B"
    value = float(size)
    for unit in _PULL_UNITS:
        value /= 1000
        if value < 999.95 or unit == _PULL_UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")
