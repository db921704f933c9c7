"""Client setup snippets: what to paste into docker, containerd, k3s and podman to use a mirror.

Pure functions from the mirror's URL (and an optional private CA file) to the exact text of each
client's configuration, printed by ``hubproxy print-config CLIENT --url URL [--ca FILE]``. Each
output is checked by a test that parses it with the client's own format (JSON, TOML, YAML).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from .registries import BUILTIN_REGISTRIES, DEFAULT_REGISTRY
from .urls import Url, parse_url

CLIENTS = ("docker", "containerd", "k3s", "podman")
BUILTIN_NAMES = tuple(name for name, _, _ in BUILTIN_REGISTRIES)


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def docker(url: Url) -> str:
    """``/etc/docker/daemon.json``: dockerd uses registry-mirrors for docker.io images only."""
    return json.dumps({"registry-mirrors": [str(url.origin)]}, indent=2) + "\n"


def containerd(url: Url, ca: str | None, registries: Sequence[str]) -> str:
    """``/etc/containerd/certs.d/_default/hosts.toml``: one mirror for every registry.

    containerd adds ``?ns=<registry>`` to each request it sends to a mirror whose host is not
    the registry's, which is how hubproxy tells the registries apart. With no ``server`` line
    the registry itself stays the fallback: a registry hubproxy does not serve answers 404
    there, and containerd then pulls from the registry directly."""
    lines = [
        f"# hubproxy serves: {', '.join(registries)}",
        f"[host.{_toml_string(str(url.origin))}]",
        '  capabilities = ["pull", "resolve"]',
    ]
    if ca:
        lines.append(f"  ca = {_toml_string(ca)}")
    return "\n".join(lines) + "\n"


def k3s(url: Url, ca: str | None, registries: Sequence[str]) -> str:
    """``/etc/rancher/k3s/registries.yaml``: the mirror as the endpoint of each registry."""
    lines = ["mirrors:"]
    for name in registries:
        lines += [
            f"  {json.dumps(name)}:",
            "    endpoint:",
            f"      - {json.dumps(str(url.origin))}",
        ]
    if ca:
        lines += [
            "configs:",
            f"  {json.dumps(url.origin.authority)}:",
            "    tls:",
            f"      ca_file: {json.dumps(ca)}",
        ]
    return "\n".join(lines) + "\n"


def podman(url: Url, registries: Sequence[str]) -> str:
    """``/etc/containers/registries.conf`` (podman, skopeo, buildah, cri-o): Docker Hub at the
    mirror's root, every other registry under its name as a path prefix."""
    lines: list[str] = []
    for name in registries:
        # the mirror's root serves the default registry; the others are path prefixes
        root = name == DEFAULT_REGISTRY
        location = url.origin.authority if root else f"{url.origin.authority}/{name}"
        lines += [
            "[[registry]]",
            f"prefix = {_toml_string(name)}",
            f"location = {_toml_string(name)}",
            "",
            "[[registry.mirror]]",
            f"location = {_toml_string(location)}",
        ]
        if not url.origin.tls:
            lines.append("insecure = true")
        lines.append("")
    return "\n".join(lines)


def snippet(
    client: str,
    mirror_url: str,
    ca: str | None,
    registries: Sequence[str] = BUILTIN_NAMES,
) -> tuple[str, str]:
    """The configuration text for ``client`` and a one-line hint on where it goes (and what
    else to do); ValueError for an unknown client or an unusable URL. ``registries``: the
    registries the mirror serves (docker's registry-mirrors covers Docker Hub only)."""
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
        hint += f"; other registries by path: docker pull {host}/ghcr.io/OWNER/IMAGE"
        return docker(url), hint
    if client == "containerd":
        return (
            containerd(url, ca, registries),
            "put this in /etc/containerd/certs.d/_default/hosts.toml (config_path = "
            '"/etc/containerd/certs.d" in the CRI registry section), then restart containerd',
        )
    if client == "k3s":
        return (
            k3s(url, ca, registries),
            "put this in /etc/rancher/k3s/registries.yaml, then restart k3s",
        )
    if client == "podman":
        hint = "put this in /etc/containers/registries.conf"
        if ca:
            hint += f"; and copy {ca} to /etc/containers/certs.d/{host}/ca.crt"
        return podman(url, registries), hint
    raise ValueError(f"unknown client {client!r}: one of {', '.join(CLIENTS)}")
