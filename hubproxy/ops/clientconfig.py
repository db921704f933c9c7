"""Client setup snippets: what to paste into docker, containerd, k3s and podman to use a mirror.

Pure functions from the mirror's URL (and an optional private CA file) to the exact text of each
client's configuration, printed by ``hubproxy print-config CLIENT --url URL [--ca FILE]``. Each
output is checked by a test that parses it with the client's own format (JSON, TOML, YAML).

Four formats serve seven clients: dockerd reads daemon.json (``docker``); containerd and nerdctl
read the same hosts.toml directory; k3s its registries.yaml; podman, skopeo, buildah and cri-o
containers/image's registries.conf. A plain-HTTP mirror must be allowed in each format, or the
client skips it without a word and pulls from the registry itself: dockerd needs the mirror in
``insecure-registries`` (only 127.0.0.0/8 is insecure by default, not ``::1``), registries.conf
``insecure = true``; containerd and k3s take the ``http://`` of the endpoint URL as plain HTTP
(``skip_verify`` is about certificates, not the scheme).

Two kinds of text name the mirror. Endpoint URLs (daemon.json, hosts.toml, registries.yaml) take
any host, an IPv6 literal in brackets too. Image references (``docker pull HOST/...``, podman's
mirror ``location``, which containers/image parses as a reference prefix) do not: the reference
grammar of docker 20.10 and podman 4.3 (distribution/reference before it took bracketed IPv6)
allows only a domain name or an IPv4 address before the port. ``reference_host`` is the one rule for
what an image reference may call the mirror.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence

from ..policy.registries import BUILTIN_REGISTRIES, DEFAULT_REGISTRY
from ..policy.urls import DEFAULT_PORTS, Origin, Url, parse_url

CLIENTS = ("docker", "containerd", "k3s", "podman")
# other names print-config takes: the client whose format each one reads
ALIASES = {"dockerd": "docker", "nerdctl": "containerd", "cri-o": "podman", "crio": "podman"}
CLIENT_NAMES = ("docker", "dockerd", "containerd", "nerdctl", "k3s", "podman", "cri-o", "crio")
BUILTIN_NAMES = tuple(name for name, _, _ in BUILTIN_REGISTRIES)


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def reference_name(host: str) -> str | None:
    """What an image reference may call the host ``host`` (as ``Origin`` keeps it: lowercase,
    an IPv6 literal without brackets), for older docker and podman; None when nothing. A domain
    name or an IPv4 address is used as it is; ``::1`` becomes ``localhost`` (which resolves to
    ::1 and 127.0.0.1, and the clients try each address); an IPv4-mapped address becomes its IPv4
    form (no grammar accepts it bracketed); any other IPv6 address has no form they accept."""
    if ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host)
    except ValueError:  # a zone ("fe80::1%eth0"): excluded even by the newer grammar
        return None
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    if address.is_loopback:
        return "localhost"
    return None


def reference_host(origin: Origin) -> str | None:
    """``host[:port]`` for the mirror at ``origin`` in an image reference (``reference_name``,
    the port left out when it is the scheme's default); None when no reference can name it."""
    name = reference_name(origin.host)
    if name is None or DEFAULT_PORTS[origin.scheme] == origin.port:
        return name
    return f"{name}:{origin.port}"


def _no_reference(origin: Origin) -> str:
    return (
        f"an image reference cannot name the IPv6 address {origin.host} (docker 20.10 and "
        "podman 4.3 accept none, newer ones no zone): give the mirror a host name"
    )


def docker_names(url: Url) -> list[str]:
    """The names dockerd looks the mirror up by, in ``certs.d`` and ``insecure-registries``:
    the URL's ``host[:port]`` (registry-mirrors), and the image reference's if it differs (a
    pull by path, ``docker pull HOST/ghcr.io/...``)."""
    host = url.origin.authority
    reference = reference_host(url.origin)
    return [host] if reference in (None, host) else [host, reference]


def docker(url: Url) -> str:
    """``/etc/docker/daemon.json``: dockerd uses registry-mirrors for docker.io images only. A
    plain-HTTP mirror is listed in insecure-registries too, or dockerd skips it silently."""
    settings: dict[str, list[str]] = {"registry-mirrors": [str(url.origin)]}
    if not url.origin.tls:
        settings["insecure-registries"] = docker_names(url)
    return json.dumps(settings, indent=2) + "\n"


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
    mirror's root, every other registry under its name as a path prefix. ValueError when the
    mirror's host cannot appear in an image reference (``reference_host``)."""
    # containers/image parses location + the rest of the image name as a reference
    host = reference_host(url.origin)
    if host is None:
        raise ValueError(f"podman cannot use {url.origin}: {_no_reference(url.origin)}")
    lines: list[str] = []
    for name in registries:
        # the mirror's root serves the default registry; the others are path prefixes
        root = name == DEFAULT_REGISTRY
        location = host if root else f"{host}/{name}"
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
    """The configuration text for ``client`` (a name in ``CLIENT_NAMES``) and a one-line hint
    on where it goes (and what else to do); ValueError for an unknown client or an unusable
    URL. ``registries``: the registries the mirror serves (docker's registry-mirrors covers
    Docker Hub only)."""
    url = parse_url(mirror_url)
    if url.target not in ("", "/"):
        raise ValueError(f"a mirror URL has no path: {mirror_url!r}")
    reference = reference_host(url.origin)
    kind = ALIASES.get(client, client)
    if kind == "docker":
        hint = "put this in /etc/docker/daemon.json, then: systemctl restart docker"
        if ca:
            places = " and ".join(
                f"/etc/docker/certs.d/{name}/ca.crt" for name in docker_names(url)
            )
            hint += f"; and copy {ca} to {places}"
        if reference is None:
            hint += f"; other registries by path: {_no_reference(url.origin)}"
        else:
            hint += f"; other registries by path: docker pull {reference}/ghcr.io/OWNER/IMAGE"
        return docker(url), hint
    if kind == "containerd":
        if client == "nerdctl":
            hint = (
                "put this in /etc/containerd/certs.d/_default/hosts.toml (rootless: "
                "~/.config/containerd/certs.d/_default/hosts.toml); nerdctl reads it at each pull"
            )
        else:
            hint = (
                "put this in /etc/containerd/certs.d/_default/hosts.toml (config_path = "
                '"/etc/containerd/certs.d" in the CRI registry section), then restart containerd'
            )
        return containerd(url, ca, registries), hint
    if kind == "k3s":
        return (
            k3s(url, ca, registries),
            "put this in /etc/rancher/k3s/registries.yaml, then restart k3s",
        )
    if kind == "podman":
        text = podman(url, registries)  # ValueError when no reference can name the mirror
        hint = "put this in /etc/containers/registries.conf"
        if client in ("cri-o", "crio"):
            hint += ", then: systemctl reload crio (cri-o re-reads it on SIGHUP)"
        if ca:
            hint += f"; and copy {ca} to /etc/containers/certs.d/{reference}/ca.crt"
        name = reference_name(url.origin.host)
        if url.origin.tls and name != url.origin.host:
            hint += f"; {client} reaches the mirror as {name}: its certificate must name {name}"
        return text, hint
    raise ValueError(f"unknown client {client!r}: one of {', '.join(CLIENT_NAMES)}")
