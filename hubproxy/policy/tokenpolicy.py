"""Whose credentials go where: the rules for token requests and for what a registry request
carries upstream. Pure: the token endpoint (``tokens.py``) and the proxy do the I/O.

Theory of operation. Registry clients fetch a token from the realm our challenges name (the
mirror's ``/token/...``); we forward that request to the realm the upstream's own challenge named,
then the client presents the token on ``/v2/`` requests. Three kinds of credential reach the
upstream:

- the **client's own** (its ``Authorization`` to the realm, or the upstream token it got): passed
  as they are, for whatever the client may do itself, pushes included;
- the **operator's login** (``--registry-login``), used only when the client brought none of its
  own. It serves pulls only: token scopes are reduced to ``pull`` (a repository scope asking more is
  refused with ``DENIED``), only GET and HEAD carry it to a Basic-only registry, and it goes only
  to the realm or origin of the registry's *primary* upstream, never to a fallback or a redirect
  target (``flow`` enforces the latter per attempt);
- a **mirror user's** login (``--users``) is the mirror's, never the upstream's.

A token obtained with the operator's login, or for a mirror user, never reaches the client as it
is: the client gets a *sealed* token (``sealing``) bound to the registry, the mirror user and
whether it is operator-backed, which only this process can open. Every token answer is cut down to
the fields clients read (``token``, ``access_token``, ``expires_in``, ``issued_at``): a
``refresh_token`` issued for the operator must never leave.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from .credentials import bearer_token
from .errors import AccessDenied, MirrorUnauthorized, UpstreamUnavailable
from .registries import Registry, Scope, query_scopes, replace_query_scopes
from .routing import without_query_param
from .sealing import Grant, TokenSealer, is_sealed
from .upstreams import Learned
from .values import immutable

READ_METHODS = frozenset({"GET", "HEAD"})
PULL = "pull"
TOKEN_FIELDS = ("token", "access_token", "expires_in", "issued_at")
MAX_TOKEN_RESPONSE = 64 * 1024  # a token answer (a JWT or two in JSON) is a few KB
MAX_TOKEN_LIFETIME = 3600.0  # seconds a sealed token is honoured at most
DEFAULT_TOKEN_LIFETIME = 60  # the token spec's default when expires_in is absent
# query parameters that would make the token service issue more than a pull token for the
# operator: a long-lived refresh token (offline_token=true, docker login's flow)
OPERATOR_DROPPED_PARAMS = ("offline_token",)


def basic_authorization(login: tuple[str, str]) -> bytes:
    """``Basic base64(user:password)`` (RFC 7617)."""
    return b"Basic " + base64.b64encode(f"{login[0]}:{login[1]}".encode())


# --- token requests ------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenRequest:
    """How one token request goes upstream and how its answer comes back."""

    query: str  # the query for the realm
    operator: bool  # the operator's login goes with it
    seal: bool  # the client gets a sealed token (operator-backed, or a mirror user's)


def plan_token_request(
    query: str,
    *,
    registry: Registry,
    index: int,
    client_credentials: bool,
    mirror_user: str | None,
    permits: Callable[[str, str], bool],
) -> TokenRequest:
    """Decide a token request for ``registry``'s upstream ``index`` (its query already in the
    registry's own terms: prefix removed, ``library/`` added).

    Raises AccessDenied for a repository the image rules refuse, and for a write (push, delete,
    ``*``) that could only be made with the operator's login.
    """
    for scope in query_scopes(query):
        if _is_repository(scope) and not permits(registry.name, scope.name):
            raise AccessDenied(f"{registry.name}/{scope.name} is not served by this mirror")
    operator = registry.login is not None and not client_credentials and index == 0
    if not operator:
        return TokenRequest(query, operator=False, seal=mirror_user is not None)
    for scope in query_scopes(query):
        if _is_repository(scope) and any(action != PULL for action in scope.actions):
            raise AccessDenied(
                f"this mirror pulls {registry.name} with its operator's login, which serves "
                "pulls only; to push, log in to the registry with your own credentials"
            )
    query = replace_query_scopes(query, _pull_only)
    for name in OPERATOR_DROPPED_PARAMS:
        query = without_query_param(query, name)
    return TokenRequest(query, operator=True, seal=True)


def _is_repository(scope: Scope) -> bool:
    return scope.kind.split("(")[0] == "repository"


def _pull_only(scope: Scope) -> Scope | None:
    """Scopes the operator's login may ask for: repository pulls; anything else is dropped."""
    if not _is_repository(scope) or PULL not in scope.actions:
        return None
    return Scope(scope.kind, scope.name, (PULL,))


# --- token answers -------------------------------------------------------------------------


def token_document(body: bytes) -> dict[str, object]:
    """The fields of a token service's 200 answer that clients read, and nothing else.

    Raise UpstreamUnavailable for an answer that is not a JSON object with a string token."""
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise UpstreamUnavailable("the token service answered something other than a JSON object")
    token = document.get("token") or document.get("access_token") or ""
    if not isinstance(token, str):  # "" is an anonymous grant of a registry that needs none
        raise UpstreamUnavailable("the token service's token is not a string")
    kept: dict[str, object] = {"token": token, "access_token": token}
    lifetime = document.get("expires_in")
    if isinstance(lifetime, int | float) and not isinstance(lifetime, bool) and lifetime > 0:
        kept["expires_in"] = lifetime
    if isinstance(document.get("issued_at"), str):
        kept["issued_at"] = document["issued_at"]
    return kept


def sealed_document(
    document: dict[str, object], sealer: TokenSealer, grant: Grant, now: float
) -> dict[str, object]:
    """``document`` with its token replaced by a sealed one carrying ``grant`` (whose upstream
    credential the caller set to the token), valid as long as the upstream token but at most
    :data:`MAX_TOKEN_LIFETIME`."""
    lifetime = document.get("expires_in", DEFAULT_TOKEN_LIFETIME)
    assert isinstance(lifetime, int | float)  # token_document kept only a positive number
    lifetime = min(float(lifetime), MAX_TOKEN_LIFETIME)
    try:
        sealed = sealer.seal(grant, now + lifetime)
    except ValueError as exc:  # a token too large to carry
        raise UpstreamUnavailable(f"the token service's token cannot be sealed: {exc}") from exc
    answer: dict[str, object] = {
        "token": sealed,
        "access_token": sealed,
        "expires_in": int(lifetime),
    }
    if "issued_at" in document:
        answer["issued_at"] = document["issued_at"]
    return answer


def encode_document(document: dict[str, object]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


# --- registry requests ---------------------------------------------------------------------


@immutable
class Credential:
    """What a registry request may carry upstream, from what the client presented."""

    upstream: bytes | None  # the client's upstream credential (None: none)
    user: str | None = None  # the mirror user, under --users
    operator: bool = False  # the credential is operator-backed: reads only


def client_credential(
    authorization: bytes | None,
    *,
    registry: str,
    sealer: TokenSealer,
    now: float,
    stamp_of: Callable[[str], bytes | None] | None,
    basic_user: str | None,
) -> Credential:
    """Resolve the client's ``Authorization`` on a registry request for ``registry``.

    A sealed mirror token is opened and must be for this registry and, when it names a mirror
    user, for a user still in the users file with the same password (``stamp_of``, None without
    ``--users``). With ``--users`` (``stamp_of`` given) anything else needs a mirror user's Basic
    login (``basic_user``, already checked by the caller) and goes upstream without credentials.
    Without it, the client's own credential passes as it is.

    Raises MirrorUnauthorized (the caller adds the challenge to log in with).
    """
    token = bearer_token(authorization) if authorization is not None else None
    if token is not None and is_sealed(token):
        grant = sealer.open(token, now)
        if grant is None:
            raise MirrorUnauthorized("this mirror's token expired or is not valid: log in again")
        if grant.registry != registry:
            raise MirrorUnauthorized(f"this mirror token is for {grant.registry}, not {registry}")
        if grant.user and (stamp_of is None or stamp_of(grant.user) != grant.stamp):
            raise MirrorUnauthorized("this mirror token's user was removed or changed")
        if stamp_of is not None and not grant.user:
            raise MirrorUnauthorized("this mirror requires a login (no mirror user in the token)")
        return Credential(grant.upstream, grant.user or None, grant.operator)
    if stamp_of is None:
        return Credential(authorization)
    if basic_user is not None:
        return Credential(None, basic_user)
    if authorization is not None and authorization[:6].lower() == b"basic ":
        raise MirrorUnauthorized("wrong mirror user name or password")
    why = "a token this mirror did not issue" if token is not None else "no mirror login"
    raise MirrorUnauthorized(f"this mirror requires a login ({why})")


def check_method(credential: Credential, *, method: str, registry: Registry) -> None:
    """A write needs the client's own credential: refuse one that could only go with the
    operator's login (DENIED, not a 401 the client would answer by logging in with nothing)."""
    if method in READ_METHODS:
        return
    if credential.operator or (credential.upstream is None and registry.login is not None):
        raise AccessDenied(
            f"this mirror pulls {registry.name} with its operator's login, which serves pulls "
            "only; to push, log in to the registry with your own credentials"
        )


@immutable
class Outbound:
    """What a registry request's plan carries (``flow`` sends each only where it may go)."""

    authorization: bytes | None = field(default=None, repr=False)  # to the addressed origin
    operator: bytes | None = field(default=None, repr=False)  # to the primary's origin only


def outbound(
    credential: Credential, registry: Registry, primary: Learned, *, method: str
) -> Outbound:
    """The credentials of a registry request's plan. The client's own go to whichever upstream
    answers; a token obtained with the operator's login, or the operator's Basic login itself,
    only to the registry's primary upstream (a fallback is someone else's)."""
    if credential.operator:
        return Outbound(operator=credential.upstream)
    return Outbound(
        authorization=credential.upstream,
        operator=operator_credential(registry, primary, method=method, credential=credential),
    )


def operator_credential(
    registry: Registry, primary: Learned, *, method: str, credential: Credential
) -> bytes | None:
    """The operator's Basic login for a registry request, or None: only for a read with no
    credential of the client's, to a registry whose primary upstream asked for Basic (a Bearer
    registry gets the operator's login through its token endpoint instead)."""
    if registry.login is None or credential.upstream is not None or method not in READ_METHODS:
        return None
    if not primary.basic:
        return None
    return basic_authorization(registry.login)
