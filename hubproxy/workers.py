"""``--workers N``: a supervisor process and N worker processes on one listening port.

Theory of operation. The ``hubproxy`` the user started becomes the supervisor: it binds the
listening address with ``SO_REUSEPORT`` without listening (the port is reserved, an ephemeral
port ``:0`` is resolved once, and a port in use fails the start with the usual line), prepares
the cache directory once (what a single process does at start: the crash leftovers in ``tmp/``
swept, the bound applied, the manifest database created), and starts N workers. A worker is
``python -m hubproxy`` with the very same arguments and ``HUBPROXY_WORKER`` in its environment
(its index, the port, the run directory and its end of a socket pair): it reads and checks the
same configuration a single process would, binds the same port with ``SO_REUSEPORT`` and
listens, so the kernel spreads new connections over the workers (and a worker holding more than
its share of them sheds some: ``policy.balance``). A subprocess rather than a
``multiprocessing`` child: nothing to pickle, no fork of a running trio loop, no resource
tracker, and a worker is exactly the program a single process is, plus four hooks.

The socket pair carries the keys every worker must share (64 bytes, first thing: the key that
seals mirror tokens and the one that stamps mirror users, so a token one worker issued opens in
every other), then one line from the worker ("ready", once it serves). When the supervisor
dies, even by SIGKILL, each worker reads end-of-file and stops as after a SIGTERM. The
supervisor passes SIGHUP (reload) and SIGTERM to every worker; SIGINT becomes SIGTERM (workers
ignore SIGINT itself, which a terminal sends to the whole process group: each worker must hear
one stop, not two, since a second one means "stop now"). A worker that
dies unexpectedly is started again, with one line saying so; one that dies within
``STABLE_AFTER`` seconds of its start waits before its next start, twice as long each time up
to ``MAX_BACKOFF`` (a crash loop costs a line every 30 seconds, not a core). A worker that
fails before its first "ready" (the certificate, the cache directory) stops the whole start.

The run directory (a private temporary directory) holds each worker's metrics socket, the
counters of workers that died, the board of each worker's count of client connections
(``net.board``), each worker's socket for the access confirmations the others pass on
(``cache.confirmshare``), and nothing else; the supervisor deletes it on exit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import trio

from .cache.claims import sweep_owner
from .cache.manifests import ManifestStore
from .cache.store import BlobStore
from .config import Config
from .net.board import clear_slot, create_board
from .net.server import bind_shared
from .ops.workermetrics import retire

log = logging.getLogger("hubproxy")

WORKER_ENV = "HUBPROXY_WORKER"
STABLE_AFTER = 10.0  # seconds: a worker that lived this long died of something other than start
MAX_BACKOFF = 30.0  # seconds between two starts of a worker that keeps dying at once
READY = b"ready\n"
KEYS = 64  # bytes: the token sealing key, then the users' stamp key


class WorkersError(Exception):
    """The workers could not be started; the message says why (the workers logged details)."""


@dataclass(frozen=True)
class WorkerRole:
    """What a worker process is told by its supervisor (in ``HUBPROXY_WORKER``)."""

    index: int
    count: int
    port: int  # the listening port, resolved by the supervisor (``--listen HOST:0`` too)
    run_dir: Path
    control_fd: int  # the worker's end of its socket pair with the supervisor

    def encode(self) -> str:
        return json.dumps(
            {
                "index": self.index,
                "count": self.count,
                "port": self.port,
                "run_dir": str(self.run_dir),
                "fd": self.control_fd,
            }
        )

    @classmethod
    def from_environment(cls) -> WorkerRole | None:
        """This process's role, if a supervisor started it (else None: a single process)."""
        text = os.environ.get(WORKER_ENV)
        if not text:
            return None
        fields = json.loads(text)
        return cls(
            int(fields["index"]),
            int(fields["count"]),
            int(fields["port"]),
            Path(fields["run_dir"]),
            int(fields["fd"]),
        )


def prepare_cache(config: Config) -> None:
    """What a single process does to the cache directory at start, done once before the
    workers share it (raises OSError)."""
    if config.cache_dir is None:
        return
    root = Path(config.cache_dir)
    BlobStore(root, config.cache_size).open()  # tmp/ swept, the bound applied
    manifests = ManifestStore(
        root, max_bytes=config.manifest_cache_size, max_entries=config.manifest_cache_entries
    )
    manifests.open()  # created, or a damaged one set aside: once, not by N workers at once
    manifests.close()


def reserve_port(config: Config) -> tuple[list[socket.socket], int]:
    """Bind (not listen) the listening address with SO_REUSEPORT: the sockets, held while the
    workers run, and the port (an ephemeral one resolved). Raises OSError."""
    sockets = bind_shared(config.listen_host, config.listen_port, listen=False)
    port = int(sockets[0].getsockname()[1])
    if config.listen_port == 0 and len(sockets) > 1:  # every address on the same port
        for sock in sockets:
            sock.close()
        sockets = bind_shared(config.listen_host, port, listen=False)
    return sockets, port


@dataclass
class _Slot:
    index: int
    process: trio.Process | None = None
    control: trio.socket.SocketType | None = None
    started_at: float = 0.0
    backoff: float = 0.0
    ready: bool = False


class Supervisor:
    """N workers kept running, told of signals, started again when they die."""

    def __init__(self, config: Config, argv: list[str], port: int, run_dir: Path) -> None:
        self.config = config
        self.argv = argv
        self.port = port
        self.run_dir = run_dir
        self.slots = [_Slot(i) for i in range(config.workers)]
        self.stopping = False
        self.stop = trio.Event()  # set with ``stopping``: ends a wait before a restart
        self.all_ready = False
        self.failed: str | None = None
        self.keys = secrets.token_bytes(KEYS)  # for every worker, restarted ones too

    async def run(self) -> None:
        """Run the workers until a stop signal, then until each has stopped. Raises
        WorkersError if one fails before all were ready."""
        async with trio.open_nursery() as signals:
            signals.start_soon(self._signals)
            async with trio.open_nursery() as slots:
                for slot in self.slots:
                    slots.start_soon(self._keep, slot)
            signals.cancel_scope.cancel()
        if self.failed is not None:
            raise WorkersError(self.failed)

    def _send(self, signum: int) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(signum)

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: passed to %d workers", len(self.slots))
                    self._send(signal.SIGHUP)
                    continue
                if not self.stopping:
                    self.stopping = True
                    self.stop.set()
                    log.info(
                        "%s: stopping %d workers", signal.Signals(signum).name, len(self.slots)
                    )
                self._send(signal.SIGTERM)  # a second one: the workers stop now

    async def _start(self, slot: _Slot) -> None:
        ours, theirs = socket.socketpair()
        role = WorkerRole(slot.index, len(self.slots), self.port, self.run_dir, theirs.fileno())
        env = dict(os.environ, **{WORKER_ENV: role.encode()})
        try:
            slot.process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "hubproxy", *self.argv],
                env=env,
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()
        slot.control = trio.socket.from_stdlib_socket(ours)
        await slot.control.send(self.keys)  # into the socket's buffer: never waits
        slot.started_at = trio.current_time()
        slot.ready = False

    async def _keep(self, slot: _Slot) -> None:
        """Start the slot's worker, and again each time it dies, until stopping."""
        while not self.stopping:
            await self._start(slot)
            process, control = slot.process, slot.control
            assert process is not None and control is not None
            with control:
                async with trio.open_nursery() as watching:
                    watching.start_soon(self._await_ready, slot, control)
                    status = await process.wait()
                    watching.cancel_scope.cancel()
            retire(self.run_dir, slot.index)
            clear_slot(self.run_dir, slot.index)
            if self.config.cache_dir is not None:
                sweep_owner(Path(self.config.cache_dir) / "tmp", process.pid)
            if self.stopping:
                return
            if not self.all_ready:
                self.failed = f"worker {slot.index} {_death(status)} while starting"
                self.stopping = True
                self.stop.set()
                self._send(signal.SIGTERM)
                return
            lived = trio.current_time() - slot.started_at
            slot.backoff = (
                0.0 if lived >= STABLE_AFTER else min(MAX_BACKOFF, max(1.0, slot.backoff * 2))
            )
            log.warning(
                "worker %d (pid %d) %s after %.0fs; starting it again%s",
                slot.index,
                process.pid,
                _death(status),
                lived,
                f" in {slot.backoff:g}s" if slot.backoff else "",
            )
            with trio.move_on_after(slot.backoff):
                await self.stop.wait()

    async def _await_ready(self, slot: _Slot, control: trio.socket.SocketType) -> None:
        data = b""
        while not data.endswith(b"\n"):
            chunk = await control.recv(64)
            if not chunk:
                return
            data += chunk
        if data == READY:
            slot.ready = True
            if not self.all_ready and all(s.ready for s in self.slots):
                self.all_ready = True
                log.info(
                    "%d workers serving on port %d (pids %s)",
                    len(self.slots),
                    self.port,
                    ", ".join(str(s.process.pid) for s in self.slots if s.process),
                )


def _death(status: int) -> str:
    if status < 0:
        return f"was killed by {signal.Signals(-status).name}"
    return f"exited with status {status}"


def supervise(config: Config, argv: list[str], port: int) -> None:
    """Run ``config.workers`` workers on ``port`` (reserved by :func:`reserve_port`) until
    SIGTERM/SIGINT, blocking. Raises WorkersError if they could not all start."""
    run_dir = Path(tempfile.mkdtemp(prefix="hubproxy-workers-"))
    try:
        create_board(run_dir, config.workers)
        trio.run(Supervisor(config, argv, port, run_dir).run)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


# -- the worker's side ---------------------------------------------------------------------------


def receive_keys(role: WorkerRole) -> bytes:
    """The keys the supervisor sends first (blocking: before the event loop starts)."""
    with socket.socket(fileno=os.dup(role.control_fd)) as control:
        keys = b""
        while len(keys) < KEYS:
            chunk = control.recv(KEYS - len(keys))
            if not chunk:
                raise WorkersError("the supervisor is gone")
            keys += chunk
    return keys


async def report_ready(role: WorkerRole) -> None:
    """Tell the supervisor this worker serves."""
    sock = socket.socket(fileno=os.dup(role.control_fd))
    with trio.socket.from_stdlib_socket(sock) as control:
        await control.send(READY)


async def await_supervisor_gone(role: WorkerRole) -> None:
    """Return when the supervisor is gone (its end of the socket pair closed)."""
    sock = socket.socket(fileno=os.dup(role.control_fd))
    with trio.socket.from_stdlib_socket(sock) as control:
        while await control.recv(64):
            pass
