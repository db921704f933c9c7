"""``--only-listed-registries``: the built-in registry table off, only what the operator named."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trustme

from hubproxy.cli import load_settings
from hubproxy.config import Config
from hubproxy.policy.errors import RegistryNotServed
from hubproxy.policy.registries import (
    BUILTIN_REGISTRIES,
    Registry,
    address,
    build_table,
    listed_registries,
)
from hubproxy.policy.urls import base_url
from tests.conftest import Canary, StartProxy
from tests.fakehub import FakeHub, fetch, make_layer
from tests.registry_client import RegistryClient
from tests.test_multiregistry import pull

BUILTIN = [name for name, _, _ in BUILTIN_REGISTRIES]


def config(*argv: str) -> Config:
    return load_settings(argv)[1]


def served(cfg: Config) -> set[str]:
    return {r.name for r in cfg.registry_table().registries}


@pytest.mark.parametrize(
    ("named", "expected"),
    [
        ((), {"registry.example.com"}),  # the operator's own registry stays
        (("ghcr.io",), {"ghcr.io", "registry.example.com"}),
        (("ghcr.io", "nvcr.io"), {"ghcr.io", "nvcr.io", "registry.example.com"}),
        (("registry.example.com",), {"registry.example.com"}),
    ],
)
def test_listed_registries_keeps_the_named_builtins_and_the_operators_own(
    named: tuple[str, ...], expected: set[str]
) -> None:
    everything = [Registry(name, ()) for name in [*BUILTIN[1:], "registry.example.com"]]
    kept = listed_registries(BUILTIN, named, everything)
    assert {r.name for r in kept} == expected


def test_without_the_flag_every_builtin_is_served() -> None:
    assert served(config()) == set(BUILTIN)


def test_with_the_flag_only_docker_hub_and_the_named_ones(tmp_path: Path) -> None:
    assert served(config("--only-listed-registries")) == {"docker.io"}
    login = tmp_path / "ghcr.login"
    login.write_text("me:secret\n")
    cfg = config(
        "--only-listed-registries",
        "--registry",
        "registry.example.com=https://registry.example.com",
        "--registry-login",
        f"ghcr.io={login}",
        "--allow-shared-login",
        "--host-map",
        "q.lan=quay.io",
        "--registry-fallback",
        "registry.k8s.io=https://k8s-worker.example",
    )
    assert served(cfg) == {
        "docker.io",
        "registry.example.com",
        "ghcr.io",
        "quay.io",
        "registry.k8s.io",
    }
    k8s = cfg.registry_table().find("k8s.gcr.io")  # a named built-in keeps its other names
    assert k8s is not None and k8s.name == "registry.k8s.io"
    # the built-in upstream stays the first one: naming a registry does not move it
    assert k8s.upstreams[0] == base_url("https://registry.k8s.io")


def test_the_config_file_key_and_a_registry_table_name_registries(tmp_path: Path) -> None:
    path = tmp_path / "hubproxy.toml"
    path.write_text(
        'only-listed-registries = true\n[registry."quay.io"]\nhost = ["quay.mirror.lan"]\n'
    )
    cfg = config("--config", str(path))
    assert cfg.only_listed_registries
    assert served(cfg) == {"docker.io", "quay.io"}


def test_a_refusal_names_the_reason() -> None:
    default = Registry("docker.io", (base_url("https://registry-1.docker.io"),))
    table = build_table(default, [], (), listed_only=True)
    with pytest.raises(RegistryNotServed) as info:
        address(table, "/v2/nvcr.io/nvidia/cuda/manifests/12", None)
    assert (info.value.status, info.value.code, info.value.registry) == (
        404,
        "NAME_UNKNOWN",
        "nvcr.io",
    )
    assert "serves only the registries its operator listed" in info.value.message
    with pytest.raises(RegistryNotServed) as info:
        address(build_table(default, [], ()), "/v2/x/y/manifests/1?ns=nvcr.io", None)
    assert "operator listed" not in info.value.message


async def test_unlisted_builtins_are_refused_end_to_end(
    hub: FakeHub,
    ghcr: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    canary: Canary,
    caplog: pytest.LogCaptureFixture,
) -> None:
    layer = make_layer(1, 1000)
    ghcr.add_image("owner/app", "v1", [layer])
    listed = config("--only-listed-registries", "--registry", f"ghcr.io={ghcr.registry_url}")
    proxy = await start_proxy(registries=listed.registries, only_listed_registries=True)
    client = RegistryClient(proxy.url, ca)
    await pull(client, "owner/app", "v1", [layer], "?ns=ghcr.io")  # the listed one works
    seen = len(hub.requests) + len(ghcr.requests)
    caplog.set_level(logging.DEBUG, logger="hubproxy")
    for path in (
        "/v2/nvidia/cuda/manifests/12?ns=nvcr.io",
        "/v2/quay.io/coreos/etcd/manifests/v3",
        "/v2/?ns=mcr.microsoft.com",
    ):
        r = await fetch(proxy.url + path, ca)
        assert r.status == 404, path
        error = r.json()["errors"][0]
        assert error["code"] == "NAME_UNKNOWN"
        assert "operator listed" in error["message"]
    r = await fetch(proxy.url + "/token/0?scope=repository:gcr.io/x/y:pull&service=x", ca)
    assert r.status == 404
    assert len(hub.requests) + len(ghcr.requests) == seen  # no upstream was asked anything
    lines = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.DEBUG]
    refused = [line for line in lines if "--only-listed-registries" in line]
    assert [line.split("'")[1] for line in refused] == [
        "nvcr.io",
        "quay.io",
        "mcr.microsoft.com",
        "gcr.io",
    ]
    assert all("127.0.0.1" in line and "\n" not in line for line in refused)
    assert canary.connections == 0
