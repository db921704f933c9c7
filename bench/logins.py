"""Login timing and flooding (issue 12, case 8), measured against a running ``python -m hubproxy``.

    python -m bench.logins [--source DIR] [--flood 300] [--rounds 3] [--samples 30]
                           [--hubproxy-arg=--login-failures=0 ...]

Starts hubproxy (from ``--source``, default this checkout: give an older checkout's directory
to measure "before") on plain HTTP with a users file, its upstream a closed port, and measures
at its token endpoint:

* the answer time of a wrong password for an unknown user name and for a known one (each from
  its own address in 127.0.0.0/8, so no per-address throttle is involved), median and p90;
* the time of a valid first login from 127.0.0.1 while ``--flood`` wrong-password requests from
  127.0.0.2 (over 100 keep-alive connections) are under way, and what the flood was answered.

The valid login's status is not 200 (the upstream is a closed port: the token request fails
after the login check), but its time is the check's plus a refused connect. Prints one line
per figure; nothing is asserted.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import statistics
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from pathlib import Path

import h11
import trio

from bench import procs
from hubproxy.policy.passwords import hash_password

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKEN = "/token/0?" + urllib.parse.urlencode(
    {"service": "registry.docker.io", "scope": "repository:library/alpine:pull"}
)
FLOOD_CONNECTIONS = 100


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


class Client:
    """One keep-alive HTTP/1.1 connection from a chosen source address."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, source: str, port: int) -> Client:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
        return cls(trio.SocketStream(sock))

    async def get(self, target: str, authorization: bytes) -> int:
        """Send one GET and read its whole answer: the status (0: the connection closed)."""
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        headers = [(b"host", b"mirror"), (b"authorization", authorization)]
        data = self.conn.send(h11.Request(method="GET", target=target, headers=headers))
        await self.stream.send_all(data + (self.conn.send(h11.EndOfMessage()) or b""))
        status = 0
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return status

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def one_request(source: str, port: int, authorization: bytes) -> tuple[float, int]:
    client = await Client.connect(source, port)
    try:
        began = time.perf_counter()
        status = await client.get(TOKEN, authorization)
        return (time.perf_counter() - began) * 1000, status
    finally:
        await client.aclose()


async def name_timing(port: int, samples: int) -> None:
    unknown: list[float] = []
    known: list[float] = []
    for i in range(samples):  # interleaved, each from an address of its own
        ms, _ = await one_request(f"127.0.1.{10 + i}", port, basic(f"nobody{i}", "wrong"))
        unknown.append(ms)
        ms, _ = await one_request(f"127.0.2.{10 + i}", port, basic("user0", "wrong"))
        known.append(ms)
    for label, values in (("unknown name", unknown), ("known name, wrong password", known)):
        p90 = statistics.quantiles(values, n=10)[-1]
        print(f"{label}: median {statistics.median(values):.1f} ms, p90 {p90:.1f} ms")


async def flood_round(port: int, flood: int, user: str) -> None:
    statuses: Counter[int] = Counter()
    started = trio.Event()
    sent = 0
    per_connection = -(-flood // FLOOD_CONNECTIONS)

    async def flooder(count: int) -> None:
        nonlocal sent
        try:
            client = await Client.connect("127.0.0.2", port)
        except OSError:
            statuses[-1] += count
            return
        try:
            for _ in range(count):
                sent += 1
                if sent >= FLOOD_CONNECTIONS:
                    started.set()
                try:
                    statuses[await client.get(TOKEN, basic(user, "wrong"))] += 1
                except (trio.BrokenResourceError, h11.ProtocolError):
                    statuses[0] += 1
                    return
        finally:
            await client.aclose()

    if flood == 0:
        started.set()
    began = time.perf_counter()
    async with trio.open_nursery() as nursery:
        left = flood
        while left > 0:
            nursery.start_soon(flooder, min(per_connection, left))
            left -= per_connection
        await started.wait()  # every flood connection has its first request in
        ms, status = await one_request("127.0.0.1", port, basic(user, "pw"))
        print(f"valid first login of {user} during the flood: {ms:.0f} ms (status {status})")
    flood_s = time.perf_counter() - began
    answers = ", ".join(
        f"{count}x {status or 'closed'}" for status, count in sorted(statuses.items())
    )
    print(f"  flood of {flood} wrong passwords from 127.0.0.2: {answers}; over in {flood_s:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.logins", description=__doc__)
    parser.add_argument("--source", type=Path, default=REPO_ROOT, help="hubproxy checkout")
    parser.add_argument("--flood", type=int, default=300, help="wrong passwords in the flood")
    parser.add_argument("--rounds", type=int, default=3, help="flood rounds")
    parser.add_argument("--samples", type=int, default=30, help="requests per name timing")
    parser.add_argument(
        "--hubproxy-arg", action="append", default=[], help="one more hubproxy argument"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        users = root / "users"
        users.write_text(
            "".join(f"user{i}:{hash_password('pw')}\n" for i in range(args.rounds + 1))
        )
        users.chmod(0o600)
        port, dead = procs.free_port(), procs.free_port()
        argv_ = [
            sys.executable,
            "-m",
            "hubproxy",
            "--listen",
            f"127.0.0.1:{port}",
            "--users",
            str(users),
            "--upstream",
            f"http://127.0.0.1:{dead}",
            "--no-cache",
            "--log-level",
            "error",
            *args.hubproxy_arg,
        ]
        started = procs.start("hubproxy", argv_, root / "hubproxy.log", stack, cwd=args.source)
        procs.wait_listening(started, [port])
        print(f"hubproxy from {args.source}")
        trio.run(name_timing, port, args.samples)
        for round_ in range(args.rounds):
            trio.run(flood_round, port, args.flood, f"user{round_ + 1}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
