"""Pull accounting's tables (policy.accounting), pure: window slots, the cap on keys, the top-N
ranking with its "other", whose credential a request spends, and the rate-limit warning given
once per fall under 10% (again only after a recovery). Also the /metrics families built on them:
the per-client and per-image series are capped at --accounting-top + 1."""

from __future__ import annotations

import pytest

from hubproxy.ops.metrics import HubMetrics
from hubproxy.policy.accounting import (
    ANONYMOUS,
    CLIENT,
    OPERATOR,
    OTHER,
    PullAccounting,
    RanLow,
    RateLimitWatch,
    Recovered,
    WindowCounts,
    client_name,
    credential_identity,
    is_low,
    low_line,
    manifest_repository,
    rank,
    recovered_line,
)
from tests.test_operations import metric_samples


@pytest.mark.parametrize(
    ("events", "now", "expected"),
    [
        # window 60 s in 6 slots of 10 s: a count leaves once its slot is 6 slots old
        ([("a", 0.0), ("a", 5.0), ("b", 9.9)], 10.0, {"a": 2, "b": 1}),
        ([("a", 0.0), ("b", 30.0)], 59.9, {"a": 1, "b": 1}),
        ([("a", 0.0), ("b", 30.0)], 60.0, {"b": 1}),  # a's slot [0, 10) left at 60
        ([("a", 0.0), ("b", 30.0)], 95.0, {}),
        ([("a", 55.0), ("a", 61.0), ("a", 119.0)], 119.5, {"a": 2}),
        ([("a", 55.0), ("a", 61.0), ("a", 119.0)], 120.0, {"a": 1}),
        ([], 0.0, {}),
    ],
)
def test_window_counts_slide(
    events: list[tuple[str, float]], now: float, expected: dict[str, int]
) -> None:
    counts = WindowCounts(60.0, slots=6)
    for key, when in events:
        counts.add(key, when)
    assert counts.totals(now) == expected


def test_a_slot_holds_at_most_max_keys_and_the_rest_is_other() -> None:
    counts = WindowCounts(60.0, slots=6, max_keys=3)
    for when in (0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 55.0):
        for key in range(100):
            counts.add(f"client-{key}", when)
    assert counts.entries() <= 6 * 3  # bounded whatever the number of clients
    ranking = counts.top(59.0, 2)
    assert ranking.total == 700
    assert sum(count for _, count in ranking.top) + ranking.other == ranking.total
    # the first keys of each slot were counted by name, the rest summed
    assert ranking.top == (("client-0", 7), ("client-1", 7))


@pytest.mark.parametrize(
    ("items", "n", "expected"),
    [
        ([("a", 1), ("b", 3), ("c", 2)], 2, (("b", 3), ("c", 2))),
        ([("b", 2), ("a", 2), ("c", 2)], 2, (("a", 2), ("b", 2))),  # ties by key: stable
        ([("a", 1)], 5, (("a", 1),)),
        ([("a", 1)], 0, ()),
        ([], 3, ()),
    ],
)
def test_rank(items: list[tuple[str, int]], n: int, expected: tuple[tuple[str, int], ...]) -> None:
    assert rank(items, n) == expected


def test_top_and_labelled_series_end_in_other() -> None:
    counts = WindowCounts(3600.0)
    for index, times in enumerate((5, 4, 3, 2, 1)):
        for _ in range(times):
            counts.add(f"10.0.0.{index}", 1.0)
    ranking = counts.top(2.0, 2)
    assert ranking.top == (("10.0.0.0", 5), ("10.0.0.1", 4))
    assert (ranking.other, ranking.total) == (6, 15)
    assert ranking.labelled() == {("10.0.0.0",): 5.0, ("10.0.0.1",): 4.0, (OTHER,): 6.0}
    assert WindowCounts(60.0).top(0.0, 3).labelled() == {(OTHER,): 0.0}


@pytest.mark.parametrize(
    ("sent", "operator", "anonymous", "identity"),
    [
        (None, None, False, ANONYMOUS),
        (None, b"Basic b3A6cHc=", False, ANONYMOUS),  # the operator's login could go, did not
        (b"Basic b3A6cHc=", b"Basic b3A6cHc=", False, OPERATOR),
        (b"Bearer operator-token", b"Bearer operator-token", False, OPERATOR),
        (b"Bearer operator-token", b"Bearer operator-token", True, OPERATOR),
        (b"Bearer client-token", None, False, CLIENT),
        (b"Bearer client-token", b"Basic b3A6cHc=", False, CLIENT),
        (b"Bearer anonymous-token", None, True, ANONYMOUS),  # a mirror user's (--users)
    ],
)
def test_credential_identity(
    sent: bytes | None, operator: bytes | None, anonymous: bool, identity: str
) -> None:
    assert credential_identity(sent, operator, anonymous=anonymous) == identity


@pytest.mark.parametrize(
    ("target", "repository"),
    [
        ("/v2/library/alpine/manifests/3.20", "library/alpine"),
        ("/v2/library/alpine/manifests/sha256:abc?ns=docker.io", "library/alpine"),
        ("/v2/a/b/c/manifests/latest", "a/b/c"),
        ("/v2/library/alpine/blobs/sha256:abc", None),
        ("/v2/library/alpine/tags/list", None),
        ("/v2/", None),
        ("/v2/manifests/x", None),
        ("/v2/library/alpine/manifests/", None),
        ("/token?scope=repository:library/alpine:pull", None),
    ],
)
def test_manifest_repository(target: str, repository: str | None) -> None:
    assert manifest_repository(target) == repository


@pytest.mark.parametrize(
    ("key", "user", "name"),
    [("10.0.0.5", None, "10.0.0.5"), ("10.0.0.5", "alice", "user:alice"), ("::/64", "", "::/64")],
)
def test_client_name(key: str, user: str | None, name: str) -> None:
    assert client_name(key, user) == name


@pytest.mark.parametrize(
    ("remaining", "limit", "low"),
    [
        (9, 100, True),
        (10, 100, False),
        (0, 100, True),
        (0, None, False),
        (0, 0, False),
        (1, 20, True),
    ],
)
def test_is_low(remaining: float, limit: float | None, low: bool) -> None:
    assert is_low(remaining, limit) is low


# each step: (remaining, limit) -> what to log: a fall under 10% warns once, a recovery says so
@pytest.mark.parametrize(
    ("steps", "notes"),
    [
        ([(50, 100), (11, 100), (9, 100), (5, 100), (0, 100)], [None, None, "low", None, None]),
        ([(5, 100), (4, 100), (60, 100), (3, 100)], ["low", None, "recovered", "low"]),
        ([(9, 100), (10, 100), (9, 100)], ["low", "recovered", "low"]),
        ([(0, None), (0, None)], [None, None]),  # no limit said: nothing to compare with
        ([(1, 5), (1, 50)], [None, "low"]),  # the limit changed (a login with more)
    ],
)
def test_rate_limit_watch_warns_once_per_fall(
    steps: list[tuple[float, float | None]], notes: list[str | None]
) -> None:
    watch = RateLimitWatch()
    seen = []
    for remaining, limit in steps:
        note = watch.note(
            registry="docker.io",
            identity=ANONYMOUS,
            remaining=remaining,
            limit=limit,
            window=21600.0,
            source="203.0.113.7",
            wall=0.0,
        )
        seen.append(
            "low"
            if isinstance(note, RanLow)
            else "recovered"
            if isinstance(note, Recovered)
            else None
        )
    assert seen == notes


def test_allowances_are_kept_per_registry_and_identity() -> None:
    watch = RateLimitWatch()

    def note(registry: str, identity: str, remaining: float) -> RanLow | Recovered | None:
        return watch.note(
            registry=registry,
            identity=identity,
            remaining=remaining,
            limit=100.0,
            window=None,
            source="",
            wall=0.0,
        )

    assert isinstance(note("docker.io", ANONYMOUS, 5), RanLow)
    # another identity's allowance is another count: its own warning
    assert isinstance(note("docker.io", OPERATOR, 5), RanLow)
    assert note("ghcr.io", ANONYMOUS, 50) is None
    assert [(a.registry, a.identity, a.low) for a in watch.allowances()] == [
        ("docker.io", ANONYMOUS, True),
        ("docker.io", OPERATOR, True),
        ("ghcr.io", ANONYMOUS, False),
    ]


def test_the_warning_says_what_it_means_and_what_to_do() -> None:
    watch = RateLimitWatch()
    note = watch.note(
        registry="docker.io",
        identity=ANONYMOUS,
        remaining=7,
        limit=100,
        window=21600.0,
        source="203.0.113.7",
        wall=0.0,
    )
    assert isinstance(note, RanLow)
    line = low_line(note.allowance)
    assert line.startswith("docker.io rate limit nearly spent: 7 pulls left of 100 per 6 h for ")
    assert "counted as 203.0.113.7" in line
    assert "429" in line and "Who spent the rate limit" in line and "--registry-login" in line
    assert "\n" not in line
    back = watch.note(
        registry="docker.io",
        identity=ANONYMOUS,
        remaining=80,
        limit=100,
        window=21600.0,
        source="",
        wall=1.0,
    )
    assert isinstance(back, Recovered)
    assert recovered_line(back.allowance) == (
        "docker.io rate limit for anonymous pulls recovered: 80 pulls left of 100"
    )


def test_pull_accounting_tables() -> None:
    accounting = PullAccounting(3600.0, top=2)
    for client, image in [("a", "x"), ("a", "y"), ("b", "x"), ("c", "x")]:
        accounting.client_pull(client=client, image=image, now=10.0)
    accounting.upstream_pull(image="x", now=10.0)
    assert accounting.clients.top(20.0, 2).top == (("a", 2), ("b", 1))
    assert accounting.images.top(20.0, 2).top == (("x", 3), ("y", 1))
    assert accounting.upstream_images.totals(20.0) == {"x": 1}


def test_metrics_label_sets_are_capped() -> None:
    """However many clients and images pull, /metrics carries top + 1 series for each."""
    metrics = HubMetrics()
    metrics.accounting = PullAccounting(3600.0, top=3)
    for index in range(40):
        for _ in range(index % 7 + 1):
            metrics.note_client_pull(
                registry="docker.io", client=f"10.0.{index}.1", image=f"team/app{index}"
            )
        metrics.note_upstream_pull(registry="docker.io", identity=CLIENT, image=f"team/app{index}")
    samples = metric_samples(metrics.render().decode())
    for family, label in (
        ("hubproxy_client_pulls", "client"),
        ("hubproxy_image_pulls", "image"),
        ("hubproxy_upstream_image_pulls", "image"),
    ):
        series = {
            dict(labels)[label]: value
            for (name, labels), value in samples.items()
            if name == family
        }
        assert len(series) == 4, (family, series)
        assert OTHER in series
    clients = {
        dict(labels)["client"]: value
        for (name, labels), value in samples.items()
        if name == "hubproxy_client_pulls"
    }
    total = sum(index % 7 + 1 for index in range(40))
    assert sum(clients.values()) == total
    assert samples[("hubproxy_pulls_total", frozenset({("registry", "docker.io")}))] == total
    upstream = frozenset({("registry", "docker.io"), ("identity", CLIENT)})
    assert samples[("hubproxy_upstream_pulls_total", upstream)] == 40
    with pytest.raises(ValueError, match="not an identity"):
        metrics.note_upstream_pull(registry="docker.io", identity="someone", image="x")


def test_allowance_gauges_and_the_low_flag() -> None:
    metrics = HubMetrics()

    def said(remaining: int) -> RanLow | Recovered | None:
        headers = [
            (b"ratelimit-limit", b"100;w=21600"),
            (b"ratelimit-remaining", b"%d;w=21600" % remaining),
            (b"docker-ratelimit-source", b"203.0.113.7\x1b[31m"),  # a peer's junk is dropped
        ]
        return metrics.note_allowance(
            registry="docker.io", identity=OPERATOR, headers=headers, wall=5.0
        )

    assert said(40) is None
    labels = {"registry": "docker.io", "identity": OPERATOR}
    assert metrics.allowance_remaining.get(**labels) == 40
    assert metrics.allowance_limit.get(**labels) == 100
    assert metrics.allowance_low.get(**labels) == 0
    note = said(3)
    assert isinstance(note, RanLow) and note.allowance.source == "203.0.113.7[31m"
    assert metrics.allowance_low.get(**labels) == 1
    assert said(2) is None
    assert isinstance(said(99), Recovered)
    assert metrics.allowance_low.get(**labels) == 0
    # no headers, or junk: nothing noted
    assert (
        metrics.note_allowance(registry="ghcr.io", identity=ANONYMOUS, headers=[], wall=0.0) is None
    )
    junk = [(b"ratelimit-remaining", b"lots")]
    assert (
        metrics.note_allowance(registry="ghcr.io", identity=ANONYMOUS, headers=junk, wall=0.0)
        is None
    )
    assert metrics.allowance_remaining.series() == {("docker.io", OPERATOR): 99.0}
