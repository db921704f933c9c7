"""A minimal registry client for tests, doing what docker and containerd do against a mirror:
request, and on a Bearer challenge fetch a token from the realm it names (with Basic credentials
if given), then retry with ``Authorization: Bearer``. Redirects are not followed: a mirror must
never send the client one for a pull."""

from __future__ import annotations

import base64
import urllib.parse
from collections.abc import Iterable

import trustme

from hubproxy.policy.auth import parse_challenges
from tests.fakehub import FetchResult, fetch


class RegistryClient:
    def __init__(
        self,
        base: str,
        ca: trustme.CA,
        *,
        credentials: tuple[str, str] | None = None,
        local_address: str | None = None,
    ) -> None:
        self.base = base.rstrip("/")
        self.local_address = local_address  # e.g. 127.0.0.2: another client address
        self.ca = ca
        self.credentials = credentials
        self.tokens: dict[str, str] = {}  # scope -> token
        self.challenges: list[str] = []  # every WWW-Authenticate seen
        self.token_responses: list[FetchResult] = []

    async def request(
        self,
        path: str,
        *,
        method: str = "GET",
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | list[bytes] = b"",
        scope: str | None = None,
    ) -> FetchResult:
        """One registry request with the token dance; returns the final response."""
        extra = list(headers)
        token = self.tokens.get(scope or "")
        result = await self._send(path, method, extra, body, token)
        if result.status != 401:
            return result
        challenge = result.headers.get("www-authenticate", "")
        self.challenges.append(challenge)
        bearer = [c for c in parse_challenges(challenge) if c.scheme.lower() == "bearer"]
        if not bearer:
            return result
        realm = bearer[0].param("realm") or ""
        query = [("service", bearer[0].param("service") or "")]
        wanted = scope or bearer[0].param("scope")
        if wanted:
            query.append(("scope", wanted))
        token_response = await self.fetch_token(realm, query)
        if token_response.status != 200:
            return token_response
        token = token_response.json()["token"]
        self.tokens[scope or ""] = token
        return await self._send(path, method, extra, body, token)

    async def fetch_token(self, realm: str, query: list[tuple[str, str]]) -> FetchResult:
        headers = []
        if self.credentials is not None:
            raw = f"{self.credentials[0]}:{self.credentials[1]}".encode()
            headers.append(("authorization", "Basic " + base64.b64encode(raw).decode()))
        url = realm + "?" + urllib.parse.urlencode(query)
        response = await fetch(url, self.ca, headers=headers, local_address=self.local_address)
        self.token_responses.append(response)
        return response

    async def _send(
        self,
        path: str,
        method: str,
        headers: list[tuple[str, str]],
        body: bytes | list[bytes],
        token: str | None,
    ) -> FetchResult:
        all_headers = list(headers)
        if token:
            all_headers.append(("authorization", f"Bearer {token}"))
        return await fetch(
            self.base + path,
            self.ca,
            method=method,
            headers=all_headers,
            body=body,
            local_address=self.local_address,
        )
