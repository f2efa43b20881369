"""Token usage in a model provider's response, for the audit log.

Providers report it in the response body: a JSON object's `usage` (Anthropic, OpenAI) or
`usageMetadata` (Gemini), or, when the response is a stream of server-sent events, in some of the
events (Anthropic's `message_start` and `message_delta`, OpenAI's last chunk or `response.completed`).
"""

from __future__ import annotations

import contextlib
import json
import zlib
from typing import Any

MAX_INFLATED = 16 * 1024 * 1024
USAGE_KEYS = ("usage", "usageMetadata")


def extract(body: bytes, encoding: str = "") -> dict[str, Any] | None:
    """The usage figures `body` reports (later events override earlier ones), None if it has none."""
    if encoding.lower() in ("gzip", "deflate"):
        try:
            inflater = zlib.decompressobj(wbits=47)  # gzip or zlib header, detected
            body = inflater.decompress(body, MAX_INFLATED)
        except zlib.error:
            return None
    elif encoding and encoding.lower() != "identity":
        return None
    text = body.decode("utf-8", "replace").strip()
    if not text:
        return None
    documents: list[Any] = []
    if text[0] in "{[":
        with contextlib.suppress(ValueError):
            documents.append(json.loads(text))
    if not documents:  # server-sent events: one JSON document per `data:` line
        for line in text.splitlines():
            if line.startswith("data:"):
                try:
                    documents.append(json.loads(line[5:].strip()))
                except ValueError:
                    continue
    found: dict[str, Any] = {}
    for document in documents:
        for usage in _usages(document):
            found.update({k: v for k, v in usage.items() if isinstance(v, int | float) and v is not None})
    return found or None


def _usages(document: Any, depth: int = 0) -> list[dict[str, Any]]:
    """Usage objects in a document: at its top level, or one level down (`message`, `response`)."""
    if not isinstance(document, dict) or depth > 1:
        return []
    found = [v for k, v in document.items() if k in USAGE_KEYS and isinstance(v, dict)]
    for value in document.values():
        if isinstance(value, dict):
            found += _usages(value, depth + 1)
    return found
