"""``hubproxy print-config``: each client's snippet parsed with that client's own format."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib

import pytest
import yaml

from hubproxy.ops.clientconfig import BUILTIN_NAMES, reference_host, snippet
from hubproxy.policy.urls import parse_url


def test_docker_daemon_json() -> None:
    text, hint = snippet("docker", "https://mirror.example.com", None)
    assert json.loads(text) == {"registry-mirrors": ["https://mirror.example.com"]}
    assert "/etc/docker/daemon.json" in hint
    _, hint = snippet("docker", "https://mirror.example.com:8443", "/srv/ca.pem")
    assert "/etc/docker/certs.d/mirror.example.com:8443/ca.crt" in hint


@pytest.mark.parametrize(
    ("url", "insecure"),
    [
        ("http://192.168.1.10:5000", ["192.168.1.10:5000"]),
        ("http://mirror.lan", ["mirror.lan"]),
        # dockerd's default insecure range is 127.0.0.0/8: listing loopback costs nothing, and
        # ::1 is outside it
        ("http://127.0.0.1:5000", ["127.0.0.1:5000"]),
        ("http://[::1]:5000", ["[::1]:5000", "localhost:5000"]),
        ("http://[2001:db8::1]:5000", ["[2001:db8::1]:5000"]),  # a host:port, not a reference
        ("http://[::ffff:10.0.0.2]:5000", ["[::ffff:10.0.0.2]:5000", "10.0.0.2:5000"]),
    ],
)
def test_docker_plain_http_mirror_is_insecure_in_the_json(url: str, insecure: list[str]) -> None:
    """dockerd skips an http:// mirror not listed in insecure-registries without a word, so the
    JSON to paste carries it (it was a stderr hint only)."""
    text, hint = snippet("docker", url, None)
    assert json.loads(text) == {"registry-mirrors": [url], "insecure-registries": insecure}
    assert "insecure" not in hint
    assert "insecure-registries" not in snippet("docker", url.replace("http:", "https:"), None)[0]


def test_plain_http_mirror_in_the_other_formats() -> None:
    """containerd (and nerdctl) and k3s read the endpoint URL's http:// as plain HTTP;
    registries.conf needs insecure = true on each mirror."""
    url = "http://192.168.1.10:5000"
    hosts = tomllib.loads(snippet("containerd", url, None)[0])
    assert list(hosts["host"]) == [url] and "skip_verify" not in hosts["host"][url]
    assert snippet("nerdctl", url, None)[0] == snippet("containerd", url, None)[0]
    document = yaml.safe_load(snippet("k3s", url, None)[0])
    assert {tuple(m["endpoint"]) for m in document["mirrors"].values()} == {(url,)}
    for client in ("podman", "cri-o", "crio"):
        conf = tomllib.loads(snippet(client, url, None)[0])
        assert all(m["insecure"] is True for r in conf["registry"] for m in r["mirror"])


@pytest.mark.parametrize(
    ("alias", "client", "hint"),
    [
        (
            "dockerd",
            "docker",
            "# put this in /etc/docker/daemon.json, then: systemctl restart docker; "
            "other registries by path: docker pull mirror.lan/ghcr.io/OWNER/IMAGE",
        ),
        (
            "nerdctl",
            "containerd",
            "# put this in /etc/containerd/certs.d/_default/hosts.toml "
            "(rootless: ~/.config/containerd/certs.d/_default/hosts.toml); nerdctl reads it at "
            "each pull",
        ),
        (
            "cri-o",
            "podman",
            "# put this in /etc/containers/registries.conf, then: systemctl "
            "reload crio (cri-o re-reads it on SIGHUP)",
        ),
        (
            "crio",
            "podman",
            "# put this in /etc/containers/registries.conf, then: systemctl "
            "reload crio (cri-o re-reads it on SIGHUP)",
        ),
    ],
)
def test_client_aliases_on_the_command_line(alias: str, client: str, hint: str) -> None:
    """Each alias prints its client's format, with the hint for the tool named."""
    url = "https://mirror.lan"
    result = subprocess.run(
        [sys.executable, "-m", "hubproxy", "print-config", alias, "--url", url],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert result.stdout == snippet(client, url, None)[0]
    assert result.stderr == hint + "\n"


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
    listed = subprocess.run(
        [
            *(sys.executable, "-m", "hubproxy", "print-config", "k3s", "--url", "https://m.lan"),
            *("--registry", "ghcr.io", "--only-listed-registries"),
        ],
        capture_output=True,
        check=True,
        timeout=30,
    )
    # a mirror serving only the listed registries: no snippet sends the others to it
    assert sorted(yaml.safe_load(listed.stdout)["mirrors"]) == ["docker.io", "ghcr.io"]
    bad = subprocess.run(
        [sys.executable, "-m", "hubproxy", "print-config", "docker", "--url", "nope"],
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert bad.returncode == 2
    assert b"hubproxy print-config: error:" in bad.stderr
    ipv6 = subprocess.run(
        [
            sys.executable,
            "-m",
            "hubproxy",
            "print-config",
            "podman",
            "--url",
            "https://[2001:db8::1]",
        ],
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert (ipv6.returncode, ipv6.stdout) == (2, b"")
    assert b"give the mirror a host name" in ipv6.stderr


# The image reference grammar of docker 20.10 and podman 4.3 (distribution/reference before it
# learned IPv6): domain = component ("." component)* [":" port], then "/"-separated path
# components. Every image reference we suggest must match it.
_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_NAME = r"[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*"
OLD_REFERENCE = re.compile(rf"{_COMPONENT}(?:\.{_COMPONENT})*(?::[0-9]+)?(?:/{_NAME})+")

MIRRORS = [
    "https://mirror.example.com",
    "https://mirror.example.com:8443",
    "http://192.168.1.5:5000",
    "http://localhost:5000",
    "http://[::1]:5000",
    "https://[::1]:5000",
    "https://[::1]",
    "http://[0:0:0:0:0:0:0:1]:5000",
    "http://[::ffff:10.0.0.2]:5000",
    "https://[2001:db8::1]:5000",
    "http://[fe80::1%25eth0]:5000",
]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://mirror.example.com", "mirror.example.com"),
        ("https://mirror.example.com:8443", "mirror.example.com:8443"),
        ("http://192.168.1.5:5000", "192.168.1.5:5000"),
        ("http://localhost:5000", "localhost:5000"),
        ("http://[::1]:5000", "localhost:5000"),  # not "[::1]:5000": docker 20.10 refuses it
        ("https://[::1]", "localhost"),
        ("http://[::1]:80", "localhost"),
        ("http://[0:0:0:0:0:0:0:1]:5000", "localhost:5000"),
        ("http://[::ffff:10.0.0.2]:5000", "10.0.0.2:5000"),  # no grammar takes it bracketed
        ("https://[2001:db8::1]:5000", None),
        ("http://[fe80::1%25eth0]:5000", None),
    ],
)
def test_reference_host(url: str, expected: str | None) -> None:
    assert reference_host(parse_url(url).origin) == expected


def _suggested_references(client: str, url: str) -> list[str]:
    """Every image reference in ``client``'s snippet and hint for ``url`` (podman: each mirror
    location with an image name appended, as containers/image builds it)."""
    try:
        text, hint = snippet(client, url, "/srv/ca.pem")
    except ValueError:
        return []
    found = [ref.replace("OWNER/IMAGE", "owner/image") for ref in PULL.findall(hint)]
    if client == "podman":
        for registry in tomllib.loads(text)["registry"]:
            found += [f"{mirror['location']}/library/nginx" for mirror in registry["mirror"]]
    return found


PULL = re.compile(r"docker pull (\S+)")


@pytest.mark.parametrize("url", MIRRORS)
@pytest.mark.parametrize("client", ["docker", "podman"])
def test_every_suggested_reference_parses_for_older_clients(client: str, url: str) -> None:
    references = _suggested_references(client, url)
    for reference in references:
        assert OLD_REFERENCE.fullmatch(reference), reference
    expected = reference_host(parse_url(url).origin) is not None
    assert bool(references) == expected  # a nameable mirror gets its example, no other does


def test_loopback_ipv6_mirror() -> None:
    """A mirror at [::1]: endpoint URLs keep the literal, image references say localhost."""
    text, hint = snippet("docker", "http://[::1]:5000", None)
    assert json.loads(text)["registry-mirrors"] == ["http://[::1]:5000"]
    assert hint.endswith("docker pull localhost:5000/ghcr.io/OWNER/IMAGE")
    _, hint = snippet("docker", "https://[::1]:5000", "/srv/ca.pem")
    # the mirror is looked up by its URL's host, a pull by path by the reference's
    assert "/etc/docker/certs.d/[::1]:5000/ca.crt" in hint
    assert "/etc/docker/certs.d/localhost:5000/ca.crt" in hint

    conf = tomllib.loads(snippet("podman", "http://[::1]:5000", None, ["docker.io", "ghcr.io"])[0])
    mirrors = [registry["mirror"] for registry in conf["registry"]]
    assert mirrors == [
        [{"location": "localhost:5000", "insecure": True}],
        [{"location": "localhost:5000/ghcr.io", "insecure": True}],
    ]
    _, hint = snippet("podman", "https://[::1]:5000", "/srv/ca.pem")
    assert "/etc/containers/certs.d/localhost:5000/ca.crt" in hint
    assert "its certificate must name localhost" in hint
    _, hint = snippet("podman", "https://mirror.example.com", None)
    assert "certificate" not in hint

    hosts = tomllib.loads(snippet("containerd", "https://[::1]:5000", None)[0])
    assert list(hosts["host"]) == ["https://[::1]:5000"]
    document = yaml.safe_load(snippet("k3s", "https://[::1]:5000", "/srv/ca.pem")[0])
    assert document["mirrors"]["ghcr.io"]["endpoint"] == ["https://[::1]:5000"]
    assert list(document["configs"]) == ["[::1]:5000"]


def test_other_ipv6_mirror() -> None:
    """No image reference can name [2001:db8::1] for the older clients: docker gets its
    daemon.json and a hint to use a host name, podman (whose mirror location is a reference)
    is refused with the same advice."""
    text, hint = snippet("docker", "https://[2001:db8::1]:5000", None)
    assert json.loads(text) == {"registry-mirrors": ["https://[2001:db8::1]:5000"]}
    assert "docker pull" not in hint
    assert "give the mirror a host name" in hint
    with pytest.raises(ValueError, match="give the mirror a host name"):
        snippet("podman", "https://[2001:db8::1]:5000", None)
    assert tomllib.loads(snippet("containerd", "https://[2001:db8::1]:5000", None)[0])["host"]


def test_ipv4_mapped_mirror() -> None:
    _, hint = snippet("docker", "http://[::ffff:10.0.0.2]:5000", "/srv/ca.pem")
    assert hint.endswith("docker pull 10.0.0.2:5000/ghcr.io/OWNER/IMAGE")
    assert "/etc/docker/certs.d/10.0.0.2:5000/ca.crt" in hint
