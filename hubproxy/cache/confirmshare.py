"""Access confirmations passed on between the workers of ``--workers N``.

A manifest served on a confirmation passes it on to what it names (``policy.cachepolicy``:
``vouched_paths``), so that the rest of a pull asks the upstream nothing more. The kernel spreads
a client's connections over the workers, though, and each keeps its confirmations in memory: a
layer asked for on another worker than its manifest's would ask the upstream again. So each
confirmation passed on in one worker is sent to every other one, as a datagram to its Unix socket
in the run directory (``confirm-N.sock``; the directory is the supervisor's private one), and
there kept until the same moment (the seconds it has left, not a clock time: trio's clocks are
per process).

Sent before the manifest's answer goes to the client, a datagram is in the other workers' sockets
before that client can ask for a layer; taken in as soon as their event loop looks. Best effort:
a worker that is down or behind (its socket's buffer full) misses it, and asks the upstream as it
would have.

Blob verifications go the same way. Each worker hashes a cached blob on its first read of it,
and again once the file's identity changed (``cache.store``); so without them a blob filled by
one worker was hashed again by every other (0.6 CPU-seconds per GiB), and each move of a served
blob's mtime by one worker (the shared recency, every minute at most: ``cache.claims``) had the
others hash it again on their next read. A worker that hashed a file to its digest, or moved the
mtime of one it had, sends the file's identity and the verification's age; the others keep it
only for the very file they find at that path (``BlobStore.keep_verified``).

Nothing else goes this way, and what arrives is parsed strictly (``decode_shared``,
``decode_verified``): a line that is neither a live confirmation nor a verification is dropped.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterable
from pathlib import Path

import trio

from ..policy.cachepolicy import (
    ConfirmationKey,
    IdentityFields,
    decode_shared,
    decode_verified,
    encode_shared,
    encode_verified,
)

# bytes per datagram: about 60 confirmations of about 200 bytes (an image's layers, an index's
# manifests); more go in several. Far below a Unix datagram's limit (net.core.wmem_default).
DATAGRAM = 16 * 1024


def _socket_path(run_dir: Path, index: int) -> Path:
    return run_dir / f"confirm-{index}.sock"


class ConfirmationShare:
    """One worker's end: :meth:`send` to the others, :meth:`receive` theirs."""

    def __init__(self, run_dir: Path, index: int, workers: int) -> None:
        self.index = index
        self._peers = [str(_socket_path(run_dir, i)) for i in range(workers) if i != index]
        self._path = _socket_path(run_dir, index)
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()  # a dead predecessor's (a worker started again)
        self._inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._inbox.bind(str(self._path))
        except OSError:
            self._inbox.close()
            raise
        self._inbox.setblocking(False)
        self._outbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._outbox.setblocking(False)
        self.sent = 0  # confirmations sent to each other worker (metrics)
        self.received = 0  # confirmations taken in from the others

    def send(self, entries: Iterable[tuple[ConfirmationKey, float]]) -> None:
        """Send confirmations with their seconds left to every other worker, without waiting:
        one that cannot take them now (down, or its buffer full) goes without."""
        data = encode_shared(entries)
        count = data.count(b"\n")
        while data:
            cut = data.rfind(b"\n", 0, DATAGRAM) + 1 if len(data) > DATAGRAM else len(data)
            if cut <= 0:
                return  # a line longer than a datagram: not a confirmation this sends
            for peer in self._peers:
                with contextlib.suppress(OSError):  # ENOENT, ECONNREFUSED, EAGAIN
                    self._outbox.sendto(data[:cut], peer)
            data = data[cut:]
        self.sent += count

    def send_verified(self, hexdigest: str, identity: IdentityFields, age: float) -> None:
        """Send a blob verification (see the module doc) to every other worker, without
        waiting: one that cannot take it now goes without, and hashes the blob itself."""
        data = encode_verified(hexdigest, identity, age)
        for peer in self._peers:
            with contextlib.suppress(OSError):  # ENOENT, ECONNREFUSED, EAGAIN
                self._outbox.sendto(data, peer)

    async def receive(
        self,
        keep: Callable[[ConfirmationKey, float], None],
        keep_verified: Callable[[str, IdentityFields, float], None],
    ) -> None:
        """Take in the other workers' confirmations (``keep(key, seconds_left)``) and blob
        verifications (``keep_verified(hexdigest, identity, age)``), until cancelled."""
        inbox = trio.socket.from_stdlib_socket(self._inbox)
        while True:
            data = await inbox.recv(DATAGRAM)
            for line in data.split(b"\n"):
                if line.startswith(b"V "):
                    verified = decode_verified(line)
                    if verified is not None:
                        keep_verified(*verified)
                    continue
                shared = decode_shared(line)
                if shared is not None:
                    keep(*shared)
                    self.received += 1

    def close(self) -> None:
        self._inbox.close()
        self._outbox.close()
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()
