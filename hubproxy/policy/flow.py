"""The per-request flow toward the upstreams, as one explicit state machine with no I/O.

Theory of operation. A registry request is sent to an upstream (AWAIT_HEAD). Its response head
decides what happens next:

- a redirect for GET/HEAD is followed (another attempt on the same upstream, at most ``max_hops``);
- a 429 rests that upstream and moves to the next one (if any remain untried);
- anything else is the answer (RESPONDING): the driver hands it to the client. What happens to
  its body is the driver's; a failure there can only abort the client connection, since headers
  are out and a truncated body must never end cleanly.

A failure before a head arrived (cannot connect, TLS refused, timeout, garbage) moves to the next
upstream when the request can still be replayed (no request body was consumed), else fails the
request with a registry JSON error.

The machine also owns what each attempt carries: the ``Authorization`` it sends (the client's
upstream credential goes only to the origin the client addressed; the operator's login only to the
primary upstream itself, never to a fallback or a redirect target) and the registry headers of a
followed redirect that the client must still see (the CDN's answer lacks them).

:func:`transition` is the only place these rules live; the I/O driver in ``proxy.py`` feeds it
events and performs the returned :class:`Action`. Time is passed in, never read.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import field, replace

from . import failover, redirects
from .errors import ProxyError, TooManyRedirects, UpstreamUnavailable
from .headers import get_header
from .urls import Url
from .values import immutable

# Registry headers of a redirecting response that the client must still see when we follow the
# redirect: the CDN's final response does not carry them.
CARRIED_FROM_REDIRECT = frozenset(
    {
        b"docker-content-digest",
        b"docker-distribution-api-version",
        b"ratelimit-limit",
        b"ratelimit-remaining",
        b"docker-ratelimit-source",
    }
)


class Phase(enum.Enum):
    AWAIT_HEAD = "await-head"  # an attempt was sent; waiting for its response head
    RESPONDING = "responding"  # the final response is the client's (the driver streams it)
    DONE = "done"  # an error answers the client


@immutable
class Plan:
    """What the client asked for and the policy knobs: fixed for the whole request."""

    method: str
    target: str  # origin-form target relative to each upstream's base ("/v2/...")
    upstreams: tuple[Url, ...]  # base URLs: the primary first, then the fallbacks
    replayable: bool  # False once a request body is being consumed (pushes)
    max_hops: int = 5
    follow_redirects: bool = True  # False: a redirect is the answer (access checks)
    rate_limit_rest: float = 60.0  # default rest after a 429 without Retry-After
    unreachable_rest: float = 10.0
    profile: str = ""  # whose connection settings (a registry's CA and proxy); "" the global ones
    # The client's credential for the upstream (its own Authorization, or the one a sealed mirror
    # token carries); None: none. Sent only to the origin the client addressed.
    authorization: bytes | None = field(default=None, repr=False)
    # The operator's login, when this request may use it (a pull with no client credential, to a
    # registry that asked for Basic): sent only to the primary upstream's own origin.
    operator_authorization: bytes | None = field(default=None, repr=False)
    # ``authorization`` is a token the mirror fetched with no credentials, for a mirror user
    # (--users): the upstream counts its pulls as anonymous ones (pull accounting)
    anonymous_token: bool = False
    # the client's own Host goes upstream, not the upstream's: a --peer owner routes the
    # request as the instance that passes it on did (--host-map names registries by Host)
    client_host: bool = False


@immutable
class Attempt:
    """One request to send upstream."""

    upstream: int  # index into Plan.upstreams
    url: Url
    hops: int  # redirects followed so far in this attempt chain
    authorization: bytes | None = field(default=None, repr=False)  # what it sends, if anything


@immutable
class State:
    phase: Phase
    attempt: Attempt
    tried: frozenset[int] = field(default_factory=frozenset)
    # the registry's own headers from the redirect this chain followed (see CARRIED_FROM_REDIRECT)
    carried: tuple[tuple[bytes, bytes], ...] = ()


def _in_phase(state: State, phase: Phase) -> State:
    """``state`` moved to ``phase`` (``dataclasses.replace``, without its field-by-field walk:
    every response head takes one of these)."""
    return State(phase, state.attempt, state.tried, state.carried)


# Events (inputs)
@immutable
class HeadReceived:
    status: int
    headers: Sequence[tuple[bytes, bytes]]


@immutable
class AttemptFailed:
    error: ProxyError


Event = HeadReceived | AttemptFailed


# Actions (outputs)
@immutable
class Send:
    """Discard the current response (if any) and send ``attempt``."""

    attempt: Attempt


@immutable
class Respond:
    """The current response is the client's answer: hand it over (with ``State.carried``)."""


@immutable
class Fail:
    """Answer the client with this error (no response was started)."""

    error: ProxyError


Action = Send | Respond | Fail


@immutable
class Rest:
    """Side effect: upstream ``upstream`` should not be used before ``until``."""

    upstream: int
    until: float


def _first_attempt(plan: Plan, index: int) -> Attempt:
    """A new chain on upstream ``index``: the client's credential, else (the primary only) the
    operator's."""
    base = plan.upstreams[index]
    if plan.target.startswith("/"):
        url = Url(base.origin, base.target.rstrip("/") + plan.target)
    else:  # a query for the base URL itself (token requests to a realm)
        url = Url(base.origin, base.target + plan.target)
    return Attempt(index, url, 0, _credential(plan, index))


def _credential(plan: Plan, index: int) -> bytes | None:
    """What a chain on upstream ``index`` sends to that upstream's own origin."""
    if plan.authorization is not None:
        return plan.authorization
    return plan.operator_authorization if index == 0 else None


def start(plan: Plan, resting_until: Sequence[float], now: float) -> tuple[State, Send]:
    """The first attempt of a request."""
    index = failover.choose_upstream(resting_until, frozenset(), now)
    assert index is not None  # with nothing tried, choose_upstream always picks one
    attempt = _first_attempt(plan, index)
    return State(Phase.AWAIT_HEAD, attempt, frozenset({index})), Send(attempt)


def transition(
    plan: Plan,
    state: State,
    event: Event,
    *,
    resting_until: Sequence[float],
    now: float,
    wall_now: float,
) -> tuple[State, Action, Rest | None]:
    """Apply one event; return the next state, the action to perform and an optional rest."""
    if state.phase is Phase.AWAIT_HEAD:
        if isinstance(event, HeadReceived):
            return _on_head(plan, state, event, resting_until, now, wall_now)
        if isinstance(event, AttemptFailed):
            rest = Rest(state.attempt.upstream, now + plan.unreachable_rest)
            resting = _with_rest(resting_until, rest)
            nxt = _next_upstream(plan, state, resting, now)
            if nxt is not None:
                return nxt[0], nxt[1], rest
            return _in_phase(state, Phase.DONE), Fail(event.error), rest
    raise RuntimeError(f"event {type(event).__name__} is not valid in phase {state.phase.name}")


def _on_head(
    plan: Plan,
    state: State,
    event: HeadReceived,
    resting_until: Sequence[float],
    now: float,
    wall_now: float,
) -> tuple[State, Action, Rest | None]:
    attempt = state.attempt
    if event.status == 429:
        wait = failover.retry_after_seconds(
            get_header(event.headers, b"retry-after"),
            wall_now=wall_now,
            default=plan.rate_limit_rest,
        )
        rest = Rest(attempt.upstream, now + wait)
        nxt = _next_upstream(plan, state, _with_rest(resting_until, rest), now)
        if nxt is not None:
            return nxt[0], nxt[1], rest
        return _in_phase(state, Phase.RESPONDING), Respond(), rest
    location = get_header(event.headers, b"location")
    if not plan.follow_redirects:
        return _in_phase(state, Phase.RESPONDING), Respond(), None
    try:
        target = redirects.redirect_target(
            plan.method,
            event.status,
            location.decode("latin-1") if location is not None else None,
            attempt.url,
        )
    except ValueError as exc:
        return _in_phase(state, Phase.DONE), Fail(UpstreamUnavailable(str(exc))), None
    if target is None:
        return _in_phase(state, Phase.RESPONDING), Respond(), None
    if attempt.hops >= plan.max_hops:
        error = TooManyRedirects(
            f"upstream redirected more than {plan.max_hops} times (last to {target.origin})"
        )
        return _in_phase(state, Phase.DONE), Fail(error), None
    addressed = plan.upstreams[attempt.upstream].origin
    follow = Attempt(
        attempt.upstream,
        target,
        attempt.hops + 1,
        _credential(plan, attempt.upstream)
        if redirects.may_send_authorization(addressed, target.origin)
        else None,
    )
    carried = state.carried
    if attempt.hops == 0:  # the registry's own redirect: the headers its client must still see
        carried = tuple((k, v) for k, v in event.headers if k in CARRIED_FROM_REDIRECT)
    return replace(state, attempt=follow, carried=carried), Send(follow), None


def _next_upstream(
    plan: Plan, state: State, resting_until: Sequence[float], now: float
) -> tuple[State, Send] | None:
    if not plan.replayable:
        return None
    index = failover.choose_upstream(resting_until, state.tried, now)
    if index is None:
        return None
    attempt = _first_attempt(plan, index)
    return State(Phase.AWAIT_HEAD, attempt, state.tried | {index}), Send(attempt)


def _with_rest(resting_until: Sequence[float], rest: Rest) -> list[float]:
    out = list(resting_until)
    out[rest.upstream] = max(out[rest.upstream], rest.until)
    return out
