"""Not an open proxy: no client input makes hubproxy connect anywhere but the configured
upstreams, the realms they named and the redirect targets they returned. A canary listener on
127.0.0.1 records every connection; after a barrage of crafted requests it has seen none."""

from __future__ import annotations

import random

import trio
import trustme

from tests.conftest import Canary, RunningProxy, StartProxy
from tests.fakehub import FakeHub, fetch, make_layer
from tests.registry_client import RegistryClient
from tests.wire import open_stream, read_until_closed


async def raw_exchange(proxy: RunningProxy, ca: trustme.CA, raw: bytes) -> bytes:
    stream = await open_stream(proxy.url, ca)
    try:
        await stream.send_all(raw)
        with trio.fail_after(10):
            return await read_until_closed(stream)
    finally:
        await stream.aclose()


async def test_crafted_requests_never_reach_another_host(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, canary: Canary
) -> None:
    hub.add_image("library/alpine", "3.20", [make_layer(1, 1000)])
    proxy = await start_proxy(tls=False)
    evil = f"127.0.0.1:{canary.port}"
    targets = [
        f"http://{evil}/v2/",
        f"//{evil}/v2/",
        f"/v2/library/alpine/manifests/3.20?ns={evil}",
        f"/token/0?realm=http://{evil}/token&service=x",
        f"/token/http:%2f%2f{evil}",
        f"/token/..%2f..%2f{evil}",
        "/v2/%2e%2e/%2e%2e/token",
        f"/v2/library/alpine/blobs/..%2f..%2f{evil}",
        f"/v2/../../{evil}/v2/",
        f"/v1/search?q=x&host={evil}",
    ]
    for target in targets:
        await fetch(
            f"{proxy.url}{target}"
            if target.startswith("/") and not target.startswith("//")
            else f"{proxy.url}/",
            ca,
            headers=[
                ("host", evil),
                ("x-forwarded-host", evil),
                ("forwarded", f"host={evil}"),
            ],
        )
        raw = f"GET {target} HTTP/1.1\r\nhost: {evil}\r\nconnection: close\r\n\r\n".encode()
        await raw_exchange(proxy, ca, raw)
    await raw_exchange(proxy, ca, f"CONNECT {evil} HTTP/1.1\r\nhost: {evil}\r\n\r\n".encode())
    # and a normal pull still works, with realms pointing where the client addressed us
    client = RegistryClient(proxy.url, ca)
    assert (await client.request("/v2/alpine/manifests/3.20")).status == 200
    assert canary.connections == 0


def fuzz_payloads(count: int, seed: int = 20261128) -> list[bytes]:
    """Random bytes, and a valid request mutated byte by byte (flips, cuts, repeats)."""
    rng = random.Random(seed)
    valid = (
        b"GET /v2/library/alpine/manifests/3.20 HTTP/1.1\r\nhost: m\r\n"
        b"accept: application/vnd.docker.distribution.manifest.v2+json\r\n"
        b"content-length: 0\r\n\r\n"
    )
    payloads = []
    for i in range(count):
        if i % 3 == 0:
            payloads.append(rng.randbytes(rng.randrange(1, 400)))
            continue
        data = bytearray(valid)
        for _ in range(rng.randrange(1, 6)):
            position = rng.randrange(len(data))
            action = rng.randrange(4)
            if action == 0:
                data[position] = rng.randrange(256)
            elif action == 1:
                del data[position : position + rng.randrange(1, 20)]
            elif action == 2:
                data[position:position] = data[position : position + rng.randrange(1, 40)] * 3
            else:
                data[position:position] = rng.choice([b"\r", b"\n", b"\x00", b":", b" ", b"%"])
        payloads.append(bytes(data))
    return payloads


async def test_random_and_mutated_bytes_never_hurt_the_server(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, canary: Canary
) -> None:
    """A byte-level fuzz of the client-facing socket: whatever arrives, the process answers or
    closes, connects nowhere it should not, and then serves a normal pull."""
    hub.add_image("library/alpine", "3.20", [make_layer(1, 1000)])
    proxy = await start_proxy(tls=False, timeouts={"request_head": 2.0, "keepalive_idle": 2.0})

    answers: list[bytes] = []

    async def one(payload: bytes) -> None:
        stream = await open_stream(proxy.url, ca)
        try:
            await stream.send_all(payload)
            await stream.send_eof()  # type: ignore[attr-defined]  # a plain SocketStream
            answers.append(await read_until_closed(stream))
        finally:
            await stream.aclose()

    payloads = fuzz_payloads(150)
    with trio.fail_after(60):
        for start in range(0, len(payloads), 25):  # 25 at a time
            async with trio.open_nursery() as nursery:
                for payload in payloads[start : start + 25]:
                    nursery.start_soon(one, payload)
    assert len(answers) == len(payloads)
    statuses = {answer[9:12] for answer in answers if answer.startswith(b"HTTP/1.1 ")}
    assert b"400" in statuses  # the fuzz did reach the parser...
    assert statuses & {b"401", b"404"}  # ...and some mutants were still valid requests
    client = RegistryClient(proxy.url, ca)
    assert (await client.request("/v2/alpine/manifests/3.20")).status == 200
    assert canary.connections == 0
    with trio.fail_after(10):
        while proxy.server.connections:
            await proxy.server.wait_connections_changed()
