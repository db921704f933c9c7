"""End to end with a real registry client: skopeo pulls through hubproxy over TLS from the fake
Docker Hub (registry, token service and CDN on three origins), trusting the test CA."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from hubproxy.ops.usersfile import add_user
from tests.conftest import RunningProxy, StartProxy, TLSFiles
from tests.fakehub import FakeHub, make_layer

pytestmark = pytest.mark.skipif(
    shutil.which("skopeo") is None, reason="skopeo is not installed (tests/run.sh installs it)"
)


class Skopeo:
    def __init__(self, proxy: RunningProxy, tls_files: TLSFiles, home: Path) -> None:
        self.host = proxy.url.removeprefix("https://")
        self.cert_dir = str(tls_files.cert_dir)
        self.home = home
        self.policy = home / "policy.json"
        self.policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))

    async def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),  # no stored credentials
            "REGISTRY_AUTH_FILE": str(self.home / "auth.json"),
        }
        with trio.fail_after(120):
            result = await trio.run_process(
                ["skopeo", "--policy", str(self.policy), *args],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=env,
            )
        if check and result.returncode != 0:
            raise AssertionError(f"skopeo {args} failed:\n{result.stderr.decode()}")
        return result

    def ref(self, name: str) -> str:
        return f"docker://{self.host}/{name}"


@pytest.fixture
async def skopeo(start_proxy: StartProxy, tls_files: TLSFiles, tmp_path: Path) -> Skopeo:
    proxy = await start_proxy()
    return Skopeo(proxy, tls_files, tmp_path)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_dir_copy(target: Path) -> list[str]:
    """Every blob skopeo wrote to a dir: copy is named by its sha256 and must match it."""
    checked = []
    for path in target.iterdir():
        if len(path.name) == 64:  # blobs are stored under their hex digest
            assert sha256_file(path) == path.name, path
            checked.append(path.name)
    return checked


async def test_inspect_and_list_tags(hub: FakeHub, skopeo: Skopeo) -> None:
    digest = hub.add_image("library/alpine", "3.20", [make_layer(1, 10_000)], arch="arm64")
    hub.add_image("library/alpine", "3.19", [make_layer(2, 10_000)])
    result = await skopeo.run("inspect", "--cert-dir", skopeo.cert_dir, skopeo.ref("alpine:3.20"))
    info = json.loads(result.stdout)
    assert info["Digest"] == digest
    assert info["Architecture"] == "arm64"
    tags = await skopeo.run("list-tags", "--cert-dir", skopeo.cert_dir, skopeo.ref("alpine"))
    assert sorted(json.loads(tags.stdout)["Tags"]) == ["3.19", "3.20"]


async def test_copy_multi_layer_image(hub: FakeHub, skopeo: Skopeo, tmp_path: Path) -> None:
    layers = [make_layer(i, size) for i, size in enumerate([3_000_000, 700_000, 5_000, 100])]
    hub.add_image("library/busybox", "latest", layers)
    target = tmp_path / "busybox"
    await skopeo.run(
        "copy", "--src-cert-dir", skopeo.cert_dir, skopeo.ref("busybox:latest"), f"dir:{target}"
    )
    checked = check_dir_copy(target)
    for layer in layers:
        assert hashlib.sha256(layer).hexdigest() in checked
    cdn = [s for s in hub.requests if s.server == "cdn"]
    assert len(cdn) >= len(layers)
    assert all("authorization" not in s.headers for s in cdn)


async def test_copy_multi_arch_index(hub: FakeHub, skopeo: Skopeo, tmp_path: Path) -> None:
    amd = hub.add_image("library/nginx", None, [make_layer(10, 400_000)], arch="amd64")
    arm = hub.add_image("library/nginx", None, [make_layer(11, 400_000)], arch="arm64")
    index = hub.add_index(
        "library/nginx", "1.27", [(amd, "amd64", "linux"), (arm, "arm64", "linux")]
    )
    target = tmp_path / "nginx"
    await skopeo.run(
        "copy",
        "--all",
        "--src-cert-dir",
        skopeo.cert_dir,
        skopeo.ref("nginx:1.27"),
        f"dir:{target}",
    )
    checked = check_dir_copy(target)
    assert len(checked) >= 4  # two layers and two configs
    manifest = (target / "manifest.json").read_bytes()
    assert "sha256:" + hashlib.sha256(manifest).hexdigest() == index  # byte-exact index
    for digest in (amd, arm):
        assert (target / f"{digest.removeprefix('sha256:')}.manifest.json").exists()


async def test_authenticated_and_refused_private_pulls(
    hub: FakeHub, skopeo: Skopeo, tmp_path: Path
) -> None:
    layer = make_layer(20, 200_000)
    hub.add_image("acme/secret", "v1", [layer])
    hub.add_user("alice", "s3cret")
    hub.make_private("acme/secret", "alice")
    target = tmp_path / "secret"
    await skopeo.run(
        "copy",
        "--src-cert-dir",
        skopeo.cert_dir,
        "--src-creds",
        "alice:s3cret",
        skopeo.ref("acme/secret:v1"),
        f"dir:{target}",
    )
    assert hashlib.sha256(layer).hexdigest() in check_dir_copy(target)
    refused = await skopeo.run(
        "inspect", "--cert-dir", skopeo.cert_dir, skopeo.ref("acme/secret:v1"), check=False
    )
    assert refused.returncode != 0
    message = refused.stderr.decode().lower()
    assert "unauthorized" in message or "authentication required" in message, message


async def test_mirror_users_log_in_with_skopeo(
    hub: FakeHub, start_proxy: StartProxy, tls_files: TLSFiles, tmp_path: Path
) -> None:
    """--users: a real client logs in to the mirror (its credentials reach our token endpoint,
    it gets a sealed token) and pulls; without or with wrong credentials it is refused."""
    layers = [make_layer(30, 400_000), make_layer(31, 1_000)]
    hub.add_image("library/nginx", "1.27", layers)
    users = tmp_path / "users"
    add_user(users, "bob", "mirror-pass-123")
    proxy = await start_proxy(users_file=str(users), cache_dir=str(tmp_path / "cache"))
    skopeo = Skopeo(proxy, tls_files, tmp_path)
    target = tmp_path / "nginx"
    await skopeo.run(
        "copy",
        "--src-cert-dir",
        skopeo.cert_dir,
        "--src-creds",
        "bob:mirror-pass-123",
        skopeo.ref("nginx:1.27"),
        f"dir:{target}",
    )
    checked = check_dir_copy(target)
    assert all(hashlib.sha256(layer).hexdigest() in checked for layer in layers)
    for creds in ([], ["--creds", "bob:wrong"]):
        refused = await skopeo.run(
            "inspect", "--cert-dir", skopeo.cert_dir, *creds, skopeo.ref("nginx:1.27"), check=False
        )
        assert refused.returncode != 0, creds
        message = refused.stderr.decode().lower()
        assert "unauthorized" in message or "authentication required" in message, message
    # Docker Hub saw anonymous token requests only: bob's login stayed with the mirror
    assert all("authorization" not in s.headers for s in hub.requests if s.server == "auth")


async def test_push_through_a_plain_http_mirror_to_a_registry_honouring_forwarded_proto(
    hub: FakeHub, start_proxy: StartProxy, tls_files: TLSFiles, tmp_path: Path
) -> None:
    """distribution builds absolute upload URLs from X-Forwarded-Proto and Host: behind a
    plain-HTTP mirror they read http://<upstream host:port>/..., which the mirror must turn back
    into its own paths (dockerd 20.10 otherwise speaks plain HTTP to the registry's TLS port)."""
    hub.absolute_locations = True
    hub.add_user("alice", "s3cret")
    layers = [make_layer(i, size) for i, size in enumerate([400_000, 3_000])]
    hub.add_image("library/busybox", "latest", layers)
    proxy = await start_proxy(tls=False)
    skopeo = Skopeo(proxy, tls_files, tmp_path)
    skopeo.host = proxy.url.removeprefix("http://")
    image = tmp_path / "busybox"
    await skopeo.run("copy", "--src-tls-verify=false", skopeo.ref("busybox:latest"), f"dir:{image}")
    await skopeo.run(
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        "alice:s3cret",
        f"dir:{image}",
        skopeo.ref("alice/app:v1"),
    )
    pushed = tmp_path / "pushed"
    await skopeo.run(
        "copy",
        "--src-tls-verify=false",
        "--src-creds",
        "alice:s3cret",
        skopeo.ref("alice/app:v1"),
        f"dir:{pushed}",
    )
    for layer in layers:
        assert hashlib.sha256(layer).hexdigest() in check_dir_copy(pushed)
    uploads = [s for s in hub.requests if s.method in ("PATCH", "PUT") and "/uploads/" in s.target]
    assert uploads and all(s.server == "registry" for s in uploads)
