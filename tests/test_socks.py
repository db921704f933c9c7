"""SOCKS5 upstream proxies end to end: pulls through a real SOCKS5 server (tests.fakeproxy,
written from RFC 1928) in front of the fake registry, socks5 and socks5h, with and without a
login, and a proxy that refuses."""

from __future__ import annotations

import logging

import pytest
import trio
import trustme

from hubproxy.policy.proxies import parse_proxy_url
from tests.conftest import StartProxy
from tests.fakehub import FakeHub, make_layer
from tests.fakeproxy import SocksProxy
from tests.registry_client import RegistryClient

ACCEPT = [("accept", "application/vnd.docker.distribution.manifest.v2+json")]
LOGIN = ("mirror", "hunter22-secret")
LAYER = make_layer(7, 5000)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def through(
    nursery: trio.Nursery,
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    socks: SocksProxy,
    *,
    scheme: str = "socks5h",
    login: tuple[str, str] | None = None,
) -> RegistryClient:
    """hubproxy with ``socks`` as its upstream proxy and the registry named ``localhost`` (so
    socks5 and socks5h differ: one resolves the name here, the other sends it)."""
    await nursery.start(socks.serve)
    hub.add_image("library/alpine", "3.20", [LAYER])
    proxy = await start_proxy(
        upstream=f"https://localhost:{port_of(hub.registry_url)}",
        upstream_proxy=parse_proxy_url(socks.url(scheme, login)),
    )
    return RegistryClient(proxy.url, ca)


def problems(caplog: pytest.LogCaptureFixture) -> list[str]:
    """hubproxy's warnings and errors (not the access lines)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("hubproxy") and r.levelno >= logging.WARNING
    ]


@pytest.mark.parametrize(
    ("scheme", "kind", "host"), [("socks5", "ipv4", "127.0.0.1"), ("socks5h", "name", "localhost")]
)
async def test_pull_through_socks5(
    nursery: trio.Nursery,
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    scheme: str,
    kind: str,
    host: str,
) -> None:
    socks = SocksProxy()
    client = await through(nursery, hub, start_proxy, ca, socks, scheme=scheme)
    manifest = await client.request("/v2/library/alpine/manifests/3.20", headers=ACCEPT)
    assert manifest.status == 200
    blob = manifest.json()["layers"][0]["digest"]
    r = await client.request(f"/v2/library/alpine/blobs/{blob}")
    assert r.status == 200 and r.body == LAYER
    # the registry by the name of the URL (socks5h) or the address this machine found (socks5);
    # the token service and the CDN are IP literals, sent as addresses either way
    registry = (kind, host, port_of(hub.registry_url))
    assert registry in socks.asked
    assert {a for a in socks.asked if a != registry} <= {
        ("ipv4", "127.0.0.1", port_of(hub.auth_url)),
        ("ipv4", "127.0.0.1", port_of(hub.cdn_url)),
    }
    assert ("ipv4", "127.0.0.1", port_of(hub.cdn_url)) in socks.asked
    assert socks.connections == len(socks.asked)  # every upstream connection went through it


async def test_socks5_login_accepted(
    nursery: trio.Nursery, hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    socks = SocksProxy(login=LOGIN)
    client = await through(nursery, hub, start_proxy, ca, socks, login=LOGIN)
    r = await client.request("/v2/library/alpine/manifests/3.20", headers=ACCEPT)
    assert r.status == 200
    assert socks.logins and set(socks.logins) == {LOGIN}


@pytest.mark.parametrize(
    ("login", "reason"),
    [
        (("mirror", "wrong-password"), "refused the username and password"),
        (None, "wants a username and password"),
    ],
)
async def test_socks5_login_refused_is_a_registry_error_and_one_log_line(
    nursery: trio.Nursery,
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    caplog: pytest.LogCaptureFixture,
    login: tuple[str, str] | None,
    reason: str,
) -> None:
    caplog.set_level(logging.INFO, logger="hubproxy")
    socks = SocksProxy(login=LOGIN)
    client = await through(nursery, hub, start_proxy, ca, socks, login=login)
    r = await client.request("/v2/library/alpine/manifests/3.20", headers=ACCEPT)
    assert r.status in (502, 503)
    (error,) = r.json()["errors"]
    assert error["code"] == "UNAVAILABLE"
    logged = problems(caplog)
    assert len(logged) == 1, logged
    assert f"SOCKS5 proxy {socks.address} {reason}" in logged[0]
    for text in (logged[0], error["message"], caplog.text):
        assert "wrong-password" not in text and LOGIN[1] not in text


async def test_socks5_refused_connection_is_a_registry_error_and_one_log_line(
    nursery: trio.Nursery,
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="hubproxy")
    socks = SocksProxy(refuse=4)
    client = await through(nursery, hub, start_proxy, ca, socks)
    r = await client.request("/v2/library/alpine/manifests/3.20", headers=ACCEPT)
    assert r.status in (502, 503)
    assert r.json()["errors"][0]["code"] == "UNAVAILABLE"
    wanted = (
        f"SOCKS5 proxy {socks.address} refused the connection to "
        f"localhost:{port_of(hub.registry_url)}: host unreachable (reply 4)"
    )
    logged = problems(caplog)
    assert len(logged) == 1, logged
    assert wanted in logged[0]
