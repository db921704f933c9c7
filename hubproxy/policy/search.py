"""``docker search`` through the mirror: the index's answer cut down to the images served.

Docker Hub's ``/v1/search`` answers ``{"num_results": N, "query": ..., "results": [{"name":
"nginx", "is_official": true, ...}, ...]}`` (official images without ``library/``). A mirror whose
image rules serve only some images must not list the others: the results it may not serve are
dropped and the counts follow. Pure: bytes in, bytes out.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from .errors import UpstreamUnavailable

MAX_SEARCH_ANSWER = 1024 * 1024  # 100 results of Docker Hub's are about 30 KB


def filter_search_answer(body: bytes, permits: Callable[[str], bool]) -> bytes:
    """Keep the results whose ``name`` ``permits`` (a repository of the default registry) allows.

    Raise UpstreamUnavailable for an answer that is not such a document: passing it on unread
    could list what the rules refuse."""
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict) or not isinstance(document.get("results"), list):
        raise UpstreamUnavailable("the search index answered something other than search results")
    results = document["results"]
    kept = [
        item
        for item in results
        if isinstance(item, dict) and isinstance(item.get("name"), str) and permits(item["name"])
    ]
    dropped = len(results) - len(kept)
    document["results"] = kept
    if dropped:  # other pages may hold more refused ones: count only what is shown
        document["num_results"] = len(kept)
    return json.dumps(document, separators=(",", ":")).encode()
