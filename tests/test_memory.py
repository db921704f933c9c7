"""Freed heap pages go back to the system every ten seconds (ops/memory.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from hubproxy.ops.memory import TRIM_INTERVAL, find_malloc_trim, give_back_memory, machine_memory

MiB = 1024 * 1024
PHYSICAL = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cgroups(tmp_path: Path, membership: str, limits: dict[str, str]) -> tuple[str, str]:
    """A fake ``/proc/self/cgroup`` and ``/sys/fs/cgroup`` tree: ``limits`` maps a file's path
    under the root to its text."""
    proc = tmp_path / "cgroup"
    proc.write_text(membership)
    root = tmp_path / "sys"
    for path, text in limits.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text + "\n")
    return str(proc), str(root)


@pytest.mark.parametrize(
    ("membership", "limits", "memory"),
    [
        # cgroup v2, a container of 256 MiB (its own namespace: the root is its cgroup)
        ("0::/\n", {"memory.max": str(256 * MiB)}, 256 * MiB),
        # v2, a systemd unit with MemoryMax= under a slice without one
        (
            "0::/system.slice/hubproxy.service\n",
            {
                "system.slice/memory.max": "max",
                "system.slice/hubproxy.service/memory.max": str(512 * MiB),
            },
            512 * MiB,
        ),
        # v2, the slice above is the tighter one
        (
            "0::/a/b\n",
            {"a/memory.max": str(300 * MiB), "a/b/memory.max": str(900 * MiB)},
            300 * MiB,
        ),
        # v2, no limit anywhere: the machine's
        ("0::/a\n", {"a/memory.max": "max"}, PHYSICAL),
        # cgroup v1: the memory controller's hierarchy; its "no limit" is a huge number
        (
            "4:memory:/docker/abc\n3:cpu:/docker/abc\n",
            {"memory/docker/abc/memory.limit_in_bytes": str(128 * MiB)},
            128 * MiB,
        ),
        ("4:memory:/\n", {"memory/memory.limit_in_bytes": str(2**63 - 4096)}, PHYSICAL),
        # nothing readable: the machine's
        ("0::/gone\n", {}, PHYSICAL),
    ],
)
def test_machine_memory_is_the_tightest_of_the_machine_and_its_cgroups(
    tmp_path: Path, membership: str, limits: dict[str, str], memory: int
) -> None:
    proc, root = cgroups(tmp_path, membership, limits)
    assert machine_memory(proc, root) == min(memory, PHYSICAL)


def test_machine_memory_without_cgroup_files_is_the_machines(tmp_path: Path) -> None:
    assert machine_memory(str(tmp_path / "none"), str(tmp_path)) == PHYSICAL


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_glibc_has_malloc_trim_and_it_runs() -> None:
    trim = find_malloc_trim()
    assert trim is not None  # the Debian and Alpine-free systems hubproxy is built on
    assert trim() in (0, 1)  # 1: memory was released, 0: there was none to release


async def test_trims_once_per_interval(autojump_clock: trio.testing.MockClock) -> None:
    calls: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(give_back_memory, lambda: calls.append(trio.current_time()))
        await trio.sleep(TRIM_INTERVAL * 3 + 1)
        nursery.cancel_scope.cancel()
    assert calls == [TRIM_INTERVAL, TRIM_INTERVAL * 2, TRIM_INTERVAL * 3]
