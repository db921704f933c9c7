"""Processes we start, and what /proc says about them.

Every process is started in its own session (so its process group is its pid and nginx workers
go with their master), with output into a log file, and registered on an ``ExitStack`` that
stops it (SIGTERM to the group, then SIGKILL after a bounded wait). CPU is each process's CPU
clock (all its threads, in nanoseconds: what ``clock_getcpuclockid`` gives), summed over the
process and its children (nginx master + workers); ``utime + stime`` from ``/proc/PID/stat``
counts 10 ms ticks, as coarse as a tenth of a 64 MiB transfer's CPU. Peak RSS is
``VmHWM`` from ``/proc/PID/status`` summed the same way, reset before each run by writing ``5`` to
``/proc/PID/clear_refs``. The descendants are found by a scan of ``/proc`` (every ``ppid``), so a
process that forks workers (nginx, ``hubproxy --workers``) is measured whole. A process may be
started pinned to some CPUs (``sched_setaffinity`` before ``exec``, as ``taskset -c`` does); its
children inherit the mask.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
STOP_TIMEOUT = 10.0
# CPU seconds below which a process group counts as idle over ``wait_quiet``'s window: an idle
# hubproxy's timers wake it for a few microseconds now and then (the CPU clock counts them)
QUIET_CPU = 0.002


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    utime: int
    stime: int

    @property
    def cpu_ticks(self) -> int:
        return self.utime + self.stime


def parse_stat(text: str) -> ProcStat:
    """Parse one ``/proc/PID/stat`` line. The command name may hold spaces and parentheses, so
    the fields are counted from the last ``)``: state is field 3, ppid 4, utime 14, stime 15."""
    head, _, rest = text.rpartition(")")
    pid = int(head.split("(", 1)[0])
    fields = rest.split()
    return ProcStat(pid=pid, ppid=int(fields[1]), utime=int(fields[11]), stime=int(fields[12]))


def parse_vmhwm_kb(status_text: str, field: str = "VmHWM") -> int:
    """``VmHWM`` (peak resident set; or another ``field`` such as ``VmRSS``) in kB from
    ``/proc/PID/status``; 0 for kernel threads."""
    for line in status_text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _read(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def read_stat(pid: int) -> ProcStat | None:
    text = _read(f"/proc/{pid}/stat")
    return parse_stat(text) if text else None


def group_pids(root: int) -> list[int]:
    """``root`` and its descendants (nginx: the master and its workers)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = read_stat(int(entry))
            if stat:
                parents[stat.pid] = stat.ppid
    found = [root]
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found.extend(children)
        frontier.extend(children)
    return found


def process_clock(pid: int) -> int:
    """The clock id of ``pid``'s CPU time, all its threads, as glibc's ``clock_getcpuclockid``
    makes it (Linux's ABI: the pid inverted, shifted by 3, ``CPUCLOCK_SCHED``; Python has no
    binding for it)."""
    return ((~pid) << 3) | 2


def cpu_seconds(pids: Sequence[int]) -> float:
    """The CPU time used so far by ``pids`` together (a process gone counts 0)."""
    total = 0.0
    for pid in pids:
        try:
            total += time.clock_gettime(process_clock(pid))
        except OSError:  # gone (EINVAL), or no such clock here: its ticks, if it is still there
            stat = read_stat(pid)
            if stat:
                total += stat.cpu_ticks / CLK_TCK
    return total


def peak_rss_kb(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        text = _read(f"/proc/{pid}/status")
        if text:
            total += parse_vmhwm_kb(text)
    return total


def rss_kb(pids: Sequence[int]) -> int:
    """The resident set now (``VmRSS``), summed over ``pids``."""
    total = 0
    for pid in pids:
        text = _read(f"/proc/{pid}/status")
        if text:
            total += parse_vmhwm_kb(text, "VmRSS")
    return total


def reset_peak_rss(pids: Sequence[int]) -> bool:
    """Reset ``VmHWM`` to the current RSS; False if the kernel refused (not our process)."""
    ok = True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            ok = False
    return ok


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Started:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def pids(self) -> list[int]:
        return group_pids(self.process.pid)


def start(
    name: str,
    argv: Sequence[str],
    log: Path,
    stack: contextlib.ExitStack,
    cwd: Path | None = None,
    cpus: set[int] | None = None,
) -> Started:
    """Start ``argv`` in a new session, output to ``log``, on ``cpus`` only if given (the
    whole process tree: the mask is inherited); ``stack`` stops it on exit."""

    def pin() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    with log.open("ab") as out:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=cwd,
            preexec_fn=pin if cpus is not None else None,
        )
    started = Started(name, process, log)
    stack.callback(stop, started)
    return started


def stop(started: Started, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM to the process group, SIGKILL to it if still there after ``timeout``."""
    process = started.process
    if process.poll() is not None:
        _kill_group(process.pid, signal.SIGKILL)  # orphaned children, if any
        return
    _kill_group(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)
    _kill_group(process.pid, signal.SIGKILL)


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def wait_listening(started: Started, ports: Sequence[int], timeout: float = 15.0) -> None:
    """Poll-connect each port until it accepts, the process exits, or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            if started.process.poll() is not None:
                raise RuntimeError(
                    f"{started.name} exited with {started.process.returncode} before listening "
                    f"on {port}:\n{tail(started.log)}"
                )
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{started.name} did not listen on {port} within {timeout:g}s:\n"
                        f"{tail(started.log)}"
                    ) from None
                time.sleep(0.05)


def wait_quiet(
    started: Started, quiet: float = 0.3, timeout: float = 10.0, step: float = 0.05
) -> bool:
    """Wait until ``started``'s process group used no CPU for ``quiet`` seconds (its start-up
    work done: hubproxy checks its upstreams in the background once it listens), at most
    ``timeout``; whether it went quiet. A run measured right after a restart would otherwise
    count that work as the run's."""
    deadline = time.monotonic() + timeout
    last = cpu_seconds(group_pids(started.process.pid))
    still_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(step)
        now = cpu_seconds(group_pids(started.process.pid))
        if now - last >= QUIET_CPU:
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= quiet:
            return True
    return False


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])
