"""Issue 15's scale-out tests with real processes: moto's S3 server, the fake registry and three
``python -m hubproxy`` processes with ``--peer`` lists on one bucket.

The processes are started once for the module (``cluster``); a test that needs them all running
asks ``Cluster.up``, which starts again any an earlier test stopped. The fake registry runs in a
thread with a trio loop of its own, so that it outlives each test's loop as the processes do;
the tests reach it through ``HubThread.call`` and ``HubThread.wait``. Every process's output is
kept, and printed after each test (pytest shows it when the test failed).
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trustme

from hubproxy.cache.objects import blob_key, open_object_store
from hubproxy.policy.peers import owner
from hubproxy.policy.urls import base_url
from tests.conftest import TLSFiles, aws_environment
from tests.fakehub import MEDIA_DOCKER_MANIFEST, FakeHub, Seen, fetch, sha256_digest
from tests.registry_client import RegistryClient
from tests.test_cachestore import FakeS3
from tests.wire import WireClient

pytest.importorskip("obstore")

T = TypeVar("T")
MiB = 1024 * 1024
START_TIMEOUT = 30.0  # seconds a process may take to say it listens (a loaded CI machine)
# a peer that answers later than this is skipped: long, so that a busy CI machine never makes
# a live owner look dead (a second upstream fetch); no test waits for it, since a killed
# instance's connections close and its port refuses at once
PEER_TIMEOUT = "20s"
ACCEPT = [("accept", MEDIA_DOCKER_MANIFEST)]
ADDRESSES = [f"127.0.15.{n}" for n in range(1, 5)]  # the instances' own loopback addresses


def layer(seed: int, size: int) -> bytes:
    """An uncompressed layer of ``size`` random bytes (cheap to make, unlike a gzipped one)."""
    return random.Random(seed).randbytes(size)


def owned_layer(first_seed: int, size: int, names: list[str], index: int) -> bytes:
    """A layer whose digest peer ``index`` of ``names`` owns."""
    for seed in range(first_seed, first_seed + 1000):
        data = layer(seed, size)
        if owner(hashlib.sha256(data).hexdigest(), names) == index:
            return data
    raise AssertionError("no seed gives that owner")


async def pull_image(url: str, ca: trustme.CA, repo: str) -> list[str]:
    """Pull ``repo:latest`` from ``url`` as a client does, every blob verified by its digest;
    the blobs' digests."""
    client = RegistryClient(url, ca)
    manifest = await client.request(f"/v2/{repo}/manifests/latest", headers=ACCEPT)
    assert manifest.status == 200, manifest.body
    doc = manifest.json()
    digests = [d["digest"] for d in [doc["config"], *doc["layers"]]]
    for digest in digests:
        answer = await client.request(f"/v2/{repo}/blobs/{digest}")
        assert answer.status == 200 and answer.complete, (url, digest, answer.status)
        assert sha256_digest(answer.body) == digest, (url, digest)
    return digests


def cdn_gets(requests: list[Seen]) -> Counter[str]:
    """GETs of each blob (by its hex digest) from the CDN: the upstream fetches."""
    return Counter(
        seen.target.split("?")[0].rsplit("/", 2)[-2]  # .../sha256/ab/<hex>/data
        for seen in requests
        if seen.server == "cdn" and seen.method == "GET"
    )


class HubThread:
    """The fake registry in a thread of its own, serving until ``stop``."""

    def __init__(self, ca: trustme.CA) -> None:
        self.hub = FakeHub(ca)
        self.running = False
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope = trio.CancelScope()
        self._thread = threading.Thread(target=trio.run, args=(self._serve,), daemon=True)
        self._started = threading.Event()

    def start(self) -> None:
        self._thread.start()
        assert self._started.wait(START_TIMEOUT) and self.running, "the fake registry did not start"

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.hub.serve)
                    self.running = True
                    self._started.set()
        finally:
            self.running = False
            self._started.set()

    def stop(self) -> None:
        """Close its listeners (the upstream goes away) and end the thread. Blocking."""
        if self._thread.is_alive() and self._token is not None:
            trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(START_TIMEOUT)

    async def call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``function(*args)`` in the registry's thread (its state is that thread's)."""
        assert self._token is not None
        call = functools.partial(function, *args, **kwargs)
        return await trio.to_thread.run_sync(
            functools.partial(trio.from_thread.run_sync, call, trio_token=self._token)
        )

    async def wait(self, event: trio.Event) -> None:
        """Wait for one of the registry's events (a stall reached, say)."""
        assert self._token is not None
        await trio.to_thread.run_sync(
            functools.partial(trio.from_thread.run, event.wait, trio_token=self._token),
            abandon_on_cancel=True,
        )

    async def requests(self) -> list[Seen]:
        return await self.call(list, self.hub.requests)


class Instance:
    """One ``python -m hubproxy`` process; a thread reads its output line by line (the pipe
    never fills), kept for the test's report and for ``wait_for``."""

    def __init__(self, name: str, url: str, cache_dir: Path) -> None:
        self.name = name
        self.url = url
        self.cache_dir = cache_dir
        self.process: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader: threading.Thread | None = None
        self._ended = True
        self.started_at = 0  # where the output of its latest start begins

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, argv: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self._ended = False
        self.lines.append(f"--- started: {' '.join(argv[1:])}\n")
        self.started_at = len(self.lines)
        self._reader = threading.Thread(target=self._read, args=(self.process,), daemon=True)
        self._reader.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for(self, pattern: str, since: int = 0) -> re.Match[str]:
        """The first line from ``since`` on matching ``pattern``; AssertionError if the process
        ends (or says nothing of the kind for a long while) first. Blocking."""
        compiled = re.compile(pattern)
        position = since
        with self._changed:
            while True:
                for line in self.lines[position:]:
                    if match := compiled.search(line):
                        return match
                position = len(self.lines)
                if self._ended:
                    raise AssertionError(f"{self.name} ended without {pattern!r}:\n{self.log}")
                if not self._changed.wait(START_TIMEOUT):
                    raise AssertionError(f"{self.name} said nothing like {pattern!r}:\n{self.log}")

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def send(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self) -> int | None:
        """SIGTERM, as a service manager stops it; its exit status once it exited. Blocking."""
        self.send(signal.SIGTERM)
        assert self.process is not None
        try:
            self.process.wait(START_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not stop on SIGTERM:\n{self.log}") from None
        return self.reap()

    def reap(self) -> int | None:
        """Kill it if it still runs, wait for it and its output; its exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.kill()
        status = self.process.wait()
        if self._reader is not None:
            self._reader.join(START_TIMEOUT)
            self._reader = None
            assert self.process.stdout is not None
            self.process.stdout.close()
            self.lines.append(f"--- exited with {status}\n")
        return status


def free_port(address: str) -> int:
    """A port nothing listens on at ``address`` now."""
    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


class Cluster:
    """Three hubproxy processes on one bucket, each listing all three as ``--peer``, plus one
    kept for a fourth. Each must know the others' ports before any starts, so each listens on
    a loopback address of its own (``ADDRESSES``): a port found free there stays free until the
    process binds it, where on 127.0.0.1 a busy machine's outgoing connections (every one takes
    an ephemeral port of 127.0.0.1) could take it meanwhile."""

    def __init__(self, ca: trustme.CA, tls_files: TLSFiles, moto_url: str, root: Path) -> None:
        self.ca = ca
        self.tls_files = tls_files
        self.moto_url = moto_url
        self.root = root
        self.bucket = f"s3://scaleout-{secrets.token_hex(4)}/mirror"
        self.env = {**_without_aws(), **aws_environment(root)}
        self.cert, self.key = root / "server.pem", root / "server-key.pem"
        issued = ca.issue_cert(*ADDRESSES)
        issued.cert_chain_pems[0].write_to_path(str(self.cert))
        issued.private_key_pem.write_to_path(str(self.key))
        self.urls = [f"https://{address}:{free_port(address)}" for address in ADDRESSES]
        self.instances = [
            Instance(f"instance {n}", url, root / f"cache-{n}") for n, url in enumerate(self.urls)
        ]
        self.hub_thread: HubThread | None = None

    @property
    def names(self) -> list[str]:
        """The three instances as the owner function names them."""
        return [str(base_url(url).origin) for url in self.urls[:3]]

    @property
    def hub(self) -> HubThread:
        assert self.hub_thread is not None
        return self.hub_thread

    def argv(self, instance: Instance, peers: list[str]) -> list[str]:
        assert self.hub_thread is not None
        tls = self.tls_files
        origin = base_url(instance.url).origin
        return [
            sys.executable,
            "-m",
            "hubproxy",
            *("--listen", f"{origin.host}:{origin.port}", "--cert", str(self.cert)),
            *("--key", str(self.key), "--upstream", self.hub_thread.hub.registry_url),
            *("--upstream-ca", str(tls.ca_pem), "--library-prefix"),
            *("--cache-dir", str(instance.cache_dir)),
            *("--cache-store", self.bucket, "--s3-endpoint", self.moto_url),
            *(arg for url in peers for arg in ("--peer", url)),
            *("--peer-ca", str(tls.ca_pem), "--peer-timeout", PEER_TIMEOUT),
        ]

    def up(self) -> list[Instance]:
        """The fake registry and the three instances, running; started if they are not (a
        registry started again has new ports: every instance is then started again). Blocking."""
        if self.hub_thread is None or not self.hub_thread.running:
            if self.hub_thread is None:
                trio.run(_create_bucket, self.moto_url, self.bucket)
            else:
                for instance in self.instances:
                    instance.reap()
            self.hub_thread = HubThread(self.ca)
            self.hub_thread.start()
        starting = [instance for instance in self.instances[:3] if not instance.running]
        for instance in starting:
            instance.reap()
            instance.start(self.argv(instance, self.urls[:3]), self.env)
        self.wait_listening(starting)
        return self.instances[:3]

    def start_fourth(self) -> Instance:
        """The fourth instance, on an empty cache directory, listing itself and the three."""
        fourth = self.instances[3]
        fourth.start(self.argv(fourth, self.urls), self.env)
        self.wait_listening([fourth])
        return fourth

    def wait_listening(self, instances: list[Instance]) -> None:
        for instance in instances:
            instance.wait_for(rf"listening on {re.escape(instance.url)}\b", instance.started_at)

    def close(self) -> None:
        for instance in self.instances:
            instance.reap()
        if self.hub_thread is not None:
            self.hub_thread.stop()


def _without_aws() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


async def _create_bucket(moto_url: str, bucket: str) -> None:
    name = bucket.removeprefix("s3://").split("/", 1)[0]
    answer = await fetch(f"{moto_url}/{name}", None, method="PUT")
    assert answer.status == 200, answer.body


@pytest.fixture(scope="module")
def cluster(
    moto_url: str, ca: trustme.CA, tls_files: TLSFiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    group = Cluster(ca, tls_files, moto_url, tmp_path_factory.mktemp("scaleout"))
    try:
        group.up()
        yield group
    finally:
        group.close()


@pytest.fixture(autouse=True)
def process_logs(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test of the cluster, the lines its processes wrote meanwhile (shown by
    pytest only when the test failed)."""
    if "cluster" not in request.fixturenames:
        yield
        return
    group: Cluster = request.getfixturevalue("cluster")
    marks = [len(instance.lines) for instance in group.instances]
    yield
    for instance, mark in zip(group.instances, marks, strict=True):
        if len(instance.lines) > mark:
            print(f"===== {instance.name} ({instance.url})")
            print("".join(instance.lines[mark:]), end="")


async def blocking(function: Callable[..., T], *args: Any) -> T:
    """A blocking cluster call from a test's trio loop."""
    return await trio.to_thread.run_sync(functools.partial(function, *args))


def check_bucket(cluster: Cluster) -> dict[str, int]:
    """Every object under blobs/ in the bucket hashes to its key (nothing half-written or
    wrong is visible); the keys and sizes. Blocking."""
    store = open_object_store(cluster.bucket, cluster.moto_url)
    found = dict(store.list("blobs"))
    for key, size in found.items():
        hasher = hashlib.sha256()
        total = 0
        for chunk in store.chunks(key):
            hasher.update(chunk)
            total += len(chunk)
        assert total == size and blob_key(hasher.hexdigest()) == key, key
    return found


# -- the tests ------------------------------------------------------------------------------


async def test_twelve_clients_on_three_instances_fetch_each_blob_from_the_upstream_once(
    cluster: Cluster, ca: trustme.CA
) -> None:
    instances = await blocking(cluster.up)
    # a 20 MiB image with a layer owned by each instance: owners follow from the instances'
    # ports, which are random, and fixed layers gave all five blobs (the config too) one owner
    # in one run of 81 (3 / 3**5)
    layers = [owned_layer(1000 * (n + 1), 5 * MiB, cluster.names, n % 3) for n in range(4)]
    await cluster.hub.call(cluster.hub.hub.add_image, "library/scaleout", "latest", layers)
    pulled: list[list[str]] = []

    async def client(n: int) -> None:  # round robin
        pulled.append(await pull_image(instances[n % 3].url, ca, "library/scaleout"))

    with trio.fail_after(60):
        async with trio.open_nursery() as clients:
            for n in range(12):
                clients.start_soon(client, n)
    digests = pulled[0]
    assert len(pulled) == 12 and all(p == digests for p in pulled)
    assert {sha256_digest(data) for data in layers} <= set(digests)
    gets = cdn_gets(await cluster.hub.requests())
    assert {d: gets[d.removeprefix("sha256:")] for d in digests} == {d: 1 for d in digests}
    owners = {owner(d.removeprefix("sha256:"), cluster.names) for d in digests}
    assert owners == {0, 1, 2}  # the blobs' fetches were shared out, not all one instance's


async def start_blob(url: str, ca: trustme.CA, repo: str, digest: str) -> WireClient:
    """A client's GET of a blob, its token fetched first, up to the response's head (200)."""
    registry = RegistryClient(url, ca)
    manifest = await registry.request(f"/v2/{repo}/manifests/latest", headers=ACCEPT)
    assert manifest.status == 200, manifest.body
    client = await WireClient.connect(url, ca)
    bearer = ("authorization", f"Bearer {registry.tokens['']}")
    await client.send_request("GET", f"/v2/{repo}/blobs/{digest}", [bearer])
    head = await client.receive_head()
    assert head.status_code == 200, head
    return client


async def test_the_owner_killed_mid_fill_costs_the_other_instances_clients_nothing(
    cluster: Cluster, ca: trustme.CA, aws_env: None
) -> None:
    """SIGKILL of the instance that fetches a blob for the others, while the upstream is half
    way through it: their clients' transfers finish from the upstream, verified; its other
    blobs come from the upstream; the bucket holds only whole, verified blobs."""
    instances = await blocking(cluster.up)
    victim, others = instances[0], instances[1:]
    names = cluster.names
    killed = owned_layer(100, 4 * MiB, names, 0)  # the one in flight when its owner dies
    later = owned_layer(200, MiB, names, 0)  # asked for once it is dead
    elsewhere = owned_layer(300, MiB, names, 1)
    hub = cluster.hub
    await hub.call(hub.hub.add_image, "library/killed", "latest", [killed, later, elsewhere])
    digest = sha256_digest(killed)
    stall = await hub.call(hub.hub.stall_blob, digest, after=MiB)
    with trio.fail_after(60):
        # two clients on each of the other instances, each with the response's head: each
        # instance's fill follows the owner's
        clients = [
            await start_blob(instance.url, ca, "library/killed", digest)
            for instance in others
            for _ in range(2)
        ]
        await hub.wait(stall.reached)  # the owner has 1 MiB of 4 from the upstream, no more
        await blocking(victim.reap)  # SIGKILL
        for client in clients:
            body = await client.receive_body()
            assert sha256_digest(body) == digest
            await client.aclose()
        for instance in others:
            await pull_image(instance.url, ca, "library/killed")
    await hub.call(stall.release.set)
    assert victim.lines[-1] == "--- exited with -9\n"
    await blocking(check_bucket, cluster)


async def test_a_process_on_a_store_ignoring_conditional_puts_exits_with_one_line(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The start's probe: a second create-only put of one key that succeeds refuses the store
    (instances could overwrite each other's blobs), before anything listens."""
    fake = FakeS3()  # every PUT succeeds, If-None-Match or not
    await nursery.start(fake.serve)
    argv = [sys.executable, "-m", "hubproxy", "--listen", "127.0.0.1:0"]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--cache-store", "s3://shared/mirror"]
    argv += ["--s3-endpoint", fake.url]
    env = {**_without_aws(), **aws_environment(tmp_path)}
    with trio.fail_after(START_TIMEOUT):
        result = await trio.run_process(argv, capture_stderr=True, check=False, env=env)
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 1, lines
    assert len(lines) == 1, lines  # the one line, no traceback
    assert "does not honour conditional puts (If-None-Match: *)" in lines[0]
    assert "drop --cache-store" in lines[0]
    assert len(fake.puts) == 2  # the probe, put create-only twice


async def test_a_fourth_instance_serves_a_cached_image_with_the_upstream_stopped(
    cluster: Cluster, ca: trustme.CA
) -> None:
    """The three pull an image and stop (SIGTERM); the upstream goes away; a fourth instance
    on an empty cache directory, joining the list, serves the image from the bucket: blobs
    committed there, and the manifest state (the snapshot saved at stop, or kept live in the
    bucket as instances run)."""
    instances = await blocking(cluster.up)
    hub = cluster.hub
    layers = [layer(n, MiB) for n in (401, 402)]
    await hub.call(hub.hub.add_image, "library/warm", "latest", layers)
    with trio.fail_after(60):
        # each instance serves the tag: whichever snapshot is saved last has it
        digests = [await pull_image(instance.url, ca, "library/warm") for instance in instances]
        async with trio.open_nursery() as stopping:
            for instance in instances:
                stopping.start_soon(blocking, instance.stop)
    assert [instance.lines[-1] for instance in instances] == ["--- exited with 0\n"] * 3
    await blocking(hub.stop)
    with pytest.raises(OSError, match="all attempts to connect"):  # the upstream is gone
        await fetch(hub.hub.registry_url + "/v2/", ca)
    fourth = await blocking(cluster.start_fourth)
    with trio.fail_after(60):
        assert await pull_image(fourth.url, ca, "library/warm") == digests[0]
