"""The mirror's token endpoint: ``/token/N`` (the default registry) and ``/token/<registry>/N``.

Our challenges name these as the realm, so clients ask us for their tokens. The request goes to
the realm upstream ``N`` of that registry named in its own challenge (``upstreams``), with the
decisions of ``tokenpolicy``: whose credentials go with it, which scopes, and whether the answer
is sealed. The answer keeps only the fields clients read.

A registry that wants Basic credentials has no token service: its "token" is a sealed one that
carries the client's Basic credentials (or none), turned back into Basic on the registry request.
That is what lets ``docker pull mirror/registry.example/team/app``, whose client asks the default
registry's realm, reach a Basic-only registry.
"""

from __future__ import annotations

import logging
import time
from contextlib import AsyncExitStack
from urllib.parse import quote

import h11

from .forwarder import Forwarder, answer_whole, read_whole
from .net.server import ClientRequest, ClientResponse
from .net.upstream import UpstreamConnection
from .policy.access import ImageRules
from .policy.errors import RegistryNotServed, RouteNotFound
from .policy.headers import Headers, get_header
from .policy.registries import not_served_line, rewrite_token_query, token_registry
from .policy.routing import Route, without_query_param
from .policy.sealing import Grant, TokenSealer
from .policy.tokenpolicy import (
    MAX_TOKEN_RESPONSE,
    basic_authorization,
    encode_document,
    plan_token_request,
    sealed_document,
    token_document,
)

log = logging.getLogger("hubproxy")

JSON = b"application/json"
BASIC_TOKEN_LIFETIME = 300  # a sealed token standing for Basic credentials: Docker Hub's lifetime


class TokenEndpoint:
    """Answers token requests for every registry of one mirror."""

    def __init__(
        self,
        forwarder: Forwarder,
        sealer: TokenSealer,
        images: ImageRules,
    ) -> None:
        self.forwarder = forwarder
        self.sealer = sealer
        self.images = images

    async def serve(
        self,
        request: ClientRequest,
        route: Route,
        response: ClientResponse,
        *,
        mirror_user: str | None,
        stamp: bytes,
    ) -> None:
        """Answer one token request. ``mirror_user`` is the mirror user under ``--users`` (the
        caller checked the login), with its current ``stamp``; None without ``--users``."""
        forwarder = self.forwarder
        table = forwarder.table
        named = table.find(route.registry) if route.registry else table.default_registry
        if named is None or named.name not in forwarder.registries:
            raise RouteNotFound(f"unknown token endpoint for registry {route.registry!r}")
        upstreams = forwarder.registries[named.name]
        key = route.realm_key or ""
        if not key.isdigit() or int(key) >= len(upstreams.urls):
            raise RouteNotFound(f"unknown token endpoint {upstreams.token_prefix}{key}")
        index = int(key)
        query = route.target.removeprefix("?")
        # a path-prefix pull asks the default registry's realm for another registry's scope
        try:
            chosen, query = token_registry(table, named, query)
        except RegistryNotServed as refused:
            log.debug("%s", not_served_line(table, refused, request.client_ip))
            raise
        if chosen is not named:
            upstreams, index = forwarder.registries[chosen.name], 0
        if not upstreams.learned[index].known:
            await forwarder.learn_challenge(upstreams, index)
        learned = upstreams.learned[index]
        if chosen is not named and learned.service:
            query = "&".join(filter(None, [query, "service=" + quote(learned.service, safe="")]))
        if mirror_user is not None:
            query = without_query_param(query, "account")  # the mirror user, not the registry's
        query = rewrite_token_query(query, library_prefix=upstreams.registry.library_prefix)
        client = None if mirror_user is not None else get_header(request.headers, b"authorization")
        decision = plan_token_request(
            query,
            registry=upstreams.registry,
            index=index,
            client_credentials=client is not None,
            mirror_user=mirror_user,
            permits=self.images.permits,
        )
        grant = Grant(
            user=mirror_user or "",
            registry=upstreams.registry.name,
            operator=decision.operator,
            stamp=stamp,
        )
        if learned.realm is None:
            # no token service (Basic auth, or none at all): the token stands for the client's
            # Basic credentials, or for none (a read may then carry the operator's login, see
            # tokenpolicy.operator_credential)
            basic = client if client is not None and client[:6].lower() == b"basic " else None
            document: dict[str, object] = {"token": "", "expires_in": BASIC_TOKEN_LIFETIME}
            sealed = Grant(grant.user, grant.registry, upstream=basic, stamp=stamp)
            body = self._sealed(document, sealed)
            await answer_whole(request, response, 200, [(b"content-type", JSON)], body)
            return
        realm = await forwarder.learn_realm(upstreams, index)
        login = upstreams.registry.login
        target = ("&" if "?" in realm.target else "?") + decision.query if decision.query else ""
        plan = forwarder.plan(
            request,
            target,
            (realm,),
            profile=upstreams.profile,
            authorization=client,
            operator_authorization=basic_authorization(login)
            if decision.operator and login is not None
            else None,
        )

        async def deliver(
            conn: UpstreamConnection, head: h11.Response, headers: Headers, _: AsyncExitStack
        ) -> None:
            answer = await read_whole(conn, MAX_TOKEN_RESPONSE, "the token service")
            if head.status_code == 200:
                document = token_document(answer)
                if decision.seal:
                    token = document["token"]
                    assert isinstance(token, str)
                    document = self._sealed_for(document, grant, token)
                answer = encode_document(document)
            elif decision.operator and head.status_code in (401, 403):
                log.warning(
                    "the token service of %s refused this mirror's login (%d): check the "
                    "--registry-login file for %s",
                    realm.origin,
                    head.status_code,
                    upstreams.registry.name,
                )
            kept = [(k, v) for k, v in headers if k != b"content-type"]
            kept.append((b"content-type", JSON))
            await answer_whole(request, response, head.status_code, kept, answer, head.reason)

        await forwarder.run_flow(plan, request, response, upstreams=None, deliver=deliver)

    def _sealed_for(
        self, document: dict[str, object], grant: Grant, token: str
    ) -> dict[str, object]:
        upstream = Grant(
            grant.user,
            grant.registry,
            upstream=b"Bearer " + token.encode("latin-1") if token else None,
            operator=grant.operator,
            stamp=grant.stamp,
        )
        return sealed_document(document, self.sealer, upstream, time.time())

    def _sealed(self, document: dict[str, object], grant: Grant) -> bytes:
        return encode_document(sealed_document(document, self.sealer, grant, time.time()))
