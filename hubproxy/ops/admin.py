"""The admin API: what ``hubproxy cache ls|rm|refresh`` do, over HTTP, in the running mirror.

- ``GET /admin/cache[?registry=R&repository=GLOB]``: the images, as ``cache ls --json``.
- ``DELETE /admin/cache/IMAGE``: ``cache rm IMAGE`` (``nginx:1.27``, ``ghcr.io/owner/app``,
  ``library/nginx@sha256:...``, ``sha256:...``; ``@`` and ``:`` may be percent-encoded).
- ``POST /admin/cache/refresh/IMAGE:TAG``: ``cache refresh IMAGE:TAG``.

Off unless ``--admin-token-file`` is given (then 404, as for any unknown path). A request must
come from ``--ops-allow`` (without one: this machine only; ``admission.admit_admin``) and carry
``Authorization: Bearer <token>``; otherwise 403 or 401, before anything is read. Done in the
mirror, a removal forgets the tag in this process at once, and in every other process on the
cache directory through the journal (``cache/manifests``); the command line does the same from
outside, so both reach a running mirror.
"""

from __future__ import annotations

import json
import logging
import urllib.parse

from ..cache.inventory import Inventory, Outcome
from ..net.server import ClientRequest, ClientResponse
from ..policy.errors import BadImageName, MirrorUnauthorized, RouteNotFound
from ..policy.headers import get_header
from ..policy.inventory import parse_image_ref
from .admintoken import token_matches

log = logging.getLogger("hubproxy")

CACHE = "/admin/cache"
REFRESH = "/admin/cache/refresh/"
CHALLENGE = b'Bearer realm="hubproxy-admin"'


def _wrong_method(method: str, path: str, wanted: str) -> RouteNotFound:
    return RouteNotFound(f"{method} {path}: use {wanted}", status=405)


class Admin:
    """Answers ``/admin/...`` for one mirror; ``token`` is the SHA-256 of the admin token."""

    def __init__(self, inventory: Inventory | None, token: bytes | None) -> None:
        self.inventory = inventory
        self.token = token

    @property
    def enabled(self) -> bool:
        return self.token is not None

    def check_token(self, request: ClientRequest) -> None:
        """MirrorUnauthorized unless the request carries the admin token."""
        assert self.token is not None
        if not token_matches(self.token, get_header(request.headers, b"authorization")):
            raise MirrorUnauthorized(
                "the admin API needs 'Authorization: Bearer <the token of --admin-token-file>'",
                headers=((b"www-authenticate", CHALLENGE),),
            )

    async def serve(self, request: ClientRequest, response: ClientResponse) -> None:
        """Answer an admitted, authorised admin request."""
        path, _, query = request.target.partition("?")
        inventory = self.inventory
        if inventory is None:
            raise RouteNotFound("this mirror has no cache (--no-cache)")
        method = request.method
        if path == CACHE:
            if method not in ("GET", "HEAD"):
                raise _wrong_method(method, CACHE, "GET")
            params = dict(urllib.parse.parse_qsl(query))
            try:
                listed = await inventory.listing(
                    params.get("registry") or None, params.get("repository") or None
                )
            except ValueError as exc:
                raise BadImageName(str(exc)) from None
            document: dict[str, object] = {
                "images": [image.as_json() for image in listed.images],
                "totals": listed.totals.as_json(),
            }
        elif path.startswith(REFRESH):
            if method != "POST":
                raise _wrong_method(method, REFRESH + "IMAGE:TAG", "POST")
            ref = parse_image_ref(urllib.parse.unquote(path[len(REFRESH) :]))
            document = self._done("refreshed", await inventory.remove(ref, refresh=True))
        elif path.startswith(CACHE + "/"):
            if method != "DELETE":
                raise _wrong_method(method, CACHE + "/IMAGE", "DELETE")
            ref = parse_image_ref(urllib.parse.unquote(path[len(CACHE) + 1 :]))
            document = self._done("removed", await inventory.remove(ref))
        else:
            raise RouteNotFound(f"no admin path {path[:100]}")
        # bounded as the cache's own indexes are (--manifest-cache-entries tags)
        body = json.dumps(document, indent=2).encode() + b"\n"
        response.record.upstream = "-"
        await response.start(
            200,
            [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
                (b"cache-control", b"no-store"),
            ],
        )
        if method != "HEAD":
            await response.send(body)
        await response.finish()

    @staticmethod
    def _done(verb: str, outcome: Outcome) -> dict[str, object]:
        log.info(
            "admin API: %s %s (%d blobs, %d bytes deleted)",
            verb,
            ", ".join(outcome.plan.removed),
            outcome.blobs_removed,
            outcome.bytes_removed,
        )
        return outcome.as_json()
