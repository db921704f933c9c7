"""``hubproxy print-config``: each client's snippet parsed with that client's own format."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import pytest
import yaml

from hubproxy.clientconfig import BUILTIN_NAMES, snippet


def test_docker_daemon_json() -> None:
    text, hint = snippet("docker", "https://mirror.example.com", None)
    assert json.loads(text) == {"registry-mirrors": ["https://mirror.example.com"]}
    assert "/etc/docker/daemon.json" in hint
    _, hint = snippet("docker", "https://mirror.example.com:8443", "/srv/ca.pem")
    assert "/etc/docker/certs.d/mirror.example.com:8443/ca.crt" in hint
    _, hint = snippet("docker", "http://192.168.1.5:5000", None)
    assert '"insecure-registries": ["192.168.1.5:5000"]' in hint


def test_containerd_hosts_toml() -> None:
    text, hint = snippet("containerd", "https://mirror.example.com:8443", "/srv/ca.pem")
    assert "/etc/containerd/certs.d/_default/hosts.toml" in hint
    hosts = tomllib.loads(text)
    # _default: every registry; without "server" the registry itself stays the fallback
    assert "server" not in hosts
    assert text.startswith("# hubproxy serves: docker.io, ghcr.io, quay.io, registry.k8s.io,")
    host = hosts["host"]["https://mirror.example.com:8443"]
    assert host["capabilities"] == ["pull", "resolve"]
    assert host["ca"] == "/srv/ca.pem"
    assert (
        "ca"
        not in tomllib.loads(snippet("containerd", "https://m.example", None)[0])["host"][
            "https://m.example"
        ]
    )


def test_k3s_registries_yaml() -> None:
    text, _ = snippet("k3s", "https://mirror.example.com", "/srv/ca.pem")
    document = yaml.safe_load(text)
    assert set(document["mirrors"]) == set(BUILTIN_NAMES)
    for name in BUILTIN_NAMES:
        assert document["mirrors"][name]["endpoint"] == ["https://mirror.example.com"]
    assert document["configs"]["mirror.example.com"]["tls"]["ca_file"] == "/srv/ca.pem"
    assert "configs" not in yaml.safe_load(snippet("k3s", "https://m.example", None)[0])


def test_podman_registries_conf() -> None:
    conf = tomllib.loads(snippet("podman", "https://mirror.example.com", None)[0])
    by_prefix = {registry["prefix"]: registry for registry in conf["registry"]}
    assert set(by_prefix) == set(BUILTIN_NAMES)
    assert by_prefix["docker.io"]["mirror"] == [{"location": "mirror.example.com"}]
    # the other registries through the mirror's path prefix
    assert by_prefix["ghcr.io"]["location"] == "ghcr.io"
    assert by_prefix["ghcr.io"]["mirror"] == [{"location": "mirror.example.com/ghcr.io"}]
    plain = tomllib.loads(snippet("podman", "http://10.0.0.2:5000", None, ["docker.io"])[0])
    assert plain["registry"][0]["mirror"] == [{"location": "10.0.0.2:5000", "insecure": True}]


@pytest.mark.parametrize(
    ("client", "url"),
    [("lxc", "https://m.example"), ("docker", "ftp://m.example"), ("k3s", "https://m/x")],
)
def test_bad_input_is_refused(client: str, url: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        snippet(client, url, None)


def test_command_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hubproxy", "print-config", "containerd", "--url", "https://m.lan"],
        capture_output=True,
        check=True,
        timeout=30,
    )
    assert tomllib.loads(result.stdout.decode())["host"]["https://m.lan"]["capabilities"]
    assert result.stderr.startswith(b"# put this in /etc/containerd/certs.d/_default/hosts.toml")
    extra = subprocess.run(
        [
            *(sys.executable, "-m", "hubproxy", "print-config", "k3s", "--url", "https://m.lan"),
            *("--registry", "registry.example.com"),
        ],
        capture_output=True,
        check=True,
        timeout=30,
    )
    assert "registry.example.com" in yaml.safe_load(extra.stdout)["mirrors"]
    bad = subprocess.run(
        [sys.executable, "-m", "hubproxy", "print-config", "docker", "--url", "nope"],
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert bad.returncode == 2
    assert b"hubproxy print-config: error:" in bad.stderr
