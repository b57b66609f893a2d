"""OpenAI chat completions to Google's Gemini API (generateContent), and the answer back.

``chat_to_gemini`` rewrites the request, ``gemini_to_chat`` the JSON reply and
``error_to_openai`` the errors; the SSE stream is gemini_stream.py's. Pure functions, no
I/O. The path is built by one overridable method (``ChatToGemini.path``) so that Gemini
on Vertex AI, the same body under another path and credential, reuses the class.
"""

from __future__ import annotations

import base64
import binascii
import mimetypes
import re
import time
import uuid
from typing import Any
from urllib.parse import quote, urlsplit

import orjson

from extproc.schemas.openai import (
    as_count,
    bad_request,
    error_body,
    max_output_tokens,
    usage_object,
)
from extproc.translators.base import StreamTranslator, Translator, UpstreamRequest
from extproc.translators.chat_request import (
    data_url,
    function_tools,
    messages_of,
    texts,
    tool_call_id,
    tool_calls,
    user_parts,
)
from extproc.usage import TokenUsage

# -- paths -----------------------------------------------------------------------------------


def model_id(model: str) -> str:
    """The bare model id: clients of the google-genai SDK may say ``models/gemini-...``."""
    return model.removeprefix("models/")


def model_path(prefix: str, model: str, method: str) -> str:
    """``{prefix}/models/{model}:{method}``, the model percent-encoded so it stays one segment."""
    return f"{prefix}/models/{quote(model_id(model), safe='')}:{method}"


def generate_method(stream: bool) -> str:
    """The generate method (with its query): streams are asked for as SSE."""
    return "streamGenerateContent?alt=sse" if stream else "generateContent"


# -- thought signatures ------------------------------------------------------------------------
# Gemini 3 models attach an opaque thoughtSignature to a function call and refuse the next
# request unless that call comes back with it. OpenAI's history has no place for it but
# the tool call id, which clients send back verbatim: the id carries the signature (as
# base64url, so the id stays [A-Za-z0-9_-] and other providers accept it too).

_CALL_ID = re.compile(r"call_[0-9a-f]{24}__([A-Za-z0-9_-]+)")
# Google's documented stand-in for a call whose signature is unknown (history written by
# another model, or by a client that made up its own ids).
SKIP_SIGNATURE = "skip_thought_signature_validator"
_SIGNING_MODEL = re.compile(r"(?:^|/)gemini-(\d+)")


def call_id(signature: Any) -> str:
    """A fresh OpenAI tool call id, carrying Gemini's thought signature if there is one."""
    base = f"call_{uuid.uuid4().hex[:24]}"
    if not isinstance(signature, str) or not signature:
        return base
    try:  # proto JSON bytes: standard base64, or the URL-safe alphabet (which the SDK sends)
        raw = base64.b64decode(signature.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        return base  # not base64: Gemini's signatures always are
    return f"{base}__{base64.urlsafe_b64encode(raw).decode().rstrip('=')}"


def signature_of(tool_call_id: str) -> str | None:
    """The thought signature a tool call id carries (standard base64, as Gemini sent it)."""
    match = _CALL_ID.fullmatch(tool_call_id)
    if match is None:
        return None
    packed = match.group(1)
    try:
        raw = base64.urlsafe_b64decode(packed + "=" * (-len(packed) % 4))
    except (binascii.Error, ValueError):
        return None
    return base64.b64encode(raw).decode()


def requires_signatures(model: str) -> bool:
    """Gemini 3 and later refuse a current-turn function call without its signature."""
    match = _SIGNING_MODEL.search(model)
    return match is not None and int(match.group(1)) >= 3


# -- OpenAI chat request -> GenerateContentRequest ---------------------------------------------

_TOOL_MODES = {"auto": "AUTO", "required": "ANY", "none": "NONE"}
# Keys of Gemini's Schema object (an OpenAPI 3.0 subset); other JSON Schema keywords are
# dropped because the API refuses unknown fields.
_SCHEMA_KEYS = frozenset({
    "type", "format", "title", "description", "nullable", "enum", "maxItems", "minItems", "properties",
    "required", "minProperties", "maxProperties", "minLength", "maxLength", "pattern", "example", "anyOf",
    "propertyOrdering", "default", "items", "minimum", "maximum",
})
_SCHEMA_TYPES = frozenset({"string", "number", "integer", "boolean", "array", "object"})


def chat_to_gemini(body: dict[str, Any], model: str = "") -> dict[str, Any]:
    """An OpenAI chat-completions request as a Gemini GenerateContentRequest body.

    The model and streaming go in the path; ``model`` decides whether function calls
    need a thought signature. Raises RequestError (400) for what Gemini
    cannot express, rather than letting the backend answer in a shape the client cannot read.
    """
    messages = messages_of(body)
    for legacy in ("functions", "function_call"):
        if body.get(legacy) is not None:
            raise bad_request(f"'{legacy}' is deprecated and not translated for Gemini models; use 'tools' and "
                              "'tool_choice'.", param=legacy)
    if body.get("logprobs") is True:
        raise bad_request("logprobs are not translated for Gemini models.", param="logprobs")
    system: list[str] = []
    contents: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}  # tool call id -> function name (functionResponse needs the name)
    for role, where, message in messages:
        if role in ("system", "developer"):
            system.extend(t for t in texts(message.get("content"), f"{where}.content") if t)
            continue
        if role == "user":
            gemini_role = "user"
            parts = [{"text": part.value} if part.kind == "text" else _image_part(part.value, part.where)
                     for part in user_parts(message.get("content"), f"{where}.content", "Gemini models")]
        elif role == "assistant":
            gemini_role, parts = "model", _model_parts(message, where, call_names, requires_signatures(model))
        else:  # tool
            gemini_role, parts = "user", [_function_response(message, where, call_names)]
        if not parts:
            continue  # Gemini refuses a turn without parts; an empty message says nothing
        if contents and contents[-1]["role"] == gemini_role:  # one turn per speaker, as Gemini expects
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": gemini_role, "parts": parts})
    if not contents:
        raise bad_request("'messages' must contain a user or assistant message with content.", param="messages")
    out: dict[str, Any] = {"contents": contents}
    if system:
        out["systemInstruction"] = {"parts": [{"text": t} for t in system]}
    tools = body.get("tools")
    declarations = _function_declarations(tools) if tools is not None else []
    if declarations:
        out["tools"] = [{"functionDeclarations": declarations}]
    tool_config = _tool_config(body.get("tool_choice"), {d["name"] for d in declarations})
    if tool_config is not None:
        out["toolConfig"] = tool_config
    generation = _generation_config(body, model)
    if generation:
        out["generationConfig"] = generation
    return out


def _image_part(url: str, where: str) -> dict[str, Any]:
    """A data: URL as inlineData; an http(s) URL as fileData, its type guessed from the path."""
    if url.startswith(("http://", "https://")):
        mime, _ = mimetypes.guess_type(urlsplit(url).path)
        if mime is None or not mime.startswith("image/"):
            raise bad_request(
                f"{where}.url: the image type cannot be told from the URL (use a path ending in .png, .jpg, "
                ".webp, ... or a base64 data: URL).",
                param=where, code="invalid_image_url",
            )
        return {"fileData": {"mimeType": mime, "fileUri": url}}
    mime, data = data_url(url, where)
    if not mime.startswith("image/"):
        raise bad_request(f"{where}.url: images must be base64 data: URLs of an image/* type.", param=where)
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where}.url: the image data is not valid base64.", param=where) from None
    return {"inlineData": {"mimeType": mime, "data": data}}


def _model_parts(
    message: dict[str, Any], where: str, call_names: dict[str, str], signed: bool
) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"text": t} for t in texts(message.get("content"), f"{where}.content") if t]
    for call in tool_calls(message, where):
        call_names[call.id] = call.name
        part: dict[str, Any] = {"functionCall": {"name": call.name, "args": call.arguments}}
        signature = signature_of(call.id)
        if signature is not None:
            part["thoughtSignature"] = signature
        parts.append(part)
    calls_parts = [p for p in parts if "functionCall" in p]
    if signed and calls_parts and not any("thoughtSignature" in p for p in calls_parts):
        calls_parts[0]["thoughtSignature"] = SKIP_SIGNATURE  # only a parallel call's first part is signed
    return parts


def _function_response(message: dict[str, Any], where: str, call_names: dict[str, str]) -> dict[str, Any]:
    """A tool message as a functionResponse part, named after the call it answers."""
    call_id = tool_call_id(message, where)
    name = call_names.get(call_id)
    if name is None:
        raise bad_request(
            f"{where}.tool_call_id {call_id!r} answers no tool call of an earlier assistant message "
            "(Gemini needs the function's name).",
            param=f"{where}.tool_call_id",
        )
    text = "".join(texts(message.get("content"), f"{where}.content"))
    try:
        value: Any = orjson.loads(text) if text else None
    except orjson.JSONDecodeError:
        value = text
    # Gemini's response is a JSON object: an object result passes as is, anything else is wrapped.
    response = value if isinstance(value, dict) else {"content": value if value is not None else ""}
    return {"functionResponse": {"name": name, "response": response}}


def gemini_schema(schema: Any, where: str) -> dict[str, Any]:
    """A JSON Schema as Gemini's Schema object: unknown keywords dropped, ``type: [T, "null"]``
    as ``nullable``, ``const`` as a one-value enum; ``$ref`` is refused (Gemini has no references)."""
    if not isinstance(schema, dict):
        raise bad_request(f"{where} must be a JSON Schema object.", param=where)
    if "$ref" in schema:
        raise bad_request(f"{where}: JSON Schema references ($ref) are not supported for Gemini models; "
                          "inline the definitions.", param=where)
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "type" and isinstance(value, list):
            kinds = [v for v in value if v != "null"]
            if len(kinds) != 1:
                raise bad_request(f"{where}.type: Gemini takes one type (optionally with null).", param=where)
            out["type"] = kinds[0]
            if len(kinds) < len(value):
                out["nullable"] = True
        elif key == "const":
            out["enum"] = [value]
        elif key == "properties" and isinstance(value, dict):
            out["properties"] = {name: gemini_schema(sub, f"{where}.properties.{name}") for name, sub in value.items()}
        elif key == "items":
            out["items"] = gemini_schema(value, f"{where}.items")
        elif key == "anyOf" and isinstance(value, list):
            out["anyOf"] = [gemini_schema(sub, f"{where}.anyOf[{k}]") for k, sub in enumerate(value)]
        elif key in _SCHEMA_KEYS:
            out[key] = value
    if isinstance(out.get("type"), str):
        if out["type"] not in _SCHEMA_TYPES:
            raise bad_request(f"{where}.type {out['type']!r} is not supported for Gemini models.", param=where)
        out["type"] = out["type"].upper()
    if "enum" in out:  # Gemini's enums are strings
        out["enum"] = [v if isinstance(v, str) else orjson.dumps(v).decode() for v in out["enum"]]
        out.setdefault("type", "STRING")
    return out


def _function_declarations(tools: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for tool in function_tools(tools, "Gemini models"):
        declaration: dict[str, Any] = {"name": tool.name}
        if tool.description:
            declaration["description"] = tool.description
        if tool.parameters is not None:
            schema = gemini_schema(tool.parameters, f"{tool.where}.function.parameters")
            if schema.get("properties"):  # Gemini refuses an OBJECT without properties: leave it out
                declaration["parameters"] = schema
        out.append(declaration)
    return out


def _tool_config(choice: Any, names: set[str]) -> dict[str, Any] | None:
    if choice is None:
        return None
    if isinstance(choice, str) and choice in _TOOL_MODES:
        if not names:
            if choice == "required":
                raise bad_request("'tool_choice' requires 'tools'.", param="tool_choice")
            return None
        return {"functionCallingConfig": {"mode": _TOOL_MODES[choice]}}
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or name not in names:
            raise bad_request("'tool_choice' names a function that is not in 'tools'.", param="tool_choice")
        return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}
    raise bad_request(
        "'tool_choice' must be 'auto', 'required', 'none' or {\"type\": \"function\", ...}.", param="tool_choice"
    )


def _number(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(f"'{key}' must be a number.", param=key)
    return value


# reasoning_effort -> Gemini 2.5's thinkingBudget (tokens), as Google's own OpenAI layer maps it
_THINKING_BUDGETS = {"none": 0, "minimal": 0, "low": 1024, "medium": 8192, "high": 24576}
_THINKING_LEVELS = {"none": "MINIMAL", "minimal": "MINIMAL", "low": "LOW", "medium": "MEDIUM", "high": "HIGH",
                    "xhigh": "XHIGH"}


def _thinking(effort: Any, model: str) -> dict[str, Any] | None:
    """reasoning_effort as thinkingConfig: a level for Gemini 3 and later, a budget before."""
    if effort is None:
        return None
    if requires_signatures(model):  # the same generations: Gemini 3+ think in levels
        if effort in _THINKING_LEVELS:
            return {"thinkingLevel": _THINKING_LEVELS[effort]}
    elif effort in _THINKING_BUDGETS:
        return {"thinkingBudget": _THINKING_BUDGETS[effort]}
    raise bad_request("'reasoning_effort' must be 'none', 'minimal', 'low', 'medium' or 'high'.",
                      param="reasoning_effort")


def _generation_config(body: dict[str, Any], model: str) -> dict[str, Any]:
    config: dict[str, Any] = {}
    thinking = _thinking(body.get("reasoning_effort"), model)
    if thinking is not None:
        config["thinkingConfig"] = thinking
    for key, field in (("temperature", "temperature"), ("top_p", "topP"),
                       ("presence_penalty", "presencePenalty"), ("frequency_penalty", "frequencyPenalty")):
        value = _number(body, key)
        if value is not None:
            config[field] = value
    max_tokens = max_output_tokens(body)
    if max_tokens is not None:
        config["maxOutputTokens"] = max_tokens
    stop = body.get("stop")
    if isinstance(stop, str):
        if stop:
            config["stopSequences"] = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if any(stop):
            config["stopSequences"] = [s for s in stop if s]
    elif stop is not None:
        raise bad_request("'stop' must be a string or an array of strings.", param="stop")
    n = body.get("n")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise bad_request("'n' must be a positive integer.", param="n")
        if n != 1:
            config["candidateCount"] = n
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise bad_request("'seed' must be an integer.", param="seed")
        config["seed"] = seed
    config.update(_response_format(body.get("response_format")))
    return config


def _response_format(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"responseMimeType": "application/json"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is None:
            return {"responseMimeType": "application/json"}
        return {"responseMimeType": "application/json",
                "responseSchema": gemini_schema(schema, "response_format.json_schema.schema")}
    raise bad_request("'response_format.type' must be 'text', 'json_object' or 'json_schema'.",
                      param="response_format")


# -- GenerateContentResponse -> OpenAI chat completion ------------------------------------------

_FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "IMAGE_PROHIBITED_CONTENT": "content_filter",
}


def finish_reason(reason: Any, called: bool) -> str | None:
    """OpenAI's finish_reason for a Gemini finishReason (None while still generating);
    a turn that ended in function calls is "tool_calls", as OpenAI reports it."""
    if not isinstance(reason, str) or not reason:
        return None
    mapped = _FINISH_REASONS.get(reason, "stop")
    return "tool_calls" if called and mapped == "stop" else mapped


def usage_from_gemini(meta: Any) -> TokenUsage | None:
    """Gemini's usageMetadata as TokenUsage, counted the way OpenAI counts.

    promptTokenCount already includes cachedContentTokenCount (OpenAI's cached_tokens is
    likewise a part of prompt_tokens); thinking tokens are output tokens, as OpenAI's
    reasoning_tokens are part of completion_tokens. Tokens of tool-use prompts (Google
    Search results and the like) count as prompt, so prompt + completion = total.
    """
    if not isinstance(meta, dict):
        return None
    prompt = as_count(meta.get("promptTokenCount")) + as_count(meta.get("toolUsePromptTokenCount"))
    thoughts = as_count(meta.get("thoughtsTokenCount"))
    output = as_count(meta.get("candidatesTokenCount")) + thoughts
    return TokenUsage(
        input_tokens=prompt,
        output_tokens=output,
        total_tokens=as_count(meta.get("totalTokenCount")) or prompt + output,
        cached_input_tokens=as_count(meta.get("cachedContentTokenCount")),
        reasoning_tokens=thoughts,
    )


def tool_call(part: dict[str, Any]) -> dict[str, Any]:
    """A functionCall part as an OpenAI tool call; its id carries the part's thought signature."""
    call = part["functionCall"]
    return {
        "id": call_id(part.get("thoughtSignature")),
        "type": "function",
        "function": {"name": str(call.get("name") or ""), "arguments": orjson.dumps(call.get("args") or {}).decode()},
    }


def completion_id(response_id: Any) -> str:
    return f"chatcmpl-{response_id if isinstance(response_id, str) and response_id else uuid.uuid4().hex}"


def model_name(response: dict[str, Any], fallback: str) -> str:
    version = response.get("modelVersion")
    return version if isinstance(version, str) and version else fallback


def gemini_to_chat(response: Any, model: str) -> dict[str, Any]:
    """A GenerateContentResponse as an OpenAI ``chat.completion`` (one choice per candidate)."""
    if not isinstance(response, dict):
        response = {}
    candidates = response.get("candidates")
    choices = []
    for position, candidate in enumerate(candidates if isinstance(candidates, list) else ()):
        if not isinstance(candidate, dict):
            continue
        texts: list[str] = []
        thoughts: list[str] = []
        calls: list[dict[str, Any]] = []
        content = candidate.get("content")
        parts = content.get("parts") if isinstance(content, dict) else None
        for part in parts if isinstance(parts, list) else ():
            if not isinstance(part, dict):
                continue
            if isinstance(part.get("functionCall"), dict):
                calls.append(tool_call(part))
            elif isinstance(part.get("text"), str):
                (thoughts if part.get("thought") is True else texts).append(part["text"])
        message: dict[str, Any] = {
            "role": "assistant", "content": "".join(texts) if texts or not calls else None, "refusal": None,
        }
        if calls:
            message["tool_calls"] = calls
        if thoughts:  # the de-facto field (DeepSeek, vLLM) for thinking text
            message["reasoning_content"] = "".join(thoughts)
        index = candidate.get("index")
        choices.append({
            "index": index if isinstance(index, int) and not isinstance(index, bool) else position,
            "message": message,
            "logprobs": None,
            "finish_reason": finish_reason(candidate.get("finishReason"), bool(calls)) or "stop",
        })
    if not choices:  # the prompt itself was blocked (promptFeedback.blockReason): nothing was generated
        choices.append({"index": 0, "message": {"role": "assistant", "content": None, "refusal": None},
                        "logprobs": None, "finish_reason": "content_filter"})
    out: dict[str, Any] = {
        "id": completion_id(response.get("responseId")),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name(response, model),
        "choices": choices,
    }
    usage = usage_from_gemini(response.get("usageMetadata"))
    if usage is not None:
        out["usage"] = usage_object(usage)
    return out


# -- errors ------------------------------------------------------------------------------------

# Gemini's (google.rpc) status -> OpenAI (type, code).
_ERRORS: dict[str, tuple[str, str | None]] = {
    "INVALID_ARGUMENT": ("invalid_request_error", None),
    "FAILED_PRECONDITION": ("invalid_request_error", "failed_precondition"),
    "OUT_OF_RANGE": ("invalid_request_error", None),
    "UNAUTHENTICATED": ("authentication_error", "invalid_api_key"),
    "PERMISSION_DENIED": ("permission_error", "permission_denied"),
    "NOT_FOUND": ("invalid_request_error", "not_found"),
    "RESOURCE_EXHAUSTED": ("rate_limit_error", "rate_limit_exceeded"),
    "CANCELLED": ("server_error", "cancelled"),
    "DEADLINE_EXCEEDED": ("server_error", "timeout"),
    "UNAVAILABLE": ("server_error", "service_unavailable"),
    "INTERNAL": ("server_error", None),
}
_BY_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
              429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL", 503: "UNAVAILABLE",
              504: "DEADLINE_EXCEEDED"}
_MAX_ERROR_TEXT = 1000


def error_kind(status_name: Any, status: int) -> tuple[str, str | None]:
    """OpenAI's (type, code) for a Gemini error status name, else for the HTTP status."""
    if isinstance(status_name, str) and status_name in _ERRORS:
        return _ERRORS[status_name]
    if status in _BY_STATUS:
        return _ERRORS[_BY_STATUS[status]]
    return ("server_error" if status >= 500 else "invalid_request_error"), None


def _api_key_invalid(error: dict[str, Any]) -> bool:
    """Gemini answers a bad key with 400 INVALID_ARGUMENT and reason API_KEY_INVALID in details."""
    details = error.get("details")
    return isinstance(details, list) and any(
        isinstance(d, dict) and d.get("reason") == "API_KEY_INVALID" for d in details)


def error_parts(error: Any, status: int) -> tuple[str | None, str, str | None]:
    """(message, OpenAI type, code) of a Gemini ``error`` object."""
    if not isinstance(error, dict):
        error = {}
    message = error.get("message")
    error_type, code = error_kind(error.get("status"), status)
    if _api_key_invalid(error):
        code = "invalid_api_key"
    return (message if isinstance(message, str) and message else None), error_type, code


def error_to_openai(status: int, body: bytes) -> bytes:
    """A Gemini error response (``{"error": {"code", "message", "status"}}``, or a list of
    one such object) as OpenAI's error JSON with the same status; never raises."""
    try:
        parsed: Any = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, list) and parsed:
        parsed = parsed[0]
    error = parsed.get("error") if isinstance(parsed, dict) else None
    message, error_type, code = error_parts(error, status)
    if message is None:
        text = bytes(body[:_MAX_ERROR_TEXT]).decode("utf-8", "replace").strip() if parsed is None else ""
        message = text or f"The Gemini backend answered with HTTP status {status}."
    return error_body(status, message, error_type, code)


# -- the translator ----------------------------------------------------------------------------


class ChatToGemini(Translator):
    """OpenAI chat to Gemini's generateContent / streamGenerateContent (SSE)."""

    translates_response = True
    _candidates = 1

    def path(self, model: str, stream: bool) -> str:
        """The request path (with its query). Vertex AI's Gemini overrides this only."""
        return model_path(self.attempt.target.path_prefix, model, generate_method(stream))

    def request(self, body: dict[str, Any], raw: bytes) -> UpstreamRequest:
        translated = chat_to_gemini(body, self.attempt.model)
        self._candidates = (translated.get("generationConfig") or {}).get("candidateCount", 1)
        return UpstreamRequest(self.path(self.attempt.model, self.attempt.stream), orjson.dumps(translated),
                               [("content-type", b"application/json")])

    def stream_translator(self) -> StreamTranslator | None:
        from extproc.translators.gemini_stream import GeminiStreamTranslator

        return GeminiStreamTranslator(self.attempt.model, self.attempt.include_usage, self._candidates)

    def whole_response(self, status: int, body: bytes, error_type: str | None) -> bytes:
        if status >= 300:
            return error_to_openai(status, body)
        return orjson.dumps(gemini_to_chat(orjson.loads(body), self.attempt.model))
