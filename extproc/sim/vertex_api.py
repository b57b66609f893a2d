"""Vertex AI's publisher-model endpoints, simulated: Google's auth in front of the
Anthropic and Gemini simulators.

Paths as Google serves them (any API version, `v1` or `v1beta1`):

    /v1/projects/{project}/locations/{location}/publishers/anthropic/models/{model}:rawPredict
    /v1/projects/{project}/locations/{location}/publishers/anthropic/models/{model}:streamRawPredict
    /v1/projects/{project}/locations/{location}/publishers/anthropic/models/count-tokens:rawPredict
    /v1/projects/{project}/locations/{location}/publishers/google/models/{model}:generateContent
    /v1/projects/{project}/locations/{location}/publishers/google/models/{model}:streamGenerateContent?alt=sse

Every call must carry `Authorization: Bearer <token>` with a token the simulated token
endpoint issued (``google_auth``) for the cloud-platform scope; else Google's 401/403 in
Google's error shape (`{"error": {"code", "message", "status"}}`). Past that gate, Claude
models are the Anthropic simulator with Vertex's body convention (`anthropic_version:
vertex-2023-10-16` in the body, no `model`: it is in the path), so their replies, streams
and model errors are Anthropic's own, as on Vertex; Google's models are the Gemini
simulator (the same GenerateContent JSON on Vertex), without its API-key check.

Knob: ``x-sim-vertex-error: STATUS`` makes Google's front end answer that error itself
(in Google's shape, e.g. 429 RESOURCE_EXHAUSTED for a project's quota), as Vertex does
before any model sees the request.
"""

from __future__ import annotations

import re

import orjson
from aiohttp import web

from extproc.sim import anthropic_api, gemini_api, wire
from extproc.sim.google_auth import CLOUD_PLATFORM_SCOPE

_PATH_RE = re.compile(
    r"/v1(?:beta1)?/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"
    r"/publishers/(?P<publisher>[^/]+)/models/(?P<model>[^/:]+):(?P<method>[A-Za-z]+)$"
)
_STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 405: "METHOD_NOT_ALLOWED", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}
_ANTHROPIC_METHODS = {"rawPredict": False, "streamRawPredict": True}
_COUNT_TOKENS_MODEL = "count-tokens"  # Claude's token count: the model is named in the body
_GEMINI_METHODS = frozenset({"generateContent", "streamGenerateContent", "countTokens"})


def matches(path: str) -> bool:
    """Is this a Vertex AI publisher-model path (behind any base path)?"""
    return _PATH_RE.search(path) is not None


def google_error(status: int, message: str) -> web.Response:
    """Google's API error body (`google.rpc.Status` as JSON)."""
    body = {"error": {"code": status, "message": message, "status": _STATUS_NAMES.get(status, "UNKNOWN")}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


async def dispatch(request: web.Request, settings: wire.SimSettings) -> web.StreamResponse:
    found = _PATH_RE.search(request.path)
    assert found is not None  # matches() said so
    issued = settings.google.token_of(request.headers.get("authorization"))
    if issued is None:
        return google_error(401, "Request had invalid authentication credentials. Expected OAuth 2 access token, "
                            "login cookie or other valid authentication credential.")
    if CLOUD_PLATFORM_SCOPE not in issued.scopes:
        return google_error(403, "Request had insufficient authentication scopes.")
    if request.method != "POST":
        return google_error(405, f"Method {request.method} is not allowed; use POST.")
    publisher, model, method = found["publisher"], found["model"], found["method"]
    knob = request.headers.get("x-sim-vertex-error", "")
    if knob:
        status = int(knob) if knob.isdigit() and 400 <= int(knob) <= 599 else 400
        return google_error(status, f"Quota exceeded for aiplatform.googleapis.com/online_prediction_requests_per_"
                            f"base_model with base model: {model}." if status == 429 else
                            f"The simulated Vertex front end failed with {status} (x-sim-vertex-error).")
    if publisher == "anthropic":
        streaming = _ANTHROPIC_METHODS.get(method)
        if streaming is None:
            return google_error(404, f"Method {method} is not served for publisher model {model}.")
        call = anthropic_api.VertexCall(model, streaming, count_tokens=model == _COUNT_TOKENS_MODEL)
        return await anthropic_api.dispatch(request, settings, call)
    if publisher == "google" and method in _GEMINI_METHODS:
        return await gemini_api.dispatch(request, settings, vertex=True)
    return google_error(404, f"Publisher Model `projects/{found['project']}/locations/{found['location']}/"
                        f"publishers/{publisher}/models/{model}` was not found.")
