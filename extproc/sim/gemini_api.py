"""aiohttp handler that speaks Google's Gemini API (``.../models/{model}:{method}``).

Methods: ``generateContent``, ``streamGenerateContent`` (``?alt=sse``: each ``data:``
event a whole GenerateContentResponse), ``embedContent``, ``batchEmbedContents``,
``countTokens``, and ``GET .../models``. Faithful where a gateway or the official
google-genai SDK can tell: the key in ``x-goog-api-key`` (or ``?key=``), errors as
``{"error": {"code", "message", "status"}}``, the API's refusal of unknown fields (in
the request, generationConfig and function parameter schemas), of a function response
turn that does not follow a function call turn, of schema types Gemini lacks, and (for
Gemini 3 and later models) of a current-turn function call that does not come back with
the thoughtSignature the model gave it. It
validates on its own, sharing no code with the gateway's translation.

The reply echoes the last user text like the other simulators, or calls a function when
tools are offered and that text says "weather" (or ``toolConfig`` mode ANY forces a
call); ``maxOutputTokens`` and ``stopSequences`` cut it with the matching finishReason;
``candidateCount`` repeats the candidate.

Knobs: the ``x-sim-*`` headers every simulated API reads (``wire.read_knobs``: chunks,
delays, error, cached tokens, reasoning tokens, no usage, compression, hold) plus
``x-sim-tool-call: 1`` (call the first function even without "weather") and
``x-sim-reply-tokens``, and ``x-sim-stream-error: STATUS`` (a stream fails with an error
event after its first piece). A key starting with ``invalid`` is refused as Gemini refuses a
bad key (400, reason API_KEY_INVALID); a model ``sim-error-NNN`` fails with NNN.

Token rule (deterministic, see ``text``): the prompt is the tokens of the system
instruction, of each function's name and description, and per content
``text.MESSAGE_OVERHEAD`` plus the tokens of its text parts, function calls (name and
JSON args) and function responses (name and JSON response). The output is the tokens of
the text, or of a call's name and JSON args, per candidate. promptTokenCount is the
whole prompt, cachedContentTokenCount a part of it (``x-sim-cached-tokens``);
thoughtsTokenCount (``x-sim-reasoning-tokens``) adds to the total.
"""

from __future__ import annotations

import base64
import hashlib
import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from extproc.sim import text, wire

_METHOD_RE = re.compile(r"/models/(?P<model>[^/:]+):(?P<method>[A-Za-z]+)$")
_LIST_RE = re.compile(r"/v1(?:beta|alpha)?/models$")
_OWN_LIST_RE = re.compile(r"/v1(?:beta|alpha)/models$")  # /v1/models is also OpenAI's: told apart by the key
_WEATHER_RE = re.compile(r"\bweather\b", re.IGNORECASE)
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,63}")
DEFAULT_DIMENSIONS = 768
SKIP_SIGNATURE = "skip_thought_signature_validator"  # Google's documented stand-in
MODELS = ("gemini-2.5-flash", "gemini-2.5-pro", "gemini-2.0-flash", "text-embedding-004")
_STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL", 501: "UNIMPLEMENTED",
                 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
_REQUEST_KEYS = frozenset({"contents", "systemInstruction", "tools", "toolConfig", "generationConfig",
                           "safetySettings", "cachedContent", "labels"})
_GENERATION_KEYS = frozenset({
    "temperature", "topP", "topK", "candidateCount", "maxOutputTokens", "stopSequences", "presencePenalty",
    "frequencyPenalty", "seed", "responseMimeType", "responseSchema", "responseJsonSchema", "responseLogprobs",
    "logprobs", "thinkingConfig", "responseModalities",
})
_SCHEMA_KEYS = frozenset({
    "type", "format", "title", "description", "nullable", "enum", "maxItems", "minItems", "properties",
    "required", "minProperties", "maxProperties", "minLength", "maxLength", "pattern", "example", "anyOf",
    "propertyOrdering", "default", "items", "minimum", "maximum",
})
_SCHEMA_TYPES = frozenset({"STRING", "NUMBER", "INTEGER", "BOOLEAN", "ARRAY", "OBJECT", "NULL"})
_PART_KINDS = frozenset({"text", "inlineData", "fileData", "functionCall", "functionResponse"})


def matches(path: str, headers: Mapping[str, str] | None = None) -> bool:
    """Is this a Gemini API path (behind any base path)? ``GET /v1/models`` is Gemini's
    only when it comes with a Google key (OpenAI's clients list models there too)."""
    if _METHOD_RE.search(path) is not None or _OWN_LIST_RE.search(path) is not None:
        return True
    return _LIST_RE.search(path) is not None and headers is not None and "x-goog-api-key" in headers


class ApiError(Exception):
    def __init__(self, status: int, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details


def error_response(status: int, message: str, details: list[dict[str, Any]] | None = None) -> web.Response:
    """Gemini's error body: ``{"error": {"code", "message", "status"[, "details"]}}``."""
    error: dict[str, Any] = {"code": status, "message": message,
                             "status": _STATUS_NAMES.get(status, "INTERNAL" if status >= 500 else "INVALID_ARGUMENT")}
    if details:
        error["details"] = details
    return web.Response(status=status, body=orjson.dumps({"error": error}), content_type="application/json")


def _camel(key: str) -> str:
    """The API takes proto field names in either spelling (the SDK sends some in snake_case)."""
    head, *rest = key.split("_")
    return head + "".join(word.capitalize() for word in rest)


def _invalid(message: str) -> ApiError:
    return ApiError(400, message)


def _unknown(name: str, where: str) -> ApiError:
    return _invalid(f"Invalid JSON payload received. Unknown name \"{name}\" at '{where}': Cannot find field.")


# -- validation --------------------------------------------------------------------------------


def _validate_schema(schema: Any, where: str) -> None:
    if not isinstance(schema, dict):
        raise _invalid(f"{where}: must be an object")
    for key, value in schema.items():
        if key not in _SCHEMA_KEYS:
            raise _unknown(key, where)
        if key == "type" and value not in _SCHEMA_TYPES:
            raise _invalid(f"Invalid value at '{where}.type' ({value!r})")
        if key == "properties":
            for name, sub in (value.items() if isinstance(value, dict) else ()):
                _validate_schema(sub, f"{where}.properties[{name}]")
        if key == "items":
            _validate_schema(value, f"{where}.items")
        if key == "enum" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise _invalid(f"Invalid value at '{where}.enum': strings expected")
    if schema.get("type") == "OBJECT" and "properties" in schema and not schema["properties"]:
        raise _invalid(f"{where}.properties: should be non-empty for OBJECT type")


def _validate_parts(parts: Any, where: str) -> None:
    if not isinstance(parts, list) or not parts:
        raise _invalid(f"{where}.parts: must contain at least one part")
    for j, part in enumerate(parts):
        here = f"{where}.parts[{j}]"
        if not isinstance(part, dict):
            raise _invalid(f"{here}: must be an object")
        kinds = [k for k in part if k in _PART_KINDS]
        for key in part:
            if key not in _PART_KINDS and key not in ("thought", "thoughtSignature"):
                raise _unknown(key, here)
        if len(kinds) != 1:
            raise _invalid(f"{here}: exactly one of text, inlineData, fileData, functionCall, functionResponse")
        value = part[kinds[0]]
        if kinds[0] == "text" and not isinstance(value, str):
            raise _invalid(f"{here}.text: must be a string")
        if kinds[0] == "inlineData" and not (isinstance(value, dict) and value.get("mimeType") and value.get("data")):
            raise _invalid(f"{here}.inlineData: mimeType and data are required")
        if kinds[0] == "fileData" and not (isinstance(value, dict) and value.get("fileUri")):
            raise _invalid(f"{here}.fileData: fileUri is required")
        if kinds[0] in ("functionCall", "functionResponse"):
            if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
                raise _invalid(f"{here}.{kinds[0]}.name: Name cannot be empty.")
            payload = value.get("args" if kinds[0] == "functionCall" else "response")
            if payload is not None and not isinstance(payload, dict):
                raise _invalid(f"{here}.{kinds[0]}: args and response must be JSON objects")


def _field(obj: dict[str, Any], name: str, default: Any = None) -> Any:
    """A field under its camelCase or snake_case name."""
    if name in obj:
        return obj[name]
    return obj.get("".join(f"_{c.lower()}" if c.isupper() else c for c in name), default)


def _kind_count(content: dict[str, Any], kind: str) -> int:
    return sum(1 for p in content["parts"] if kind in p)


def signs_calls(model: str) -> bool:
    """Gemini 3 and later sign their function calls and want the signature back."""
    match = re.match(r"gemini-(\d+)", model)
    return match is not None and int(match.group(1)) >= 3


def thought_signature(call: dict[str, Any]) -> str:
    """The simulator's opaque signature of a call: deterministic, so it can be checked."""
    digest = hashlib.blake2b(orjson.dumps([call["name"], call.get("args") or {}]), digest_size=48).digest()
    return base64.b64encode(b"sim-thought:" + digest).decode()


def _bytes(value: Any) -> bytes | None:
    """A proto JSON bytes field: base64 in either alphabet (the SDK sends the URL-safe one)."""
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value.replace("-", "+").replace("_", "/"), validate=True)
    except ValueError:  # binascii.Error is a ValueError
        return None


def _validate_signatures(contents: list[dict[str, Any]]) -> None:
    """Every model turn since the last user text must sign its first function call, with
    the signature the simulator gave it or Google's documented skip value."""
    start = 0
    for i, content in enumerate(contents):
        if content.get("role", "user") == "user" and any("text" in p for p in content["parts"]):
            start = i
    for i, content in enumerate(contents[start:], start):
        calls = [p for p in content["parts"] if "functionCall" in p]
        if content.get("role") != "model" or not calls:
            continue
        signature = calls[0].get("thoughtSignature")
        if signature is None:
            raise _invalid(f"Function call is missing a thought_signature in functionCall parts. This is required "
                           f"for tools to work correctly (contents[{i}]).")
        if signature != SKIP_SIGNATURE and _bytes(signature) != _bytes(thought_signature(calls[0]["functionCall"])):
            raise _invalid(f"Corrupted thought signature (contents[{i}]).")


def _validate(body: dict[str, Any]) -> None:
    for key in body:
        if _camel(key) not in _REQUEST_KEYS:
            raise _unknown(key, "")
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise _invalid("* GenerateContentRequest.contents: contents is not specified")
    for i, content in enumerate(contents):
        if not isinstance(content, dict):
            raise _invalid(f"contents[{i}]: must be an object")
        if content.get("role", "user") not in ("user", "model"):
            raise _invalid(f"Please use a valid role: user, model. (contents[{i}])")
        _validate_parts(content.get("parts"), f"contents[{i}]")
        responses = _kind_count(content, "functionResponse")
        if responses:
            previous = contents[i - 1] if i else None
            calls = _kind_count(previous, "functionCall") if previous is not None else 0
            if previous is None or not calls or previous.get("role") != "model":
                raise _invalid("Please ensure that function response turn comes immediately after a function call "
                               "turn.")
            if calls != responses:
                raise _invalid("Please ensure that the number of function response parts is equal to the number of "
                               "function call parts of the function call turn.")
    system = body.get("systemInstruction")
    if system is not None:
        if not isinstance(system, dict):
            raise _invalid("systemInstruction: must be a Content object")
        _validate_parts(system.get("parts"), "systemInstruction")
    names = _validate_tools(body.get("tools"))
    _validate_tool_config(body.get("toolConfig"), names)
    generation = body.get("generationConfig")
    if generation is not None:
        if not isinstance(generation, dict):
            raise _invalid("generationConfig: must be an object")
        for key in generation:
            if _camel(key) not in _GENERATION_KEYS:
                raise _unknown(key, "generation_config")
        _validate_generation(generation)


def _validate_tools(tools: Any) -> list[str]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _invalid("tools: must be a list")
    names: list[str] = []
    for t, tool in enumerate(tools):
        declarations = tool.get("functionDeclarations") if isinstance(tool, dict) else None
        if not isinstance(declarations, list):
            raise _invalid(f"tools[{t}]: only functionDeclarations are simulated")
        for d, declaration in enumerate(declarations):
            where = f"tools[{t}].function_declarations[{d}]"
            name = declaration.get("name") if isinstance(declaration, dict) else None
            if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
                raise _invalid(f"{where}.name: Invalid function name. Must start with a letter or an underscore "
                               "and be a-z, A-Z, 0-9, underscores, dots, colons or dashes, at most 64 long.")
            for key in declaration:
                if _camel(key) not in ("name", "description", "parameters", "parametersJsonSchema", "response",
                                       "responseJsonSchema"):
                    raise _unknown(key, where)
            if "parameters" in declaration:
                _validate_schema(declaration["parameters"], f"{where}.parameters")
            elif not isinstance(_field(declaration, "parametersJsonSchema", {}), dict):
                raise _invalid(f"{where}.parameters_json_schema: must be a JSON Schema object")
            names.append(name)
    return names


def _validate_tool_config(config: Any, names: list[str]) -> None:
    if config is None:
        return
    calling = config.get("functionCallingConfig") if isinstance(config, dict) else None
    if not isinstance(calling, dict) or calling.get("mode") not in ("AUTO", "ANY", "NONE", "VALIDATED"):
        raise _invalid("tool_config.function_calling_config.mode: must be AUTO, ANY, NONE or VALIDATED")
    allowed = calling.get("allowedFunctionNames")
    if allowed is not None:
        if calling["mode"] != "ANY":
            raise _invalid("allowed_function_names may be set only when mode is ANY")
        if not isinstance(allowed, list) or any(a not in names for a in allowed):
            raise _invalid("allowed_function_names must name declared functions")


def _validate_generation(config: dict[str, Any]) -> None:
    for key in ("temperature", "topP", "presencePenalty", "frequencyPenalty"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise _invalid(f"generation_config.{key}: must be a number")
    temperature = config.get("temperature")
    if temperature is not None and not 0 <= temperature <= 2:
        raise _invalid("generation_config.temperature: must be between 0 and 2")
    for key, low in (("maxOutputTokens", 1), ("candidateCount", 1)):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise _invalid(f"generation_config.{key}: must be a positive integer")
    if config.get("candidateCount", 1) > 8:
        raise _invalid("generation_config.candidate_count: must be at most 8")
    stop = config.get("stopSequences")
    if stop is not None and (not isinstance(stop, list) or len(stop) > 5 or not all(isinstance(s, str) for s in stop)):
        raise _invalid("generation_config.stop_sequences: at most 5 strings")
    mime = config.get("responseMimeType")
    if mime is not None and mime not in ("text/plain", "application/json", "text/x.enum"):
        raise _invalid(f"generation_config.response_mime_type: unsupported {mime!r}")
    if "responseSchema" in config:
        if mime != "application/json":
            raise _invalid("generation_config.response_schema requires response_mime_type application/json")
        _validate_schema(config["responseSchema"], "generation_config.response_schema")


# -- the reply ---------------------------------------------------------------------------------


def _part_texts(parts: list[dict[str, Any]]) -> Iterator[str]:
    for part in parts:
        if isinstance(part.get("text"), str):
            yield part["text"]
        for kind, payload in (("functionCall", "args"), ("functionResponse", "response")):
            if kind in part:
                yield part[kind]["name"]
                yield orjson.dumps(part[kind].get(payload) or {}).decode()


def prompt_tokens(body: dict[str, Any]) -> int:
    """The whole prompt's tokens under the module's token rule."""
    total = sum(text.count_tokens(t) for t in _part_texts((body.get("systemInstruction") or {}).get("parts") or []))
    for tool in body.get("tools") or ():
        for declaration in tool.get("functionDeclarations") or ():
            total += text.count_tokens(declaration["name"]) + text.count_tokens(declaration.get("description") or "")
    for content in body["contents"]:
        total += text.MESSAGE_OVERHEAD + sum(text.count_tokens(t) for t in _part_texts(content["parts"]))
    return total


def _last_user_text(contents: list[dict[str, Any]]) -> str:
    for content in reversed(contents):
        if content.get("role", "user") == "user":
            return "\n".join(p["text"] for p in content["parts"] if isinstance(p.get("text"), str))
    return ""


def _sample(schema: Any) -> Any:
    if isinstance(schema, dict) and isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = str(schema.get("type", "")).upper() if isinstance(schema, dict) else ""
    return {"INTEGER": 1, "NUMBER": 1.5, "BOOLEAN": True, "ARRAY": [], "OBJECT": {}}.get(kind, "Paris")


def function_args(schema: Any) -> dict[str, Any]:
    """Small deterministic args: the required (else first) properties filled in."""
    properties = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(properties, dict) or not properties:
        return {}
    required = [p for p in schema.get("required") or () if p in properties]
    return {name: _sample(properties[name]) for name in required or list(properties)[:1]}


@dataclass
class _Reply:
    model: str
    response_id: str
    parts: list[dict[str, Any]]  # one candidate's parts (a text, or a function call)
    finish_reason: str
    candidates: int
    prompt: int
    cached: int
    thoughts: int
    omit_usage: bool

    @property
    def output_tokens(self) -> int:
        """One candidate's output tokens."""
        total = 0
        for part in self.parts:
            if "functionCall" in part:
                call = part["functionCall"]
                total += text.call_tokens(call["name"], orjson.dumps(call["args"]).decode())
            else:
                total += text.count_tokens(part["text"])
        return total

    def usage(self, final: bool = True) -> dict[str, Any]:
        if not final:  # mid-stream chunks carry the prompt's counts only, as Gemini's do
            return {"promptTokenCount": self.prompt, "totalTokenCount": self.prompt}
        output = self.output_tokens * self.candidates
        usage: dict[str, Any] = {"promptTokenCount": self.prompt, "candidatesTokenCount": output,
                                 "totalTokenCount": self.prompt + output + self.thoughts,
                                 "promptTokensDetails": [{"modality": "TEXT", "tokenCount": self.prompt}]}
        if self.cached:
            usage["cachedContentTokenCount"] = self.cached
        if self.thoughts:
            usage["thoughtsTokenCount"] = self.thoughts
        return usage

    def response(self, parts: list[dict[str, Any]], finish: bool, final_usage: bool = True) -> dict[str, Any]:
        candidates = []
        for index in range(self.candidates):
            candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": index}
            if finish:
                candidate["finishReason"] = self.finish_reason
            candidates.append(candidate)
        out: dict[str, Any] = {"candidates": candidates}
        if not self.omit_usage:
            out["usageMetadata"] = self.usage(final_usage)
        out["modelVersion"] = self.model
        out["responseId"] = self.response_id
        return out


def _reply(body: dict[str, Any], model: str, knobs: wire.Knobs, request: web.Request) -> _Reply:
    contents = body["contents"]
    generation = body.get("generationConfig") or {}
    prompt = prompt_tokens(body)
    reply_tokens = wire.header_int(request, "x-sim-reply-tokens", text.DEFAULT_REPLY_TOKENS, 1, wire.MAX_TOKENS_LIMIT)
    budget = generation.get("maxOutputTokens", wire.MAX_TOKENS_LIMIT)
    last_user = _last_user_text(contents)
    parts: list[dict[str, Any]] = []
    finish = "STOP"
    declarations = [d for t in body.get("tools") or () for d in t.get("functionDeclarations") or ()]
    calling = (body.get("toolConfig") or {}).get("functionCallingConfig") or {"mode": "AUTO"}
    wants_call = calling["mode"] == "ANY" or request.headers.get("x-sim-tool-call") == "1" \
        or _WEATHER_RE.search(last_user) is not None
    if declarations and calling["mode"] != "NONE" and wants_call:
        allowed = calling.get("allowedFunctionNames") or [declarations[0]["name"]]
        declaration = next(d for d in declarations if d["name"] == allowed[0])
        schema = declaration.get("parameters") or _field(declaration, "parametersJsonSchema")
        call = {"name": declaration["name"], "args": function_args(schema)}
        parts = [{"functionCall": call, "thoughtSignature": thought_signature(call)} if signs_calls(model)
                 else {"functionCall": call}]
    else:
        length = min(reply_tokens, budget)
        reply = text.reply_text(last_user, length)
        if length < reply_tokens:
            finish = "MAX_TOKENS"
        hits = [(reply.find(s), s) for s in generation.get("stopSequences") or () if s and s in reply]
        if hits:
            reply, finish = reply[:min(hits)[0]], "STOP"
        parts = [{"text": reply}]
    return _Reply(
        model=model, response_id=uuid.uuid4().hex[:22], parts=parts, finish_reason=finish,
        candidates=generation.get("candidateCount", 1), prompt=prompt, cached=min(knobs.usage.cached_tokens, prompt),
        thoughts=knobs.usage.reasoning_tokens, omit_usage=knobs.usage.omit,
    )


def stream_events(reply: _Reply, chunks: int, fail: int | None = None) -> Iterator[dict[str, Any] | None]:
    """The streamed responses; ``None`` marks a pause point. ``fail``: after the first
    event, an error event with that status ends the stream (how Gemini reports a failure
    once the 200 went out)."""
    if "functionCall" in reply.parts[0]:  # Gemini sends a call whole, in one event
        yield reply.response(reply.parts, finish=True)
        return
    pieces = text.split_chunks(reply.parts[0]["text"], chunks)
    for i, piece in enumerate(pieces):
        if i:
            yield None
        if i and fail is not None:
            yield {"error": {"code": fail, "message": wire.simulated_error(fail, "x-sim-stream-error header"),
                             "status": _STATUS_NAMES.get(fail, "INTERNAL")}}
            return
        last = i == len(pieces) - 1
        yield reply.response([{"text": piece}], finish=last, final_usage=last)


async def _write_stream(request: web.Request, knobs: wire.Knobs, settings: wire.SimSettings,
                        events: Iterator[dict[str, Any] | None]) -> web.StreamResponse:
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    resp, compressor = await wire.open_stream(request, knobs.compress, headers)
    try:
        async for event in wire.paced(events, request, settings, knobs.chunk_delay):
            chunk = b"data: " + orjson.dumps(event) + b"\r\n\r\n"
            await resp.write(compressor.write(chunk) if compressor else chunk)
        if compressor:
            await resp.write(compressor.end())
        await resp.write_eof()
    except ConnectionError:
        pass  # the client went away mid-stream
    return resp


# -- embeddings and token counting -------------------------------------------------------------


def _embed_text(request: Any, where: str) -> tuple[str, int]:
    if not isinstance(request, dict):
        raise _invalid(f"{where}: must be an object")
    content = request.get("content")
    if not isinstance(content, dict):
        raise _invalid(f"{where}.content: content is not specified")
    _validate_parts(content.get("parts"), f"{where}.content")
    dimensions = request.get("outputDimensionality", DEFAULT_DIMENSIONS)
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= 3072:
        raise _invalid(f"{where}.output_dimensionality: must be between 1 and 3072")
    return "\n".join(p["text"] for p in content["parts"] if isinstance(p.get("text"), str)), dimensions


def _embedding(request: Any, where: str) -> dict[str, Any]:
    seed, dimensions = _embed_text(request, where)
    return {"values": text.embedding_vector(seed, dimensions)}


def _batch_embeddings(body: dict[str, Any], model: str) -> dict[str, Any]:
    requests = body.get("requests")
    if not isinstance(requests, list) or not requests:
        raise _invalid("requests: at least one request is required")
    if len(requests) > 100:
        raise _invalid("requests: at most 100 requests can be in one batch")
    for i, request in enumerate(requests):
        if not isinstance(request, dict) or request.get("model") != f"models/{model}":
            raise _invalid(f"requests[{i}].model: Model names in the requests must match the model in the URL "
                           f"(models/{model}).")
    return {"embeddings": [_embedding(r, f"requests[{i}]") for i, r in enumerate(requests)]}


def _count_tokens(body: dict[str, Any]) -> dict[str, Any]:
    inner = body.get("generateContentRequest")
    request = inner if isinstance(inner, dict) else {"contents": body.get("contents")}
    _validate({k: v for k, v in request.items() if k != "model"})
    tokens = prompt_tokens(request)
    return {"totalTokens": tokens, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": tokens}]}


def _models_list() -> dict[str, Any]:
    return {"models": [
        {"name": f"models/{m}", "baseModelId": m, "version": "001", "displayName": m,
         "supportedGenerationMethods": ["embedContent"] if "embedding" in m else ["generateContent", "countTokens"]}
        for m in MODELS
    ]}


# -- dispatch ----------------------------------------------------------------------------------


def _check_key(request: web.Request) -> None:
    key = request.headers.get("x-goog-api-key") or request.query.get("key")
    if not key:
        raise ApiError(403, "Method doesn't allow unregistered callers (callers without established identity). "
                            "Please use API Key or other form of API consumer identity to call this API.")
    if key.startswith("invalid"):
        raise ApiError(400, "API key not valid. Please pass a valid API key.",
                       [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                         "domain": "googleapis.com"}])


async def dispatch(request: web.Request, settings: wire.SimSettings, vertex: bool = False) -> web.StreamResponse:
    """Every Gemini method; each failure becomes a Gemini-shaped error. `vertex`: behind
    Vertex AI, whose front end (``vertex_api``) already checked the caller's token."""
    try:
        if not vertex:
            _check_key(request)
        knobs = wire.read_knobs(request, settings)
        if _LIST_RE.search(request.path) and request.method == "GET":
            return wire.json_reply(orjson.dumps(_models_list()), knobs.compress)
        match = _METHOD_RE.search(request.path)
        if match is None or request.method != "POST":
            raise ApiError(404, f"{request.method} {request.path} is not a Gemini API method.")
        model, method = match.group("model"), match.group("method")
        status = wire.model_error(model)
        if status is not None:
            raise ApiError(status, wire.simulated_error(status, f"model {model}"))
        await wire.wait_first_byte(knobs)
        if knobs.error_status is not None:
            raise ApiError(knobs.error_status, wire.simulated_error(knobs.error_status, "x-sim-error header"))
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            raise _invalid(f"Invalid JSON payload received. {exc}") from None
        if not isinstance(body, dict):
            raise _invalid("Invalid JSON payload received. The body must be a JSON object.")
        if method in ("generateContent", "streamGenerateContent"):
            _validate(body)
            if signs_calls(model):
                _validate_signatures(body["contents"])
            reply = _reply(body, model, knobs, request)
            if method == "streamGenerateContent":
                if request.query.get("alt") != "sse":
                    raise _invalid("The simulator streams only as SSE (?alt=sse), as the SDKs ask.")
                fail = wire.header_int(request, "x-sim-stream-error", 0, 400, 599) or None
                return await _write_stream(request, knobs, settings, stream_events(reply, knobs.chunks, fail))
            return wire.json_reply(orjson.dumps(reply.response(reply.parts, finish=True)), knobs.compress)
        if method == "embedContent":
            return wire.json_reply(orjson.dumps({"embedding": _embedding(body, "")}), knobs.compress)
        if method == "batchEmbedContents":
            return wire.json_reply(orjson.dumps(_batch_embeddings(body, model)), knobs.compress)
        if method == "countTokens":
            return wire.json_reply(orjson.dumps(_count_tokens(body)), knobs.compress)
        raise ApiError(404, f"Method {method} is not found for model models/{model}.")
    except ApiError as exc:
        return error_response(exc.status, exc.message, exc.details)
    except wire.KnobError as exc:
        return error_response(400, str(exc))
    except web.HTTPException as exc:
        return error_response(exc.status, exc.reason)
