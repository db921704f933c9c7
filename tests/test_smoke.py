from __future__ import annotations

import hashlib

import trustme

from tests.conftest import StartProxy
from tests.fakehub import FakeHub, make_layer
from tests.registry_client import RegistryClient


async def test_anonymous_pull(hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA) -> None:
    layer = make_layer(1, 300_000)
    digest = hub.add_image("library/alpine", "latest", [layer])
    proxy = await start_proxy()
    client = RegistryClient(proxy.url, ca)
    r = await client.request("/v2/alpine/manifests/latest")
    assert r.status == 200, r
    assert r.headers["docker-content-digest"] == digest
    layer_digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    b = await client.request(f"/v2/alpine/blobs/{layer_digest}", scope="repository:alpine:pull")
    assert b.status == 200, b.headers
    assert b.body == layer
