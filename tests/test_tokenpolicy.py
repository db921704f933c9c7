"""Tests for hubproxy.policy.tokenpolicy: whose credentials go where, as tables without sockets."""

from __future__ import annotations

import json
from urllib.parse import parse_qs

import pytest

from hubproxy.policy.errors import AccessDenied, MirrorUnauthorized, UpstreamUnavailable
from hubproxy.policy.registries import Registry
from hubproxy.policy.sealing import Grant, TokenSealer
from hubproxy.policy.tokenpolicy import (
    MAX_TOKEN_LIFETIME,
    Credential,
    basic_authorization,
    check_method,
    client_credential,
    operator_credential,
    outbound,
    plan_token_request,
    sealed_document,
    token_document,
)
from hubproxy.policy.upstreams import Learned
from hubproxy.policy.urls import parse_url

HUB = Registry("docker.io", (parse_url("https://registry-1.docker.io"),), library_prefix=True)
LOGGED_IN = Registry(
    "docker.io", (parse_url("https://registry-1.docker.io"),), login=("operator", "secret")
)
OPERATOR = basic_authorization(("operator", "secret"))


def allow_all(registry: str, repository: str) -> bool:
    return True


def scopes(query: str) -> list[str]:
    return parse_qs(query).get("scope", [])


# --- token requests ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "kept"),
    [
        ("scope=repository%3Alibrary%2Fnginx%3Apull", ["repository:library/nginx:pull"]),
        # several scopes in one parameter and repeated parameters (containerd)
        (
            "scope=repository:a/b:pull&scope=repository:c/d:pull",
            ["repository:a/b:pull", "repository:c/d:pull"],
        ),
        # a catalog scope is not a pull of a repository: the operator's login never asks for it
        ("scope=registry:catalog:*&scope=repository:a/b:pull", ["repository:a/b:pull"]),
    ],
)
def test_operator_login_asks_for_pulls_only(query: str, kept: list[str]) -> None:
    plan = plan_token_request(
        "service=registry.docker.io&" + query,
        registry=LOGGED_IN,
        index=0,
        client_credentials=False,
        mirror_user=None,
        permits=allow_all,
    )
    assert plan.operator and plan.seal
    assert scopes(plan.query) == kept
    assert parse_qs(plan.query)["service"] == ["registry.docker.io"]


@pytest.mark.parametrize(
    "scope",
    [
        "repository:library/nginx:pull,push",
        "repository:library/nginx:push",
        "repository:library/nginx:delete",
        "repository:library/nginx:*",
    ],
)
def test_a_write_that_would_need_the_operator_login_is_denied(scope: str) -> None:
    with pytest.raises(AccessDenied) as caught:
        plan_token_request(
            f"scope={scope}",
            registry=LOGGED_IN,
            index=0,
            client_credentials=False,
            mirror_user="alice",
            permits=allow_all,
        )
    assert caught.value.code == "DENIED" and caught.value.status == 403


def test_the_clients_own_login_may_push() -> None:
    query = "scope=repository:me/app:pull,push&offline_token=true"
    plan = plan_token_request(
        query,
        registry=LOGGED_IN,
        index=0,
        client_credentials=True,
        mirror_user=None,
        permits=allow_all,
    )
    assert not plan.operator and not plan.seal
    assert plan.query == query


def test_no_operator_login_to_a_fallbacks_realm() -> None:
    plan = plan_token_request(
        "scope=repository:library/nginx:pull",
        registry=LOGGED_IN,
        index=1,
        client_credentials=False,
        mirror_user=None,
        permits=allow_all,
    )
    assert not plan.operator and not plan.seal


def test_the_operator_never_asks_for_a_refresh_token() -> None:
    plan = plan_token_request(
        "scope=repository:library/nginx:pull&offline_token=true&client_id=docker",
        registry=LOGGED_IN,
        index=0,
        client_credentials=False,
        mirror_user=None,
        permits=allow_all,
    )
    assert "offline_token" not in parse_qs(plan.query)
    assert parse_qs(plan.query)["client_id"] == ["docker"]


@pytest.mark.parametrize("registry", [HUB, LOGGED_IN])
def test_image_rules_apply_to_token_scopes(registry: Registry) -> None:
    def only_nginx(name: str, repository: str) -> bool:
        return repository == "library/nginx"

    plan_token_request(
        "scope=repository:library/nginx:pull",
        registry=registry,
        index=0,
        client_credentials=False,
        mirror_user=None,
        permits=only_nginx,
    )
    with pytest.raises(AccessDenied):
        plan_token_request(
            "scope=repository:library/nginx:pull&scope=repository:evil/app:pull",
            registry=registry,
            index=0,
            client_credentials=True,
            mirror_user=None,
            permits=only_nginx,
        )


def test_a_mirror_users_token_is_sealed_even_without_an_operator_login() -> None:
    plan = plan_token_request(
        "scope=repository:library/nginx:pull",
        registry=HUB,
        index=0,
        client_credentials=False,
        mirror_user="alice",
        permits=allow_all,
    )
    assert plan.seal and not plan.operator


# --- token answers -----------------------------------------------------------------------


def test_token_answers_keep_only_what_clients_read() -> None:
    answer = {
        "token": "t",
        "access_token": "t",
        "expires_in": 300,
        "issued_at": "2026-11-28T10:00:00Z",
        "refresh_token": "operator-refresh",
        "scope": "repository:x:pull",
        "extra": {"nested": True},
    }
    kept = token_document(json.dumps(answer).encode())
    assert kept == {
        "token": "t",
        "access_token": "t",
        "expires_in": 300,
        "issued_at": "2026-11-28T10:00:00Z",
    }


@pytest.mark.parametrize(
    ("document", "lifetime"),
    [
        ({"token": "t", "expires_in": 300, "issued_at": "2026-11-28T10:00:00Z"}, 300),
        ({"access_token": "t"}, 60),  # no expires_in: the token spec's 60 s
        ({"token": "t", "expires_in": True}, 60),
        ({"token": "t", "expires_in": -5}, 60),
        ({"token": "t", "expires_in": 10**9}, MAX_TOKEN_LIFETIME),
        ({"token": ""}, 60),
    ],
)
def test_sealed_answers(document: dict[str, object], lifetime: float) -> None:
    sealer = TokenSealer()
    grant = Grant("bob", "docker.io", upstream=b"Bearer t", operator=True)
    answer = sealed_document(token_document(json.dumps(document).encode()), sealer, grant, 1000.0)
    token = answer["token"]
    assert isinstance(token, str) and token == answer["access_token"]
    assert token.startswith("hp1.") and "t" != token
    assert answer["expires_in"] == int(lifetime)
    assert answer.get("issued_at") == document.get("issued_at")
    assert sealer.open(token, 1000.0 + lifetime - 1) == grant
    assert sealer.open(token, 1000.0 + lifetime) is None


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"token": 5}', b'"x"'])
def test_unusable_token_answers_are_upstream_failures(body: bytes) -> None:
    with pytest.raises(UpstreamUnavailable):
        token_document(body)


def test_a_token_too_long_to_seal_is_an_upstream_failure() -> None:
    document = token_document(json.dumps({"token": "x" * 20000}).encode())
    grant = Grant("", "docker.io", b"Bearer " + b"x" * 20000)
    with pytest.raises(UpstreamUnavailable):
        sealed_document(document, TokenSealer(), grant, 0.0)


# --- registry requests -------------------------------------------------------------------

SEALER = TokenSealer(b"s" * 32)
STAMPS = {"alice": b"a" * 16}


def sealed(grant: Grant, expires: float = 100.0) -> bytes:
    return b"Bearer " + SEALER.seal(grant, expires).encode()


def resolve(
    authorization: bytes | None,
    *,
    registry: str = "docker.io",
    users: bool = False,
    basic_user: str | None = None,
    now: float = 50.0,
) -> Credential:
    return client_credential(
        authorization,
        registry=registry,
        sealer=SEALER,
        now=now,
        stamp_of=STAMPS.get if users else None,
        basic_user=basic_user,
    )


def test_a_sealed_token_carries_its_upstream_credential() -> None:
    grant = Grant("", "docker.io", upstream=b"Bearer up", operator=True)
    assert resolve(sealed(grant)) == Credential(b"Bearer up", None, operator=True)


def test_a_sealed_token_is_bound_to_its_registry() -> None:
    grant = Grant("", "ghcr.io", upstream=b"Bearer ghcr-operator-token", operator=True)
    with pytest.raises(MirrorUnauthorized):
        resolve(sealed(grant), registry="docker.io")
    assert resolve(sealed(grant), registry="ghcr.io").upstream == b"Bearer ghcr-operator-token"


def test_a_removed_or_changed_users_token_stops_working() -> None:
    good = Grant("alice", "docker.io", upstream=b"Bearer up", stamp=STAMPS["alice"])
    assert resolve(sealed(good), users=True) == Credential(b"Bearer up", "alice")
    for grant in (
        Grant("alice", "docker.io", upstream=b"Bearer up", stamp=b"b" * 16),  # password changed
        Grant("carol", "docker.io", upstream=b"Bearer up", stamp=b"c" * 16),  # removed
        Grant("", "docker.io", upstream=b"Bearer up"),  # an anonymous one, under --users
    ):
        with pytest.raises(MirrorUnauthorized):
            resolve(sealed(grant), users=True)


def test_expired_and_forged_tokens_are_refused() -> None:
    grant = Grant("", "docker.io", upstream=b"Bearer up")
    with pytest.raises(MirrorUnauthorized):
        resolve(sealed(grant, expires=10.0))
    with pytest.raises(MirrorUnauthorized):
        resolve(b"Bearer " + TokenSealer(b"x" * 32).seal(grant, 100.0).encode())


def test_without_users_the_clients_own_credential_passes() -> None:
    assert resolve(b"Bearer upstream-token") == Credential(b"Bearer upstream-token")
    assert resolve(b"Basic dTpw") == Credential(b"Basic dTpw")
    assert resolve(None) == Credential(None)


def test_under_users_a_login_is_required() -> None:
    assert resolve(b"Basic dTpw", users=True, basic_user="alice") == Credential(None, "alice")
    with pytest.raises(MirrorUnauthorized) as wrong:
        resolve(b"Basic dTpw", users=True)
    with pytest.raises(MirrorUnauthorized) as none:
        resolve(None, users=True)
    assert "wrong" in wrong.value.message and "wrong" not in none.value.message
    with pytest.raises(MirrorUnauthorized):
        resolve(b"Bearer upstream-token", users=True)


@pytest.mark.parametrize(
    ("credential", "registry", "method", "denied"),
    [
        (Credential(None), LOGGED_IN, "GET", False),
        (Credential(None), LOGGED_IN, "PUT", True),  # anonymous write, login configured
        (Credential(None), HUB, "PUT", False),  # no login: the upstream answers
        (Credential(b"Bearer up", operator=True), LOGGED_IN, "HEAD", False),
        (Credential(b"Bearer up", operator=True), LOGGED_IN, "POST", True),
        (Credential(b"Bearer up", operator=True), HUB, "DELETE", True),
        (Credential(b"Basic own"), LOGGED_IN, "PATCH", False),
        (Credential(None, "alice"), LOGGED_IN, "PUT", True),
    ],
)
def test_writes_never_ride_on_the_operator_login(
    credential: Credential, registry: Registry, method: str, denied: bool
) -> None:
    if denied:
        with pytest.raises(AccessDenied):
            check_method(credential, method=method, registry=registry)
    else:
        check_method(credential, method=method, registry=registry)


@pytest.mark.parametrize(
    ("learned", "method", "credential", "sent"),
    [
        (Learned(basic=True), "GET", Credential(None), True),
        (Learned(basic=True), "HEAD", Credential(None, "alice"), True),
        (Learned(basic=True), "PUT", Credential(None), False),
        (Learned(basic=True), "GET", Credential(b"Basic own"), False),
        (Learned(realm=parse_url("https://auth.example/token")), "GET", Credential(None), False),
        (Learned(), "GET", Credential(None), False),
    ],
)
def test_operator_basic_login_only_for_reads_of_a_basic_primary(
    learned: Learned, method: str, credential: Credential, sent: bool
) -> None:
    got = operator_credential(LOGGED_IN, learned, method=method, credential=credential)
    assert got == (OPERATOR if sent else None)
    assert operator_credential(HUB, learned, method=method, credential=credential) is None


@pytest.mark.parametrize(
    ("credential", "learned", "method", "authorization", "operator"),
    [
        # the client's own credential goes to whichever upstream answers
        (Credential(b"Bearer own"), Learned(basic=True), "GET", b"Bearer own", None),
        # an operator-backed token is the operator's: to the primary only
        (Credential(b"Bearer op", operator=True), Learned(), "GET", None, b"Bearer op"),
        # no credential, a Basic primary: the operator's login, to the primary only
        (Credential(None), Learned(basic=True), "HEAD", None, OPERATOR),
        (Credential(None), Learned(basic=True), "PUT", None, None),
        (Credential(None), Learned(), "GET", None, None),
    ],
)
def test_outbound_credentials(
    credential: Credential,
    learned: Learned,
    method: str,
    authorization: bytes | None,
    operator: bytes | None,
) -> None:
    sent = outbound(credential, LOGGED_IN, learned, method=method)
    assert (sent.authorization, sent.operator) == (authorization, operator)
    assert "Bearer" not in repr(sent) and "Basic" not in repr(sent)


def test_a_large_upstream_token_still_opens_once_sealed() -> None:
    """A registry's JWT of 6 KB (some put many claims in it) sealed is longer than 4 KiB; the
    client's Authorization header carrying it must still be read, or the client loops on 401."""
    grant = Grant("", "docker.io", upstream=b"Bearer " + b"j" * 6000)
    authorization = sealed(grant)
    assert len(authorization) > 8000
    assert resolve(authorization).upstream == grant.upstream
