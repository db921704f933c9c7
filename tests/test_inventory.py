"""The cache's inventory and purge: ``hubproxy cache ls|rm|refresh``, the admin API, and the
status page's tables, over caches filled by real pulls through the fake registry."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import trio
import trustme

from hubproxy.cache.inventory import read_state
from hubproxy.cache.manifests import ManifestStore
from hubproxy.cache.store import BlobStore
from hubproxy.cli import main
from hubproxy.policy.access import parse_networks
from hubproxy.policy.errors import BadImageName, NotCached
from hubproxy.policy.inventory import (
    CacheState,
    ImageRef,
    ManifestFacts,
    Removal,
    Usage,
    images,
    parse_image_ref,
    plan_refresh,
    plan_removal,
)
from tests.conftest import RunningProxy, StartProxy, TLSFiles
from tests.fakehub import (
    MEDIA_DOCKER_LIST,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    FakeHub,
    fetch,
    make_layer,
)
from tests.registry_client import RegistryClient
from tests.test_pullthrough import pullthrough
from tests.test_skopeo import Skopeo, check_dir_copy

ACCEPT = [
    (
        "accept",
        f"{MEDIA_DOCKER_MANIFEST}, {MEDIA_DOCKER_LIST}, {MEDIA_OCI_MANIFEST}, {MEDIA_OCI_INDEX}",
    )
]
TOKEN = "0123456789abcdef-admin-token"
H = ["a" * 64, "b" * 64, "c" * 64, "d" * 64, "e" * 64, "f" * 64, "1" * 64, "2" * 64]


# -- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("nginx", ImageRef("docker.io", "library/nginx")),
        ("nginx:1.27", ImageRef("docker.io", "library/nginx", "1.27")),
        ("bitnami/redis:7", ImageRef("docker.io", "bitnami/redis", "7")),
        ("ghcr.io/owner/app:tag", ImageRef("ghcr.io", "owner/app", "tag")),
        (
            f"docker.io/library/nginx@sha256:{H[0]}",
            ImageRef("docker.io", "library/nginx", None, f"sha256:{H[0]}"),
        ),
        ("index.docker.io/nginx:1", ImageRef("docker.io", "library/nginx", "1")),
        ("k8s.gcr.io/pause:3.9", ImageRef("registry.k8s.io", "pause", "3.9")),
        ("localhost:5000/app:v1", ImageRef("localhost:5000", "app", "v1")),
        (f"sha256:{H[1]}", ImageRef("", "", None, f"sha256:{H[1]}")),
    ],
)
def test_images_are_named_as_users_name_them(text: str, ref: ImageRef) -> None:
    assert parse_image_ref(text) == ref


@pytest.mark.parametrize(
    "text", ["", "Nginx", "nginx:", "nginx@sha256:abc", "sha256:xyz", "a//b", "nginx:-bad", "../x"]
)
def test_a_bad_name_is_refused_saying_so(text: str) -> None:
    with pytest.raises(BadImageName):
        parse_image_ref(text)


# -- what a removal takes (pure) ---------------------------------------------------------------


def state() -> CacheState:
    """library/nginx:1.27 and :latest name an index (amd64 cached, arm64 not); library/alpine:3
    shares layer H[5] with nginx's amd64 image; H[7] is a blob no manifest names."""
    index, amd, alpine = H[0], H[1], H[2]
    return CacheState(
        tags={
            "library/nginx:1.27": {"k1": index, "k2": amd},  # an old client got amd64 itself
            "library/nginx:latest": {"k1": index},
            "library/alpine:3": {"k1": alpine},
        },
        links={
            "library/nginx": {f"sha256:{index}": MEDIA_DOCKER_LIST, f"sha256:{amd}": "x"},
            "library/alpine": {f"sha256:{alpine}": MEDIA_DOCKER_MANIFEST},
        },
        manifests={
            index: ManifestFacts(children=((amd, "linux/amd64"), (H[6], "linux/arm64"))),
            amd: ManifestFacts(blobs=(H[3], H[5])),
            alpine: ManifestFacts(blobs=(H[4], H[5])),
        },
        manifest_sizes={index: 300, amd: 200, alpine: 200},
        blobs={H[3]: 1000, H[4]: 2000, H[5]: 4000, H[7]: 8},
        usage={
            "library/nginx:1.27": Usage(3, 2, 100.0),
            "library/nginx:latest": Usage(1, 1, 200.0),
            f"library/nginx@sha256:{amd}": Usage(5, 5, 300.0),  # a platform: not a pull
        },
    )


def test_an_index_is_one_image_with_its_tags_platforms_and_counts() -> None:
    alpine, nginx = images(state())
    assert (nginx.tags, nginx.platforms, nginx.platforms_listed) == (
        ("1.27", "latest"),
        ("linux/amd64",),
        2,
    )
    assert (nginx.size, nginx.blobs_cached, nginx.blobs_named) == (5000, 2, 2)
    assert (nginx.pulls, nginx.hits, nginx.last_used) == (4, 3, 200.0)
    assert (alpine.shown, alpine.size, alpine.pulls) == ("library/alpine:3", 6000, 0)


def test_removing_one_of_two_tags_keeps_the_image() -> None:
    plan = plan_removal(state(), parse_image_ref("nginx:latest"))
    assert plan.removals == ((Removal.TAG, "library/nginx:latest"),)
    assert plan.blobs == ()


def test_removing_an_image_keeps_the_blob_another_image_uses() -> None:
    cache = state()
    plan = plan_removal(cache, parse_image_ref("alpine:3"))
    assert plan.blobs == (H[4],)  # H[5] is nginx's too
    assert plan.kept_blobs == 1
    assert (Removal.MANIFEST, H[2]) in plan.removals
    whole = plan_removal(cache, parse_image_ref("nginx"))  # every tag and manifest of it
    assert whole.blobs == (H[3],) and whole.kept_blobs == 1
    assert {(Removal.MANIFEST, H[0]), (Removal.MANIFEST, H[1])} <= set(whole.removals)
    assert (Removal.REPOSITORY, "library/nginx") in whole.removals


def test_a_bare_digest_is_removed_whoever_uses_it() -> None:
    plan = plan_removal(state(), parse_image_ref(f"sha256:{H[5]}"))
    assert plan.blobs == (H[5],) and plan.removals == ()
    with pytest.raises(NotCached):
        plan_removal(state(), parse_image_ref(f"sha256:{H[6]}"))
    with pytest.raises(NotCached):
        plan_removal(state(), parse_image_ref("nginx:1.28"))


def test_refresh_forgets_the_tag_only() -> None:
    plan = plan_refresh(state(), parse_image_ref("nginx:1.27"))
    assert plan.removals == ((Removal.TAG, "library/nginx:1.27"),) and plan.blobs == ()
    with pytest.raises(BadImageName):
        plan_refresh(state(), parse_image_ref("nginx"))


# -- the journal: what one process removes, the others forget ------------------------------------


def test_another_process_on_the_directory_forgets_what_one_removed(tmp_path: Path) -> None:
    body = b'{"schemaVersion": 2, "layers": []}'
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    accepted = frozenset({MEDIA_DOCKER_MANIFEST})
    mirror = ManifestStore(tmp_path)
    mirror.open()
    try:
        mirror.put(
            "library/x",
            "1",
            accepted=accepted,
            media_type=MEDIA_DOCKER_MANIFEST,
            body=body,
            claimed=None,
        )
        mirror.note_pull("library/x:1", hit=False, now=100.0)
        assert mirror.flush()
        command = ManifestStore(tmp_path)  # hubproxy cache refresh, say
        command.open()
        command.note_pull("library/x:1", hit=True, now=200.0)  # counts add up across processes
        command.remove([(Removal.TAG, "library/x:1")])
        assert command.flush()
        command.close()
        assert mirror.tag("library/x", "1", accepted) == digest  # not read yet
        assert mirror.read_journal_now(10.0)
        assert mirror.tag("library/x", "1", accepted) is None
        assert mirror.get("library/x", digest) is not None  # refresh keeps the bytes
    finally:
        mirror.close()
    cache = read_state(tmp_path)
    assert "library/x:1" not in cache.tags


def test_pull_counts_add_up_across_processes(tmp_path: Path) -> None:
    stores = [ManifestStore(tmp_path), ManifestStore(tmp_path)]
    for store in stores:
        store.open()
    for n, store in enumerate(stores):
        store.note_pull("library/x:1", hit=bool(n), now=100.0 + n)
        assert store.flush()
    for store in stores:
        store.close()
    assert read_state(tmp_path).usage["library/x:1"] == Usage(2, 1, 101.0)


def test_a_blob_being_read_is_deleted_when_its_reader_closes(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    data = b"layer bytes"
    key = hashlib.sha256(data).hexdigest()
    store.path(key).parent.mkdir(parents=True, exist_ok=True)
    store.path(key).write_bytes(data)
    store._add(key, len(data))
    reader = store.reader(key)
    removed, busy = store.remove([key])
    assert (removed, busy) == ([(key, len(data))], [])
    assert store.size_of(key) is None  # new requests miss at once
    assert store.path(key).exists()  # the reader has not opened it yet
    reader.close()
    assert not store.path(key).exists()


# -- end to end --------------------------------------------------------------------------------


async def pull(
    proxy: RunningProxy,
    ca: trustme.CA,
    repository: str,
    tag: str,
    client: RegistryClient | None = None,
) -> str:
    """Pull an image as docker does (an index: its first platform); its top digest."""
    client = client or RegistryClient(proxy.url, ca)
    r = await client.request(f"/v2/{repository}/manifests/{tag}", headers=ACCEPT)
    assert r.status == 200, r.body
    top = r.headers["docker-content-digest"]
    document = r.json()
    if "manifests" in document:
        child = document["manifests"][0]["digest"]
        r = await client.request(f"/v2/{repository}/manifests/{child}", headers=ACCEPT)
        assert r.status == 200
        document = r.json()
    for blob in [document["config"], *document["layers"]]:
        r = await client.request(f"/v2/{repository}/blobs/{blob['digest']}")
        assert r.status == 200 and r.complete
    await proxy.fills_ended()  # its blobs in the cache
    return top


def manifest_gets(hub: FakeHub, repository: str) -> int:
    return sum(
        1
        for s in hub.requests
        if s.server == "registry"
        and s.method == "GET"
        and f"/v2/{repository}/manifests/" in s.target
        and "authorization" in s.headers
    )


def blob_file(cache: Path, layer: bytes) -> Path:
    hexpart = hashlib.sha256(layer).hexdigest()
    return cache / "blobs" / "sha256" / hexpart[:2] / hexpart


async def written(proxy: RunningProxy) -> None:
    """The mirror's blobs and manifest state are committed (what a CLI run beside it reads)."""
    await proxy.fills_ended()
    assert await trio.to_thread.run_sync(pullthrough(proxy).manifests.wait_written, 10.0)


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """A ``hubproxy`` command, in a thread: the mirror goes on serving meanwhile."""
    status = await trio.to_thread.run_sync(main, list(argv))
    out, err = capsys.readouterr()
    return status, out, err


async def shared_layer_images(hub: FakeHub, proxy: RunningProxy, ca: trustme.CA) -> list[bytes]:
    """library/alpine:3.20 and the index library/nginx:1.27 (amd64 and arm64), sharing a layer;
    alpine and nginx's amd64 pulled. Layers: shared, alpine's, nginx amd64's, nginx arm64's."""
    layers = [make_layer(n, 20_000 + n) for n in (1, 2, 3, 4)]
    hub.add_image("library/alpine", "3.20", [layers[0], layers[1]])
    amd = hub.add_image("library/nginx", None, [layers[0], layers[2]], arch="amd64")
    arm = hub.add_image("library/nginx", None, [layers[3]], arch="arm64")
    hub.add_index("library/nginx", "1.27", [(amd, "amd64", "linux"), (arm, "arm64", "linux")])
    await pull(proxy, ca, "library/alpine", "3.20")
    await pull(proxy, ca, "library/nginx", "1.27")
    await pull(proxy, ca, "library/nginx", "1.27")  # a hit
    await written(proxy)
    return layers


async def test_cache_ls_lists_what_pulls_cached(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cache = tmp_path / "cache"
    proxy = await start_proxy(cache_dir=str(cache))
    await shared_layer_images(hub, proxy, ca)
    status, out, _ = await cli(capsys, "cache", "ls", "--cache-dir", str(cache))
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == ["IMAGE", "DIGEST", "PLATFORMS", "SIZE", "BLOBS", "PULLS",
                                "HITS", "LAST", "PULL"]  # fmt: skip
    assert lines[1].startswith("library/alpine:3.20 ")
    assert lines[2].startswith("library/nginx:1.27 ")
    assert "1/2: linux/amd64" in lines[2]
    assert lines[2].split()[-4:] == ["2", "1", "0s", "ago"]  # pulls, hits, last pull
    assert lines[-1].startswith("2 images, 2 tags, ")
    status, out, _ = await cli(
        capsys, "cache", "ls", "--cache-dir", str(cache), "--repository", "nginx", "--json"
    )
    document = json.loads(out)
    (nginx,) = document["images"]
    assert nginx["tags"] == ["1.27"] and nginx["platforms"] == ["linux/amd64"]
    assert nginx["blobs_cached"] == nginx["blobs_named"] == 3  # config and two layers
    assert nginx["pulls"] == 2 and nginx["hits"] == 1 and nginx["last_used"] is not None
    assert document["totals"]["images"] == 1
    status, out, _ = await cli(capsys, "cache", "ls", "--cache-dir", str(cache), "--registry",
                               "ghcr.io")  # fmt: skip
    assert status == 0 and out.splitlines()[-1].startswith("0 images")


async def test_cache_rm_beside_a_running_mirror_keeps_shared_blobs_and_the_next_pull_refetches(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cache = tmp_path / "cache"
    proxy = await start_proxy(cache_dir=str(cache), manifest_ttl=3600.0)
    layers = await shared_layer_images(hub, proxy, ca)
    status, out, _ = await cli(capsys, "cache", "rm", "alpine:3.20", "--cache-dir", str(cache))
    assert status == 0
    assert out.startswith("removed library/alpine:3.20: 2 blobs")  # its layer and config
    assert "1 blobs kept: other cached images use them" in out
    assert blob_file(cache, layers[0]).exists()  # nginx uses it
    assert not blob_file(cache, layers[1]).exists()
    status, _, err = await cli(capsys, "cache", "rm", "alpine:3.20", "--cache-dir", str(cache))
    assert status == 1 and "library/alpine:3.20 is not cached" in err
    # the running mirror heard of it: the next pull asks the upstream, and caches again
    assert await trio.to_thread.run_sync(pullthrough(proxy).manifests.read_journal_now, 10.0)
    before = manifest_gets(hub, "library/alpine")
    await pull(proxy, ca, "library/alpine", "3.20")
    assert manifest_gets(hub, "library/alpine") == before + 1
    assert blob_file(cache, layers[1]).exists()


async def test_cache_refresh_makes_the_next_pull_ask_the_upstream(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cache = tmp_path / "cache"
    proxy = await start_proxy(cache_dir=str(cache), manifest_ttl=3600.0)
    hub.add_image("library/alpine", "3.20", [make_layer(7, 1000)])
    client = RegistryClient(proxy.url, ca)  # one client: its access is confirmed
    first = await pull(proxy, ca, "library/alpine", "3.20", client)
    moved = hub.add_image("library/alpine", "3.20", [make_layer(8, 1000)])  # pushed upstream
    assert await pull(proxy, ca, "library/alpine", "3.20", client) == first  # fresh for an hour
    await written(proxy)
    status, out, _ = await cli(capsys, "cache", "refresh", "alpine:3.20", "--cache-dir", str(cache))
    assert (status, out) == (0, "refreshed library/alpine:3.20: its next pull asks the upstream\n")
    assert await trio.to_thread.run_sync(pullthrough(proxy).manifests.read_journal_now, 10.0)
    assert await pull(proxy, ca, "library/alpine", "3.20", client) == moved


async def admin(
    proxy: RunningProxy, ca: trustme.CA, method: str, path: str, token: str | None = TOKEN
) -> tuple[int, object]:
    headers = [("authorization", f"Bearer {token}")] if token is not None else []
    r = await fetch(proxy.url + path, ca, method=method, headers=headers)
    return r.status, r.json() if r.body else None


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin-token"
    path.write_text(TOKEN + "\n")
    return path


async def test_the_admin_api_needs_its_token_and_an_allowed_address(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    tmp_path: Path,
    token_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    off = await start_proxy(cache_dir=str(tmp_path / "off"))
    assert (await admin(off, ca, "GET", "/admin/cache"))[0] == 404  # no token file: no API
    # no --ops-allow: this machine only, which the tests are
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"), admin_token_file=str(token_file))
    status, answer = await admin(proxy, ca, "GET", "/admin/cache", token=None)
    assert status == 401 and answer["errors"][0]["code"] == "UNAUTHORIZED"  # type: ignore[index]
    assert (await admin(proxy, ca, "GET", "/admin/cache", token="wrong-token-0123456"))[0] == 401
    status, answer = await admin(proxy, ca, "GET", "/admin/cache")
    assert status == 200 and answer == {"images": [], "totals": answer["totals"]}  # type: ignore[index]
    elsewhere = await start_proxy(
        cache_dir=str(tmp_path / "cache2"),
        admin_token_file=str(token_file),
        ops_allow=parse_networks(["10.0.0.0/8"]),
    )
    status, answer = await admin(elsewhere, ca, "GET", "/admin/cache")
    assert status == 403 and answer["errors"][0]["code"] == "DENIED"  # type: ignore[index]
    allowed = await start_proxy(
        cache_dir=str(tmp_path / "cache3"),
        admin_token_file=str(token_file),
        ops_allow=parse_networks(["127.0.0.1/32"]),
    )
    assert (await admin(allowed, ca, "GET", "/admin/cache"))[0] == 200
    assert TOKEN not in caplog.text and "wrong-token" not in caplog.text


async def test_the_admin_api_removes_and_refreshes(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path, token_file: Path
) -> None:
    cache = tmp_path / "cache"
    proxy = await start_proxy(
        cache_dir=str(cache), admin_token_file=str(token_file), manifest_ttl=3600.0
    )
    layers = await shared_layer_images(hub, proxy, ca)
    status, answer = await admin(proxy, ca, "GET", "/admin/cache?repository=library/*")
    assert status == 200
    assert [i["tags"] for i in answer["images"]] == [["3.20"], ["1.27"]]  # type: ignore[index]
    status, answer = await admin(proxy, ca, "DELETE", "/admin/cache/alpine:3.20")
    assert status == 200 and answer["removed"] == ["library/alpine:3.20"]  # type: ignore[index]
    assert answer["blobs_removed"] == 2 and answer["blobs_kept_in_use_by_other_images"] == 1  # type: ignore[index]
    assert blob_file(cache, layers[0]).exists() and not blob_file(cache, layers[1]).exists()
    assert (await admin(proxy, ca, "DELETE", "/admin/cache/alpine:3.20"))[0] == 404
    before = manifest_gets(hub, "library/alpine")
    await pull(proxy, ca, "library/alpine", "3.20")  # no wait: this very process removed it
    assert manifest_gets(hub, "library/alpine") == before + 1
    before = manifest_gets(hub, "library/nginx")
    status, _ = await admin(proxy, ca, "POST", "/admin/cache/refresh/nginx%3A1.27")
    assert status == 200
    await pull(proxy, ca, "library/nginx", "1.27")
    assert manifest_gets(hub, "library/nginx") > before
    assert (await admin(proxy, ca, "GET", "/admin/cache/refresh/nginx:1.27"))[0] == 405
    assert (await admin(proxy, ca, "DELETE", "/admin/cache/Not%20A%20Name"))[0] == 400


async def test_the_status_page_shows_the_largest_and_most_pulled_images(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    await shared_layer_images(hub, proxy, ca)
    page = (await fetch(proxy.url + "/", ca)).body.decode()
    section = page.split("<h2>Cached images</h2>", 1)[1].split("<h2>", 1)[0]
    largest, pulled = section.split("<th>Most pulled</th>")
    assert largest.index("library/alpine:3.20") > 0 and "library/nginx:1.27" in largest
    assert "2 pulls" in pulled and pulled.index("library/nginx:1.27") < pulled.index(
        "library/alpine:3.20"
    )


def test_a_cache_command_without_a_cache_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["cache", "ls", "--cache-dir", str(tmp_path)]) == 1
    assert "no blob cache in" in capsys.readouterr().err
    os.makedirs(tmp_path / "blobs" / "sha256")
    assert main(["cache", "ls", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("0 images, 0 tags")
    assert main(["cache", "rm", "Bad Name", "--cache-dir", str(tmp_path)]) == 1


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
async def test_skopeo_pulls_again_after_cache_rm(
    hub: FakeHub,
    start_proxy: StartProxy,
    tls_files: TLSFiles,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cache = tmp_path / "cache"
    proxy = await start_proxy(cache_dir=str(cache))
    skopeo = Skopeo(proxy, tls_files, tmp_path)
    layer = make_layer(21, 300_000)
    hub.add_image("library/busybox", "1.36", [layer])

    async def copy(into: str) -> None:
        target = tmp_path / into
        await skopeo.run(
            "copy", "--src-cert-dir", skopeo.cert_dir, skopeo.ref("busybox:1.36"), f"dir:{target}"
        )
        assert hashlib.sha256(layer).hexdigest() in check_dir_copy(target)

    await copy("first")
    await written(proxy)
    assert blob_file(cache, layer).exists()
    status, out, _ = await cli(capsys, "cache", "rm", "busybox", "--cache-dir", str(cache))
    assert status == 0 and out.startswith("removed library/busybox: 2 blobs")
    assert not blob_file(cache, layer).exists()
    assert await trio.to_thread.run_sync(pullthrough(proxy).manifests.read_journal_now, 10.0)
    cdn = sum(1 for s in hub.requests if s.server == "cdn")
    await copy("second")
    assert sum(1 for s in hub.requests if s.server == "cdn") > cdn  # fetched again
    await proxy.fills_ended()
    assert blob_file(cache, layer).exists()  # and cached again
