"""OpenAI chat completions to Amazon Bedrock's Converse API, and the answer back.

The request (body and path), the JSON reply, errors and usage are mapped here, as pure
functions that tests prove against botocore, the AWS SDK's own reference code; the
binary event stream of ConverseStream is chat_to_bedrock_stream.py's. Only the mapping
between the two schemas is ours. botocore (~5 MiB per worker) is imported on first use
only (the model's path, the stream's frames, the SigV4 signature: extproc/sigv4.py), so
workers without a Bedrock backend never load it.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from typing import Any

import orjson

from extproc.schemas.openai import (
    as_count,
    bad_request,
    error_body,
    max_output_tokens,
    usage_object,
)
from extproc.translators.base import StreamTranslator, Translator, UpstreamRequest
from extproc.usage import TokenUsage

EVENT_STREAM_CONTENT_TYPE = "application/vnd.amazon.eventstream"

# -- request -----------------------------------------------------------------------


def converse_path(model: str, stream: bool) -> str:
    """The request path for a model, percent-encoded exactly as botocore renders the
    non-greedy ``{modelId}`` label (``:`` -> ``%3A``, ``/`` of an ARN -> ``%2F``), so a
    signature computed over it matches what AWS recomputes."""
    from botocore.utils import (
        percent_encode,  # botocore: loaded by the first Bedrock request
    )

    return f"/model/{percent_encode(model)}/{'converse-stream' if stream else 'converse'}"


_IMAGE_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg", "image/gif": "gif",
                  "image/webp": "webp"}


def _text_of(content: Any, role: str, index: int) -> list[str]:
    """Text parts of a message that may only carry text (system, developer, tool)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        out: list[str] = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            else:
                raise bad_request(f"messages[{index}]: a {role} message may only contain text parts.", "messages")
        return out
    raise bad_request(f"messages[{index}].content must be a string or an array of content parts.", "messages")


def _image_block(part: dict[str, Any], index: int) -> dict[str, Any]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise bad_request(f"messages[{index}]: image_url.url must be a string.", "messages")
    if not url.startswith("data:"):
        raise bad_request(
            f"messages[{index}]: Bedrock Converse accepts images only inline, as base64 data: URLs.",
            "messages", "unsupported_image_url",
        )
    header, comma, data = url[5:].partition(",")
    mime, _, encoding = header.partition(";")
    image_format = _IMAGE_FORMATS.get(mime.strip().lower())
    if not comma or encoding.strip().lower() != "base64" or image_format is None:
        raise bad_request(
            f"messages[{index}]: images must be base64 data: URLs of type png, jpeg, gif or webp.",
            "messages", "invalid_image_format",
        )
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"messages[{index}]: the image data is not valid base64.", "messages") from None
    # The REST body carries blobs as base64 text, so the client's encoding passes through.
    return {"image": {"format": image_format, "source": {"bytes": data}}}


def _user_blocks(content: Any, index: int) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}] if content else []
    if not isinstance(content, list):
        raise bad_request(f"messages[{index}].content must be a string or an array of content parts.", "messages")
    blocks: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if part["text"]:
                blocks.append({"text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image_block(part, index))
        else:
            raise bad_request(
                f"messages[{index}]: content part type {kind!r} is not supported by Bedrock Converse.", "messages"
            )
    return blocks


def _tool_use_block(call: Any, index: int) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(call.get("id"), str) \
            or not isinstance(function.get("name"), str):
        raise bad_request(f"messages[{index}].tool_calls: each call needs an id and a function name.", "messages")
    arguments = function.get("arguments") or "{}"
    try:
        parsed = orjson.loads(arguments) if isinstance(arguments, str) else None
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise bad_request(
            f"messages[{index}].tool_calls: function.arguments must be a JSON object (as a string).", "messages"
        )
    return {"toolUse": {"toolUseId": call["id"], "name": function["name"], "input": parsed}}


def _assistant_blocks(message: dict[str, Any], index: int) -> list[dict[str, Any]]:
    blocks = [{"text": t} for t in _assistant_text(message.get("content"), index) if t]
    calls = message.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise bad_request(f"messages[{index}].tool_calls must be an array.", "messages")
        blocks.extend(_tool_use_block(call, index) for call in calls)
    return blocks


def _assistant_text(content: Any, index: int) -> list[str]:
    if isinstance(content, list):  # text and refusal parts; a refusal is what the assistant said
        out = []
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("text", "refusal"):
                value = part.get(part["type"])
                if isinstance(value, str):
                    out.append(value)
                    continue
            raise bad_request(f"messages[{index}]: an assistant message may only contain text parts.", "messages")
        return out
    return _text_of(content, "assistant", index)


def _tool_result_block(message: dict[str, Any], index: int) -> dict[str, Any]:
    tool_call_id = message.get("tool_call_id")
    if not isinstance(tool_call_id, str) or not tool_call_id:
        raise bad_request(f"messages[{index}]: a tool message needs a tool_call_id.", "messages")
    text = "\n".join(_text_of(message.get("content"), "tool", index))
    return {"toolResult": {"toolUseId": tool_call_id, "content": [{"text": text}]}}


def _messages(raw: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system blocks, alternating Converse messages) from OpenAI chat messages."""
    if not isinstance(raw, list) or not raw:
        raise bad_request("'messages' must be a non-empty array.", "messages")
    system: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{index}] must be an object.", "messages")
        role = message.get("role")
        if role in ("system", "developer"):
            system.extend({"text": t} for t in _text_of(message.get("content"), role, index) if t)
            continue
        if role == "user":
            blocks, bedrock_role = _user_blocks(message.get("content"), index), "user"
        elif role == "assistant":
            blocks, bedrock_role = _assistant_blocks(message, index), "assistant"
        elif role == "tool":
            blocks, bedrock_role = [_tool_result_block(message, index)], "user"
        else:
            raise bad_request(f"messages[{index}]: role {role!r} is not supported by Bedrock Converse.", "messages")
        if not blocks:  # Bedrock rejects empty content; an empty turn says nothing anyway
            continue
        if messages and messages[-1]["role"] == bedrock_role:  # Bedrock requires alternating roles
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": bedrock_role, "content": blocks})
    if not messages:
        raise bad_request("'messages' must contain at least one non-empty user message.", "messages")
    return system, messages


def _tool_spec(tool: Any, index: int) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise bad_request(f"tools[{index}] must be a function tool with a name.", "tools")
    parameters = function.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise bad_request(f"tools[{index}].function.parameters must be a JSON Schema object.", "tools")
    spec: dict[str, Any] = {"name": function["name"], "inputSchema": {"json": parameters}}
    if isinstance(function.get("description"), str) and function["description"]:
        spec["description"] = function["description"]
    return {"toolSpec": spec}


def _tool_choice(choice: Any, names: set[str]) -> dict[str, Any] | None:
    """Bedrock's toolChoice; None for "auto", which is Bedrock's default and the only
    choice every tool-capable model accepts (explicit toolChoice is model-specific)."""
    if choice is None or choice == "auto":
        return None
    if choice == "required":
        return {"any": {}}
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if name not in names:
            raise bad_request("tool_choice names a function that is not in 'tools'.", "tool_choice")
        return {"tool": {"name": name}}
    raise bad_request("tool_choice must be 'none', 'auto', 'required' or a function.", "tool_choice")


def _uses_tools(messages: list[dict[str, Any]]) -> bool:
    return any("toolUse" in b or "toolResult" in b for m in messages for b in m["content"])


def _tool_config(body: dict[str, Any], messages: list[dict[str, Any]]) -> dict[str, Any] | None:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise bad_request("tool_choice is only allowed when tools are specified.", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise bad_request("'tools' must be an array.", "tools")
    specs = [_tool_spec(tool, i) for i, tool in enumerate(tools)]
    if choice == "none":
        # Converse has no "none". Dropping the tools forbids calls, but Bedrock requires
        # toolConfig whenever the history holds toolUse/toolResult blocks; then the tools
        # stay (with the default "auto") and the model may still call one.
        return {"tools": specs} if _uses_tools(messages) else None
    config: dict[str, Any] = {"tools": specs}
    tool_choice = _tool_choice(choice, {s["toolSpec"]["name"] for s in specs})
    if tool_choice is not None:
        config["toolChoice"] = tool_choice
    return config


def _unit_number(body: dict[str, Any], key: str) -> float | None:
    """A number Converse bounds to [0, 1]: refused here rather than after a signed round trip
    (OpenAI allows temperature up to 2; Bedrock does not)."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise bad_request(f"'{key}' must be a number between 0 and 1 for Bedrock models.", key)
    return value


def _inference_config(body: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    max_tokens = max_output_tokens(body)
    if max_tokens is not None:
        config["maxTokens"] = max_tokens
    temperature = _unit_number(body, "temperature")
    if temperature is not None:
        config["temperature"] = temperature
    top_p = _unit_number(body, "top_p")
    if top_p is not None:
        config["topP"] = top_p
    stop = body.get("stop")
    if isinstance(stop, str) and stop:
        config["stopSequences"] = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) and s for s in stop):
        if stop:
            config["stopSequences"] = stop
    elif stop is not None:
        raise bad_request("'stop' must be a non-empty string or an array of them.", "stop")
    return config


def chat_to_converse(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat-completions request as a Converse request body.

    The model goes in the path (see `converse_path`), streaming in the choice of path.
    Raises RequestError (400) for what Converse cannot express. Parameters Converse has
    no field for (seed, penalties, response_format, ...) are dropped, not refused.
    """
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request("Bedrock Converse returns one choice; 'n' must be 1.", "n")
    system, messages = _messages(body.get("messages"))
    out: dict[str, Any] = {"messages": messages}
    if system:
        out["system"] = system
    inference = _inference_config(body)
    if inference:
        out["inferenceConfig"] = inference
    tool_config = _tool_config(body, messages)
    if tool_config is not None:
        out["toolConfig"] = tool_config
    return out


# -- response ----------------------------------------------------------------------

_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}


def finish_reason(stop_reason: Any) -> str:
    """OpenAI's finish_reason for a Bedrock stopReason (unknown ones read as "stop")."""
    return _FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def usage_from_bedrock(usage: Any) -> TokenUsage | None:
    """Bedrock's `usage` as TokenUsage, with input counted the way OpenAI counts prompts.

    Bedrock's inputTokens excludes tokens read from or written to the prompt cache;
    OpenAI's prompt_tokens is the whole prompt, of which cached_tokens were cache hits.
    """
    if not isinstance(usage, dict):
        return None
    cache_read = as_count(usage.get("cacheReadInputTokens"))
    cache_write = usage.get("cacheWriteInputTokens")
    written = as_count(cache_write) if cache_write is not None else None
    input_tokens = as_count(usage.get("inputTokens")) + cache_read + (written or 0)
    output_tokens = as_count(usage.get("outputTokens"))
    return TokenUsage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        total_tokens=input_tokens + output_tokens,
        cached_input_tokens=cache_read,
        cache_creation_input_tokens=written,
    )


def completion_id() -> str:
    """A fresh OpenAI chat completion id."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def converse_to_chat(response: dict[str, Any], model: str) -> dict[str, Any]:
    """A Converse JSON response as an OpenAI `chat.completion` (one choice)."""
    output = response.get("output")
    message = output.get("message") if isinstance(output, dict) else None
    blocks = message.get("content") if isinstance(message, dict) else None
    texts: list[str] = []
    reasoning: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for block in blocks if isinstance(blocks, list) else ():
        if not isinstance(block, dict):
            continue
        if isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif isinstance(block.get("toolUse"), dict):
            use = block["toolUse"]
            arguments = orjson.dumps(use.get("input", {})).decode()
            tool_calls.append({
                "id": str(use.get("toolUseId") or ""),
                "type": "function",
                "function": {"name": str(use.get("name") or ""), "arguments": arguments},
            })
        elif isinstance(block.get("reasoningContent"), dict):
            text = (block["reasoningContent"].get("reasoningText") or {}).get("text")
            if isinstance(text, str):
                reasoning.append(text)
    reply: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not tool_calls else None,
        "refusal": None,
    }
    if tool_calls:
        reply["tool_calls"] = tool_calls
    if reasoning:  # the de-facto field (DeepSeek, vLLM) for thinking text
        reply["reasoning_content"] = "".join(reasoning)
    out: dict[str, Any] = {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": reply, "logprobs": None, "finish_reason": finish_reason(response.get("stopReason"))}
        ],
    }
    usage = usage_from_bedrock(response.get("usage"))
    if usage is not None:
        out["usage"] = usage_object(usage)
    return out


# -- errors ------------------------------------------------------------------------

# Bedrock error type -> OpenAI (type, code).
_ERRORS: dict[str, tuple[str, str | None]] = {
    "throttlingexception": ("requests", "rate_limit_exceeded"),
    "servicequotaexceededexception": ("requests", "rate_limit_exceeded"),
    "validationexception": ("invalid_request_error", None),
    "accessdeniedexception": ("permission_error", "permission_denied"),
    "unrecognizedclientexception": ("invalid_request_error", "invalid_api_key"),
    "invalidsignatureexception": ("invalid_request_error", "invalid_api_key"),
    "incompletesignatureexception": ("invalid_request_error", "invalid_api_key"),
    "missingauthenticationtokenexception": ("invalid_request_error", "invalid_api_key"),
    "expiredtokenexception": ("invalid_request_error", "invalid_api_key"),
    "resourcenotfoundexception": ("invalid_request_error", "not_found"),
    "modeltimeoutexception": ("server_error", "timeout"),
    "modelnotreadyexception": ("server_error", "model_not_ready"),
    "modelerrorexception": ("server_error", "model_error"),
    "modelstreamerrorexception": ("server_error", "model_error"),
    "serviceunavailableexception": ("server_error", "service_unavailable"),
    "internalserverexception": ("server_error", None),
}


def error_kind(error_type: str | None, status: int) -> tuple[str, str | None]:
    """OpenAI's (type, code) for a Bedrock error type (by the HTTP status when unknown)."""
    if error_type:
        known = _ERRORS.get(error_type.lower())
        if known is not None:
            return known
    if status == 429:
        return "requests", "rate_limit_exceeded"
    if status == 401:
        return "invalid_request_error", "invalid_api_key"
    if status == 403:
        return "permission_error", None
    return ("server_error" if status >= 500 else "invalid_request_error"), None


def _error_type_name(header: str | None, body: Any) -> str | None:
    """`ThrottlingException` from `ThrottlingException:http://...`, or from the body's __type."""
    if header:
        return header.split(":", 1)[0].strip() or None
    if isinstance(body, dict):
        for key in ("__type", "code", "Code"):
            value = body.get(key)
            if isinstance(value, str) and value:
                return value.rsplit("#", 1)[-1]
    return None


def error_to_openai(status: int, body: bytes, error_type_header: str | None) -> bytes:
    """A Bedrock error response as OpenAI's error JSON; never raises."""
    try:
        return _error_to_openai(status, bytes(body), error_type_header)
    except Exception:  # whatever arrived, the client still gets an error in its own shape
        error_type, code = error_kind(None, status if isinstance(status, int) else 502)
        return error_body(status, f"Bedrock returned HTTP {status}", error_type, code)


def _error_to_openai(status: int, body: bytes, error_type_header: str | None) -> bytes:
    try:
        parsed: Any = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = None
    name = _error_type_name(error_type_header, parsed)
    message = None
    if isinstance(parsed, dict):
        message = next((parsed[k] for k in ("message", "Message") if isinstance(parsed.get(k), str)), None)
    if message is None:
        text = body[:1000].decode("utf-8", "replace").strip() if body and parsed is None else ""
        message = text or f"Bedrock returned HTTP {status}" + (f" ({name})" if name else "")
    error_type, code = error_kind(name, status)
    return error_body(status, message, error_type, code)


# -- the translator ----------------------------------------------------------------


class ChatToBedrock(Translator):
    translates_response = True

    def request(self, body: dict[str, Any], raw: bytes) -> UpstreamRequest:
        attempt = self.attempt
        path = attempt.target.path_prefix + converse_path(attempt.model, attempt.stream)
        accept = EVENT_STREAM_CONTENT_TYPE.encode() if attempt.stream else b"application/json"
        return UpstreamRequest(path, orjson.dumps(chat_to_converse(body)),
                               [("content-type", b"application/json"), ("accept", accept)])

    def stream_translator(self) -> StreamTranslator | None:
        from extproc.translators.chat_to_bedrock_stream import (
            ConverseStreamTranslator,  # botocore: on first use
        )

        return ConverseStreamTranslator(self.attempt.model, self.attempt.include_usage)

    def whole_response(self, status: int, body: bytes, error_type: str | None) -> bytes:
        if status >= 300:
            return error_to_openai(status, body, error_type)
        return orjson.dumps(converse_to_chat(orjson.loads(body), self.attempt.model))
