"""OpenAI embeddings to Gemini's batchEmbedContents, and the vectors back.

One request per input, in one batch call. Gemini's embedding answers carry no token
count (only some newer versions add usageMetadata, which is read when present): without
it the reply has no ``usage`` and the gateway accounts zero tokens, or its own marked
estimate when ``usage.estimate_when_missing`` is on.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

import orjson

from extproc.schemas.openai import as_count, bad_request, usage_object
from extproc.translators.base import Translator, UpstreamRequest
from extproc.translators.chat_to_gemini import error_to_openai, model_id, model_path
from extproc.usage import TokenUsage

MAX_BATCH = 100  # Gemini's limit of requests per batchEmbedContents call


def _inputs(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise bad_request("'input' must be a non-empty string or array of strings.", param="input")
    if not all(isinstance(v, str) and v for v in value):
        raise bad_request("Gemini embeds text only: 'input' must hold non-empty strings (not token arrays).",
                          param="input")
    if len(value) > MAX_BATCH:
        raise bad_request(f"Gemini embeds at most {MAX_BATCH} inputs per request.", param="input")
    return value


def embeddings_to_gemini(body: dict[str, Any], model: str) -> dict[str, Any]:
    """An OpenAI embeddings request as a BatchEmbedContentsRequest for ``model``."""
    inputs = _inputs(body.get("input"))
    dimensions = body.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1):
        raise bad_request("'dimensions' must be a positive integer.", param="dimensions")
    encoding = body.get("encoding_format")
    if encoding not in (None, "float", "base64"):
        raise bad_request("'encoding_format' must be 'float' or 'base64'.", param="encoding_format")
    name = f"models/{model_id(model)}"
    requests = []
    for text in inputs:
        request: dict[str, Any] = {"model": name, "content": {"parts": [{"text": text}]}}
        if dimensions is not None:
            request["outputDimensionality"] = dimensions
        requests.append(request)
    return {"requests": requests}


def _base64_f32(values: list[float]) -> str:
    """OpenAI's base64 encoding: the vector as little-endian float32."""
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")


def gemini_to_embeddings(response: Any, model: str, base64_encoded: bool) -> dict[str, Any]:
    """A BatchEmbedContentsResponse as OpenAI's embedding list."""
    embeddings = response.get("embeddings") if isinstance(response, dict) else None
    data = []
    for index, embedding in enumerate(embeddings if isinstance(embeddings, list) else ()):
        values = embedding.get("values") if isinstance(embedding, dict) else None
        values = [float(v) for v in values] if isinstance(values, list) else []
        data.append({"object": "embedding", "index": index,
                     "embedding": _base64_f32(values) if base64_encoded else values})
    out: dict[str, Any] = {"object": "list", "data": data, "model": model}
    meta = response.get("usageMetadata") if isinstance(response, dict) else None
    if isinstance(meta, dict):
        prompt = as_count(meta.get("promptTokenCount"))
        out["usage"] = usage_object(TokenUsage(input_tokens=prompt, total_tokens=prompt))
    return out


class EmbeddingsToGemini(Translator):
    translates_response = True
    _base64 = False

    def path(self, model: str) -> str:
        """The request path; Vertex AI overrides it."""
        return model_path(self.attempt.target.path_prefix, model, "batchEmbedContents")

    def request(self, body: dict[str, Any], raw: bytes) -> UpstreamRequest:
        translated = embeddings_to_gemini(body, self.attempt.model)
        self._base64 = body.get("encoding_format") == "base64"
        return UpstreamRequest(self.path(self.attempt.model), orjson.dumps(translated),
                               [("content-type", b"application/json")])

    def whole_response(self, status: int, body: bytes, error_type: str | None) -> bytes:
        if status >= 300:
            return error_to_openai(status, body)
        return orjson.dumps(gemini_to_embeddings(orjson.loads(body), self.attempt.model, self._base64))
