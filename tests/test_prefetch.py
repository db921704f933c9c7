"""``hubproxy prefetch`` and the config file's prefetch list, against the fake Docker Hub: through
a running mirror (``--mirror``), in-process on a cache directory, and on the mirror's schedule."""

from __future__ import annotations

import hashlib
import io
import logging
import ssl
from pathlib import Path

import pytest
import trio
import trustme

from hubproxy.cli import prefetch_command
from hubproxy.policy.prefetch import (
    FailureMemory,
    ImageRef,
    Platform,
    Tally,
    machine_platform,
    parse_image,
    parse_manifest,
    parse_platforms,
    select_platforms,
)
from hubproxy.policy.urls import parse_url
from hubproxy.prefetch import Display, prefetch_through_mirror
from tests.conftest import RunningProxy, StartProxy, TLSFiles
from tests.fakehub import MEDIA_DOCKER_MANIFEST, FakeHub, fetch, make_layer, sha256_digest
from tests.registry_client import RegistryClient
from tests.test_skopeo import Skopeo, check_dir_copy

ACCEPT = [("accept", MEDIA_DOCKER_MANIFEST)]
AMD64 = (Platform("linux", "amd64"),)


def cdn_gets(hub: FakeHub) -> list[str]:
    """The blob digests the CDN served, in order."""
    return [
        "sha256:" + s.target.split("/sha256/")[1].split("/")[1]
        for s in hub.requests
        if s.server == "cdn" and s.method == "GET"
    ]


def mirror_context(tls_files: TLSFiles) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(tls_files.ca_pem))
    return context


async def through(
    proxy: RunningProxy,
    tls_files: TLSFiles,
    *images: str,
    platforms: tuple[Platform, ...] | None = AMD64,
) -> tuple[Tally, list[str]]:
    """Prefetch ``images`` through the running mirror; the tally and the plain output lines."""
    out = io.StringIO()
    tally = await prefetch_through_mirror(
        parse_url(proxy.url),
        [parse_image(i) for i in images],
        platforms,
        jobs=2,
        context=mirror_context(tls_files),
        display=Display(out, tty=False),
    )
    await proxy.fills_ended()  # the mirror's copies committed
    return tally, out.getvalue().splitlines()


# -- pure rules -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "registry", "repository", "reference"),
    [
        ("nginx", "docker.io", "library/nginx", "latest"),
        ("nginx:1.27", "docker.io", "library/nginx", "1.27"),
        ("bitnami/redis:7", "docker.io", "bitnami/redis", "7"),
        ("ghcr.io/o/app:tag", "ghcr.io", "o/app", "tag"),
        ("index.docker.io/library/nginx", "docker.io", "library/nginx", "latest"),
        ("k8s.gcr.io/pause:3.9", "registry.k8s.io", "pause", "3.9"),
        ("localhost:5000/app", "localhost:5000", "app", "latest"),
        (
            f"docker.io/library/nginx@sha256:{'a' * 64}",
            "docker.io",
            "library/nginx",
            "sha256:" + "a" * 64,
        ),
        (f"nginx:1.27@sha256:{'b' * 64}", "docker.io", "library/nginx", "sha256:" + "b" * 64),
    ],
)
def test_images_are_read_as_docker_reads_them(
    text: str, registry: str, repository: str, reference: str
) -> None:
    ref = parse_image(text)
    assert (ref.registry, ref.repository, ref.reference) == (registry, repository, reference)


@pytest.mark.parametrize("text", ["", "Nginx", "nginx:", "nginx@sha256:abc", "a//b", "nginx:-x"])
def test_bad_image_names_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"not|digest|tag"):
        parse_image(text)


def test_a_mirror_path_puts_other_registries_first() -> None:
    assert parse_image("nginx").path == "library/nginx"
    assert parse_image("ghcr.io/o/app").path == "ghcr.io/o/app"


def test_platforms() -> None:
    assert machine_platform("Linux", "x86_64") == Platform("linux", "amd64")
    assert machine_platform("Linux", "aarch64") == Platform("linux", "arm64")
    assert str(machine_platform("Linux", "armv7l")) == "linux/arm/v7"
    assert parse_platforms("linux/amd64, linux/arm64/v8,linux/amd64") == (
        Platform("linux", "amd64"),
        Platform("linux", "arm64", "v8"),
    )
    with pytest.raises(ValueError, match="OS/ARCH"):
        parse_platforms("amd64")


def test_index_selection_skips_attestations_and_names_what_is_missing() -> None:
    def entry(n: int, os: str, arch: str, variant: str = "") -> str:
        platform = f'"os": "{os}", "architecture": "{arch}", "variant": "{variant}"'
        return f'{{"digest": "sha256:{n:064x}", "size": 1, "platform": {{{platform}}}}}'

    body = (
        '{"mediaType": "application/vnd.oci.image.index.v1+json", "manifests": ['
        + ", ".join(
            [
                entry(1, "linux", "amd64"),
                entry(2, "linux", "arm64", "v8"),
                entry(3, "unknown", "unknown"),
            ]
        )
        + "]}"
    ).encode()
    index = parse_manifest(body, "")
    chosen, missing = select_platforms(index, parse_platforms("linux/arm64,linux/s390x"))
    assert [c.digest[-1] for c in chosen] == ["2"]
    assert missing == [Platform("linux", "s390x")]
    every, _ = select_platforms(index, None)
    assert [c.digest[-1] for c in every] == ["1", "2"]


def test_a_failure_is_news_once_and_its_recovery_once() -> None:
    memory = FailureMemory()
    assert memory.failed("a", "404")
    assert not memory.failed("a", "404")
    assert memory.failed("a", "429")  # a different failure is news again
    assert memory.succeeded("a")
    assert not memory.succeeded("a")


# -- through a running mirror -------------------------------------------------------------------


async def test_prefetch_through_the_mirror_makes_the_next_pull_all_hits(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tls_files: TLSFiles, tmp_path: Path
) -> None:
    layers = [make_layer(501, 3000), make_layer(502, 5000)]
    hub.add_image("library/alpine", "3.20", layers)
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    tally, lines = await through(proxy, tls_files, "alpine:3.20")
    assert (tally.images, tally.failed, tally.manifests, tally.blobs_done) == (1, 0, 1, 3)
    assert tally.bytes_cached == 0 and tally.bytes_fetched > 8000
    served = len(cdn_gets(hub))
    assert served == 3  # config and two layers, each once

    again, _ = await through(proxy, tls_files, "alpine:3.20")
    assert again.bytes_fetched == 0 and again.bytes_cached == tally.bytes_fetched

    client = RegistryClient(proxy.url, ca)
    r = await client.request("/v2/library/alpine/manifests/3.20", headers=ACCEPT)
    assert r.status == 200
    for layer in layers:
        blob = await client.request(f"/v2/library/alpine/blobs/{sha256_digest(layer)}")
        assert blob.body == layer
    assert len(cdn_gets(hub)) == served  # all from the cache
    assert lines[0].startswith("done   alpine:3.20 (one platform, 3 blobs, ")


async def test_skopeo_pulls_a_prefetched_image_all_from_the_cache(
    hub: FakeHub, start_proxy: StartProxy, tls_files: TLSFiles, tmp_path: Path
) -> None:
    """A real client after a prefetch: every blob it pulls is a hit (the CDN sees no GET)."""
    layers = [make_layer(521, 200_000), make_layer(522, 3000)]
    hub.add_image("library/busybox", "1.36", layers)
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    tally, _ = await through(proxy, tls_files, "busybox:1.36")
    assert tally.failed == 0 and tally.blobs_done == 3
    served = len(cdn_gets(hub))
    skopeo = Skopeo(proxy, tls_files, tmp_path)
    target = tmp_path / "copy"
    await skopeo.run(
        "copy", "--src-cert-dir", skopeo.cert_dir, skopeo.ref("busybox:1.36"), f"dir:{target}"
    )
    copied = check_dir_copy(target)
    assert all(hashlib.sha256(layer).hexdigest() in copied for layer in layers)
    assert len(cdn_gets(hub)) == served


async def test_platforms_of_an_index(
    hub: FakeHub, start_proxy: StartProxy, tls_files: TLSFiles, tmp_path: Path
) -> None:
    amd = make_layer(511, 2000)
    arm = make_layer(512, 2000)
    amd_digest = hub.add_image("library/redis", None, [amd])
    arm_digest = hub.add_image("library/redis", None, [arm], arch="arm64")
    hub.add_index(
        "library/redis", "7", [(amd_digest, "amd64", "linux"), (arm_digest, "arm64", "linux")]
    )
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))

    tally, lines = await through(
        proxy, tls_files, "redis:7", platforms=parse_platforms("linux/arm64")
    )
    assert tally.failed == 0 and tally.manifests == 1
    assert sha256_digest(arm) in cdn_gets(hub) and sha256_digest(amd) not in cdn_gets(hub)
    assert "(linux/arm64, 2 blobs, " in lines[0]

    tally, _ = await through(proxy, tls_files, "redis:7", platforms=None)  # --all-platforms
    assert tally.manifests == 2 and tally.failed == 0
    assert sha256_digest(amd) in cdn_gets(hub)

    tally, lines = await through(
        proxy, tls_files, "redis:7", platforms=parse_platforms("linux/s390x")
    )
    assert tally.failed == 1
    assert tally.failures == [
        "redis:7: it has no linux/s390x image (it has linux/amd64, linux/arm64): pick those "
        "with --platform, or use --all-platforms"
    ]


async def test_a_bad_blob_is_reported(
    hub: FakeHub, start_proxy: StartProxy, tls_files: TLSFiles, tmp_path: Path
) -> None:
    """A blob whose bytes do not match its digest fails its image, with what to do; the other
    images go on. Straight from the fake registry (redirects followed): nobody verified it."""
    layer = make_layer(521, 3000)
    hub.add_image("library/alpine", "3.20", [layer])
    hub.add_image("library/busybox", "1", [make_layer(522, 1000)])
    hub.corrupt_blob(sha256_digest(layer))
    out = io.StringIO()
    tally = await prefetch_through_mirror(
        parse_url(hub.registry_url),
        [parse_image("alpine:3.20"), parse_image("busybox:1")],
        AMD64,
        jobs=2,
        context=mirror_context(tls_files),
        display=Display(out, tty=False),
    )
    assert (tally.images, tally.failed) == (2, 1)
    [failure] = tally.failures
    assert failure.startswith(f"alpine:3.20: blob {sha256_digest(layer)} came with ")
    assert failure.endswith("on the mirror's machine run 'hubproxy cache verify', then retry")


async def test_a_missing_tag_says_what_to_do(
    hub: FakeHub, start_proxy: StartProxy, tls_files: TLSFiles, tmp_path: Path
) -> None:
    hub.add_image("library/alpine", "3.20", [make_layer(523, 1000)])
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    tally, lines = await through(proxy, tls_files, "alpine:nope", "alpine:3.20", "nosuch:1")
    nope, nosuch = sorted(tally.failures)
    assert nope == (
        "alpine:nope: manifest library/alpine:nope: 404: manifest unknown (no such image, tag "
        "or digest upstream: check its spelling (and the registry))"
    )
    assert nosuch.startswith("nosuch:1: manifest library/nosuch:1: 401")
    assert nosuch.endswith(
        "(no such repository, or a private one: check its name; for a private image give the "
        "mirror a login for its registry (registry-login in its config file))"
    )
    assert lines[-1].startswith("prefetched 1 of 3 images (1 manifest, 2 blobs): ")
    assert lines[-1].endswith("; 2 failed")


# -- the command, in-process on a cache directory ----------------------------------------------


async def test_the_command_without_a_mirror_fills_the_cache_a_mirror_then_serves(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tls_files: TLSFiles, tmp_path: Path
) -> None:
    """The non-TTY output, exit status and summary of ``hubproxy prefetch --config FILE``; a
    mirror started on that cache directory afterwards serves the image without the CDN."""
    layer = make_layer(531, 4000)
    hub.add_image("library/alpine", "3.20", [layer])
    cache = tmp_path / "cache"
    config = tmp_path / "hubproxy.toml"
    config.write_text(
        f'upstream = "{hub.registry_url}"\nindex-url = "{hub.registry_url}"\n'
        f'upstream-ca = "{tls_files.ca_pem}"\ncache-dir = "{cache}"\n'
    )
    out, err = io.StringIO(), io.StringIO()
    argv = ["alpine:3.20", "alpine:missing", "--config", str(config), "--platform", "linux/amd64"]
    status = await trio.to_thread.run_sync(lambda: prefetch_command(argv, stdout=out, stderr=err))
    assert status == 1
    lines = out.getvalue().splitlines()
    assert sorted(line.split(" (")[0] for line in lines[:2]) == [
        "done   alpine:3.20",
        "failed alpine:missing: manifest library/alpine:missing: 404: manifest unknown",
    ]
    assert lines[2].startswith("prefetched 1 of 2 images (1 manifest, 2 blobs): ")
    assert lines[2].endswith("0 B already cached, in " + lines[2].split(" in ")[1])
    assert err.getvalue().splitlines() == [
        "hubproxy prefetch: error: alpine:missing: manifest library/alpine:missing: 404: "
        "manifest unknown (no such image, tag or digest upstream: check its spelling (and the "
        "registry))"
    ]
    served = len(cdn_gets(hub))
    proxy = await start_proxy(cache_dir=str(cache))
    client = RegistryClient(proxy.url, ca)
    assert (await client.request("/v2/library/alpine/manifests/3.20", headers=ACCEPT)).status == 200
    assert (await client.request(f"/v2/library/alpine/blobs/{sha256_digest(layer)}")).body == layer
    assert len(cdn_gets(hub)) == served


def test_a_terminal_gets_one_line_redrawn() -> None:
    out = io.StringIO()
    display = Display(out, tty=True)
    display.draw("1/2 images")
    display.draw("2/2 images")
    display.line("done   alpine")
    assert out.getvalue() == "\r\x1b[K1/2 images\r\x1b[K2/2 images\r\x1b[Kdone   alpine\n"


def test_usage_errors_exit_2() -> None:
    out, err = io.StringIO(), io.StringIO()
    assert prefetch_command(["Nginx"], stdout=out, stderr=err) == 2
    assert err.getvalue().startswith("hubproxy prefetch: error: 'Nginx' is not an image name")
    err = io.StringIO()
    argv = ["nginx", "--platform", "linux/amd64", "--all-platforms"]
    assert prefetch_command(argv, stdout=out, stderr=err) == 2


# -- the mirror's own prefetch list ---------------------------------------------------------------


async def test_the_list_picks_up_a_moved_tag_and_logs_a_failure_once(
    hub: FakeHub,
    ca: trustme.CA,
    start_proxy: StartProxy,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    autojump_clock: trio.testing.MockClock,
) -> None:
    caplog.set_level(logging.INFO, logger="hubproxy")
    first = make_layer(541, 2000)
    hub.add_image("library/alpine", "latest", [first])
    listed: tuple[ImageRef, ...] = (parse_image("alpine"), parse_image("alpine:gone"))
    proxy = await start_proxy(
        cache_dir=str(tmp_path / "cache"),
        prefetch=listed,
        prefetch_interval=3600.0,
        manifest_ttl=86400.0,  # a day: only the schedule's revalidation finds the move
        prefetch_platforms=AMD64,
    )
    schedule = proxy.app.prefetch
    assert schedule is not None
    while schedule.rounds_done < 1:
        await schedule.round_done.wait()
    assert sha256_digest(first) in cdn_gets(hub)

    moved = make_layer(542, 2000)
    hub.add_image("library/alpine", "latest", [moved])
    while schedule.rounds_done < 3:
        await schedule.round_done.wait()
    assert sha256_digest(moved) in cdn_gets(hub)

    failures = [r.getMessage() for r in caplog.records if "alpine:gone" in r.getMessage()]
    assert len(failures) == 1  # three rounds, one line
    assert failures[0].startswith("prefetch: alpine:gone: manifest library/alpine:gone: 404")
    metrics = proxy.proxy.metrics.render().decode()
    assert 'hubproxy_prefetch_images{result="failed"} 1' in metrics
    assert "hubproxy_prefetch_rounds_total 3" in metrics
    # The page reads the cached images in worker threads, and a clock jumping at once while
    # they run went on from timer to timer (up to 715 s under CPU load, the whole hour with a
    # 50 ms disk read): the fourth round then began before alpine:gone is added below. While
    # the page is fetched the clock moves only after a second of real idleness.
    autojump_clock.autojump_threshold = 1.0
    page = (await fetch(proxy.url + "/", ca)).body.decode()
    autojump_clock.autojump_threshold = 0.0
    assert "<th>Prefetch list</th><td>prefetched 1 of 2 images (1 manifest, " in page

    hub.add_image("library/alpine", "gone", [moved])  # it recovers: one line says so
    while schedule.rounds_done < 4:
        await schedule.round_done.wait()
    recovered = [
        r.getMessage() for r in caplog.records if "alpine:gone works again" in r.getMessage()
    ]
    assert recovered == ["prefetch: alpine:gone works again"]


async def test_every_round_asks_where_a_tag_points_whatever_the_ttl(
    nursery: trio.Nursery,
    ca: trustme.CA,
    start_proxy: StartProxy,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An upstream anyone may pull from without a token: the rounds' requests carry the same
    (no) credentials, confirmed a moment ago, and the tag is within its day of --manifest-ttl;
    still each round asks the upstream where the tag points now."""
    open_hub = FakeHub(ca, auth_layout="basic", basic_anonymous=True)
    open_hub.ratelimit_limit = None
    await nursery.start(open_hub.serve)
    open_hub.add_image("library/alpine", "latest", [make_layer(551, 1000)])
    proxy = await start_proxy(
        upstream=open_hub.registry_url,
        cache_dir=str(tmp_path / "cache"),
        prefetch=(parse_image("alpine"),),
        prefetch_interval=20.0,
        manifest_ttl=86400.0,
        prefetch_platforms=AMD64,
    )
    schedule = proxy.app.prefetch
    assert schedule is not None
    while schedule.rounds_done < 1:
        await schedule.round_done.wait()
    moved = make_layer(552, 1000)
    open_hub.add_image("library/alpine", "latest", [moved])
    while schedule.rounds_done < 2:
        await schedule.round_done.wait()
    blob_gets = [s.target for s in open_hub.requests if "/blobs/" in s.target and s.method == "GET"]
    assert any(sha256_digest(moved) in target for target in blob_gets)
