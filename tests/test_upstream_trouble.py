"""Upstream trouble, read by an operator: the reachability check at start, 429 episodes (one
warning, a summary a minute, one line when it ends), stale serving logged once per episode with
its real cause, and /readyz following an upstream that dies and comes back. The decisions
(``policy.trouble``) as tables; the lines end to end against the fake hub, asserted verbatim,
with trio's MockClock for the minutes between them."""

from __future__ import annotations

import functools
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme

from hubproxy.app import App, serve
from hubproxy.forwarder import describe_failure
from hubproxy.ops.activity import UpstreamCondition
from hubproxy.ops.operations import PROBE_RETRY, RECENT_ANSWER
from hubproxy.policy.errors import UpstreamTimeout, UpstreamUnavailable
from hubproxy.policy.registries import Registry, RegistryTable
from hubproxy.policy.trouble import (
    Cause,
    Continuing,
    Ended,
    Health,
    Kind,
    LineThrottle,
    Started,
    advice,
    continuing_line,
    ended_line,
    format_duration,
    note_answer,
    note_failure,
    note_stale,
    probed_registries,
    rate_limit_details,
    readiness,
    started_line,
    status_cause,
)
from hubproxy.policy.urls import Origin, base_url
from tests.conftest import StartProxy, TLSFiles, make_config
from tests.fakehub import FakeHub, fetch, make_layer, sha256_digest
from tests.registry_client import RegistryClient

ACCEPT = [("accept", "application/vnd.docker.distribution.manifest.v2+json")]
LIMITED = Cause(Kind.RATE_LIMITED, "rate limited (429)")
REFUSED = Cause(Kind.UNREACHABLE, "connection refused")
BROKEN = Cause(Kind.SERVER_ERROR, "answered 503")


# -- the decisions -------------------------------------------------------------------------------


def test_a_429_episode_is_announced_once_summed_up_each_minute_and_ended() -> None:
    health = Health()
    notes = []
    for now in [100.0 + i for i in range(10)]:  # ten 429s in ten seconds
        health, note = note_answer(health, now, LIMITED, reached_client=True)
        notes.append(note)
    assert notes == [Started(LIMITED)] + [None] * 9
    health, note = note_answer(health, 170.0, LIMITED, reached_client=True)
    assert note == Continuing(LIMITED, more=10, over=70.0)  # nine in the first minute, and this
    health, note = note_answer(health, 180.0, LIMITED, reached_client=True)
    assert note is None  # the next summary only a minute after the last
    health, note = note_answer(health, 200.0, None, reached_client=True)
    assert note == Ended(LIMITED, lasted=100.0, count=12)
    assert health.episode is None and health.up
    _, note = note_answer(health, 201.0, LIMITED, reached_client=True)
    assert note == Started(LIMITED)  # another episode


def test_trouble_a_fallback_took_over_is_not_announced_until_it_reaches_a_client() -> None:
    health, note = note_answer(Health(), 0.0, LIMITED, reached_client=False)
    assert note is None and health.episode is not None
    health, note = note_answer(health, 1.0, None, reached_client=True)
    assert note is None  # its start was never logged: neither is its end
    health, _ = note_answer(Health(), 0.0, LIMITED, reached_client=False)
    health, note = note_answer(health, 5.0, LIMITED, reached_client=True)
    assert note == Started(LIMITED)


def test_failed_connections_are_episodes_but_never_announced_here() -> None:
    health, note = note_failure(Health(), 0.0, REFUSED, reached_client=True)
    assert note is None  # the failed request has a line of its own
    assert health.episode is not None and health.failure == REFUSED and not health.up
    health, note = note_answer(health, 1.0, LIMITED, reached_client=True)
    assert note == Started(LIMITED)  # another kind of trouble is another episode


def test_stale_serving_is_logged_once_per_kind_until_the_upstream_answers() -> None:
    health, due = note_stale(Health(), LIMITED)
    assert due
    health, due = note_stale(health, LIMITED)
    assert not due
    health, due = note_stale(health, REFUSED)
    assert due  # the cause changed
    health, _ = note_answer(health, 1.0, None, reached_client=True)
    _, due = note_stale(health, REFUSED)
    assert due


@pytest.mark.parametrize(
    ("status", "headers", "cause"),
    [
        (200, [], None),
        (401, [], None),
        (404, [], None),
        (503, [], BROKEN),
        (
            429,
            [(b"retry-after", b"60"), (b"ratelimit-limit", b"100;w=21600")],
            Cause(
                Kind.RATE_LIMITED, "rate limited (429)", ("retry after 1m00s", "limit 100 per 6h")
            ),
        ),
        (
            429,
            [(b"retry-after", b"soon"), (b"ratelimit-reset", b"3600"), (b"ratelimit-limit", b"x")],
            Cause(Kind.RATE_LIMITED, "rate limited (429)", ("limit resets in 1h",)),
        ),
    ],
)
def test_what_a_status_means(
    status: int, headers: list[tuple[bytes, bytes]], cause: Cause | None
) -> None:
    assert status_cause(status, headers, wall_now=0.0) == cause


def test_an_http_date_retry_after_is_read() -> None:
    headers = [(b"retry-after", b"Thu, 01 Jan 1970 00:02:05 GMT")]
    assert rate_limit_details(headers, wall_now=5.0) == ("retry after 2m00s",)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.4, "0s"), (59, "59s"), (60, "1m00s"), (125, "2m05s"), (21600, "6h"), (3720, "1h02m")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_advice_names_the_flags_of_the_registry() -> None:
    def said(kind: Kind, registry: str, *, fallbacks: int = 0, login: bool = False) -> str:
        default = registry == "docker.io"
        return advice(kind, registry=registry, default=default, fallbacks=fallbacks, login=login)

    assert said(Kind.RATE_LIMITED, "docker.io") == (
        "add a fallback (--fallback URL) or pull with an account for a higher limit "
        "(--registry-login docker.io=FILE)"
    )
    assert said(Kind.RATE_LIMITED, "ghcr.io", login=True) == (
        "add a fallback (--registry-fallback ghcr.io=URL)"
    )
    assert said(Kind.RATE_LIMITED, "docker.io", fallbacks=1) == (
        "its fallbacks could not take the requests either"
    )
    assert said(Kind.SERVER_ERROR, "docker.io") == (
        "the fault is at its end (fallbacks take over 429s and failed connections only)"
    )


def test_the_lines() -> None:
    origin = "https://registry-1.docker.io"
    assert started_line(origin, BROKEN, "the fault is at its end") == (
        "upstream https://registry-1.docker.io answered 503: pulls of what the cache lacks fail "
        "until it recovers; the fault is at its end"
    )
    assert continuing_line(origin, Continuing(BROKEN, 1, 60.0)) == (
        "upstream https://registry-1.docker.io still failing: 1 more server error in the last 1m00s"
    )
    assert ended_line(origin, Ended(REFUSED, 5.0, 1)) == (
        "upstream https://registry-1.docker.io answers again: unreachable for 5s "
        "(1 failed connection)"
    )


ORIGINS = ["https://a", "https://b"]


@pytest.mark.parametrize(
    ("healths", "ok", "detail"),
    [
        # nothing known: a probe tells
        ([Health(), Health()], None, "no recent answer"),
        # an answer 2s ago, nothing failed since
        ([Health(last_ok=98.0), Health()], True, "https://a answered 2s ago"),
        # an old answer: a probe tells
        ([Health(last_ok=90.0), Health()], None, "no recent answer"),
        # the primary failed after its answer; the fallback answers
        (
            [Health(last_ok=98.0, last_failure=99.0, failure=REFUSED), Health(last_ok=97.0)],
            True,
            "https://b answered 3s ago",
        ),
        # every upstream failed just now: not ready, without a probe
        (
            [
                Health(last_ok=98.0, last_failure=99.0, failure=REFUSED),
                Health(last_failure=99.5, failure=BROKEN),
            ],
            False,
            "https://a: connection refused 1s ago; https://b: answered 503 0s ago",
        ),
        # failed a while ago: probe again (it may be back)
        (
            [
                Health(last_failure=90.0, failure=REFUSED),
                Health(last_failure=99.0, failure=REFUSED),
            ],
            None,
            "no recent answer",
        ),
    ],
)
def test_readiness(healths: list[Health], ok: bool | None, detail: str) -> None:
    verdict = readiness(ORIGINS, healths, 100.0, recent=5.0, retry=5.0)
    assert (verdict.ok, verdict.detail) == (ok, detail)


def test_a_rate_limited_upstream_is_answering() -> None:
    health, _ = note_answer(Health(), 99.0, LIMITED, reached_client=True)
    verdict = readiness(ORIGINS[:1], [health], 100.0, recent=5.0, retry=5.0)
    assert (verdict.ok, verdict.detail) == (True, "https://a answered 1s ago (rate limited: 429)")


def test_probed_registries_are_the_default_and_the_configured_ones() -> None:
    hub = Registry("docker.io", (base_url("https://registry-1.docker.io"),))
    ghcr = Registry("ghcr.io", (base_url("https://ghcr.io"),))  # built in, untouched
    quay = Registry("quay.io", (base_url("https://quay.io"), base_url("https://w.example")))
    mine = Registry("registry.example.com", (base_url("https://registry.example.com"),))
    table = RegistryTable((hub, ghcr, quay, mine))
    assert probed_registries(table) == [hub, quay, mine]


async def test_failures_in_words() -> None:
    origin = Origin("https", "registry-1.dokcer.io", 443)
    dns = UpstreamUnavailable("cannot connect")
    dns.__cause__ = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert describe_failure(dns, origin).words == "cannot resolve registry-1.dokcer.io"
    group = ExceptionGroup("all", [ConnectionRefusedError(111, "Connection refused")])
    outer = OSError("all attempts to connect to 127.0.0.1:1 failed")
    outer.__cause__ = group
    refused = UpstreamUnavailable("cannot connect")
    refused.__cause__ = outer
    assert describe_failure(refused, origin).words == "connection refused"
    timeout = UpstreamTimeout("connecting to https://x timed out after 10s")
    assert describe_failure(timeout, origin).words == (
        "timed out (connecting to https://x timed out after 10s)"
    )
    assert describe_failure(UpstreamUnavailable("x closed"), origin).words == "x closed"


# -- end to end ----------------------------------------------------------------------------------


def lines(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    """What hubproxy logged at ``level`` or above, but the access and pull lines."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("hubproxy")
        and r.name not in ("hubproxy.access", "hubproxy.pulls")
        and r.levelno >= level
    ]


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.INFO, logger="hubproxy"):
        yield caplog


async def test_429s_without_a_fallback_get_one_warning_a_summary_a_minute_and_an_end_line(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    mock_clock: trio.testing.MockClock,
    warnings: pytest.LogCaptureFixture,
) -> None:
    hub.add_image("library/alpine", "3.20", [make_layer(1, 1000)])
    proxy = await start_proxy()
    origin = hub.registry_url
    client = RegistryClient(proxy.url, ca)
    assert (await client.request("/v2/library/alpine/manifests/3.20", headers=ACCEPT)).status == 200
    warnings.clear()
    hub.force_429(11, retry_after=60)
    for _ in range(10):
        r = await client.request("/v2/library/alpine/manifests/3.20", headers=ACCEPT)
        assert r.status == 429
    assert lines(warnings) == [
        f"upstream {origin} is rate limiting this mirror (429; retry after 1m00s, limit 100 per "
        "6h): pulls of what the cache lacks fail until the limit lifts; add a fallback "
        "(--fallback URL) or pull with an account for a higher limit "
        "(--registry-login docker.io=FILE)"
    ]
    warnings.clear()
    mock_clock.jump(61)
    r = await client.request("/v2/library/alpine/manifests/3.20", headers=ACCEPT)
    assert r.status == 429
    assert lines(warnings) == [
        f"upstream {origin} still rate limited: 10 more 429s in the last 1m01s"
    ]
    warnings.clear()
    mock_clock.jump(60)  # the Retry-After has passed
    r = await client.request("/v2/library/alpine/manifests/3.20", headers=ACCEPT)
    assert r.status == 200
    assert lines(warnings) == [f"upstream {origin} answers again: rate limited for 2m01s (11 429s)"]


async def test_cache_hits_while_rate_limited_log_one_stale_line_naming_the_429(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    tmp_path: Path,
    mock_clock: trio.testing.MockClock,
    warnings: pytest.LogCaptureFixture,
) -> None:
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    layer = make_layer(3, 5000)
    digest = hub.add_image("library/alpine", "3.20", [layer])
    client = RegistryClient(proxy.url, ca)
    assert (await client.request("/v2/library/alpine/manifests/3.20", headers=ACCEPT)).status == 200
    assert (await client.request(f"/v2/library/alpine/blobs/{sha256_digest(layer)}")).body == layer
    await proxy.proxy.pullthrough.wait_probes()  # type: ignore[union-attr]
    warnings.clear()
    hub.force_status("manifest", 429, times=5, headers=[("retry-after", "30")])
    hub.force_status("blob", 429, times=5, headers=[("retry-after", "30")])
    for _ in range(5):  # strangers: each one's access is checked upstream, and gets a 429
        stranger = RegistryClient(proxy.url, ca)
        r = await stranger.request("/v2/library/alpine/manifests/3.20", headers=ACCEPT)
        assert (r.status, r.headers["docker-content-digest"]) == (200, digest)
        r = await stranger.request(f"/v2/library/alpine/blobs/{sha256_digest(layer)}")
        assert r.body == layer
    stale = (
        f"upstream {hub.registry_url} rate limited (429): serving from the cache without "
        "revalidation (stale) until it answers again; first: a manifest of library/alpine"
    )
    assert lines(warnings) == [stale]
    assert proxy.proxy.pullthrough.stats.stale_answers == 10  # type: ignore[union-attr]
    # it answers again, then fails again: another episode, another line
    stranger = RegistryClient(proxy.url, ca)
    assert (
        await stranger.request("/v2/library/alpine/manifests/3.20", headers=ACCEPT)
    ).status == 200
    hub.force_status("manifest", 503, times=1)
    r = await RegistryClient(proxy.url, ca).request(
        "/v2/library/alpine/manifests/3.20", headers=ACCEPT
    )
    assert r.status == 200
    assert lines(warnings) == [
        stale,
        f"upstream {hub.registry_url} answered 503: serving from the cache without "
        "revalidation (stale) until it answers again; first: a manifest of library/alpine",
    ]


async def readyz(url: str, ca: trustme.CA) -> tuple[int, bool, str]:
    r = await fetch(url + "/readyz", ca)
    upstream = r.json()["checks"]["upstream"]
    return r.status, upstream["ok"], upstream["detail"]


async def test_readyz_follows_an_upstream_that_fails_and_recovers_while_idle(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, mock_clock: trio.testing.MockClock
) -> None:
    proxy = await start_proxy()
    origin = hub.registry_url
    assert await readyz(proxy.url, ca) == (200, True, f"{origin} answered 0s ago")  # a probe
    pings = sum(s.target == "/v2/" for s in hub.requests)
    hub.force_status("ping", 503, times=1)
    mock_clock.jump(RECENT_ANSWER)
    assert await readyz(proxy.url, ca) == (503, False, f"{origin}: answered 503 0s ago")
    mock_clock.jump(PROBE_RETRY - 1)
    assert await readyz(proxy.url, ca) == (503, False, f"{origin}: answered 503 4s ago")
    assert sum(s.target == "/v2/" for s in hub.requests) == pings + 1  # no probe meanwhile
    mock_clock.jump(1)
    assert await readyz(proxy.url, ca) == (200, True, f"{origin} answered 0s ago")


async def test_readyz_fails_at_the_first_failed_request_after_the_upstream_died(
    nursery: trio.Nursery,
    start_proxy: StartProxy,
    ca: trustme.CA,
    mock_clock: trio.testing.MockClock,
) -> None:
    doomed = FakeHub(ca)
    scope = trio.CancelScope()

    async def run_hub(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await doomed.serve(task_status=task_status)

    await nursery.start(run_hub)
    proxy = await start_proxy(upstream=doomed.registry_url)
    origin = doomed.registry_url
    assert await readyz(proxy.url, ca) == (200, True, f"{origin} answered 0s ago")
    scope.cancel()  # the upstream dies: its port refuses connections
    await trio.testing.wait_all_tasks_blocked()
    r = await fetch(proxy.url + "/v2/library/alpine/manifests/3.20", ca)
    assert r.status == 502
    assert await readyz(proxy.url, ca) == (503, False, f"{origin}: connection refused 0s ago")
    mock_clock.jump(PROBE_RETRY)  # probed again, and still refused
    assert await readyz(proxy.url, ca) == (503, False, f"{origin}: connection refused 0s ago")


def test_a_line_throttle_says_how_many_it_held_back() -> None:
    throttle = LineThrottle(interval=60.0, max_keys=2)
    assert throttle.admit(("UpstreamUnavailable", 502), 0.0) == 0
    assert throttle.admit(("UpstreamUnavailable", 502), 1.0) is None
    assert throttle.admit(("UpstreamUnavailable", 502), 59.0) is None
    assert throttle.admit(("UpstreamTimeout", 504), 59.0) == 0  # another kind: its own line
    assert throttle.admit(("UpstreamUnavailable", 502), 60.0) == 2
    assert throttle.admit(("MirrorBusy", 503), 61.0) == 0  # a third key: the oldest is dropped
    assert throttle.admit(("UpstreamTimeout", 504), 62.0) == 0


async def test_a_dead_upstream_fails_every_request_in_one_line_a_minute(
    nursery: trio.Nursery,
    start_proxy: StartProxy,
    ca: trustme.CA,
    mock_clock: trio.testing.MockClock,
    warnings: pytest.LogCaptureFixture,
) -> None:
    with trio.socket.socket() as unused:  # a port nothing listens on
        await unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    proxy = await start_proxy(upstream=f"https://127.0.0.1:{port}")
    for _ in range(3):
        r = await fetch(proxy.url + "/v2/library/alpine/manifests/3.20", ca)
        assert r.status == 502
    failed = [line for line in lines(warnings, logging.WARNING) if " failed: " in line]
    assert len(failed) == 1 and failed[0].startswith("GET /v2/library/alpine/manifests/3.20 failed")
    mock_clock.jump(60)
    r = await fetch(proxy.url + "/v2/library/alpine/manifests/3.20", ca)
    failed = [line for line in lines(warnings, logging.WARNING) if " failed: " in line]
    assert len(failed) == 2
    assert failed[1].endswith("(2 more like it in the last minute, not logged)")


# -- the reachability check at start -------------------------------------------------------------


async def start_probing(
    nursery: trio.Nursery, hub: FakeHub, tls_files: TLSFiles, **overrides: Any
) -> App:
    config = make_config(hub, tls_files, **overrides)
    app: App = await nursery.start(functools.partial(serve, config, probe_upstreams=True))
    return app


async def test_a_reachable_upstream_gets_one_info_line(
    nursery: trio.Nursery,
    hub: FakeHub,
    tls_files: TLSFiles,
    mock_clock: trio.testing.MockClock,
    warnings: pytest.LogCaptureFixture,
) -> None:
    app = await start_probing(nursery, hub, tls_files)
    await app.proxy.forwarder.start_probed.wait()
    assert lines(warnings)[-1] == f"upstream {hub.registry_url} reachable (401 in 0 ms)"


class NoSuchName(trio.abc.HostnameResolver):
    """A resolver that knows no name: what a misspelt host name meets, without asking DNS."""

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list:  # type: ignore[type-arg]
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def getnameinfo(
        self, sockaddr: tuple[str, int] | tuple[str, int, int, int], flags: int
    ) -> tuple[str, str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


async def test_unreachable_upstreams_at_start_get_one_warning_each_in_words(
    nursery: trio.Nursery,
    hub: FakeHub,
    tls_files: TLSFiles,
    mock_clock: trio.testing.MockClock,
    warnings: pytest.LogCaptureFixture,
) -> None:
    trio.socket.set_custom_hostname_resolver(NoSuchName())
    with trio.socket.socket() as unused:  # a port nothing listens on
        await unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    untrusted = Registry("registry.example.com", (base_url(hub.registry_url),))
    app = await start_probing(
        nursery,
        hub,
        tls_files,
        upstream="https://registry-1.dokcer.io",
        fallbacks=(f"https://127.0.0.1:{port}",),
        registries=(untrusted,),
        upstream_ca=None,  # the fake hub's CA is trusted by nobody now
    )
    await app.proxy.forwarder.start_probed.wait()
    assert sorted(lines(warnings, logging.WARNING)) == sorted(
        [
            f"upstream https://127.0.0.1:{port} unreachable at start: connection refused",
            f"upstream {hub.registry_url} unreachable at start: TLS: certificate not trusted "
            "(use --registry-ca registry.example.com=FILE)",
            "upstream https://registry-1.dokcer.io unreachable at start: cannot resolve "
            "registry-1.dokcer.io: check --upstream",
        ]
    )
    # and the status page shows it before any pull was tried
    page = app.proxy.forwarder.metrics.activity.upstreams
    state = page.state(f"https://127.0.0.1:{port}", time.time())
    assert state.condition == UpstreamCondition.UNREACHABLE


async def test_the_server_starts_without_waiting_for_the_check_at_start(
    nursery: trio.Nursery,
    hub: FakeHub,
    tls_files: TLSFiles,
    ca: trustme.CA,
    mock_clock: trio.testing.MockClock,
    warnings: pytest.LogCaptureFixture,
) -> None:
    (silent,) = await trio.open_tcp_listeners(0, host="127.0.0.1")  # accepts, never answers
    port = silent.socket.getsockname()[1]
    app = await start_probing(nursery, hub, tls_files, upstream=f"https://127.0.0.1:{port}")
    host, own = app.server.bound[0]
    r = await fetch(f"https://{host}:{own}/healthz", ca)
    assert r.status == 200  # serving while the check waits for an answer
    assert not app.proxy.forwarder.start_probed.is_set()
    mock_clock.jump(10)
    await app.proxy.forwarder.start_probed.wait()
    assert lines(warnings, logging.WARNING) == [
        f"upstream https://127.0.0.1:{port} unreachable at start: timed out (no answer within 10s)"
    ]
    await silent.aclose()
