"""The connection board of ``--workers N``: how many client connections each worker holds.

A file of N 8-byte counts in the workers' run directory, mapped into every worker's memory:
each worker writes its own slot when it starts serving and whenever a connection opens or
closes, and reads all of them when it decides whether it holds more than its share
(``policy.balance``). An aligned 8-byte store is seen whole by the other processes; a count a
moment old is good enough for a share. The supervisor creates the file, every slot ``NOT_SERVING``,
and marks a dead worker's slot so again (it takes no share while it is down: no connection can
land on it).
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

BOARD = "connections"  # the file's name in the run directory
_SLOT = struct.Struct("<q")
NOT_SERVING = -1  # the slot of a worker not started yet, or dead


def create_board(run_dir: Path, workers: int) -> None:
    """The supervisor's part: a board of ``workers`` slots, none serving yet."""
    (run_dir / BOARD).write_bytes(_SLOT.pack(NOT_SERVING) * workers)


def clear_slot(run_dir: Path, index: int) -> None:
    """The supervisor's part: worker ``index`` died; it serves no connection."""
    try:
        fd = os.open(run_dir / BOARD, os.O_WRONLY)
    except FileNotFoundError:
        return
    try:
        os.pwrite(fd, _SLOT.pack(NOT_SERVING), index * _SLOT.size)
    finally:
        os.close(fd)


class ConnectionBoard:
    """One worker's view of the board: its own slot to write, everyone's to read."""

    def __init__(self, run_dir: Path, index: int, workers: int) -> None:
        self.index = index
        fd = os.open(run_dir / BOARD, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, _SLOT.size * workers)
        finally:
            os.close(fd)

    def publish(self, connections: int) -> None:
        _SLOT.pack_into(self._map, self.index * _SLOT.size, connections)

    def counts(self) -> list[int]:
        return [count for (count,) in _SLOT.iter_unpack(self._map)]
