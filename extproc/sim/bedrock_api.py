"""aiohttp handlers that speak AWS Bedrock Runtime Converse and ConverseStream.

Faithful where a gateway could get it wrong: every request must carry a valid SigV4
signature (recomputed with botocore over the path *as sent*, percent-encoding and
all), errors come as Bedrock sends them (``{"message"}`` plus ``x-amzn-errortype``),
and ConverseStream answers with a real binary ``application/vnd.amazon.eventstream``
that boto3 decodes. Replies and token counts are deterministic, as in the OpenAI sim.

Prompt tokens: each system block and each message costs ``text.MESSAGE_OVERHEAD``
plus the tokens of its text, tool names, tool inputs (as JSON) and tool results.
Bedrock's ``inputTokens`` excludes cache reads and writes, so with
``x-sim-cached-tokens`` / ``x-sim-cache-write-tokens`` those move out of
``inputTokens`` into ``cacheReadInputTokens`` / ``cacheWriteInputTokens``.

Knobs (headers, like the OpenAI sim): ``x-sim-chunks``, ``x-sim-chunk-delay-ms``,
``x-sim-first-byte-delay-ms``, ``x-sim-error`` (status; ``x-sim-error-type`` overrides
the Bedrock error type), ``x-sim-cached-tokens``, ``x-sim-cache-write-tokens``,
``x-sim-no-usage``, ``x-sim-hold``, ``x-sim-tool-call: 1`` and
``x-sim-stream-exception: throttlingException`` (an exception frame mid-stream).
A model id ``sim-error-NNN`` answers with that error status.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import struct
import time
import uuid
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.compat import HTTPHeaders
from botocore.credentials import Credentials

from extproc.sim import text, wire

SIM_AWS_ACCESS_KEY_ID = "AKIDSIMULATOR"
SIM_AWS_SECRET_ACCESS_KEY = "sim/Secret+Access/Key0123456789EXAMPLEKEY"
# Temporary credentials: requests must also carry this x-amz-security-token.
SIM_AWS_SESSION_ACCESS_KEY_ID = "ASIASIMULATOR"
SIM_AWS_SESSION_SECRET_ACCESS_KEY = "sim/Session+Secret/Key0123456789EXAMPLE"
SIM_AWS_SESSION_TOKEN = "SimulatorSessionToken//////////wEaCXVzLWVhc3QtMSJHMEUCIQ"

# access key id -> (secret, session token or None)
CREDENTIALS: dict[str, tuple[str, str | None]] = {
    SIM_AWS_ACCESS_KEY_ID: (SIM_AWS_SECRET_ACCESS_KEY, None),
    SIM_AWS_SESSION_ACCESS_KEY_ID: (SIM_AWS_SESSION_SECRET_ACCESS_KEY, SIM_AWS_SESSION_TOKEN),
}
SIGNING_SERVICE = "bedrock"
MAX_CLOCK_SKEW = timedelta(minutes=15)
_AMZ_DATE = "%Y%m%dT%H%M%SZ"
_ERROR_NAMESPACE = "http://internal.amazon.com/coral/com.amazon.bedrock/"
_SIGNATURE_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. Consult the service documentation for details."
)
_PATH_RE = re.compile(r"/model/(?P<model>.+)/(?P<op>converse|converse-stream)/?$")
_STREAM_EXCEPTION_RE = re.compile(r"^[a-z][A-Za-z]{1,63}Exception$")
_IMAGE_FORMATS = frozenset({"png", "jpeg", "gif", "webp"})
_PADDING = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

_ERROR_TYPES = {
    400: "ValidationException",
    401: "UnrecognizedClientException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    408: "ModelTimeoutException",
    424: "ModelErrorException",
    429: "ThrottlingException",
    500: "InternalServerException",
    503: "ServiceUnavailableException",
}


class BedrockError(Exception):
    """Raised inside a handler to answer with a Bedrock-shaped error."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error_type, self.message = status, error_type, message


def _invalid(message: str) -> BedrockError:
    return BedrockError(400, "ValidationException", message)


def error_response(status: int, error_type: str, message: str) -> web.Response:
    """Bedrock's error shape: ``{"message"}`` with the type in ``x-amzn-errortype``."""
    headers = {"x-amzn-errortype": f"{error_type}:{_ERROR_NAMESPACE}", "x-amzn-requestid": str(uuid.uuid4())}
    return web.Response(
        status=status, body=orjson.dumps({"message": message}), content_type="application/json", headers=headers
    )


# -- event stream encoding ---------------------------------------------------------------


def _string_header(name: str, value: str) -> bytes:
    raw_name, raw_value = name.encode(), value.encode()
    return bytes([len(raw_name)]) + raw_name + b"\x07" + struct.pack(">H", len(raw_value)) + raw_value


def encode_frame(headers: Mapping[str, str], payload: bytes) -> bytes:
    """One AWS event-stream message: prelude (total length, headers length, CRC32),
    string headers, payload, CRC32 of everything before it."""
    encoded = b"".join(_string_header(name, value) for name, value in headers.items())
    prelude = struct.pack(">II", 12 + len(encoded) + len(payload) + 4, len(encoded))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + encoded + payload
    return message + struct.pack(">I", zlib.crc32(message))


def event_frame(event_type: str, payload: dict[str, Any]) -> bytes:
    headers = {":event-type": event_type, ":content-type": "application/json", ":message-type": "event"}
    return encode_frame(headers, orjson.dumps(payload))


def exception_frame(exception_type: str, message: str) -> bytes:
    headers = {":exception-type": exception_type, ":content-type": "application/json", ":message-type": "exception"}
    return encode_frame(headers, orjson.dumps({"message": message}))


# -- SigV4 verification ------------------------------------------------------------------


class _ListedHeaders(SigV4Auth):
    """SigV4 over exactly the headers the request says it signed, as AWS recomputes it
    (botocore's signer would skip some names, e.g. user-agent, and add host)."""

    def headers_to_sign(self, request: AWSRequest) -> HTTPHeaders:
        out = HTTPHeaders()
        for name, value in request.headers.items():
            out[name.lower()] = value
        return out


def _authorization_fields(value: str) -> dict[str, str]:
    scheme, _, rest = value.strip().partition(" ")
    if scheme != "AWS4-HMAC-SHA256":
        raise BedrockError(400, "IncompleteSignatureException", f"Unsupported Authorization scheme {scheme!r}.")
    fields: dict[str, str] = {}
    for item in rest.split(","):
        key, eq, val = item.strip().partition("=")
        if eq:
            fields[key] = val
    for key in ("Credential", "SignedHeaders", "Signature"):
        if not fields.get(key):
            raise BedrockError(
                400, "IncompleteSignatureException", f"Authorization header requires '{key}' parameter."
            )
    return fields


def verify_sigv4(
    method: str,
    url: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    now: datetime | None = None,
    credentials: Mapping[str, tuple[str, str | None]] = CREDENTIALS,
) -> str:
    """Check a request's SigV4 signature as AWS does; returns the access key id.

    `url` must be the URL as sent (the raw, still percent-encoded path and query) and
    `headers` every header received, repeats included. Raises BedrockError (403/400).
    """
    received: dict[str, list[str]] = {}
    for name, value in headers:
        received.setdefault(name.lower(), []).append(value)

    def first(name: str) -> str | None:
        values = received.get(name)
        return values[0] if values else None

    authorization = received.get("authorization")
    if not authorization:
        raise BedrockError(403, "MissingAuthenticationTokenException", "Missing Authentication Token")
    fields = _authorization_fields(authorization[0])
    scope = fields["Credential"].split("/")
    if len(scope) != 5 or scope[4] != "aws4_request":
        raise BedrockError(400, "IncompleteSignatureException", f"Credential is malformed: {fields['Credential']!r}.")
    access_key, scope_date, region, service, _ = scope
    if access_key not in credentials:
        raise BedrockError(403, "UnrecognizedClientException", "The security token included in the request is invalid.")
    secret, token = credentials[access_key]
    if service != SIGNING_SERVICE:
        raise BedrockError(
            403, "InvalidSignatureException", f"Credential should be scoped to correct service: '{SIGNING_SERVICE}'."
        )
    signed = fields["SignedHeaders"].split(";")
    amz_date = (received.get("x-amz-date") or [""])[0]
    try:
        when = datetime.strptime(amz_date, _AMZ_DATE).replace(tzinfo=UTC)
    except ValueError:
        raise BedrockError(
            400, "IncompleteSignatureException",
            "Authorization header requires existence of a valid 'X-Amz-Date' header.",
        ) from None
    now = now or datetime.now(UTC)
    if when < now - MAX_CLOCK_SKEW:
        limit = (now - MAX_CLOCK_SKEW).strftime(_AMZ_DATE)
        raise BedrockError(403, "InvalidSignatureException",
                           f"Signature expired: {amz_date} is now earlier than {limit} ({now:{_AMZ_DATE}} - 15 min.)")
    if when > now + MAX_CLOCK_SKEW:
        limit = (now + MAX_CLOCK_SKEW).strftime(_AMZ_DATE)
        raise BedrockError(403, "InvalidSignatureException",
                           f"Signature not yet current: {amz_date} is still later than {limit} "
                           f"({now:{_AMZ_DATE}} + 15 min.)")
    if scope_date != amz_date[:8]:
        raise BedrockError(
            403, "InvalidSignatureException", f"Credential should be scoped to a valid date: {amz_date[:8]}."
        )
    for required in ("host", "x-amz-date"):
        if required not in signed:
            raise BedrockError(
                403, "InvalidSignatureException", f"'{required}' must be a 'SignedHeader' in the AWS Authorization."
            )
    if first("x-amz-security-token") != token:
        raise BedrockError(403, "UnrecognizedClientException", "The security token included in the request is invalid.")
    content_sha = first("x-amz-content-sha256")
    if content_sha not in (None, "UNSIGNED-PAYLOAD", hashlib.sha256(body).hexdigest()):
        raise BedrockError(
            403, "InvalidSignatureException", "The provided 'x-amz-content-sha256' header does not match the body."
        )
    request = AWSRequest(method=method.upper(), url=url, data=body)
    for name in signed:
        if name not in received:
            raise BedrockError(403, "InvalidSignatureException", _SIGNATURE_MISMATCH)
        for value in received[name]:
            request.headers[name] = value
    signer = _ListedHeaders(Credentials(access_key, secret, token), service, region)
    request.context["timestamp"] = amz_date
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    given = fields["Signature"].encode("utf-8", "replace")
    listed = signer.signed_headers(signer.headers_to_sign(request))
    if not hmac.compare_digest(expected.encode(), given) or listed != fields["SignedHeaders"]:
        raise BedrockError(403, "InvalidSignatureException", _SIGNATURE_MISMATCH)
    return access_key


# -- request validation (the checks Bedrock makes that a translator could trip) -----------


def _check_block(block: Any, where: str, role: str) -> None:
    if not isinstance(block, dict) or len(block) != 1:
        raise _invalid(f"The ContentBlock at {where} must have exactly one member.")
    kind, value = next(iter(block.items()))
    if kind == "text":
        if not isinstance(value, str) or not value.strip():
            raise _invalid(f"The text field in the ContentBlock object at {where} is blank. "
                           "Add text to the text field, and try again.")
    elif kind == "image":
        source = value.get("source") if isinstance(value, dict) else None
        if not isinstance(value, dict) or value.get("format") not in _IMAGE_FORMATS or not isinstance(source, dict):
            raise _invalid(f"The image at {where} must have a format (png, jpeg, gif, webp) and a source.")
        try:
            base64.b64decode(source.get("bytes") or "", validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise _invalid(f"The image bytes at {where} are not valid base64.") from None
    elif kind == "toolUse":
        if role != "assistant" or not isinstance(value, dict) or not isinstance(value.get("input"), dict):
            raise _invalid(f"The toolUse block at {where} must be in an assistant message, with an input object.")
    elif kind == "toolResult":
        if role != "user" or not isinstance(value, dict) or not isinstance(value.get("content"), list):
            raise _invalid(f"The toolResult block at {where} must be in a user message, with a content list.")
    elif kind not in ("document", "video", "cachePoint", "reasoningContent", "guardContent"):
        raise _invalid(f"Unknown ContentBlock member {kind!r} at {where}.")


def _check_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("The messages field is required and must not be empty.")
    pending_tool_ids: set[str] = set()
    uses_tools = False
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise _invalid(f"messages.{i}.role must be 'user' or 'assistant'.")
        if i == 0 and role != "user":
            raise _invalid("A conversation must start with a user message. Try again with a conversation that "
                           "starts with a user message.")
        if i and messages[i - 1].get("role") == role:
            raise _invalid("A conversation must alternate between user and assistant roles. Make sure the "
                           "conversation alternates between user and assistant roles and try again.")
        content = message.get("content")
        if not isinstance(content, list) or not content:
            raise _invalid(f"messages.{i}.content must be a non-empty list.")
        for j, block in enumerate(content):
            _check_block(block, f"messages.{i}.content.{j}", role)
        used = {b["toolUse"].get("toolUseId") for b in content if "toolUse" in b}
        results = {b["toolResult"].get("toolUseId") for b in content if "toolResult" in b}
        uses_tools = uses_tools or bool(used or results)
        unknown = sorted(map(str, results - pending_tool_ids))
        if unknown:
            raise _invalid(f"messages.{i}: toolResult for toolUseId(s) {unknown} not used in the previous turn.")
        pending_tool_ids = used  # a toolResult answers the assistant turn right before it
    if uses_tools and "toolConfig" not in body:
        raise _invalid("The toolConfig field must be defined when using toolUse and toolResult content blocks.")
    return messages


def _check_inference(body: dict[str, Any]) -> tuple[int, bool]:
    """(reply tokens, whether maxTokens capped them)."""
    config = body.get("inferenceConfig") or {}
    if not isinstance(config, dict):
        raise _invalid("inferenceConfig must be an object.")
    for key in ("temperature", "topP"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1):
            raise _invalid(f"inferenceConfig.{key} must be a number between 0 and 1.")
    stops = config.get("stopSequences")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops)):
        raise _invalid("inferenceConfig.stopSequences must be a list of non-empty strings.")
    limit = config.get("maxTokens")
    if limit is None:
        return text.DEFAULT_REPLY_TOKENS, False
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= wire.MAX_TOKENS_LIMIT:
        raise _invalid(f"inferenceConfig.maxTokens must be an integer between 1 and {wire.MAX_TOKENS_LIMIT}.")
    return limit, True


def _check_tools(body: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(tool specs, toolChoice) of toolConfig; empty when absent."""
    config = body.get("toolConfig")
    if config is None:
        return [], {}
    tools = config.get("tools") if isinstance(config, dict) else None
    if not isinstance(tools, list) or not tools:
        raise _invalid("toolConfig.tools must be a non-empty list.")
    specs = []
    for i, tool in enumerate(tools):
        spec = tool.get("toolSpec") if isinstance(tool, dict) else None
        schema = spec.get("inputSchema") if isinstance(spec, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(schema, dict) \
                or not isinstance(schema.get("json"), dict):
            raise _invalid(f"toolConfig.tools.{i}.toolSpec needs a name and inputSchema.json.")
        specs.append(spec)
    choice = config.get("toolChoice") or {}
    names = {s["name"] for s in specs}
    if not isinstance(choice, dict) or len(choice) > 1 or not set(choice) <= {"auto", "any", "tool"}:
        raise _invalid("toolConfig.toolChoice must have exactly one of auto, any, tool.")
    if "tool" in choice and (choice["tool"] or {}).get("name") not in names:
        raise _invalid("toolConfig.toolChoice.tool.name must name one of the tools.")
    return specs, choice


def _check_system(body: dict[str, Any]) -> list[str]:
    system = body.get("system") or []
    if not isinstance(system, list) or not all(isinstance(b, dict) for b in system):
        raise _invalid("system must be a list of SystemContentBlock objects.")
    texts = [b["text"] for b in system if isinstance(b.get("text"), str)]
    if any(not t.strip() for t in texts):
        raise _invalid("The text field in a SystemContentBlock is blank.")
    return texts


# -- replies ------------------------------------------------------------------------------


def _block_tokens(block: dict[str, Any]) -> int:
    if isinstance(block.get("text"), str):
        return text.count_tokens(block["text"])
    if isinstance(block.get("toolUse"), dict):
        use = block["toolUse"]
        return text.call_tokens(str(use.get("name", "")), orjson.dumps(use.get("input")).decode())
    if isinstance(block.get("toolResult"), dict):
        parts = [p for p in block["toolResult"].get("content") or [] if isinstance(p, dict)]
        return sum(text.count_tokens(p["text"] if isinstance(p.get("text"), str) else orjson.dumps(p).decode())
                   for p in parts)
    return 0  # images and documents cost nothing, as in the OpenAI sim


def prompt_tokens(system: list[str], messages: list[dict[str, Any]]) -> int:
    """Deterministic prompt size (see the module docstring)."""
    return sum(text.MESSAGE_OVERHEAD + text.count_tokens(t) for t in system) + sum(
        text.MESSAGE_OVERHEAD + sum(_block_tokens(b) for b in m["content"]) for m in messages
    )


def _last_user_text(messages: list[dict[str, Any]]) -> tuple[str, bool]:
    """Text of the last user message (tool results count as text), and whether it holds tool results."""
    last = messages[-1] if messages[-1]["role"] == "user" else next(
        (m for m in reversed(messages) if m["role"] == "user"), messages[0]
    )
    parts: list[str] = []
    has_results = False
    for block in last["content"]:
        if isinstance(block.get("text"), str):
            parts.append(block["text"])
        elif isinstance(block.get("toolResult"), dict):
            has_results = True
            parts.extend(p["text"] for p in block["toolResult"].get("content") or [] if isinstance(p.get("text"), str))
    return "\n".join(parts), has_results


def _sample_value(name: str, schema: Any) -> Any:
    schema = schema if isinstance(schema, dict) else {}
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "integer":
        return 1
    if kind == "number":
        return 1.5
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    if kind == "object":
        return {}
    return "Paris" if name.lower() in ("location", "city", "place") else f"sim-{name}"


def _sample_input(schema: dict[str, Any]) -> dict[str, Any]:
    """Arguments for a tool call that satisfy the simple schemas tests use."""
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        properties = {}
    required = schema.get("required")
    if not isinstance(required, list):
        required = list(properties)
    return {name: _sample_value(name, properties.get(name)) for name in required if isinstance(name, str)}


@dataclass
class _Reply:
    blocks: list[dict[str, Any]]  # Converse content blocks
    stop_reason: str
    input_tokens: int
    output_tokens: int
    cache_read: int
    cache_write: int
    report_usage: bool
    started: float

    def usage(self) -> dict[str, Any]:
        usage = {
            "inputTokens": self.input_tokens,
            "outputTokens": self.output_tokens,
            "totalTokens": self.input_tokens + self.output_tokens + self.cache_read + self.cache_write,
        }
        if self.cache_read:
            usage["cacheReadInputTokens"] = self.cache_read
        if self.cache_write:
            usage["cacheWriteInputTokens"] = self.cache_write
        return usage

    def metrics(self) -> dict[str, Any]:
        return {"latencyMs": int((time.monotonic() - self.started) * 1000)}


def _reply(request: web.Request, body: dict[str, Any], knobs: wire.Knobs, raw: bytes) -> _Reply:
    started = time.monotonic()
    system = _check_system(body)
    messages = _check_messages(body)
    tokens, capped = _check_inference(body)
    tools, choice = _check_tools(body)
    prompt, answers_tool = _last_user_text(messages)
    forced = "any" in choice or "tool" in choice or request.headers.get("x-sim-tool-call") == "1"
    wants_tool = bool(tools) and not answers_tool and (forced or "weather" in prompt.lower())
    if wants_tool:
        name = (choice.get("tool") or {}).get("name") or next(
            (s["name"] for s in tools if "weather" in s["name"].lower()), tools[0]["name"]
        )
        spec = next(s for s in tools if s["name"] == name)
        arguments = _sample_input(spec["inputSchema"]["json"])
        tool_id = "tooluse_" + hashlib.blake2b(raw, digest_size=11).hexdigest()
        intro = f"I will use the {name} tool to answer that."
        blocks: list[dict[str, Any]] = [
            {"text": intro}, {"toolUse": {"toolUseId": tool_id, "name": name, "input": arguments}},
        ]
        stop_reason = "tool_use"
    else:
        blocks = [{"text": text.reply_text(prompt, tokens)}]
        stop_reason = "max_tokens" if capped else "end_turn"
    total_prompt = prompt_tokens(system, messages)
    cache_read = min(knobs.usage.cached_tokens, total_prompt)
    cache_write_knob = wire.header_int(request, "x-sim-cache-write-tokens", 0, 0, wire.MAX_TOKENS_LIMIT)
    cache_write = min(cache_write_knob, total_prompt - cache_read)
    return _Reply(
        blocks, stop_reason, total_prompt - cache_read - cache_write, sum(_block_tokens(b) for b in blocks),
        cache_read, cache_write, not knobs.usage.omit, started,
    )


def _converse_json(reply: _Reply) -> web.Response:
    out: dict[str, Any] = {
        "output": {"message": {"role": "assistant", "content": reply.blocks}},
        "stopReason": reply.stop_reason,
        "metrics": reply.metrics(),
    }
    if reply.report_usage:
        out["usage"] = reply.usage()
    return wire.json_reply(orjson.dumps(out), None, {"x-amzn-requestid": str(uuid.uuid4())})


def _pad(payload: dict[str, Any], seed: int) -> dict[str, Any]:
    """Real Bedrock pads events with a "p" member so sizes do not reveal content."""
    return {**payload, "p": _PADDING[: 1 + seed * 7 % len(_PADDING)]}


def _stream_frames(reply: _Reply, chunks: int) -> list[tuple[str, bytes] | None]:
    """(event type, frame) of a reply's event stream; ``None`` marks a pause point between deltas."""

    def event(event_type: str, payload: dict[str, Any]) -> tuple[str, bytes]:
        return event_type, event_frame(event_type, payload)

    frames: list[tuple[str, bytes] | None] = [event("messageStart", _pad({"role": "assistant"}, 0))]
    for index, block in enumerate(reply.blocks):
        pieces: list[dict[str, Any]]  # content block deltas
        if "toolUse" in block:
            use = block["toolUse"]
            start = {"toolUse": {"toolUseId": use["toolUseId"], "name": use["name"]}}
            frames.append(event("contentBlockStart", _pad({"contentBlockIndex": index, "start": start}, index)))
            pieces = [{"toolUse": {"input": p}} for p in text.split_evenly(orjson.dumps(use["input"]).decode(), chunks)]
        else:
            pieces = [{"text": p} for p in text.split_chunks(block["text"], chunks)]
        for n, delta in enumerate(pieces):
            if frames[-1] is not None and n:
                frames.append(None)
            frames.append(event("contentBlockDelta", _pad({"contentBlockIndex": index, "delta": delta}, n)))
        frames.append(event("contentBlockStop", _pad({"contentBlockIndex": index}, index)))
    frames.append(event("messageStop", _pad({"stopReason": reply.stop_reason}, 3)))
    return frames


def _stream_exception_knob(request: web.Request) -> str | None:
    name = request.headers.get("x-sim-stream-exception")
    if name is not None and not _STREAM_EXCEPTION_RE.match(name):
        raise _invalid(f"x-sim-stream-exception must be an exception name such as throttlingException, got {name!r}")
    return name


async def _converse_stream(
    request: web.Request, reply: _Reply, knobs: wire.Knobs, settings: wire.SimSettings
) -> web.StreamResponse:
    exception = _stream_exception_knob(request)
    resp, _ = await wire.open_stream(  # no compression: x-sim-compress is for the JSON APIs
        request, None, {"Content-Type": "application/vnd.amazon.eventstream", "x-amzn-requestid": str(uuid.uuid4())}
    )
    try:
        frames = _stream_frames(reply, knobs.chunks)
        async for event_type, data in wire.paced(frames, request, settings, knobs.chunk_delay):
            await resp.write(data)
            if exception and event_type == "contentBlockDelta":
                message = f"Simulated {exception} (requested via x-sim-stream-exception)"
                await resp.write(exception_frame(exception, message))
                await resp.write_eof()
                return resp
        metadata: dict[str, Any] = {"metrics": reply.metrics()}
        if reply.report_usage:
            metadata["usage"] = reply.usage()
        await resp.write(event_frame("metadata", metadata))
        await resp.write_eof()
    except ConnectionError:
        pass  # the client went away mid-stream
    return resp


# -- routing ------------------------------------------------------------------------------


def matches(path: str) -> bool:
    """A Converse or ConverseStream path (raw or decoded), behind any base path."""
    return _PATH_RE.search(path.split("?", 1)[0]) is not None


def _simulated_error(request: web.Request, status: int, how: str) -> BedrockError:
    error_type = request.headers.get("x-sim-error-type") or _ERROR_TYPES.get(
        status, "InternalServerException" if status >= 500 else "ValidationException"
    )
    return BedrockError(status, error_type, wire.simulated_error(status, how))


def _parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BedrockError(400, "SerializationException", "Malformed request body: not valid JSON.") from None
    if not isinstance(body, dict):
        raise BedrockError(400, "SerializationException", "The request body must be a JSON object.")
    return body


async def dispatch(request: web.Request, settings: wire.SimSettings) -> web.StreamResponse:
    """Verify the signature, then answer Converse or ConverseStream; every failure is a
    Bedrock-shaped error."""
    try:
        raw_body = await request.read()
        url = f"http://{request.headers.get('Host', request.host)}{request.raw_path}"
        verify_sigv4(request.method, url, request.headers.items(), raw_body)
        match = _PATH_RE.search(request.raw_path.split("?", 1)[0])
        if request.method != "POST" or match is None:
            raise BedrockError(404, "UnknownOperationException", f"Unknown operation {request.method} {request.path}")
        knobs = wire.read_knobs(request, settings)
        await wire.wait_first_byte(knobs)
        if knobs.error_status is not None:
            raise _simulated_error(request, knobs.error_status, "x-sim-error header")
        model = unquote(match.group("model"))
        status = wire.model_error(model)
        if status is not None:
            raise _simulated_error(request, status, f"model {model}")
        reply = _reply(request, _parse_body(raw_body), knobs, raw_body)
        if match.group("op") == "converse-stream":
            return await _converse_stream(request, reply, knobs, settings)
        return _converse_json(reply)
    except BedrockError as exc:
        return error_response(exc.status, exc.error_type, exc.message)
    except wire.KnobError as exc:
        return error_response(400, "ValidationException", str(exc))
    except web.HTTPException as exc:  # e.g. body larger than client_max_size
        return error_response(exc.status, "ValidationException", exc.reason)
