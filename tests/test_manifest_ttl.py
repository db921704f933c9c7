"""Per-tag ``--manifest-ttl``: rules by tag pattern, the pure choice, the settings, end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from hubproxy.cli import UsageError, load_settings
from hubproxy.config import Config
from hubproxy.policy.cachepolicy import TtlRule, check_tag_pattern, tag_ttl
from tests.conftest import StartProxy
from tests.fakehub import FakeHub, make_layer
from tests.registry_client import RegistryClient
from tests.test_pullthrough import ACCEPT, pullthrough

RULES = (
    TtlRule("latest", 60.0),
    TtlRule("nightly*", 300.0),
    TtlRule("nightly-arm*", 5.0),
    TtlRule("*-rc*", 10.0),
    TtlRule("v1.*", 3600.0),
    TtlRule("*", 86400.0),  # a "*" among the rules is the least specific of all
)


@pytest.mark.parametrize(
    ("tag", "seconds"),
    [
        ("latest", 60.0),  # a whole tag
        ("latest-alpine", 86400.0),  # a whole tag is not a prefix
        ("Latest", 86400.0),  # tags are case-sensitive
        ("nightly", 300.0),  # "*" matches nothing too
        ("nightly-2026-11-30", 300.0),
        ("nightly-arm64", 5.0),  # the longer glob wins
        ("1.27.3-rc1", 10.0),
        ("v1.2", 3600.0),
        ("v1.2-rc1", 10.0),  # "*-rc*" and "v1.*" spell 3 characters each: the earlier wins
        ("v12", 86400.0),  # "." is a literal, not "any character"
        ("1.27.3", 86400.0),
    ],
)
def test_the_most_specific_rule_wins(tag: str, seconds: float) -> None:
    assert tag_ttl(tag, RULES, 7.0) == seconds


def test_only_a_tie_depends_on_the_order() -> None:
    backwards = tuple(reversed(RULES))
    for tag in ("latest", "nightly-arm64", "1.27.3-rc1", "v1.2", "1.27.3"):
        assert tag_ttl(tag, backwards, 7.0) == tag_ttl(tag, RULES, 7.0)
    assert tag_ttl("v1.2-rc1", backwards, 7.0) == 3600.0  # now "v1.*" is the earlier


@pytest.mark.parametrize(
    ("rules", "tag", "seconds"),
    [
        ((), "latest", 7.0),  # no rule: the default (the "*" rule of the settings)
        ((TtlRule("latest", 0.0),), "latest", 0.0),  # 0: always revalidate
        ((TtlRule("latest", 0.0),), "stable", 7.0),
        ((TtlRule("latest*", 1.0), TtlRule("latest", 2.0)), "latest", 2.0),  # exact over glob
        ((TtlRule("a*b", 1.0),), "a-x-b", 1.0),
        ((TtlRule("a*b", 1.0),), "a-x-b-c", 7.0),  # the whole tag must match
    ],
)
def test_rules_and_the_default(rules: tuple[TtlRule, ...], tag: str, seconds: float) -> None:
    assert tag_ttl(tag, rules, 7.0) == seconds


@pytest.mark.parametrize("pattern", ["", "a b", "a/b", "a=b", "[ab]", "a?", "x" * 129, "é"])
def test_what_is_not_a_tag_pattern(pattern: str) -> None:
    with pytest.raises(ValueError, match="not a tag pattern"):
        check_tag_pattern(pattern)


def config(*argv: str) -> Config:
    return load_settings(argv)[1]


def test_the_plain_flag_is_the_rule_for_every_tag() -> None:
    assert (config().manifest_ttl, config().manifest_ttl_rules) == (60.0, ())
    assert (config("--manifest-ttl", "5m").manifest_ttl, config().manifest_ttl_rules) == (300, ())


def test_patterns_on_the_command_line() -> None:
    cfg = config(
        "--manifest-ttl",
        "24h",
        "--manifest-ttl",
        "latest=60s",
        "--manifest-ttl",
        "nightly-*=5m",
        "--manifest-ttl",
        "latest=30s",  # given twice: the last one
    )
    assert cfg.manifest_ttl == 86400
    assert cfg.manifest_ttl_rules == (TtlRule("latest", 30.0), TtlRule("nightly-*", 300.0))
    # patterns only: the other tags keep the default
    assert config("--manifest-ttl", "latest=0").manifest_ttl == 60.0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("latest=", "not a duration: ''"),
        ("a/b=1m", "not a tag pattern: 'a/b'"),
        ("latest=-1", "wants 0 or more seconds, got '-1'"),
        ("nan", "wants 0 or more seconds, got 'nan'"),
        ("soon", "not a duration: 'soon'"),
    ],
)
def test_bad_rules_are_refused(value: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        config("--manifest-ttl", value)
    assert str(info.value).startswith("--manifest-ttl: ")
    assert message in str(info.value)


def test_the_config_file_table_and_its_other_spellings(tmp_path: Path) -> None:
    path = tmp_path / "hubproxy.toml"
    path.write_text(
        'listen = ":5000"\nmanifest-ttl = { "latest" = "60s", "*" = "24h", "v*" = 7 }\n'
    )
    cfg = config("--config", str(path))
    assert cfg.manifest_ttl == 86400
    assert cfg.manifest_ttl_rules == (TtlRule("latest", 60.0), TtlRule("v*", 7.0))
    path.write_text('manifest-ttl = ["1h", "latest=1m"]\n')
    cfg = config("--config", str(path))
    assert (cfg.manifest_ttl, cfg.manifest_ttl_rules) == (3600, (TtlRule("latest", 60.0),))
    path.write_text("manifest-ttl = 0.5\n")  # what older files say
    assert config("--config", str(path)).manifest_ttl == 0.5
    path.write_text('listen = ":5000"\nmanifest-ttl = { "latest" = true }\n')
    with pytest.raises(Exception, match=r"hubproxy.toml:2: manifest-ttl: 'latest': expected"):
        config("--config", str(path))
    path.write_text('\nmanifest-ttl = { "a b" = "1m" }\n')
    with pytest.raises(UsageError, match=r":2: --manifest-ttl: not a tag pattern: 'a b'"):
        config("--config", str(path))
    path.write_text("manifest-ttl = { latest = 1 }\n")  # the command line replaces the file's
    assert config("--config", str(path), "--manifest-ttl", "9s").manifest_ttl_rules == ()


async def test_each_tag_is_revalidated_by_its_own_rule(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    hub.add_image("library/alpine", "latest", [make_layer(1, 1000)])
    hub.add_image("library/alpine", "3.20", [make_layer(2, 1000)])
    proxy = await start_proxy(
        cache_dir=str(tmp_path / "cache"),
        manifest_ttl=3600.0,
        manifest_ttl_rules=(TtlRule("latest", 0.0),),
    )
    client = RegistryClient(proxy.url, ca)
    for tag in ("latest", "3.20"):
        r = await client.request(f"/v2/library/alpine/manifests/{tag}", headers=ACCEPT)
        assert r.status == 200
    await pullthrough(proxy).wait_probes()  # the background "is it public?" question

    def heads(tag: str) -> int:
        return sum(
            1
            for s in hub.requests
            if s.method == "HEAD" and s.target.endswith(f"/library/alpine/manifests/{tag}")
        )

    before = heads("latest"), heads("3.20")
    for tag in ("latest", "3.20"):
        r = await client.request(f"/v2/library/alpine/manifests/{tag}", headers=ACCEPT)
        assert r.status == 200
    assert heads("latest") == before[0] + 1  # latest=0: asked again every time
    assert heads("3.20") == before[1]  # the "*" rule: an hour without asking
