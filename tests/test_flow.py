"""Tests for the per-request state machine (hubproxy.policy.flow) and its policies (failover,
redirects).

Read like packet traces: a plan, the events an upstream produces, and the actions hubproxy takes.
The rules come from PROTOCOL.md: blob GETs are answered with a 307 to a CDN that must not see the
client's Authorization; a 429 (with or without Retry-After) moves to the next upstream; an
upstream that cannot be reached is skipped for a while; a request whose body was consumed is never
replayed; after response headers went out, a failure can only abort the connection.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hubproxy.policy import failover, flow
from hubproxy.policy.errors import (
    ProxyError,
    TooManyRedirects,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from hubproxy.policy.flow import (
    AttemptFailed,
    Event,
    Fail,
    HeadReceived,
    Phase,
    Plan,
    Respond,
    Rest,
    Send,
    State,
    start,
    transition,
)
from hubproxy.policy.redirects import client_location, may_send_authorization, redirect_target
from hubproxy.policy.urls import Origin, base_url, parse_url

HUB = base_url("https://registry-1.docker.io")
WORKER = base_url("https://hub-mirror.example.workers.dev/prefix")
LOCAL = base_url("http://10.0.0.5:5000/")
BLOB = "/v2/library/nginx/blobs/sha256:" + "a" * 64
CDN = (
    "https://production.cloudflare.docker.com/registry-v2/docker/registry/v2/blobs/sha256/aa/"
    + "a" * 64
    + "/data?verify=1700003600-c2lnbmF0dXJl"
)
NOW = 1000.0  # trio's clock
WALL = 1_700_000_000.0  # Unix seconds
FREE = [0.0, 0.0, 0.0]
CLIENT_AUTH = b"Bearer client-token"
OPERATOR_AUTH = b"Basic b3BlcmF0b3I6c2VjcmV0"


def make_plan(
    method: str = "GET",
    target: str = BLOB,
    upstreams: tuple[str, ...] = ("hub", "worker"),
    *,
    replayable: bool = True,
    max_hops: int = 5,
    authorization: bytes | None = CLIENT_AUTH,
    operator_authorization: bytes | None = None,
) -> Plan:
    urls = {"hub": HUB, "worker": WORKER, "local": LOCAL}
    return Plan(
        method=method,
        target=target,
        upstreams=tuple(urls[u] for u in upstreams),
        replayable=replayable,
        max_hops=max_hops,
        rate_limit_rest=60.0,
        unreachable_rest=10.0,
        authorization=authorization,
        operator_authorization=operator_authorization,
    )


def head(status: int, *headers: tuple[bytes, bytes]) -> HeadReceived:
    return HeadReceived(status, list(headers))


def redirect(location: str | bytes, status: int = 307) -> HeadReceived:
    value = location.encode("latin-1") if isinstance(location, str) else location
    return head(status, (b"location", value), (b"content-length", b"0"))


def step(
    plan: Plan,
    state: State,
    event: Event,
    *,
    resting: Sequence[float] | None = None,
    now: float = NOW,
    wall_now: float = WALL,
) -> tuple[State, flow.Action, Rest | None]:
    resting_until = list(resting) if resting is not None else [0.0] * len(plan.upstreams)
    return transition(plan, state, event, resting_until=resting_until, now=now, wall_now=wall_now)


def begin(plan: Plan, resting: Sequence[float] | None = None) -> State:
    state, _ = start(plan, list(resting or [0.0] * len(plan.upstreams)), NOW)
    return state


# ---------------------------------------------------------------- start


def test_start_picks_the_primary() -> None:
    plan = make_plan()
    state, action = start(plan, [0.0, 0.0], NOW)
    assert state.phase is Phase.AWAIT_HEAD
    assert state.tried == frozenset({0})
    assert action == Send(state.attempt)
    attempt = action.attempt
    assert attempt.upstream == 0
    assert str(attempt.url) == "https://registry-1.docker.io" + BLOB
    assert attempt.hops == 0
    assert attempt.authorization == CLIENT_AUTH


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        ("worker", "https://hub-mirror.example.workers.dev/prefix" + BLOB),
        ("local", "http://10.0.0.5:5000" + BLOB),  # the base's trailing slash is not doubled
    ],
)
def test_start_joins_the_base_path(upstream: str, expected: str) -> None:
    _, action = start(make_plan(upstreams=(upstream,)), [0.0], NOW)
    assert str(action.attempt.url) == expected


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (
            "?service=registry.docker.io&scope=repository:library/nginx:pull",
            "/token?service=registry.docker.io&scope=repository:library/nginx:pull",
        ),
        ("", "/token"),
    ],
)
def test_start_token_query_on_the_realm(target: str, expected: str) -> None:
    realm = parse_url("https://auth.docker.io/token")
    plan = Plan(method="GET", target=target, upstreams=(realm,), replayable=True)
    _, action = start(plan, [0.0], NOW)
    assert action.attempt.url.origin == realm.origin
    assert action.attempt.url.target == expected


@pytest.mark.parametrize(
    ("resting", "chosen"),
    [
        ([0.0, 0.0], 0),
        ([NOW, 0.0], 0),  # resting until exactly now: available again
        ([NOW + 50, 0.0], 1),  # a resting primary is skipped
        ([NOW + 50, NOW + 10], 1),  # all resting: the one available first
        ([NOW + 10, NOW + 50], 0),
        ([NOW + 10, NOW + 10], 0),
    ],
)
def test_start_skips_resting_upstreams(resting: list[float], chosen: int) -> None:
    state, action = start(make_plan(), resting, NOW)
    assert action.attempt.upstream == chosen
    assert state.tried == frozenset({chosen})


def test_start_three_upstreams_first_free_one() -> None:
    plan = make_plan(upstreams=("hub", "worker", "local"))
    _, action = start(plan, [NOW + 5, NOW + 5, 0.0], NOW)
    assert action.attempt.upstream == 2


# ---------------------------------------------------------------- final responses


@pytest.mark.parametrize("status", [200, 206, 304, 401, 403, 404, 416, 500, 502, 503])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_final_responses_are_streamed(status: int, method: str) -> None:
    plan = make_plan(method)
    state, action, rest = step(plan, begin(plan), head(status))
    assert action == Respond()
    assert state.phase is Phase.RESPONDING
    assert rest is None


# ---------------------------------------------------------------- redirects


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_redirect_to_the_cdn_is_followed_without_authorization(status: int, method: str) -> None:
    plan = make_plan(method)
    state, action, rest = step(plan, begin(plan), redirect(CDN, status))
    assert isinstance(action, Send)
    assert str(action.attempt.url) == CDN
    assert action.attempt.authorization is None
    assert action.attempt.hops == 1
    assert action.attempt.upstream == 0
    assert state.attempt == action.attempt
    assert state.phase is Phase.AWAIT_HEAD
    assert rest is None


@pytest.mark.parametrize(
    ("location", "url", "authorization"),
    [
        (
            "/v2/library/nginx/blobs/sha256:b",
            "https://registry-1.docker.io/v2/library/nginx/blobs/sha256:b",
            True,
        ),
        ("https://registry-1.docker.io/x", "https://registry-1.docker.io/x", True),
        ("https://REGISTRY-1.docker.io:443/x", "https://registry-1.docker.io/x", True),
        ("http://registry-1.docker.io/x", "http://registry-1.docker.io/x", False),  # downgrade
        ("https://registry-1.docker.io:8443/x", "https://registry-1.docker.io:8443/x", False),
        ("https://auth.docker.io/x", "https://auth.docker.io/x", False),
        ("https://docker.io/x", "https://docker.io/x", False),
        (
            "https://registry-1.docker.io.evil.example/x",
            "https://registry-1.docker.io.evil.example/x",
            False,
        ),
        ("//cdn.example/data", "https://cdn.example/data", False),
    ],
)
def test_authorization_only_to_the_addressed_origin(
    location: str, url: str, authorization: bool
) -> None:
    plan = make_plan()
    _, action, _ = step(plan, begin(plan), redirect(location))
    assert isinstance(action, Send)
    assert str(action.attempt.url) == url
    assert (action.attempt.authorization == CLIENT_AUTH) is authorization


def test_relative_redirect_on_a_fallback_with_a_base_path() -> None:
    plan = make_plan(upstreams=("worker",))
    _, action, _ = step(plan, begin(plan), redirect("data?sig=1"))
    assert isinstance(action, Send)
    assert str(action.attempt.url) == (
        "https://hub-mirror.example.workers.dev/prefix/v2/library/nginx/blobs/data?sig=1"
    )
    assert action.attempt.authorization == CLIENT_AUTH


def test_redirect_chain_back_to_the_registry_gets_authorization_again() -> None:
    plan = make_plan()
    state = begin(plan)
    state, action, _ = step(plan, state, redirect(CDN))
    assert isinstance(action, Send)
    assert action.attempt.authorization is None
    state, action, _ = step(plan, state, redirect("https://cdn2.example/data"))
    assert isinstance(action, Send)
    assert action.attempt.authorization is None
    assert action.attempt.hops == 2
    state, action, _ = step(plan, state, redirect("https://registry-1.docker.io/v2/x"))
    assert isinstance(action, Send)
    assert action.attempt.authorization == CLIENT_AUTH
    assert action.attempt.hops == 3
    state, action, _ = step(plan, state, head(200))
    assert action == Respond()


@pytest.mark.parametrize("method", ["PUT", "POST", "PATCH", "DELETE"])
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirects_not_followed_for_other_methods(method: str, status: int) -> None:
    plan = make_plan(method, "/v2/me/app/blobs/uploads/", replayable=False)
    state, action, rest = step(plan, begin(plan), redirect(CDN, status))
    assert action == Respond()
    assert state.phase is Phase.RESPONDING
    assert rest is None


@pytest.mark.parametrize("status", [201, 202, 300, 304])
def test_location_on_other_statuses_is_not_a_redirect(status: int) -> None:
    plan = make_plan("GET")
    _, action, _ = step(plan, begin(plan), redirect(CDN, status))
    assert action == Respond()


@pytest.mark.parametrize("max_hops", [0, 1, 5])
def test_more_than_max_hops_fails(max_hops: int) -> None:
    plan = make_plan(max_hops=max_hops)
    state = begin(plan)
    for hop in range(1, max_hops + 1):
        state, action, _ = step(plan, state, redirect(f"https://loop.example/{hop}"))
        assert isinstance(action, Send)
        assert action.attempt.hops == hop
    state, action, rest = step(plan, state, redirect("https://loop.example/again"))
    assert isinstance(action, Fail)
    assert isinstance(action.error, TooManyRedirects)
    assert action.error.status == 502
    assert state.phase is Phase.DONE
    assert rest is None


@pytest.mark.parametrize(
    "event",
    [
        head(307),
        head(302, (b"content-length", b"0")),
        redirect(b""),
        redirect("ftp://cdn.example/data"),
        redirect("https://user:pw@cdn.example/data"),
        redirect("https://cdn.example:99999/data"),
        redirect("mailto:root@example.com"),
    ],
)
def test_redirect_without_a_usable_location_fails(event: HeadReceived) -> None:
    plan = make_plan()
    state, action, rest = step(plan, begin(plan), event)
    assert isinstance(action, Fail)
    assert action.error.status == 502
    assert action.error.code == "UNAVAILABLE"
    assert state.phase is Phase.DONE
    assert rest is None


@pytest.mark.parametrize("location", [b"https://cdn.example/bl\xc3\xb6b", b"/data with space"])
def test_redirect_targets_are_valid_request_targets(location: bytes) -> None:
    plan = make_plan()
    _, action, _ = step(plan, begin(plan), redirect(location))
    if isinstance(action, Send):
        target = action.attempt.url.target
        assert target.isascii()
        assert " " not in target


# ---------------------------------------------------------------- 429 and failover


def retry_after(value: bytes) -> HeadReceived:
    return head(429, (b"retry-after", value), (b"content-type", b"application/json"))


@pytest.mark.parametrize(
    ("event", "wait"),
    [
        (retry_after(b"120"), 120.0),
        (retry_after(b"0"), 0.0),
        (retry_after(b"100000"), failover.MAX_COOLDOWN),
        (
            retry_after(
                format_datetime(datetime.fromtimestamp(WALL + 30, UTC), usegmt=True).encode()
            ),
            30.0,
        ),
        (retry_after(b"Tue, 14 Nov 2023 22:13:50 GMT"), 30.0),  # == WALL + 30
        (retry_after(b"Tue, 14 Nov 2023 22:00:00 GMT"), 0.0),  # in the past
        (head(429), 60.0),  # no Retry-After: the plan's default rest
        (retry_after(b"soon"), 60.0),
    ],
)
def test_429_fails_over_and_rests_the_upstream(event: HeadReceived, wait: float) -> None:
    plan = make_plan()
    state, action, rest = step(plan, begin(plan), event)
    assert isinstance(action, Send)
    assert action.attempt.upstream == 1
    assert action.attempt.hops == 0
    assert action.attempt.authorization == CLIENT_AUTH
    assert str(action.attempt.url) == "https://hub-mirror.example.workers.dev/prefix" + BLOB
    assert rest == Rest(0, NOW + wait)
    assert state.tried == frozenset({0, 1})
    assert state.phase is Phase.AWAIT_HEAD


def test_http_date_uses_wall_now_not_the_monotonic_clock() -> None:
    plan = make_plan()
    event = retry_after(b"Tue, 14 Nov 2023 22:13:50 GMT")  # WALL + 30
    _, _, rest = step(plan, begin(plan), event, now=5.0, wall_now=WALL + 10)
    assert rest == Rest(0, 25.0)


def test_429_with_no_fallback_left_reaches_the_client() -> None:
    plan = make_plan(upstreams=("hub",))
    state, action, rest = step(plan, begin(plan), retry_after(b"30"))
    assert action == Respond()
    assert state.phase is Phase.RESPONDING
    assert rest == Rest(0, NOW + 30)


def test_429_on_the_fallback_too_reaches_the_client() -> None:
    plan = make_plan()
    state, _, _ = step(plan, begin(plan), retry_after(b"30"))
    state, action, rest = step(plan, state, retry_after(b"5"), resting=[NOW + 30, 0.0])
    assert action == Respond()
    assert rest == Rest(1, NOW + 5)


def test_429_skips_a_resting_upstream_and_then_answers() -> None:
    plan = make_plan(upstreams=("hub", "worker", "local"))
    resting = [0.0, NOW + 100, 0.0]
    state = begin(plan, resting)
    state, action, _ = step(plan, state, retry_after(b"30"), resting=resting)
    assert isinstance(action, Send)
    assert action.attempt.upstream == 2
    resting[0] = NOW + 30
    state, action, _ = step(plan, state, retry_after(b"30"), resting=resting)
    assert action == Respond()  # the resting worker is not tried mid-request


def test_429_not_replayable_reaches_the_client() -> None:
    plan = make_plan("PUT", "/v2/me/app/manifests/latest", replayable=False)
    _, action, rest = step(plan, begin(plan), retry_after(b"30"))
    assert action == Respond()
    assert rest == Rest(0, NOW + 30)


def test_429_after_a_redirect_rests_the_registry_and_fails_over() -> None:
    plan = make_plan()
    state, _, _ = step(plan, begin(plan), redirect(CDN))
    state, action, rest = step(plan, state, retry_after(b"7"))
    assert isinstance(action, Send)
    assert action.attempt.upstream == 1
    assert action.attempt.hops == 0
    assert rest == Rest(0, NOW + 7)


@pytest.mark.parametrize(
    "error",
    [UpstreamUnavailable("connection refused"), UpstreamTimeout("connect timed out")],
)
def test_attempt_failed_moves_to_the_next_upstream(error: ProxyError) -> None:
    plan = make_plan()
    state, action, rest = step(plan, begin(plan), AttemptFailed(error))
    assert isinstance(action, Send)
    assert action.attempt.upstream == 1
    assert action.attempt.authorization == CLIENT_AUTH
    assert rest == Rest(0, NOW + 10.0)
    state, action, rest = step(plan, state, AttemptFailed(error))
    assert isinstance(action, Fail)
    assert action.error is error
    assert state.phase is Phase.DONE
    assert rest == Rest(1, NOW + 10.0)


def test_attempt_failed_on_the_cdn_fails_over() -> None:
    plan = make_plan()
    state, _, _ = step(plan, begin(plan), redirect(CDN))
    _, action, rest = step(plan, state, AttemptFailed(UpstreamUnavailable("cdn down")))
    assert isinstance(action, Send)
    assert action.attempt.upstream == 1
    assert action.attempt.hops == 0
    assert action.attempt.authorization == CLIENT_AUTH
    assert rest is not None


def test_attempt_failed_not_replayable_fails_with_the_same_error() -> None:
    plan = make_plan("PATCH", "/v2/me/app/blobs/uploads/u", replayable=False)
    error = UpstreamTimeout("timed out")
    state, action, rest = step(plan, begin(plan), AttemptFailed(error))
    assert isinstance(action, Fail)
    assert action.error is error
    assert action.error.status == 504
    assert state.phase is Phase.DONE
    assert rest == Rest(0, NOW + 10.0)


def test_attempt_failed_all_others_resting_fails() -> None:
    plan = make_plan()
    resting = [NOW + 50, NOW + 20]
    state = begin(plan, resting)
    assert state.attempt.upstream == 1
    _, action, _ = step(plan, state, AttemptFailed(UpstreamUnavailable("x")), resting=resting)
    assert isinstance(action, Fail)


# ---------------------------------------------------------------- what each attempt carries


def test_operator_login_goes_to_the_primary_only() -> None:
    # a 429 from the primary moves to the Worker: the operator's password must not follow
    plan = make_plan(authorization=None, operator_authorization=OPERATOR_AUTH)
    state = begin(plan)
    assert state.attempt.upstream == 0
    assert state.attempt.authorization == OPERATOR_AUTH
    _, action, _ = step(plan, state, head(429))
    assert isinstance(action, Send)
    assert action.attempt.upstream == 1
    assert action.attempt.authorization is None


def test_operator_login_never_follows_a_redirect_off_the_primary_origin() -> None:
    plan = make_plan(authorization=None, operator_authorization=OPERATOR_AUTH)
    _, action, _ = step(plan, begin(plan), redirect(CDN))
    assert isinstance(action, Send)
    assert action.attempt.authorization is None


def test_operator_login_is_not_used_when_the_primary_rests() -> None:
    plan = make_plan(authorization=None, operator_authorization=OPERATOR_AUTH)
    state = begin(plan, [NOW + 30, 0.0])
    assert state.attempt.upstream == 1
    assert state.attempt.authorization is None


def test_the_clients_own_credential_wins_over_the_operators() -> None:
    plan = make_plan(operator_authorization=OPERATOR_AUTH)
    assert begin(plan).attempt.authorization == CLIENT_AUTH


def test_registry_headers_of_a_followed_redirect_are_carried() -> None:
    plan = make_plan()
    digest = (b"docker-content-digest", b"sha256:" + b"a" * 64)
    event = head(307, (b"location", CDN.encode()), digest, (b"x-other", b"1"))
    state, _, _ = step(plan, begin(plan), event)
    assert state.carried == (digest,)
    # a second hop (CDN to CDN) keeps the registry's headers, not the CDN's
    state, _, _ = step(plan, state, head(302, (b"location", b"https://cdn2.example/d"), digest))
    assert state.carried == (digest,)
    state, action, _ = step(plan, state, head(200))
    assert action == Respond()
    assert state.carried == (digest,)


def test_failover_starts_a_chain_without_carried_headers() -> None:
    plan = make_plan()
    digest = (b"docker-content-digest", b"sha256:" + b"a" * 64)
    state, _, _ = step(plan, begin(plan), head(307, (b"location", CDN.encode()), digest))
    state, action, _ = step(plan, state, AttemptFailed(UpstreamUnavailable("cdn down")))
    assert isinstance(action, Send)
    assert action.attempt.upstream == 1
    assert state.carried == ()


# ---------------------------------------------------------------- invalid events


@pytest.mark.parametrize(
    ("phase", "event"),
    [
        (Phase.RESPONDING, head(200)),
        (Phase.RESPONDING, AttemptFailed(UpstreamUnavailable("x"))),
        (Phase.DONE, head(200)),
        (Phase.DONE, AttemptFailed(UpstreamUnavailable("x"))),
    ],
)
def test_invalid_event_for_the_phase(phase: Phase, event: Event) -> None:
    plan = make_plan()
    state = State(phase, begin(plan).attempt, frozenset({0}))
    with pytest.raises(RuntimeError, match="not valid in phase"):
        step(plan, state, event)


def test_base_url_rejects_a_query() -> None:
    with pytest.raises(ValueError, match="query"):
        base_url("https://registry.example/?x=1")
    assert base_url("https://registry.example/prefix/").target == "/prefix/"


# ---------------------------------------------------------------- a random walk


_LOCATIONS = st.sampled_from(
    [
        CDN,
        "/v2/library/nginx/blobs/x",
        "https://registry-1.docker.io/v2/x",
        "https://hub-mirror.example.workers.dev/prefix/v2/x",
        "https://cdn2.example/d",
        "http://10.0.0.5:5000/d",
    ]
)
_HEADS = st.one_of(
    st.builds(
        lambda s, loc: redirect(loc, s), st.sampled_from([301, 302, 303, 307, 308]), _LOCATIONS
    ),
    st.builds(head, st.sampled_from([200, 404, 500])),
    st.sampled_from([retry_after(b"30"), head(429), retry_after(b"junk")]),
)
_EVENTS = st.one_of(_HEADS, st.just(AttemptFailed(UpstreamUnavailable("down"))))


@given(
    st.sampled_from(["GET", "HEAD", "PUT"]),
    st.integers(1, 3),
    st.integers(0, 3),
    st.lists(st.floats(0, 2000), min_size=3, max_size=3),
    st.lists(_EVENTS, max_size=30),
)
def test_property_random_walk(
    method: str, count: int, max_hops: int, resting: list[float], events: list[Event]
) -> None:
    names = ("hub", "worker", "local")[:count]
    plan = make_plan(method, upstreams=names, replayable=method != "PUT", max_hops=max_hops)
    resting = resting[:count]
    state, _ = start(plan, resting, NOW)
    sends = 1
    seen_upstreams = [state.attempt.upstream]
    for event in events:
        state, next_action, rest = step(plan, state, event, resting=resting)
        if rest is not None:
            assert rest.until >= NOW
            resting[rest.upstream] = max(resting[rest.upstream], rest.until)
        if not isinstance(next_action, Send):
            assert isinstance(next_action, Respond | Fail)
            assert state.phase in (Phase.RESPONDING, Phase.DONE)
            break
        attempt = next_action.attempt
        sends += 1
        assert state.attempt == attempt
        assert attempt.hops <= plan.max_hops
        addressed = plan.upstreams[attempt.upstream].origin
        # credentials only ever go to the origin the client addressed through us
        assert (attempt.authorization == CLIENT_AUTH) is (attempt.url.origin == addressed)
        if attempt.hops == 0:
            assert method != "PUT"  # never replayed
            assert attempt.upstream not in seen_upstreams  # each upstream at most once
            seen_upstreams.append(attempt.upstream)
        else:
            assert method in ("GET", "HEAD")
        assert state.tried == frozenset(seen_upstreams)
    assert sends <= count * (max_hops + 1)


# ---------------------------------------------------------------- failover.retry_after_seconds


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, 42.0),
        (b"0", 0.0),
        (b"1", 1.0),
        (b"120", 120.0),
        (b" 120 ", 120.0),
        (b"0120", 120.0),
        (b"3600", 3600.0),
        (b"3601", 3600.0),
        (b"999999999999", 3600.0),
        (b"9" * 5000, 3600.0),  # would overflow an int conversion limit
        (b"", 42.0),
        (b"-5", 42.0),
        (b"-0", 42.0),
        (b"+5", 42.0),
        (b"1.5", 42.0),
        (b"1e3", 42.0),
        (b"nan", 42.0),
        (b"inf", 42.0),
        (b"120, 60", 42.0),
        (b"120s", 42.0),
        (b"soon", 42.0),
        (b"\xff\xfe", 42.0),
        (b"\xd9\xa3", 42.0),  # ARABIC-INDIC DIGIT THREE in UTF-8
        (b"\x00", 42.0),
        (b"Tue, 14 Nov 2023 22:13:50 GMT", 30.0),
        (b"Tuesday, 14-Nov-23 22:13:50 GMT", 30.0),  # RFC 850
        (b"Tue, 14 Nov 2023 22:13:20 GMT", 0.0),  # exactly now
        (b"Mon, 13 Nov 2023 00:00:00 GMT", 0.0),  # in the past: no rest
        (b"Fri, 31 Dec 9999 23:59:59 GMT", 3600.0),
        (b"Tue, 14 Nov 20230 22:13:50 GMT", 42.0),
        (b"Tue, 32 Nov 2023 22:13:50 GMT", 42.0),
        (b"Tue, 14 Nov 2023 25:13:50 GMT", 42.0),
    ],
)
def test_retry_after_seconds(value: bytes | None, expected: float) -> None:
    assert failover.retry_after_seconds(value, wall_now=WALL, default=42.0) == expected


@pytest.fixture
def local_time_is_not_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "EST+05")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("local_time_is_not_utc")
@pytest.mark.parametrize(
    "value",
    [
        b"Tue, 14 Nov 2023 22:13:50 GMT",
        b"Tuesday, 14-Nov-23 22:13:50 GMT",
        pytest.param(b"Tue Nov 14 22:13:50 2023"),
    ],
)
def test_http_dates_are_utc_whatever_the_local_zone(value: bytes) -> None:
    assert failover.retry_after_seconds(value, wall_now=WALL, default=42.0) == 30.0


@given(st.binary(max_size=40), st.floats(0, 2e9))
def test_property_retry_after_is_bounded(value: bytes, wall_now: float) -> None:
    wait = failover.retry_after_seconds(value, wall_now=wall_now, default=42.0)
    assert 0.0 <= wait <= failover.MAX_COOLDOWN


@pytest.mark.parametrize(
    ("resting", "tried", "expected"),
    [
        ([0.0, 0.0], frozenset(), 0),
        ([0.0, 0.0], frozenset({0}), 1),
        ([0.0, 0.0], frozenset({0, 1}), None),
        ([NOW + 1, 0.0], frozenset(), 1),
        ([NOW + 1, NOW + 2], frozenset(), 0),
        ([NOW + 3, NOW + 2], frozenset(), 1),
        ([0.0, NOW + 2], frozenset({0}), None),  # mid-request, a resting one is not used
        ([], frozenset(), None),
    ],
)
def test_choose_upstream(resting: list[float], tried: frozenset[int], expected: int | None) -> None:
    assert failover.choose_upstream(resting, tried, NOW) == expected


# ---------------------------------------------------------------- redirects


CURRENT = parse_url("https://registry-1.docker.io/v2/library/nginx/blobs/uploads/abc")


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_redirect_target(method: str) -> None:
    assert redirect_target(method, 307, CDN, CURRENT) == parse_url(CDN)
    assert redirect_target(method, 200, CDN, CURRENT) is None
    assert redirect_target(method, 304, None, CURRENT) is None
    with pytest.raises(ValueError, match="Location"):
        redirect_target(method, 302, None, CURRENT)
    with pytest.raises(ValueError, match="Location"):
        redirect_target(method, 302, "", CURRENT)


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS", "get"])
def test_redirect_target_other_methods(method: str) -> None:
    assert redirect_target(method, 307, CDN, CURRENT) is None
    assert redirect_target(method, 307, None, CURRENT) is None


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("https://registry-1.docker.io", "https://registry-1.docker.io:443/x", True),
        ("https://registry-1.docker.io", "http://registry-1.docker.io", False),
        ("https://registry-1.docker.io", "https://registry-1.docker.io:8443", False),
        ("https://registry-1.docker.io", "https://production.cloudflare.docker.com", False),
        ("https://docker.io", "https://registry-1.docker.io", False),
    ],
)
def test_may_send_authorization(a: str, b: str, same: bool) -> None:
    assert may_send_authorization(parse_url(a).origin, parse_url(b).origin) is same


HUB_ORIGIN = Origin("https", "registry-1.docker.io", 443)


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        # on the upstream's origin: made origin-relative, so the client comes back to us
        (
            "https://registry-1.docker.io/v2/library/nginx/blobs/uploads/u?_state=x%3D",
            "/v2/library/nginx/blobs/uploads/u?_state=x%3D",
        ),
        ("https://REGISTRY-1.docker.io:443/v2/x", "/v2/x"),
        ("//registry-1.docker.io/v2/x", "/v2/x"),
        ("/v2/library/nginx/blobs/uploads/u", "/v2/library/nginx/blobs/uploads/u"),
        ("u2?_state=y", "/v2/library/nginx/blobs/uploads/u2?_state=y"),
        # the Host we sent with the client's scheme (X-Forwarded-Proto: http), as distribution
        # builds upload URLs behind a plain-HTTP mirror
        ("http://registry-1.docker.io/v2/x", "/v2/x"),
        # elsewhere: unchanged
        (CDN, CDN),
        ("http://registry-1.docker.io:443/v2/x", "http://registry-1.docker.io:443/v2/x"),
        ("https://registry-1.docker.io:8443/v2/x", "https://registry-1.docker.io:8443/v2/x"),
        ("http://docker.io/v2/x", "http://docker.io/v2/x"),
        (
            "https://registry-1.docker.io.evil.example/v2/x",
            "https://registry-1.docker.io.evil.example/v2/x",
        ),
        # unparseable: unchanged
        ("https://u:p@registry-1.docker.io/v2/x", "https://u:p@registry-1.docker.io/v2/x"),
        ("ftp://registry-1.docker.io/x", "ftp://registry-1.docker.io/x"),
        ("https://registry-1.docker.io:bad/x", "https://registry-1.docker.io:bad/x"),
    ],
)
def test_client_location(location: str, expected: str) -> None:
    assert client_location(location, HUB, CURRENT) == expected


def test_client_location_on_an_upstream_with_a_port() -> None:
    local = base_url("https://127.0.0.1:5443")
    current = parse_url("https://127.0.0.1:5443/v2/me/app/blobs/uploads/")
    assert client_location("http://127.0.0.1:5443/v2/me/app/blobs/uploads/u", local, current) == (
        "/v2/me/app/blobs/uploads/u"
    )
    assert client_location("http://127.0.0.1:5444/v2/x", local, current) == (
        "http://127.0.0.1:5444/v2/x"
    )


def test_client_location_drops_the_upstream_base_path() -> None:
    """A fallback mounted under a prefix hands out upload URLs under it; through the mirror the
    client must use the plain /v2/ path, which is what our router accepts."""
    worker = base_url("https://w.example/prefix")
    current = parse_url("https://w.example/prefix/v2/x/blobs/uploads/")
    assert client_location("/prefix/v2/x/blobs/uploads/u1", worker, current) == (
        "/v2/x/blobs/uploads/u1"
    )
    assert client_location("https://w.example/other/v2/x", worker, current) == "/other/v2/x"
