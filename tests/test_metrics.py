"""``/metrics``: every primitive rendered, then read back with prometheus_client's own parser."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hubproxy.cache.manifests import ManifestStore
from hubproxy.cache.store import BlobStore, DiskSpace
from hubproxy.net.server import ConnectionFigures
from hubproxy.ops.metrics import (
    CONTENT_TYPE,
    CacheFigures,
    Counter,
    CounterFunction,
    Gauge,
    GaugeFunction,
    Histogram,
    HubMetrics,
    LabelValues,
    Metric,
    RateLimit,
    RecentEvents,
    Registry,
    cache_figures,
    escape_help,
    escape_label_value,
    format_value,
    manifest_figures,
    parse_ratelimit,
    read_ratelimit,
    resident_bytes,
)

Samples = list[tuple[str, dict[str, str], float]]


def parse(text: bytes) -> dict[str, tuple[str, str, Samples]]:
    """Family name -> (type, help, samples), as Prometheus's own client library reads them."""
    families = {}
    for family in text_string_to_metric_families(text.decode("utf-8")):
        samples = [(s.name, dict(s.labels), s.value) for s in family.samples]
        families[family.name] = (family.type, family.documentation, samples)
    return families


def render(*metrics: Metric) -> bytes:
    registry = Registry()
    for metric in metrics:
        registry.register(metric)
    return registry.render()


def test_content_type() -> None:
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.0, "0"),
        (-0.0, "0"),
        (1.0, "1"),
        (76.0, "76"),
        (-3.0, "-3"),
        (1700000000.0, "1700000000"),
        (20.0 * 2**30, "21474836480"),
        (0.5, "0.5"),
        (0.005, "0.005"),
        (1700000000.25, "1700000000.25"),
        (1e300, "1e+300"),
        (2.0**60, "1.152921504606847e+18"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
    ],
)
def test_format_value(value: float, text: str) -> None:
    assert format_value(value) == text
    if not math.isnan(value):
        assert float(text.replace("Inf", "inf")) == value


def test_escapes() -> None:
    assert escape_help('a\\b\nc"d') == 'a\\\\b\\nc"d'  # HELP leaves quotes alone
    assert escape_label_value('a\\b\nc"d') == 'a\\\\b\\nc\\"d'


def test_counter_without_labels_starts_at_zero() -> None:
    counter = Counter("jobs", "Jobs done.")
    assert parse(render(counter)) == {"jobs": ("counter", "Jobs done.", [("jobs_total", {}, 0)])}
    counter.inc()
    counter.inc(2.5)
    assert parse(render(counter))["jobs"][2] == [("jobs_total", {}, 3.5)]
    assert b"# HELP jobs_total Jobs done.\n# TYPE jobs_total counter\njobs_total 3.5\n" == (
        render(counter)
    )


def test_counter_with_labels_appears_once_used() -> None:
    counter = Counter("hits", "Hits.", ("route", "status"))
    assert parse(render(counter))["hits"][2] == []
    counter.inc(1, route="blob", status="200")
    counter.inc(1, route="blob", status="200")
    counter.inc(5, status="404", route="manifest")
    assert parse(render(counter))["hits"][2] == [
        ("hits_total", {"route": "blob", "status": "200"}, 2),
        ("hits_total", {"route": "manifest", "status": "404"}, 5),
    ]
    assert counter.get(route="blob", status="200") == 2
    assert counter.get(route="tags", status="200") == 0
    assert counter.series() == {("blob", "200"): 2, ("manifest", "404"): 5}


def test_counter_inc_at_counts_the_series_inc_does() -> None:
    by_name = Counter("hits", "Hits.", ("route", "status"))
    by_key = Counter("hits", "Hits.", ("route", "status"))
    by_name.inc(1, route="blob", status="200")
    by_name.inc(2.5, status="404", route="manifest")
    by_key.inc_at(("blob", "200"))
    by_key.inc_at(("manifest", "404"), 2.5)
    assert by_key.series() == by_name.series()
    assert render(by_key) == render(by_name)


def test_counter_label_named_amount() -> None:
    counter = Counter("c", "C.", ("amount",))  # the amount argument is positional-only
    counter.inc(3, amount="x")
    assert counter.get(amount="x") == 3


def test_counter_refuses_going_down_and_a_total_suffix() -> None:
    with pytest.raises(ValueError, match="only goes up"):
        Counter("c", "C.").inc(-1)
    with pytest.raises(ValueError, match="_total"):
        Counter("c_total", "C.")


def test_gauge() -> None:
    plain = Gauge("connections", "Open.")
    labelled = Gauge("remaining", "Left.", ("upstream",))
    plain.inc()
    plain.inc(3)
    plain.dec()
    labelled.set(76, upstream="a")
    labelled.set(-1.5, upstream="b")
    labelled.dec(2, upstream="a")
    families = parse(render(plain, labelled))
    assert families["connections"] == ("gauge", "Open.", [("connections", {}, 3)])
    assert families["remaining"][2] == [
        ("remaining", {"upstream": "a"}, 74),
        ("remaining", {"upstream": "b"}, -1.5),
    ]


def test_special_values_round_trip() -> None:
    gauge = Gauge("g", "G.", ("v",))
    gauge.set(math.inf, v="inf")
    gauge.set(-math.inf, v="-inf")
    gauge.set(math.nan, v="nan")
    values = {labels["v"]: value for _, labels, value in parse(render(gauge))["g"][2]}
    assert values["inf"] == math.inf
    assert values["-inf"] == -math.inf
    assert math.isnan(values["nan"])


def test_gauge_function() -> None:
    figures: dict[str, float | Mapping[LabelValues, float]] = {"one": 1.5, "many": {("a",): 1}}
    plain = GaugeFunction("plain", "P.", lambda: figures["one"])
    labelled = GaugeFunction("labelled", "L.", lambda: figures["many"], ("name",))
    assert parse(render(plain, labelled)) == {
        "plain": ("gauge", "P.", [("plain", {}, 1.5)]),
        "labelled": ("gauge", "L.", [("labelled", {"name": "a"}, 1)]),
    }
    figures["one"] = 7  # read at render time, not at construction
    figures["many"] = {("b",): 2, ("a",): 3}
    families = parse(render(plain, labelled))
    assert families["plain"][2] == [("plain", {}, 7)]
    assert families["labelled"][2] == [
        ("labelled", {"name": "a"}, 3),
        ("labelled", {"name": "b"}, 2),
    ]


def test_counter_function() -> None:
    count = [0]
    counter = CounterFunction("evictions", "Evicted.", lambda: count[0])
    count[0] = 12
    assert parse(render(counter)) == {
        "evictions": ("counter", "Evicted.", [("evictions_total", {}, 12)])
    }
    with pytest.raises(ValueError, match="_total"):
        CounterFunction("evictions_total", "Evicted.", lambda: 0)


@pytest.mark.parametrize(
    ("labelnames", "found"),
    [((), {("a",): 1.0}), (("x",), 1.0), (("x",), {("a", "b"): 1.0})],
)
def test_function_shape_checked(
    labelnames: tuple[str, ...], found: float | Mapping[LabelValues, float]
) -> None:
    with pytest.raises(ValueError, match="labels"):
        render(GaugeFunction("g", "G.", lambda: found, labelnames))


def test_histogram() -> None:
    histogram = Histogram("latency", "Latency.", (0.1, 1, 10), ("upstream",))
    assert parse(render(histogram))["latency"][2] == []
    for value in (0.05, 0.1, 0.5, 1, 3, 100):  # 0.1 and 1 lie on a bound: le is inclusive
        histogram.observe(value, upstream="hub")
    histogram.observe(0.2, upstream="mirror")
    kind, _, samples = parse(render(histogram))["latency"]
    assert kind == "histogram"
    hub = [(name, labels, value) for name, labels, value in samples if labels["upstream"] == "hub"]
    assert hub == [
        ("latency_bucket", {"upstream": "hub", "le": "0.1"}, 2),
        ("latency_bucket", {"upstream": "hub", "le": "1"}, 4),
        ("latency_bucket", {"upstream": "hub", "le": "10"}, 5),
        ("latency_bucket", {"upstream": "hub", "le": "+Inf"}, 6),
        ("latency_sum", {"upstream": "hub"}, pytest.approx(104.65)),
        ("latency_count", {"upstream": "hub"}, 6),
    ]
    assert histogram.count(upstream="mirror") == 1
    assert histogram.count(upstream="nobody") == 0


def test_histogram_without_labels_is_cumulative_and_inf_is_count() -> None:
    histogram = Histogram("h", "H.", (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
    zero = parse(render(histogram))["h"][2]
    assert zero[-1] == ("h_count", {}, 0)  # present from the start
    for value in (0.001, 0.02, 0.02, 0.3, 7, 45, 1e9, math.nan):
        histogram.observe(value)
    samples = parse(render(histogram))["h"][2]
    buckets = [(labels["le"], value) for name, labels, value in samples if name == "h_bucket"]
    counts = [value for _, value in buckets]
    assert counts == sorted(counts)  # cumulative
    assert buckets[-1] == ("+Inf", 8)
    assert ("h_count", {}, 8) in samples
    assert dict(buckets)["0.005"] == 1
    assert dict(buckets)["30"] == 5  # 45, 1e9 and NaN only in +Inf


@pytest.mark.parametrize(
    "buckets", [(), (1.0, 1.0), (2.0, 1.0), (math.nan,), (-math.inf, 1.0), (math.inf,)]
)
def test_histogram_bad_buckets(buckets: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="bucket"):
        Histogram("h", "H.", buckets)


def test_histogram_infinite_bound_given_is_not_doubled() -> None:
    histogram = Histogram("h", "H.", (1.0, math.inf))
    assert histogram.bounds == (1.0, math.inf)
    with pytest.raises(ValueError, match="reserved"):
        Histogram("h", "H.", (1.0,), ("le",))


@pytest.mark.parametrize(
    "value",
    [
        'say "hi"',
        "back\\slash",
        "trailing\\",
        "new\nline",
        "\\n is not a newline",
        'all: \\"\n\\\\',
        "ünïcødé ✓ 🐳",
        "{braces}, commas=and equals",
        "",
    ],
)
def test_awkward_label_values_round_trip(value: str) -> None:
    counter = Counter("c", 'Help with \\ and\nnewline and "quotes".', ("v",))
    counter.inc(1, v=value)
    _, help, samples = parse(render(counter))["c"]
    assert help == 'Help with \\ and\nnewline and "quotes".'
    assert samples == [("c_total", {"v": value}, 1)]


@pytest.mark.parametrize(
    "labels",
    [{}, {"route": "blob"}, {"route": "blob", "status": "200", "extra": "x"}, {"rout": "blob"}],
)
def test_wrong_labels_refused(labels: dict[str, str]) -> None:
    counter = Counter("c", "C.", ("route", "status"))
    gauge = Gauge("g", "G.", ("route", "status"))
    histogram = Histogram("h", "H.", (1.0,), ("route", "status"))
    with pytest.raises(ValueError, match="takes labels"):
        counter.inc(1, **labels)
    with pytest.raises(ValueError, match="takes labels"):
        gauge.set(1, **labels)
    with pytest.raises(ValueError, match="takes labels"):
        histogram.observe(1, **labels)
    with pytest.raises(ValueError, match="takes labels"):
        Counter("plain", "P.").inc(1, route="blob")


@pytest.mark.parametrize(
    ("name", "labelnames"),
    [("1abc", ()), ("has-dash", ()), ("", ()), ("ok", ("bad-label",)), ("ok", ("__reserved",))],
)
def test_bad_names_refused(name: str, labelnames: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="name"):
        Gauge(name, "G.", labelnames)


def test_repeated_label_names_refused() -> None:
    with pytest.raises(ValueError, match="repeated"):
        Gauge("g", "G.", ("a", "a"))


def test_duplicate_registration_refused() -> None:
    registry = Registry()
    first = registry.register(Counter("requests", "R."))
    assert isinstance(first, Counter)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Counter("requests", "Again."))
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Gauge("requests_total", "Clashes with the counter's samples."))
    registry.register(Histogram("latency", "L.", (1.0,)))
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Gauge("latency_count", "Clashes with the histogram's samples."))
    assert list(parse(registry.render())) == ["requests", "latency"]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"76;w=21600", 76.0),
        (b"100;w=21600", 100.0),
        (b"0;w=21600", 0.0),
        (b"76", 76.0),
        (b" 76 ;w=21600", 76.0),
        (b"12.0;w=60", 12.0),
        (b"", None),
        (b";w=21600", None),
        (b"abc", None),
        (b"-1;w=21600", None),
        (b"nan", None),
        (b"inf", None),
        (b"1e3", None),
        (b"7 6", None),
        (b"0x10", None),
        (b"\xff\xfe", None),
        (b"\xd9\xa7", None),  # ARABIC-INDIC DIGIT SEVEN: int() would take it, we do not
        (b"9" * 40, None),
    ],
)
def test_parse_ratelimit(header: bytes, expected: float | None) -> None:
    assert parse_ratelimit(header) == expected


def test_resident_bytes() -> None:
    assert resident_bytes("6200 3407 1200 300 0 2000 0\n", 4096) == 3407 * 4096


def test_recent_events_window() -> None:
    events = RecentEvents(window=3600)
    assert events.count(now=1000.0) == 0
    assert events.last is None
    for when in (100.0, 2000.0, 3000.0):
        events.add(when)
    assert events.last == 3000.0
    assert events.count(now=3000.0) == 3
    assert events.count(now=3700.0) == 2  # 100 fell out of the hour
    assert events.count(now=6000.0) == 1
    assert events.count(now=7000.0) == 0
    assert events.last == 3000.0


def test_recent_events_bounded() -> None:
    events = RecentEvents(window=3600, limit=3)
    for when in range(10):
        events.add(float(when))
    assert events.count(now=10.0) == 3
    assert events.last == 9.0


HUB_FAMILIES = {
    "hubproxy_requests",
    "hubproxy_response_bytes",
    "hubproxy_cache_requests",
    "hubproxy_cache_hit_ratio",
    "hubproxy_upstream_response_seconds",
    "hubproxy_upstream_rate_limited",
    "hubproxy_failovers",
    "hubproxy_upstream_ratelimit_remaining",
    "hubproxy_pulls",
    "hubproxy_upstream_pulls",
    "hubproxy_client_pulls",
    "hubproxy_image_pulls",
    "hubproxy_upstream_image_pulls",
    "hubproxy_ratelimit_remaining",
    "hubproxy_ratelimit_limit",
    "hubproxy_ratelimit_low",
    "hubproxy_client_connections",
    "hubproxy_refused_connections",
    "hubproxy_reclaimed_connections",
    "hubproxy_client_turns_waiting",
    "hubproxy_client_turn_waits",
    "hubproxy_fair_share_waits",
    "hubproxy_kernel_tls_connections",
    "hubproxy_bandwidth_client_limit_bytes_per_second",
    "hubproxy_bandwidth_total_limit_bytes_per_second",
    "hubproxy_bandwidth_delayed_bytes",
    "hubproxy_bandwidth_paced_seconds",
    "hubproxy_bandwidth_paced_clients",
    "hubproxy_client_turn_timeouts",
    "hubproxy_denied_requests",
    "hubproxy_cache_bytes",
    "hubproxy_cache_blobs",
    "hubproxy_cache_limit_bytes",
    "hubproxy_cache_pinned_bytes",
    "hubproxy_cache_filling_bytes",
    "hubproxy_cache_disk_free_bytes",
    "hubproxy_cache_evictions",
    "hubproxy_cache_verification_failures",
    "hubproxy_cache_hits_hashed",
    "hubproxy_access_confirmations_shared",
    "hubproxy_access_confirmations_received",
    "hubproxy_cache_verifications_received",
    "hubproxy_upstream_slots_in_use",
    "hubproxy_upstream_slot_waiting",
    "hubproxy_upstream_idle_connections",
    "hubproxy_upstream_slot_waits",
    "hubproxy_upstream_slot_wait_timeouts",
    "hubproxy_upstream_idle_swept",
    "hubproxy_upstream_slot_limit",
    "hubproxy_manifest_bytes_in_flight",
    "hubproxy_manifest_memory_limit_bytes",
    "hubproxy_body_memory_limit_bytes",
    "hubproxy_body_transfers",
    "hubproxy_manifest_bytes_sending",
    "hubproxy_manifest_fetches_shared",
    "hubproxy_negative_cache_hits",
    "hubproxy_negative_cache_entries",
    "hubproxy_manifest_send_waits",
    "hubproxy_manifest_fetch_waits",
    "hubproxy_peer_resting",
    "hubproxy_peer_fetches",
    "hubproxy_store_commits",
    "hubproxy_store_reads",
    "hubproxy_store_too_large",
    "hubproxy_store_evicted",
    "hubproxy_store_bytes",
    "hubproxy_store_limit_bytes",
    "hubproxy_store_redirects",
    "hubproxy_store_state_writes",
    "hubproxy_store_state_writes_dropped",
    "hubproxy_store_state_write_failures",
    "hubproxy_store_state_reads",
    "hubproxy_store_state_refused",
    "hubproxy_manifest_send_wait_timeouts",
    "hubproxy_manifest_cache_bytes",
    "hubproxy_manifest_cache_manifests",
    "hubproxy_manifest_cache_tags",
    "hubproxy_manifest_cache_limit_bytes",
    "hubproxy_manifest_cache_limit_entries",
    "hubproxy_manifest_cache_evictions",
    "hubproxy_manifest_cache_write_failures",
    "hubproxy_manifest_cache_uncached",
    "hubproxy_build_info",
    "hubproxy_start_time_seconds",
    "process_resident_memory_bytes",
    "process_open_fds",
}


def test_hub_metrics_without_cache() -> None:
    metrics = HubMetrics(version="1.2.3", started_at=1700000000.5)
    families = parse(metrics.render())
    assert set(families) == HUB_FAMILIES
    assert families["hubproxy_build_info"][2] == [("hubproxy_build_info", {"version": "1.2.3"}, 1)]
    assert families["hubproxy_start_time_seconds"][2][0][2] == 1700000000.5
    for name in ("hubproxy_cache_bytes", "hubproxy_cache_blobs", "hubproxy_cache_limit_bytes"):
        assert families[name][2] == [(name, {}, 0)]
    assert families["hubproxy_cache_evictions"][2] == [("hubproxy_cache_evictions_total", {}, 0)]
    assert families["hubproxy_cache_hit_ratio"][2] == [("hubproxy_cache_hit_ratio", {}, 0)]
    assert families["hubproxy_client_connections"][2] == [
        ("hubproxy_client_connections", {"state": state}, 0)
        for state in ("active", "handshake", "idle")
    ]
    assert families["hubproxy_refused_connections"][2] == [
        ("hubproxy_refused_connections_total", {"reason": reason}, 0)
        for reason in ("max-connections", "max-connections-per-client")
    ]
    assert families["process_open_fds"][2][0][2] > 0  # this test process has some open
    assert families["process_resident_memory_bytes"][2][0][2] > 0


def test_hub_metrics_cache_callback_returning_none_is_zero() -> None:
    metrics = HubMetrics(cache=lambda: None)
    families = parse(metrics.render())
    assert families["hubproxy_cache_limit_bytes"][2] == [("hubproxy_cache_limit_bytes", {}, 0)]


def test_hub_metrics_figures() -> None:
    figures = CacheFigures(
        bytes_used=3 << 30,
        blobs=42,
        limit_bytes=20 << 30,
        evictions=7,
        verification_failures=1,
        pinned_bytes=5 << 20,
        filling_bytes=6 << 20,
    )
    metrics = HubMetrics(version="1.2.3")
    metrics.cache = lambda: figures  # assignable once the cache is open
    metrics.requests.inc(1, route="blob", status="200")
    metrics.requests.inc(1, route="ping", status="200")
    metrics.response_bytes.inc(1000, source="cache")
    metrics.response_bytes.inc(500, source="upstream")
    for _ in range(3):
        metrics.cache_requests.inc(1, kind="blob", result="hit")
    metrics.cache_requests.inc(1, kind="manifest", result="miss")
    metrics.upstream_latency.observe(0.07, upstream="https://registry-1.docker.io")
    metrics.note_rate_limited("https://registry-1.docker.io", when=5000.0)
    metrics.failovers.inc(1, from_upstream="https://registry-1.docker.io", to_upstream="https://m")
    metrics.note_ratelimit("https://registry-1.docker.io", b"76;w=21600")
    metrics.note_ratelimit("https://registry-1.docker.io", b"junk")  # keeps the last good one
    metrics.connections = lambda: ConnectionFigures(
        handshake=2,
        idle=3,
        active=1,
        refused={"max-connections-per-client": 4},
        reclaimed=5,
        turn_waiting=6,
        turn_waits=8,
        turn_timeouts=9,
        kernel_tls=10,
    )
    metrics.denied.inc(1, reason="network")

    families = parse(metrics.render())
    assert set(families) == HUB_FAMILIES

    def only(name: str) -> float:
        [(_, _, value)] = families[name][2]
        return value

    assert only("hubproxy_cache_bytes") == 3 << 30
    assert only("hubproxy_cache_blobs") == 42
    assert only("hubproxy_cache_limit_bytes") == 20 << 30
    assert only("hubproxy_cache_evictions") == 7
    assert only("hubproxy_cache_pinned_bytes") == 5 << 20
    assert only("hubproxy_cache_filling_bytes") == 6 << 20
    assert only("hubproxy_cache_verification_failures") == 1
    assert only("hubproxy_cache_hit_ratio") == 0.75
    assert metrics.hit_ratio() == 0.75
    assert families["hubproxy_client_connections"][2] == [
        ("hubproxy_client_connections", {"state": "active"}, 1),
        ("hubproxy_client_connections", {"state": "handshake"}, 2),
        ("hubproxy_client_connections", {"state": "idle"}, 3),
    ]
    assert families["hubproxy_refused_connections"][2] == [
        ("hubproxy_refused_connections_total", {"reason": "max-connections"}, 0),
        ("hubproxy_refused_connections_total", {"reason": "max-connections-per-client"}, 4),
    ]
    assert only("hubproxy_reclaimed_connections") == 5
    assert only("hubproxy_client_turns_waiting") == 6
    assert only("hubproxy_client_turn_waits") == 8
    assert only("hubproxy_client_turn_timeouts") == 9
    assert only("hubproxy_kernel_tls_connections") == 10
    assert only("hubproxy_upstream_ratelimit_remaining") == 76
    assert only("hubproxy_upstream_rate_limited") == 1
    assert only("hubproxy_denied_requests") == 1
    assert only("hubproxy_failovers") == 1
    assert metrics.rate_limited_times.count(now=5001.0) == 1
    assert metrics.rate_limited_times.last == 5000.0
    assert families["hubproxy_response_bytes"][2] == [
        ("hubproxy_response_bytes_total", {"source": "cache"}, 1000),
        ("hubproxy_response_bytes_total", {"source": "upstream"}, 500),
    ]
    latency = families["hubproxy_upstream_response_seconds"][2]
    le = [labels["le"] for name, labels, _ in latency if name.endswith("_bucket")]
    assert le == "0.005 0.01 0.025 0.05 0.1 0.25 0.5 1 2.5 5 10 30 +Inf".split()


def test_hub_metrics_process_figures_from_proc(tmp_path: Path) -> None:
    (tmp_path / "statm").write_text("6200 100 50 3 0 200 0\n")
    (tmp_path / "fd").mkdir()
    for fd in range(5):
        (tmp_path / "fd" / str(fd)).touch()
    families = parse(HubMetrics(proc=tmp_path).render())
    page = families["process_resident_memory_bytes"][2][0][2]
    assert page > 0 and page % 100 == 0
    assert families["process_open_fds"][2][0][2] == 5


def test_hub_metrics_process_figures_unavailable(tmp_path: Path) -> None:
    families = parse(HubMetrics(proc=tmp_path / "missing").render())
    assert families["process_resident_memory_bytes"][2][0][2] == 0
    assert families["process_open_fds"][2][0][2] == 0
    (tmp_path / "statm").write_text("garbage")
    families = parse(HubMetrics(proc=tmp_path).render())
    assert families["process_resident_memory_bytes"][2][0][2] == 0


def test_cache_figures_of_a_blob_store(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, max_bytes=1 << 20, disk=lambda path: DiskSpace(5 << 30, 1 << 40))
    store.open()
    metrics = HubMetrics(cache=lambda: cache_figures(store))
    assert cache_figures(store) == CacheFigures(limit_bytes=1 << 20, disk_free_bytes=5 << 30)
    store.stats.evictions = 2
    families = parse(metrics.render())
    limit = families["hubproxy_cache_limit_bytes"][2]
    assert limit == [("hubproxy_cache_limit_bytes", {}, 1 << 20)]
    free = families["hubproxy_cache_disk_free_bytes"][2]
    assert free == [("hubproxy_cache_disk_free_bytes", {}, 5 << 30)]
    assert families["hubproxy_cache_evictions"][2] == [("hubproxy_cache_evictions_total", {}, 2)]


def test_manifest_figures_of_a_manifest_store(tmp_path: Path) -> None:
    store = ManifestStore(tmp_path, max_bytes=100, max_entries=7)
    store.open()
    metrics = HubMetrics(manifests=lambda: manifest_figures(store))
    families = parse(metrics.render())
    assert families["hubproxy_manifest_cache_limit_bytes"][2][0][2] == 100
    assert families["hubproxy_manifest_cache_limit_entries"][2][0][2] == 7
    body = b'{"schemaVersion": 2}'
    for n in range(6):  # 6 x 20 bytes: one is evicted to stay within 100
        store.put(
            "library/a",
            str(n),
            accepted=frozenset(),
            media_type="x/y",
            body=body + b" " * n,
            claimed=None,
        )
    store.put(
        "library/a",
        "big",
        accepted=frozenset(),
        media_type="x/y",
        body=b"{" + b" " * 200 + b"}",
        claimed=None,
    )
    families = parse(metrics.render())
    assert families["hubproxy_manifest_cache_manifests"][2][0][2] == 4
    assert families["hubproxy_manifest_cache_tags"][2][0][2] == 4
    assert families["hubproxy_manifest_cache_bytes"][2][0][2] == store.total <= 100
    evictions = families["hubproxy_manifest_cache_evictions"][2]
    assert evictions == [("hubproxy_manifest_cache_evictions_total", {}, 2)]
    uncached = families["hubproxy_manifest_cache_uncached"][2]
    assert uncached == [("hubproxy_manifest_cache_uncached_total", {}, 1)]
    store.close()


@pytest.mark.parametrize(
    ("route", "status", "source", "caching", "hit", "miss", "from_cache", "from_upstream"),
    [
        ("blob", 200, "cache", True, 1, 0, 100, 0),
        ("blob", 307, "redirect", True, 1, 0, 0, 0),  # --redirect-hits: a hit, no bytes here
        ("blob", 200, "https://cdn.example", True, 0, 1, 0, 100),
        ("manifest", 404, "https://registry.example", True, 0, 0, 0, 100),
        ("blob", 200, "https://cdn.example", False, 0, 0, 0, 100),  # no cache: no hits/misses
        ("ops", 200, "-", True, 0, 0, 0, 0),
        ("tags", 200, "https://registry.example", True, 0, 0, 0, 100),
    ],
)
def test_count_request(
    route: str,
    status: int,
    source: str,
    caching: bool,
    hit: int,
    miss: int,
    from_cache: int,
    from_upstream: int,
) -> None:
    metrics = HubMetrics()
    metrics.count_request(route, status=status, source=source, bytes_sent=100, caching=caching)
    assert metrics.requests.series() == {(route, str(status)): 1}
    results = metrics.cache_requests.series()
    assert results.get((route, "hit"), 0) == hit
    assert results.get((route, "miss"), 0) == miss
    sources = metrics.response_bytes.series()
    assert sources.get(("cache",), 0) == from_cache
    assert sources.get(("upstream",), 0) == from_upstream


def test_count_sent_counts_as_bytes_leave() -> None:
    """Bytes count the moment they leave (``ClientResponse.on_sent``), under the source the
    response has then; the operator's paths and bodiless answers count nowhere."""
    metrics = HubMetrics()
    metrics.count_sent("blob", "https://cdn.example", 65536)
    assert metrics.response_bytes.get(source="upstream") == 65536
    metrics.count_sent("blob", "cache-fill", 100)  # teed from upstream into the cache
    metrics.count_sent("blob", "cache", 7)
    metrics.count_sent("ops", "-", 5000)
    metrics.count_sent("manifest", "-", 10)
    assert metrics.response_bytes.series() == {("upstream",): 65636, ("cache",): 7}
    # the request's end adds nothing already counted
    metrics.count_request("blob", status=200, source="cache", bytes_sent=0, caching=True)
    assert metrics.response_bytes.series() == {("upstream",): 65636, ("cache",): 7}


def test_requests_served_leaves_out_the_operators_paths() -> None:
    metrics = HubMetrics()
    metrics.count_request("blob", status=200, source="cache", bytes_sent=0, caching=True)
    metrics.count_request("manifest", status=404, source="-", bytes_sent=0, caching=True)
    for _ in range(3):  # the status page, /metrics, /healthz
        metrics.count_request("ops", status=200, source="-", bytes_sent=0, caching=True)
    assert metrics.requests_served() == 2


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (
            [(b"ratelimit-limit", b"100;w=21600"), (b"ratelimit-remaining", b"76;w=21600")],
            RateLimit(76.0, limit=100.0, window=21600.0, seen=1000.0),
        ),
        (
            [(b"ratelimit-remaining", b"5"), (b"ratelimit-limit", b"60;w=60"),
             (b"ratelimit-reset", b"30")],
            RateLimit(5.0, limit=60.0, window=60.0, reset=1030.0, seen=1000.0),
        ),
        ([(b"ratelimit-remaining", b"3;w=junk")], RateLimit(3.0, seen=1000.0)),
        ([(b"ratelimit-remaining", b"junk"), (b"ratelimit-limit", b"100")], None),
        ([(b"ratelimit-limit", b"100;w=21600")], None),
        ([], None),
    ],
)  # fmt: skip
def test_read_ratelimit(headers: list[tuple[bytes, bytes]], expected: RateLimit | None) -> None:
    assert read_ratelimit(headers, wall=1000.0) == expected


def test_note_ratelimit_headers_keeps_the_last_good_answer() -> None:
    metrics = HubMetrics()
    upstream = "https://registry-1.docker.io"
    metrics.note_ratelimit_headers(upstream, [(b"ratelimit-remaining", b"76;w=21600")], 1.0)
    metrics.note_ratelimit_headers(upstream, [(b"ratelimit-remaining", b"junk")], 2.0)
    assert metrics.ratelimits[upstream] == RateLimit(76.0, window=21600.0, seen=1.0)
    assert metrics.ratelimit_remaining.get(upstream=upstream) == 76
