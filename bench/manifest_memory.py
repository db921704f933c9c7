"""Peak RSS of a mirror whose clients ask for large manifests and never read the answer.

Runs ``python -m hubproxy`` (plain HTTP, cache on) in front of the fake Docker Hub of the tests,
then opens N connections (64 KiB receive buffers, as a hostile client would set them) that each
send one manifest GET and read nothing. Reports the mirror's resident set (VmRSS) at its highest
while they hang, and VmHWM, in MiB. Modes: ``hit`` (one cached ~4 MiB manifest), ``miss-same``
(one uncached ~4 MiB manifest), ``miss-distinct`` (N different uncached ~4 MiB manifests).

    python -m bench.manifest_memory [--connections 100] [--mode hit|miss-same|miss-distinct]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import trio
import trustme

from tests.fakehub import MEDIA_DOCKER_MANIFEST, FakeHub
from tests.registry_client import RegistryClient

SIZE = 4 * 1024 * 1024 - 4096  # just under the 4 MiB a registry allows a manifest
ACCEPT = MEDIA_DOCKER_MANIFEST


def big_manifest(i: int) -> str:
    doc = {
        "schemaVersion": 2,
        "mediaType": MEDIA_DOCKER_MANIFEST,
        "config": {
            "mediaType": "application/octet-stream",
            "size": 2,
            "digest": "sha256:" + "0" * 64,
        },
        "layers": [],
        "annotations": {"n": str(i), "pad": "x" * (SIZE - 400)},
    }
    return json.dumps(doc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) // 1024  # MiB
    return out


async def hang(port: int, path: str, token: str) -> trio.socket.SocketType:
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    await sock.connect(("127.0.0.1", port))
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: {ACCEPT}\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    ).encode()
    await sock.send(request)
    return sock


async def run(mode: str, connections: int) -> None:
    ca = trustme.CA()
    hub = FakeHub(ca)
    distinct = connections if mode == "miss-distinct" else 1
    for i in range(distinct):
        hub._put_manifest("library/big", f"t{i}", MEDIA_DOCKER_MANIFEST, big_manifest(i))
    hub.add_image("library/big", "small", [])
    with tempfile.TemporaryDirectory() as tmp:
        ca_file = os.path.join(tmp, "ca.pem")
        ca.cert_pem.write_to_path(ca_file)
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.serve)
            port = free_port()
            mirror = await trio.lowlevel.open_process(
                [
                    sys.executable, "-m", "hubproxy", "--listen", f"127.0.0.1:{port}",
                    "--upstream", hub.registry_url, "--upstream-ca", ca_file,
                    "--cache-dir", os.path.join(tmp, "cache"), "--log-level", "warning",
                ]
            )  # fmt: skip
            try:
                client = RegistryClient(f"http://127.0.0.1:{port}", ca)
                for _ in range(100):
                    try:
                        r = await client.request(
                            "/v2/library/big/manifests/small", headers=[("accept", ACCEPT)]
                        )
                        break
                    except OSError:
                        await trio.sleep(0.1)  # the mirror is starting
                assert r.status == 200, r.status
                if mode == "hit":
                    r = await client.request(
                        "/v2/library/big/manifests/t0", headers=[("accept", ACCEPT)]
                    )
                    assert r.status == 200 and len(r.body) > SIZE - 1000, r.status
                token = client.tokens[""]
                idle = status(mirror.pid)
                socks = [
                    await hang(port, f"/v2/library/big/manifests/t{i % distinct}", token)
                    for i in range(connections)
                ]
                peak = 0
                for _ in range(40):  # 8 s: every answer is as far as it will get
                    await trio.sleep(0.2)
                    peak = max(peak, status(mirror.pid)["VmRSS"])
                after = status(mirror.pid)
                gets = sum(
                    1
                    for s in hub.requests
                    if s.method == "GET"
                    and "/manifests/t" in s.target
                    and "authorization" in s.headers
                )
                print(
                    f"{mode}: {connections} non-reading connections: RSS before {idle['VmRSS']} "
                    f"MiB, peak {peak} MiB (VmHWM {after['VmHWM']} MiB); "
                    f"upstream manifest GETs {gets}"
                )
                for s in socks:
                    s.close()
            finally:
                mirror.terminate()
                await mirror.wait()
            nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--mode", choices=("hit", "miss-same", "miss-distinct"), default="hit")
    args = parser.parse_args()
    trio.run(run, args.mode, args.connections)


if __name__ == "__main__":
    main()
