"""Canonical fingerprints of requests: the exact-cache key and the semantic context hash.

The exact key covers everything that changes the answer: tenant, policy, the resolved model
and every forwarded parameter (the full message list, tools, tool_choice, response_format,
sampling parameters, stop, seed, logprobs, ...). Only `user` (an end-user id for abuse
monitoring) is left out. Canonical JSON (sorted keys, no whitespace) makes key order and
formatting irrelevant.

The context hash is the same fingerprint with the final user turn's text taken out: two
requests may share a semantic entry only when everything else, the system prompt and the
whole earlier conversation included, is identical.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from gateway.types import CacheRequest, text_of

VERSION = 1
IGNORED_PARAMS = frozenset({"user"})


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)


def digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def _scope(request: CacheRequest, params: dict[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in params.items() if k not in IGNORED_PARAMS}
    return {"v": VERSION, "tenant": request.tenant, "policy": request.policy,
            "model": request.model, "params": kept}


def exact_key(request: CacheRequest) -> str:
    """The SHA-256 of the canonical request: equal iff the answer-changing fields are equal."""
    return digest(_scope(request, request.params))


def final_user_text(params: dict[str, Any]) -> str | None:
    """The text of the last message when it is a user turn, else None."""
    messages = params.get("messages") or []
    if not messages or messages[-1].get("role") != "user":
        return None
    text = text_of(messages[-1].get("content"))
    return text if text and text.strip() else None


def is_multi_turn(params: dict[str, Any]) -> bool:
    """Whether anything but system/developer messages precedes the final user turn."""
    return any(m.get("role") not in ("system", "developer")
               for m in (params.get("messages") or [])[:-1])


def context_hash(request: CacheRequest) -> str:
    """The fingerprint of everything except the final user turn's text."""
    messages = list(request.params.get("messages") or [])
    last = {k: v for k, v in messages[-1].items() if k != "content"} if messages else {}
    params = {**request.params, "messages": [*messages[:-1], last]}
    return digest({"context": _scope(request, params)})


def tag(value: str) -> str:
    """A fixed-width hex tag for a name (tenant, policy) in the search index."""
    return hashlib.blake2b(value.encode(), digest_size=12).hexdigest()
