"""``hubproxy print-config``: each client's snippet parsed with that client's own format."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import pytest
import yaml

from hubproxy.clientconfig import snippet


def test_docker_daemon_json() -> None:
    text, hint = snippet("docker", "https://mirror.example.com", None)
    assert json.loads(text) == {"registry-mirrors": ["https://mirror.example.com"]}
    assert "/etc/docker/daemon.json" in hint
    _, hint = snippet("docker", "https://mirror.example.com:8443", "/srv/ca.pem")
    assert "/etc/docker/certs.d/mirror.example.com:8443/ca.crt" in hint
    _, hint = snippet("docker", "http://192.168.1.5:5000", None)
    assert '"insecure-registries": ["192.168.1.5:5000"]' in hint


def test_containerd_hosts_toml() -> None:
    text, _ = snippet("containerd", "https://mirror.example.com:8443", "/srv/ca.pem")
    hosts = tomllib.loads(text)
    assert hosts["server"] == "https://registry-1.docker.io"
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
    assert document["mirrors"]["docker.io"]["endpoint"] == ["https://mirror.example.com"]
    assert document["configs"]["mirror.example.com"]["tls"]["ca_file"] == "/srv/ca.pem"
    assert "configs" not in yaml.safe_load(snippet("k3s", "https://m.example", None)[0])


def test_podman_registries_conf() -> None:
    conf = tomllib.loads(snippet("podman", "https://mirror.example.com", None)[0])
    (registry,) = conf["registry"]
    assert registry["prefix"] == "docker.io"
    assert registry["mirror"] == [{"location": "mirror.example.com"}]
    plain = tomllib.loads(snippet("podman", "http://10.0.0.2:5000", None)[0])
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
    assert result.stderr.startswith(b"# put this in /etc/containerd/certs.d/docker.io/hosts.toml")
    bad = subprocess.run(
        [sys.executable, "-m", "hubproxy", "print-config", "docker", "--url", "nope"],
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert bad.returncode == 2
    assert b"hubproxy print-config: error:" in bad.stderr
