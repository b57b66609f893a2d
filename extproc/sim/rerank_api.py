"""An aiohttp handler for rerank in Cohere's v2 shape (``POST .../rerank``), which Cohere
(``/v2/rerank``), vLLM and Jina (``/v1/rerank``) serve alike.

Request: {model, query, documents (strings, or objects with ``text``), top_n}.
Response: {id, results: [{index, relevance_score}] best first, meta: {api_version,
billed_units: {search_units}, tokens: {input_tokens, output_tokens: 0}}}. A document's
score is the share of the query's words it contains (deterministic); the input tokens
are the query's once per document plus the document's (``text.count_tokens``).
Failures are Cohere-shaped errors ({"message": ...}) with the status; ``x-sim-error``
and ``sim-error-NNN`` models work as for the other APIs.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from aiohttp import web

from extproc.sim import text, wire

MAX_DOCUMENTS = 1000
_SUFFIX = "/rerank"


def matches(path: str) -> bool:
    return path.rstrip("/").endswith(_SUFFIX)


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def error_response(status: int, message: str) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"message": message}), content_type="application/json")


async def dispatch(request: web.Request, settings: wire.SimSettings) -> web.StreamResponse:
    try:
        knobs = wire.read_knobs(request, settings)
        await wire.wait_first_byte(knobs)
        if knobs.error_status is not None:
            raise ApiError(knobs.error_status, wire.simulated_error(knobs.error_status, "x-sim-error header"))
        if request.method != "POST":
            raise ApiError(405, f"Method {request.method} not allowed for {request.path}; use POST.")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"invalid request: the body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "invalid request: the body must be a JSON object")
        return wire.json_reply(orjson.dumps(rerank(body, knobs)), knobs.compress)
    except ApiError as exc:
        return error_response(exc.status, exc.message)
    except wire.KnobError as exc:
        return error_response(400, str(exc))
    except web.HTTPException as exc:
        return error_response(exc.status, exc.reason)


def _document_text(document: Any) -> str:
    if isinstance(document, str):
        return document
    if isinstance(document, dict) and isinstance(document.get("text"), str):
        return str(document["text"])
    raise ApiError(400, "invalid request: each document must be a string or an object with text")


def rerank(body: dict[str, Any], knobs: wire.Knobs) -> dict[str, Any]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "invalid request: model is required")
    status = wire.model_error(model)
    if status is not None:
        raise ApiError(status, wire.simulated_error(status, f"model {model}"))
    query = body.get("query")
    if not isinstance(query, str) or not query:
        raise ApiError(400, "invalid request: query must be a non-empty string")
    documents = body.get("documents")
    if not isinstance(documents, list) or not 1 <= len(documents) <= MAX_DOCUMENTS:
        raise ApiError(400, f"invalid request: documents must be a list of 1 to {MAX_DOCUMENTS} documents")
    texts = [_document_text(d) for d in documents]
    top_n = body.get("top_n", len(texts))
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
        raise ApiError(400, "invalid request: top_n must be a positive integer")
    words = {w.lower() for w in text.TOKEN_RE.findall(query)}
    scores = [
        len(words & {w.lower() for w in text.TOKEN_RE.findall(t)}) / max(1, len(words)) for t in texts
    ]
    order = sorted(range(len(texts)), key=lambda i: (-scores[i], i))[:top_n]
    query_tokens = text.count_tokens(query)
    input_tokens = sum(query_tokens + text.count_tokens(t) for t in texts)
    meta: dict[str, Any] = {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}}
    if not knobs.usage.omit:
        meta["tokens"] = {"input_tokens": input_tokens, "output_tokens": 0}
    return {
        "id": str(uuid.uuid4()),
        "results": [{"index": i, "relevance_score": round(scores[i], 6)} for i in order],
        "meta": meta,
    }
