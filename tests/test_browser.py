"""The status page in a real browser: headless Chromium renders it while the primary upstream is
dead, a layer is half sent and the cache holds an image; the DOM Chromium built shows the
upstream's state, the cache use and free disk, and the transfer in progress, and the screenshot
has the red of the dead upstream's badge.

Chromium is driven from the command line (``--dump-dom``, ``--screenshot``), no Python package;
the PNG is decoded here with zlib. CI installs chromium (tests/run.sh); without it the test is
skipped, saying so."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

from tests.conftest import StartProxy
from tests.fakehub import FakeHub, make_layer
from tests.registry_client import RegistryClient
from tests.test_live_status import pull
from tests.test_statuspage import _rows, _table_rows, _upstream_rows, parse
from tests.wire import WireClient

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WINDOW = (1280, 1000)
BADGE_RED = (0xC6, 0x28, 0x28)  # statuspage's .state-bad background
CHROMIUM_TIMEOUT = 90  # seconds: a cold start on a loaded CI machine

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (apt-get install chromium): the status page's browser "
    "test needs it",
)


async def chromium(tmp_path: Path, *args: str) -> bytes:
    """Run headless Chromium with ``args``; its standard output."""
    assert CHROMIUM is not None
    profile = tmp_path / "chromium-profile"
    argv = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        *args,
    ]
    environment = {**os.environ, "HOME": str(tmp_path)}  # its caches, not the user's
    with trio.fail_after(CHROMIUM_TIMEOUT):
        done = await trio.run_process(
            argv, capture_stdout=True, capture_stderr=True, env=environment, check=False
        )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def png_rows(data: bytes) -> tuple[int, int, list[bytearray]]:
    """Width, bytes per pixel and the unfiltered rows of an 8-bit RGB or RGBA PNG (what
    Chromium writes), from its chunks, zlib and the five PNG row filters."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, idat = 8, bytearray()
    width = height = pixel = 0
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert (depth, interlace) == (8, 0) and color in (2, 6), (depth, color, interlace)
            pixel = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        offset += 12 + length
    raw = zlib.decompress(bytes(idat))
    stride = width * pixel
    rows: list[bytearray] = []
    previous = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        row_filter, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        if row_filter == 1:
            for i in range(pixel, stride):
                line[i] = (line[i] + line[i - pixel]) & 0xFF
        elif row_filter == 2:
            line = bytearray((x + up) & 0xFF for x, up in zip(line, previous, strict=True))
        elif row_filter == 3:
            for i in range(stride):
                left = line[i - pixel] if i >= pixel else 0
                line[i] = (line[i] + ((left + previous[i]) >> 1)) & 0xFF
        elif row_filter == 4:
            for i in range(stride):
                left = line[i - pixel] if i >= pixel else 0
                corner = previous[i - pixel] if i >= pixel else 0
                line[i] = (line[i] + _paeth(left, previous[i], corner)) & 0xFF
        rows.append(line)
        previous = line
    return width, pixel, rows


def red_pixels(rows: list[bytearray], pixel: int) -> list[tuple[int, int]]:
    """(x, y) of every pixel of the badge's red (within a little anti-aliasing)."""
    found = []
    for y, line in enumerate(rows):
        for x in range(0, len(line), pixel):
            r, g, b = line[x], line[x + 1], line[x + 2]
            if (
                abs(r - BADGE_RED[0]) <= 8
                and abs(g - BADGE_RED[1]) <= 8
                and abs(b - BADGE_RED[2]) <= 8
            ):
                found.append((x // pixel, y))
    return found


async def test_status_page_in_chromium(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    layer = make_layer(50, 3_000_000)
    hub.add_image("library/alpine", "3.20", [make_layer(51, 20_000)])
    hub.add_image("library/busybox", "1", [layer])
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    with trio.socket.socket() as unused:  # a port nothing listens on: the dead primary
        await unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    proxy = await start_proxy(
        tls=False,  # the browser needs no CA
        upstream=f"https://127.0.0.1:{port}",
        fallbacks=(hub.registry_url,),
        cache_dir=str(tmp_path / "cache"),
    )
    await pull(RegistryClient(proxy.url, ca))  # through the fallback, into the cache

    stall = hub.stall_blob(digest, after=1_000_000)
    client = RegistryClient(proxy.url, ca)
    r = await client.request("/v2/library/busybox/tags/list")
    assert r.status == 200
    [token] = client.tokens.values()
    transfer = await WireClient.connect(proxy.url, ca)
    await transfer.send_request(
        "GET", f"/v2/library/busybox/blobs/{digest}", [("authorization", f"Bearer {token}")]
    )
    with trio.fail_after(20):
        assert (await transfer.receive_head()).status_code == 200
        await transfer.receive_body(limit=1_000_000)
    await stall.reached.wait()
    await trio.testing.wait_all_tasks_blocked()

    dom = await chromium(tmp_path, "--dump-dom", proxy.url + "/")
    page = parse(dom)
    [primary, fallback] = _upstream_rows(dom)
    assert primary[2:4] == ["primary", primary[3]] and primary[3].startswith("unreachable since ")
    assert f"127.0.0.1:{port}" in primary[3]  # the last error names the address
    assert fallback[2] == "fallback" and fallback[3].startswith("ok last answer ")
    down = [attrs for tag, attrs in page.attributes if tag == "tr" and attrs.get("class")]
    assert [attrs["class"] for attrs in down] == ["upstream down", "upstream"]
    rows = dict(_rows(dom))
    assert " of " in rows["Cache"] and rows["Cache"].endswith(" blobs")
    assert rows["Free disk (cache)"].endswith(" free")
    transfers = _table_rows(page, "transfers")
    assert [row[:2] for row in transfers[1:]] == [["127.0.0.1", f"library/busybox {digest[:19]}"]]
    assert transfers[1][2].startswith("977 KiB of 2.9 MiB ("), transfers[1][2]

    shot = tmp_path / "status.png"
    await chromium(tmp_path, f"--screenshot={shot}", proxy.url + "/")
    width, pixel, png = png_rows(shot.read_bytes())
    assert (width, len(png)) == WINDOW
    red = red_pixels(png, pixel)
    assert len(red) > 200, "no red badge for the dead upstream in the screenshot"
    # the red sits in the registries table, right of the upstream column, near the top
    assert max(y for _, y in red) < WINDOW[1] // 2
    assert min(x for x, _ in red) > WINDOW[0] // 4

    stall.release.set()
    await transfer.aclose()
