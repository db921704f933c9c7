"""Client setup snippets: what to paste into docker, containerd, k3s and podman to use a mirror.

Pure functions from the mirror's URL (and an optional private CA file) to the exact text of each
client's configuration, printed by ``hubproxy print-config CLIENT --url URL [--ca FILE]``. Each
output is checked by a test that parses it with the client's own format (JSON, TOML, YAML).
"""

from __future__ import annotations

import json

from .urls import Url, parse_url

CLIENTS = ("docker", "containerd", "k3s", "podman")


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def docker(url: Url) -> str:
    """``/etc/docker/daemon.json``: dockerd uses registry-mirrors for docker.io images only."""
    return json.dumps({"registry-mirrors": [str(url.origin)]}, indent=2) + "\n"


def containerd(url: Url, ca: str | None) -> str:
    """``/etc/containerd/certs.d/docker.io/hosts.toml`` (containerd's ``config_path``)."""
    lines = [
        'server = "https://registry-1.docker.io"',
        "",
        f"[host.{_toml_string(str(url.origin))}]",
        '  capabilities = ["pull", "resolve"]',
    ]
    if ca:
        lines.append(f"  ca = {_toml_string(ca)}")
    return "\n".join(lines) + "\n"


def k3s(url: Url, ca: str | None) -> str:
    """``/etc/rancher/k3s/registries.yaml``."""
    lines = ["mirrors:", "  docker.io:", "    endpoint:", f"      - {json.dumps(str(url.origin))}"]
    if ca:
        lines += [
            "configs:",
            f"  {json.dumps(url.origin.authority)}:",
            "    tls:",
            f"      ca_file: {json.dumps(ca)}",
        ]
    return "\n".join(lines) + "\n"


def podman(url: Url) -> str:
    """``/etc/containers/registries.conf`` (podman, skopeo, buildah, cri-o)."""
    lines = [
        "[[registry]]",
        'prefix = "docker.io"',
        'location = "docker.io"',
        "",
        "[[registry.mirror]]",
        f"location = {_toml_string(url.origin.authority)}",
    ]
    if not url.origin.tls:
        lines.append("insecure = true")
    return "\n".join(lines) + "\n"


def snippet(client: str, mirror_url: str, ca: str | None) -> tuple[str, str]:
    """The configuration text for ``client`` and a one-line hint on where it goes (and what
    else to do); ValueError for an unknown client or an unusable URL."""
    url = parse_url(mirror_url)
    if url.target not in ("", "/"):
        raise ValueError(f"a mirror URL has no path: {mirror_url!r}")
    host = url.origin.authority
    if client == "docker":
        hint = "put this in /etc/docker/daemon.json, then: systemctl restart docker"
        if ca:
            hint += f"; and copy {ca} to /etc/docker/certs.d/{host}/ca.crt"
        if not url.origin.tls and url.origin.host not in ("127.0.0.1", "localhost", "::1"):
            hint += f'; an http mirror also needs "insecure-registries": ["{host}"]'
        return docker(url), hint
    if client == "containerd":
        return (
            containerd(url, ca),
            "put this in /etc/containerd/certs.d/docker.io/hosts.toml (config_path = "
            '"/etc/containerd/certs.d" in the CRI registry section), then restart containerd',
        )
    if client == "k3s":
        return k3s(url, ca), "put this in /etc/rancher/k3s/registries.yaml, then restart k3s"
    if client == "podman":
        hint = "put this in /etc/containers/registries.conf"
        if ca:
            hint += f"; and copy {ca} to /etc/containers/certs.d/{host}/ca.crt"
        return podman(url), hint
    raise ValueError(f"unknown client {client!r}: one of {', '.join(CLIENTS)}")
