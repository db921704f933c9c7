"""Tests for hubproxy.policy.auth: WWW-Authenticate parsing, Bearer realm rewriting, the public
base URL.

Challenge syntax is RFC 9110 section 11.6.1; Docker Hub's exact challenges come from
/work/shared/PROTOCOL.md. The mirror must point every Bearer realm at itself (so clients never try
to reach auth.docker.io directly), keep service/scope/error untouched, learn the original realm,
and leave whatever it cannot parse alone. The realm it hands out must never carry what a client put
in its Host header unless that is a plain host[:port].
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hubproxy.policy.auth import (
    Challenge,
    format_challenges,
    parse_challenges,
    public_base,
    rewrite_challenge,
)

HUB_REALM = "https://auth.docker.io/token"
HUB = f'Bearer realm="{HUB_REALM}",service="registry.docker.io"'
HUB_SCOPED = HUB + ',scope="repository:library/nginx:pull"'
OURS = "https://mirror.example.com/token/0"


def bearer(*params: tuple[str, str]) -> Challenge:
    return Challenge("Bearer", tuple(params))


# ---------------------------------------------------------------- parse_challenges


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (HUB, [bearer(("realm", HUB_REALM), ("service", "registry.docker.io"))]),
        (
            HUB_SCOPED,
            [
                bearer(
                    ("realm", HUB_REALM),
                    ("service", "registry.docker.io"),
                    ("scope", "repository:library/nginx:pull"),
                )
            ],
        ),
        (
            # the error a token with too few rights gets
            HUB + ',scope="repository:samalba/app:pull,push",error="insufficient_scope"',
            [
                bearer(
                    ("realm", HUB_REALM),
                    ("service", "registry.docker.io"),
                    ("scope", "repository:samalba/app:pull,push"),
                    ("error", "insufficient_scope"),
                )
            ],
        ),
        # quoted values with commas, escaped quotes and backslashes
        ('Bearer realm="a,b,c"', [bearer(("realm", "a,b,c"))]),
        (r'Bearer realm="say \"hi\", ok"', [bearer(("realm", 'say "hi", ok'))]),
        (r'Bearer realm="back\\slash"', [bearer(("realm", "back\\slash"))]),
        (r'Bearer realm="\a\b"', [bearer(("realm", "ab"))]),
        ('Bearer realm=""', [bearer(("realm", ""))]),
        # token values, whitespace around "=" and ",", empty list elements
        ("Bearer realm=abc", [bearer(("realm", "abc"))]),
        ('Bearer  realm = "x" ,  service="y"', [bearer(("realm", "x"), ("service", "y"))]),
        ('Bearer realm="x",,service="y"', [bearer(("realm", "x"), ("service", "y"))]),
        ('\t, Bearer realm="x" ,', [bearer(("realm", "x"))]),
        # case is kept as sent
        ('bearer REALM="x"', [Challenge("bearer", (("REALM", "x"),))]),
        # several challenges in one header
        (
            'Basic realm="Registry Realm", ' + HUB,
            [
                Challenge("Basic", (("realm", "Registry Realm"),)),
                bearer(("realm", HUB_REALM), ("service", "registry.docker.io")),
            ],
        ),
        (
            HUB + ', Basic realm="x"',
            [
                bearer(("realm", HUB_REALM), ("service", "registry.docker.io")),
                Challenge("Basic", (("realm", "x"),)),
            ],
        ),
        ("Negotiate, Bearer", [Challenge("Negotiate"), Challenge("Bearer")]),
        # token68
        ("Basic dXNlcjpwYXNz", [Challenge("Basic", token68="dXNlcjpwYXNz")]),
        ("Negotiate abc==", [Challenge("Negotiate", token68="abc==")]),
        (
            'Negotiate a+b/c==, Bearer realm="x"',
            [Challenge("Negotiate", token68="a+b/c=="), bearer(("realm", "x"))],
        ),
        ("Bearer", [Challenge("Bearer")]),
        # "realm=" alone is a valid token68, not an empty parameter
        ("Bearer realm=", [Challenge("Bearer", token68="realm=")]),
        ("", []),
        (" , ,", []),
    ],
)
def test_parse_challenges(header: str, expected: list[Challenge]) -> None:
    assert parse_challenges(header) == expected


def test_param_lookup_is_case_insensitive() -> None:
    (challenge,) = parse_challenges('Bearer Realm="x",SERVICE="y"')
    assert challenge.param("realm") == "x"
    assert challenge.param("service") == "y"
    assert challenge.param("scope") is None


@pytest.mark.parametrize(
    "header",
    [
        'Bearer realm="https://auth.docker.io/token',  # unterminated quote
        'Bearer realm="abc\\',  # escape at the very end
        'Bearer realm="x",service="y',
        "Bearer realm=,service=x",
        'Bearer realm="x" service="y"',  # missing comma
        'Bearer realm="x"garbage',
        "Bearer realm=a b",
        '="x"',
        ",=",
        '"Bearer"',
        "Bearer realm=@",
        "Bear\x00er realm=x",
        "Bearer realm=\x00",
    ],
)
def test_malformed_challenges_raise_value_error(header: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the documented contract is plain ValueError
        parse_challenges(header)


# ---------------------------------------------------------------- rewrite_challenge


@pytest.mark.parametrize(
    ("header", "expected", "realm"),
    [
        (HUB, f'Bearer realm="{OURS}",service="registry.docker.io"', HUB_REALM),
        (
            HUB_SCOPED,
            f'Bearer realm="{OURS}",service="registry.docker.io",'
            'scope="repository:library/nginx:pull"',
            HUB_REALM,
        ),
        (
            HUB + ',scope="repository:a/b:pull,push",error="insufficient_scope"',
            f'Bearer realm="{OURS}",service="registry.docker.io",'
            'scope="repository:a/b:pull,push",error="insufficient_scope"',
            HUB_REALM,
        ),
        # ghcr.io and quay.io realms, the realm not first, lowercase scheme, token values
        (
            'Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:o/r:pull"',
            f'Bearer realm="{OURS}",service="ghcr.io",scope="repository:o/r:pull"',
            "https://ghcr.io/token",
        ),
        (
            'bearer service="quay.io", realm="https://quay.io/v2/auth"',
            f'bearer service="quay.io",realm="{OURS}"',
            "https://quay.io/v2/auth",
        ),
        (
            "Bearer realm=tok,service=x",
            f'Bearer realm="{OURS}",service="x"',
            "tok",
        ),
        # Basic next to Bearer: only the Bearer realm changes
        (
            'Basic realm="Registry", ' + HUB,
            f'Basic realm="Registry", Bearer realm="{OURS}",service="registry.docker.io"',
            HUB_REALM,
        ),
        # a quoted realm with a comma and a quote inside
        (
            r'Bearer realm="https://a.example/t?x=1,2&q=\"",service="s"',
            f'Bearer realm="{OURS}",service="s"',
            'https://a.example/t?x=1,2&q="',
        ),
    ],
)
def test_rewrite_challenge(header: str, expected: str, realm: str) -> None:
    rewritten, learned = rewrite_challenge(header, OURS)
    assert rewritten == expected
    assert learned == realm
    # what the client sees still parses, and only realms differ
    before = parse_challenges(header)
    after = parse_challenges(rewritten)
    assert [c.scheme for c in after] == [c.scheme for c in before]
    for old, new in zip(before, after, strict=True):
        assert [k for k, _ in new.params] == [k for k, _ in old.params]
        for (key, old_value), (_, new_value) in zip(old.params, new.params, strict=True):
            if old.scheme.lower() == "bearer" and key.lower() == "realm":
                assert new_value == OURS
            else:
                assert new_value == old_value


def test_rewrite_challenge_several_bearers_all_rewritten_first_realm_learned() -> None:
    header = 'Bearer realm="https://one/t",service="a", Bearer realm="https://two/t",service="b"'
    rewritten, learned = rewrite_challenge(header, OURS)
    assert learned == "https://one/t"
    assert [c.param("realm") for c in parse_challenges(rewritten)] == [OURS, OURS]


@pytest.mark.parametrize(
    "header",
    [
        'Basic realm="Registry Realm"',
        "Basic dXNlcjpwYXNz",
        'Bearer service="registry.docker.io"',  # no realm
        "Bearer",
        'Digest realm="x", Basic realm="y"',
        "",
        # unparseable: passed through untouched
        'Bearer realm="https://auth.docker.io/token',
        'Bearer realm="x" service="y"',
        # an unquoted realm must be a token: ':' and '/' are not token characters
        "Bearer realm=https://auth.example/token,service=x",
        "garbage \x7f",
    ],
)
def test_rewrite_challenge_leaves_other_headers_unchanged(header: str) -> None:
    assert rewrite_challenge(header, OURS) == (header, None)


def test_rewrite_challenge_quotes_our_realm() -> None:
    rewritten, _ = rewrite_challenge(HUB, 'https://m.example/"x\\')
    assert parse_challenges(rewritten)[0].param("realm") == 'https://m.example/"x\\'


# ---------------------------------------------------------------- round trip

_TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_TOKENS = st.text(alphabet=_TCHARS, min_size=1, max_size=10)
_SCHEMES = st.one_of(st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "Digest"]), _TOKENS)
_NAMES = st.one_of(st.sampled_from(["realm", "Realm", "service", "scope", "error"]), _TOKENS)
# quoted-string content: HTAB, SP, VCHAR, obs-text
_QDTEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from('\t ",\\=;'),
        st.characters(min_codepoint=0x21, max_codepoint=0x7E),
        st.characters(min_codepoint=0x80, max_codepoint=0xFF),
    ),
    max_size=20,
)
_TOKEN68 = st.from_regex(r"[A-Za-z0-9._~+/-]{1,12}={0,2}", fullmatch=True)
_CHALLENGES = st.one_of(
    st.builds(
        Challenge,
        _SCHEMES,
        st.lists(st.tuples(_NAMES, _QDTEXT), min_size=1, max_size=4).map(tuple),
    ),
    st.builds(lambda s, t: Challenge(s, token68=t), _SCHEMES, _TOKEN68),
    st.builds(Challenge, _SCHEMES),
)


@given(st.lists(_CHALLENGES, max_size=4))
def test_property_format_then_parse_round_trips(challenges: list[Challenge]) -> None:
    assert parse_challenges(format_challenges(challenges)) == challenges


@given(st.lists(_CHALLENGES, max_size=4), _QDTEXT)
def test_property_rewrite_touches_only_bearer_realms(
    challenges: list[Challenge], our_realm: str
) -> None:
    header = format_challenges(challenges)
    rewritten, learned = rewrite_challenge(header, our_realm)
    bearer_realms = [c.param("realm") for c in challenges if c.scheme.lower() == "bearer"]
    bearer_realms = [r for r in bearer_realms if r is not None]
    if not bearer_realms:
        assert (rewritten, learned) == (header, None)
        return
    # the first realm (an empty one, useless anyway, may be skipped for a later one)
    assert learned == next((r for r in bearer_realms if r), bearer_realms[0])
    after = parse_challenges(rewritten)
    assert len(after) == len(challenges)
    for old, new in zip(challenges, after, strict=True):
        assert new.scheme == old.scheme
        assert new.token68 == old.token68
        expected = tuple(
            (k, our_realm if old.scheme.lower() == "bearer" and k.lower() == "realm" else v)
            for k, v in old.params
        )
        assert new.params == expected


@given(st.text(max_size=60))
def test_property_parse_never_raises_anything_but_value_error(header: str) -> None:
    try:
        parse_challenges(header)
    except ValueError:
        pass
    rewritten, _ = rewrite_challenge(header, OURS)
    assert isinstance(rewritten, str)


# ---------------------------------------------------------------- public_base


@pytest.mark.parametrize(
    ("configured", "expected"),
    [
        ("https://mirror.example.com", "https://mirror.example.com"),
        ("https://mirror.example.com/", "https://mirror.example.com"),
        ("https://mirror.example.com/hub/", "https://mirror.example.com/hub"),
        ("http://10.0.0.1:5000", "http://10.0.0.1:5000"),
    ],
)
def test_public_url_wins(configured: str, expected: str) -> None:
    got = public_base(
        configured=configured, scheme="http", host_header="other.example", fallback="0.0.0.0:443"
    )
    assert got == expected


@pytest.mark.parametrize(
    ("scheme", "host", "expected"),
    [
        ("https", "mirror.example.com", "https://mirror.example.com"),
        ("https", "mirror.example.com:8443", "https://mirror.example.com:8443"),
        ("http", "localhost:5000", "http://localhost:5000"),
        ("http", "127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("https", "[::1]:5000", "https://[::1]:5000"),
        ("https", "[2001:db8::1]", "https://[2001:db8::1]"),
        ("https", "MIRROR.Example.COM", "https://MIRROR.Example.COM"),
        ("https", "xn--bcher-kva.example", "https://xn--bcher-kva.example"),
        ("https", "a", "https://a"),
    ],
)
def test_host_header_used_with_scheme(scheme: str, host: str, expected: str) -> None:
    got = public_base(configured=None, scheme=scheme, host_header=host, fallback="127.0.0.1:5000")
    assert got == expected


@pytest.mark.parametrize(
    "host",
    [
        None,
        "",
        "evil.com\r\nSet-Cookie: x=1",
        "evil.com\n",
        "evil.com\r",
        "evil .com",
        " evil.com",
        "evil.com ",
        '"evil.com"',
        'evil.com",realm="https://evil',
        "evil.com/path",
        "evil.com/",
        "evil.com?x",
        "evil.com#x",
        "a@b",
        "user:pass@evil.com",
        "evil.com:80:80",
        "evil.com:port",
        "evil.com:",
        "::1",
        "[::1",
        "[::1]x",
        "[evil.com]",
        "-evil.com",
        "evil.com-",
        "bücher.example",
        "evil\x00.com",
        "evil\\.com",
        "https://evil.com",
        "a" * 300,
    ],
)
def test_hostile_host_falls_back_to_listen_address(host: str | None) -> None:
    got = public_base(configured=None, scheme="https", host_header=host, fallback="0.0.0.0:443")
    assert got == "https://0.0.0.0:443"


@given(st.text(max_size=40))
def test_property_public_base_is_a_clean_url(host: str) -> None:
    got = public_base(configured=None, scheme="https", host_header=host, fallback="h:1")
    authority = got.removeprefix("https://")
    assert authority == host or authority == "h:1"
    assert not any(c in authority for c in ' \t\r\n"\\/@?#,')
    assert authority.isascii()
    assert authority.isprintable()
