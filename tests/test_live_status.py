"""What the operator sees while the mirror works, end to end over real sockets: byte counters
and the status page's transfers table moving during a held transfer, one log line per pull,
the upstream's state on the page, and "Requests served" leaving out the operator's own loads."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import h11
import pytest
import trio
import trio.testing
import trustme

from hubproxy.net.server import TAP_LIMIT, AccessRecord, ClientConnection, ClientResponse
from hubproxy.net.settings import ListenerSettings
from hubproxy.ops.statuspage import format_ratio
from hubproxy.policy.sizes import format_size
from tests.conftest import RunningProxy, StartProxy
from tests.fakehub import MEDIA_DOCKER_MANIFEST, FakeHub, fetch, make_layer
from tests.registry_client import RegistryClient
from tests.test_operations import metric_samples, sample
from tests.test_statuspage import _rows, _table_rows, _upstream_rows, parse
from tests.wire import WireClient

GUARD = 20  # seconds: a bound on waits that should take milliseconds


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def bearer(proxy: RunningProxy, ca: trustme.CA) -> list[tuple[str, str]]:
    """A token for library/alpine as a client's Authorization header."""
    client = RegistryClient(proxy.url, ca)
    r = await client.request("/v2/library/alpine/tags/list")
    assert r.status == 200
    [token] = client.tokens.values()
    return [("authorization", f"Bearer {token}")]


async def upstream_bytes(proxy: RunningProxy, ca: trustme.CA) -> float:
    samples = metric_samples((await fetch(proxy.url + "/metrics", ca)).body.decode())
    return sample(samples, "hubproxy_response_bytes_total", source="upstream")


@pytest.mark.parametrize("cached", [False, True])
async def test_bytes_and_the_transfer_show_while_a_layer_is_sent(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path, cached: bool
) -> None:
    """Held halfway by the upstream, a layer's bytes so far are already on /metrics and the
    transfer is on the status page with its size (they used to appear only at the end)."""
    layer = make_layer(41, 2_000_000)
    hub.add_image("library/alpine", "3.20", [layer])
    digest = digest_of(layer)
    stall = hub.stall_blob(digest, after=1_000_000)
    options = {"cache_dir": str(tmp_path / "cache")} if cached else {}
    proxy = await start_proxy(**options)
    auth = await bearer(proxy, ca)
    before = await upstream_bytes(proxy, ca)

    client = await WireClient.connect(proxy.url, ca)
    await client.send_request("GET", f"/v2/library/alpine/blobs/{digest}", auth)
    with trio.fail_after(GUARD):
        assert (await client.receive_head()).status_code == 200
        assert await client.receive_body(limit=1_000_000) == layer[:1_000_000]
    await stall.reached.wait()
    await trio.testing.wait_all_tasks_blocked()  # the mirror waits for the upstream's next bytes

    assert await upstream_bytes(proxy, ca) == before + 1_000_000
    page = parse((await fetch(proxy.url + "/", ca)).body)
    [header, row] = _table_rows(page, "transfers")
    assert header == ["Client", "Image or blob", "Sent", "Rate", "For"]
    assert row[:3] == [
        "127.0.0.1",
        f"library/alpine {digest[:19]}",
        f"{format_size(1_000_000)} of {format_size(len(layer))} "
        f"({format_ratio(1_000_000 / len(layer))})",
    ]
    assert row[3].endswith("/s")
    free = dict(_rows(render := (await fetch(proxy.url + "/", ca)).body)).get("Free disk (cache)")
    assert (free is not None and free.endswith(" free")) is cached, render

    stall.release.set()
    with trio.fail_after(GUARD):
        assert await client.receive_body() == layer[1_000_000:]
    await client.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert await upstream_bytes(proxy, ca) == before + len(layer)  # each byte counted once
    page = parse((await fetch(proxy.url + "/", ca)).body)
    assert "No transfer under way." in page.text()


PULLED = re.compile(
    r"pulled library/alpine:3\.20 \((?P<count>[^,]+), (?P<size>[0-9.]+ [kMG]?B), "
    r"(?P<cached>\d+) from cache, \d+\.\d s\) for 127\.0\.0\.1"
)


async def pull(client: RegistryClient, tag: str = "3.20", *, layers: int | None = None) -> None:
    """What docker does: the manifest by tag, then the config and the layers (the first
    ``layers`` of them when given: a client that had the others)."""
    r = await client.request(
        f"/v2/library/alpine/manifests/{tag}", headers=[("accept", MEDIA_DOCKER_MANIFEST)]
    )
    assert r.status == 200
    manifest = json.loads(r.body)
    digests = [manifest["config"]["digest"]]
    digests += [item["digest"] for item in manifest["layers"][:layers]]
    for digest in digests:
        r = await client.request(f"/v2/library/alpine/blobs/{digest}")
        assert r.status == 200 and r.complete


def pull_lines(caplog: pytest.LogCaptureFixture) -> list[re.Match[str]]:
    return [
        match
        for record in caplog.records
        if record.name == "hubproxy.pulls" and (match := PULLED.fullmatch(record.getMessage()))
    ]


async def test_one_line_per_pull_when_its_last_layer_is_sent(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="hubproxy")
    hub.add_image("library/alpine", "3.20", [make_layer(42, 1_500_000), make_layer(43, 2_000)])
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    await pull(RegistryClient(proxy.url, ca))
    await trio.testing.wait_all_tasks_blocked()
    [first] = pull_lines(caplog)
    assert (first["count"], first["size"], first["cached"]) == ("2 layers", "1.5 MB", "0")
    assert [r.levelname for r in caplog.records if PULLED.fullmatch(r.getMessage())] == ["INFO"]

    await pull(RegistryClient(proxy.url, ca))  # another client machine, same address
    await trio.testing.wait_all_tasks_blocked()
    [_, second] = pull_lines(caplog)
    assert (second["count"], second["cached"]) == ("2 layers", "2")  # the cache served them

    page = parse((await fetch(proxy.url + "/", ca)).body)
    rows = _table_rows(page, "pulls")
    assert [row[1:3] for row in rows[1:]] == [["library/alpine:3.20", "127.0.0.1"]] * 2
    assert rows[1][3].startswith("2 layers, 1.5 MB, 2 from cache, ")


async def test_a_pull_of_some_layers_is_logged_once_quiet(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    caplog: pytest.LogCaptureFixture,
    autojump_clock: trio.testing.MockClock,
) -> None:
    caplog.set_level(logging.INFO, logger="hubproxy")
    hub.add_image("library/alpine", "3.20", [make_layer(44, 3_000), make_layer(45, 4_000)])
    proxy = await start_proxy()
    await pull(RegistryClient(proxy.url, ca), layers=1)  # the client had the second layer
    await trio.testing.wait_all_tasks_blocked()
    assert pull_lines(caplog) == []  # not yet: more layers may come
    await trio.sleep(11)  # the quiet time (10 s) passes
    [line] = pull_lines(caplog)
    assert line["count"] == "1 of 2 layers"


async def test_a_dead_upstream_is_red_on_the_page(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    """The primary refuses connections, the fallback serves: the page names the primary
    unreachable, since when and why, in the red badge; the fallback answers ok."""
    hub.add_image("library/alpine", "3.20", [make_layer(46, 1_000)])
    with trio.socket.socket() as unused:  # a port nothing listens on
        await unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    dead = f"https://127.0.0.1:{port}"
    proxy = await start_proxy(upstream=dead, fallbacks=(hub.registry_url,))
    raw = (await fetch(proxy.url + "/", ca)).body
    assert [row[2:] for row in _upstream_rows(raw)] == [
        ["primary", "not asked yet"],
        ["fallback", "not asked yet"],
    ]

    await pull(RegistryClient(proxy.url, ca))
    raw = (await fetch(proxy.url + "/", ca)).body
    [primary, fallback] = _upstream_rows(raw)
    assert primary[1:3] == [dead, "primary"]
    assert re.fullmatch(
        rf"unreachable since [-0-9]+ [:0-9]+ UTC \(0s ago\): .*127\.0\.0\.1:{port}.*",
        primary[3],
    ), primary[3]
    assert fallback[1:3] == [hub.registry_url, "fallback"]
    assert fallback[3].startswith("ok last answer ")
    badges = [
        attrs.get("class")
        for tag, attrs in parse(raw).attributes
        if tag == "span" and "state" in (attrs.get("class") or "")
    ]
    assert badges == ["state state-bad", "state state-ok"]


async def test_requests_served_leaves_out_the_operators_own_loads(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    hub.add_image("library/alpine", "3.20", [make_layer(47, 1_000)])
    proxy = await start_proxy()
    for path in ("/", "/", "/metrics", "/healthz", "/readyz"):
        assert (await fetch(proxy.url + path, ca)).status in (200, 503)
    assert dict(_rows((await fetch(proxy.url + "/", ca)).body))["Requests served"] == "0"
    r = await RegistryClient(proxy.url, ca).request("/v2/library/alpine/tags/list")
    assert r.status == 200
    served = dict(_rows((await fetch(proxy.url + "/", ca)).body))["Requests served"]
    assert served == "3"  # the 401 challenge, the token, the retried request


async def test_a_stop_does_not_wait_for_the_quiet_time(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    caplog: pytest.LogCaptureFixture,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A graceful stop waits for the background tasks: the pull sweeper reports the open pulls
    as they stand and ends within a second, instead of holding the stop for the quiet time."""
    caplog.set_level(logging.INFO, logger="hubproxy")
    hub.add_image("library/alpine", "3.20", [make_layer(48, 3_000), make_layer(49, 4_000)])
    proxy = await start_proxy()
    await pull(RegistryClient(proxy.url, ca), layers=1)
    await trio.testing.wait_all_tasks_blocked()
    assert proxy.proxy._sweeping and pull_lines(caplog) == []
    proxy.server.shutdown()
    await trio.sleep(1.5)  # well within the quiet time (10 s)
    [line] = pull_lines(caplog)
    assert line["count"] == "1 of 2 layers"
    assert not proxy.proxy._sweeping


async def test_the_manifest_tap_shares_an_immutable_body_instead_of_copying_it() -> None:
    """The pull tracker's view of a manifest sent in slices of one cached buffer holds those
    slices, not copies: a hundred clients of one cached 4 MiB manifest that never read used to
    hold 256 KiB of copies each (the abuse run's case 1 peaked at 101 MiB). A mutable buffer is
    copied (its owner may reuse it)."""
    ours, theirs = trio.socket.socketpair()
    client = ClientConnection(
        trio.SocketStream(ours), settings=ListenerSettings(), client_ip="127.0.0.1", scheme="http"
    )
    response = ClientResponse(client, AccessRecord("127.0.0.1", "GET", "/v2/x/manifests/1"))
    client.conn.receive_data(b"GET /v2/x/manifests/1 HTTP/1.1\r\nhost: x\r\n\r\n")
    assert isinstance(client.conn.next_event(), h11.Request)
    body = b"{" + b"x" * 1000 + b"}"
    reused = bytearray(b"abc")
    response.tap = []
    await response.start(200, [(b"content-length", b"%d" % (len(body) + 3))])
    await response.send(memoryview(body)[:500])
    await response.send(memoryview(body)[500:])
    await response.send(reused)
    reused[:] = b"zzz"
    first, second, third = response.tap
    assert isinstance(first, memoryview) and first.obj is body
    assert isinstance(second, memoryview) and second.obj is body
    assert third == b"abc"
    assert b"".join(response.tap) == body + b"abc"
    await client.stream.aclose()
    theirs.close()


async def test_the_manifest_tap_never_pins_a_large_body() -> None:
    """A manifest larger than the tap's limit is not tapped at all (its Content-Length says so
    at the first slice), and a slice of a large buffer is copied rather than kept: a view would
    pin the whole body, which a sender waiting for its turn must be able to let go of."""
    ours, theirs = trio.socket.socketpair()
    client = ClientConnection(
        trio.SocketStream(ours), settings=ListenerSettings(), client_ip="127.0.0.1", scheme="http"
    )
    client.conn.receive_data(b"GET /v2/x/manifests/1 HTTP/1.1\r\nhost: x\r\n\r\n")
    assert isinstance(client.conn.next_event(), h11.Request)
    large = b"x" * (TAP_LIMIT + 1)
    record = AccessRecord("127.0.0.1", "GET", "/v2/x/manifests/1")
    response = ClientResponse(client, record)
    response.tap = []
    await response.start(200, [(b"content-length", b"10")])
    await response.send(memoryview(large)[:10])
    [kept] = response.tap
    assert not isinstance(kept, memoryview) and kept == large[:10]  # a copy, not a view
    await client.stream.aclose()
    theirs.close()

    ours, theirs = trio.socket.socketpair()
    client = ClientConnection(
        trio.SocketStream(ours), settings=ListenerSettings(), client_ip="127.0.0.1", scheme="http"
    )
    client.conn.receive_data(b"GET /v2/x/manifests/2 HTTP/1.1\r\nhost: x\r\n\r\n")
    assert isinstance(client.conn.next_event(), h11.Request)
    record = AccessRecord("127.0.0.1", "GET", "/v2/x/manifests/2")
    record.length = len(large)  # what the head said
    response = ClientResponse(client, record)
    response.tap = []
    await response.start(200, [(b"content-length", b"%d" % len(large))])
    await response.send(memoryview(large)[:1000])  # fits the far end's socket buffer
    assert response.tap is None
    await client.stream.aclose()
    theirs.close()
