"""aiohttp handler that speaks the OpenAI Responses API (``POST .../v1/responses``).

Faithful where a gateway or the official ``openai`` SDK can tell: the ``response``
object, the streamed event sequence with ``event:`` names and ``sequence_number``
(response.created, response.in_progress, then per output item
response.output_item.added, response.content_part.added, response.output_text.delta*,
response.output_text.done, response.content_part.done, response.output_item.done, and
response.completed carrying the whole response with usage; no ``[DONE]``), OpenAI
error bodies, and the rejection of unknown parameters (``stream_options.include_usage``
is a chat-completions option the Responses API refuses).

The API is stateful, and so is the simulator: each simulator instance (one
``SimSettings``) remembers the responses it issued with ``store`` (default true). A
request whose ``previous_response_id`` this instance did not issue gets the real
400 ``previous_response_not_found``, which is how tests prove that follow-ups reach
the backend holding the state. ``GET .../responses/{id}`` returns a stored response
and ``DELETE`` forgets it. Function calls left open by the previous response must be
answered by ``function_call_output`` items, as the real API insists.

The reply echoes the last user text like the other simulators, or calls the first
function tool when tools are offered and that text says "weather" (or ``tool_choice``
forces a call, or ``x-sim-tool-call: 1``).

Knobs are the ``x-sim-*`` headers every simulated API reads (``wire.read_knobs``:
chunks, delays, error, cached and reasoning tokens, no-usage, compression, hold) plus:

* ``x-sim-reply-tokens``: the natural reply length (default ``text.DEFAULT_REPLY_TOKENS``);
  ``max_output_tokens`` below it makes the response ``incomplete``;
* ``x-sim-tool-call: 1``: call the first function tool even without "weather";
* ``x-sim-stream-failure: CODE``: a stream ends, after its first delta, with
  ``response.failed`` carrying ``error.code`` CODE (e.g. ``server_error``).

Token rule (deterministic, see ``text``): input is the tokens of ``instructions``, of
each function tool's name and description, and per input item ``text.MESSAGE_OVERHEAD``
plus the tokens of its texts (message text parts, a function call's name and
arguments, a function call output), plus, with ``previous_response_id``, the previous
response's input and output tokens (its whole context). ``x-sim-cached-tokens`` of the
input are reported as cached. Output is the reply's tokens (or a function call's name
and arguments) plus ``x-sim-reasoning-tokens``, which also appear as a reasoning item
and as ``output_tokens_details.reasoning_tokens``, as reasoning models report them.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from extproc.sim import text, wire
from extproc.sim.anthropic_api import tool_input
from extproc.sim.openai_api import ApiError, error_response, parse_body

RESPONSES_SUFFIX = "/responses"
MIN_OUTPUT_TOKENS = 16  # the real API's minimum for max_output_tokens
MAX_STORED = 20_000  # stored responses per simulator instance (oldest forgotten first)
_PATH_RE = re.compile(r"/responses(?:/([^/]+))?/?$")
_WEATHER_RE = re.compile(r"\bweather\b", re.IGNORECASE)
_TOOL_NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_FAILURE_CODE_RE = re.compile(r"[a-z0-9_]{1,64}")

# Top-level parameters of POST /v1/responses (openai SDK 3.57 ResponseCreateParams).
KNOWN_PARAMETERS = frozenset({
    "access_programs", "background", "background_options", "context_management", "conversation", "image",
    "include", "input", "instructions", "max_output_tokens", "max_tool_calls", "metadata", "model", "moderation",
    "parallel_tool_calls", "previous_response_id", "prompt", "prompt_cache_key", "prompt_cache_options",
    "prompt_cache_retention", "reasoning", "safety_identifier", "service_tier", "store", "stream",
    "stream_options", "temperature", "text", "tool_choice", "tools", "top_logprobs", "top_p", "truncation", "user",
})
_STREAM_OPTIONS = frozenset({"include_obfuscation"})
_ROLES = ("user", "assistant", "system", "developer")


def matches(path: str) -> bool:
    """Is this a Responses API path (``.../responses`` or ``.../responses/{id}``, behind any base path)?"""
    return _PATH_RE.search(path) is not None


# -- state -------------------------------------------------------------------------------------------


@dataclass
class _Stored:
    """What a follow-up needs from a stored response, and the response itself for GET."""

    context_tokens: int  # its input + output tokens: what a follow-up carries as context
    call_ids: tuple[str, ...]  # function calls a follow-up must answer
    body: bytes  # the response object as JSON


class _State:
    """The responses one simulator instance issued (bounded, oldest forgotten first)."""

    def __init__(self) -> None:
        self.stored: OrderedDict[str, _Stored] = OrderedDict()

    def remember(self, response_id: str, entry: _Stored) -> None:
        self.stored[response_id] = entry
        while len(self.stored) > MAX_STORED:
            self.stored.popitem(last=False)


def _state(settings: wire.SimSettings) -> _State:
    """The instance's state, kept on its settings (one SimSettings per simulator instance)."""
    state = settings.__dict__.get("_responses_state")
    if state is None:
        state = settings.__dict__["_responses_state"] = _State()
    return state


def stored_ids(settings: wire.SimSettings) -> list[str]:
    """The ids of the responses this simulator instance stored, oldest first (for tests)."""
    return list(_state(settings).stored)


# -- errors ------------------------------------------------------------------------------------------


def _invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _invalid_type(param: str, expected: str, value: Any) -> ApiError:
    got = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )
    return _invalid(
        f"Invalid type for '{param}': expected {expected}, but got {got} instead.", param=param, code="invalid_type"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- the request -------------------------------------------------------------------------------------


@dataclass
class _Item:
    """One input item, reduced to what the simulator needs."""

    kind: str  # message, function_call, function_call_output or another item type
    role: str | None = None
    texts: list[str] = field(default_factory=list)
    call_id: str | None = None


def _parts_texts(content: Any, where: str) -> list[str]:
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise _invalid_type(where, "one of a string or array of input content parts", content)
    out: list[str] = []
    for j, part in enumerate(content):
        here = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            raise _invalid(f"Missing required parameter: '{here}.type'.", param=f"{here}.type",
                           code="missing_required_parameter")
        if kind in ("input_text", "output_text", "text", "summary_text", "reasoning_text"):
            if not isinstance(part.get("text"), str):
                raise _invalid(f"Missing required parameter: '{here}.text'.", param=f"{here}.text",
                               code="missing_required_parameter")
            out.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            out.append(part["refusal"])
        # images, files and audio cost nothing under the simulator's token rule
    return out


def _input_items(value: Any) -> list[_Item]:
    if value is None:
        raise _invalid("Missing required parameter: 'input'.", param="input", code="missing_required_parameter")
    if isinstance(value, str):
        return [_Item("message", role="user", texts=[value])]
    if not isinstance(value, list):
        raise _invalid_type("input", "one of a string or array of input items", value)
    if not value:
        raise _invalid("Invalid 'input': empty array. Expected an array with minimum length 1, but got an empty "
                       "array instead.", param="input", code="empty_array")
    items: list[_Item] = []
    for i, raw in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(raw, dict):
            raise _invalid_type(where, "an object", raw)
        kind = raw.get("type", "message" if "role" in raw else None)
        if kind == "message":
            role = raw.get("role")
            if role not in _ROLES:
                raise _invalid(
                    f"Invalid value: {role!r}. Supported values are: 'user', 'assistant', 'system', and 'developer'.",
                    param=f"{where}.role", code="invalid_value",
                )
            if "content" not in raw:
                raise _invalid(f"Missing required parameter: '{where}.content'.", param=f"{where}.content",
                               code="missing_required_parameter")
            items.append(_Item("message", role=role, texts=_parts_texts(raw["content"], f"{where}.content")))
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(raw.get(key), str):
                    raise _invalid(f"Missing required parameter: '{where}.{key}'.", param=f"{where}.{key}",
                                   code="missing_required_parameter")
            items.append(_Item("function_call", texts=[raw["name"], raw["arguments"]], call_id=raw["call_id"]))
        elif kind == "function_call_output":
            if not isinstance(raw.get("call_id"), str) or not raw["call_id"]:
                raise _invalid(f"Missing required parameter: '{where}.call_id'.", param=f"{where}.call_id",
                               code="missing_required_parameter")
            output = raw.get("output")
            if output is None:
                raise _invalid(f"Missing required parameter: '{where}.output'.", param=f"{where}.output",
                               code="missing_required_parameter")
            texts = [output] if isinstance(output, str) else _parts_texts(output, f"{where}.output")
            items.append(_Item("function_call_output", texts=texts, call_id=raw["call_id"]))
        elif isinstance(kind, str) and kind:
            # reasoning, item_reference, hosted tool calls...: accepted, texts of a reasoning summary counted
            summary = raw.get("summary")
            items.append(_Item(kind, texts=_parts_texts(summary, f"{where}.summary") if isinstance(summary, list)
                               else []))
        else:
            raise _invalid(f"Missing required parameter: '{where}.type'.", param=f"{where}.type",
                           code="missing_required_parameter")
    return items


def _function_tools(tools: Any) -> list[dict[str, Any]]:
    """The request's tools as the response echoes them; raises for malformed function tools."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _invalid_type("tools", "an array", tools)
    out: list[dict[str, Any]] = []
    names: set[str] = set()
    for j, tool in enumerate(tools):
        where = f"tools[{j}]"
        if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
            raise _invalid(f"Missing required parameter: '{where}.type'.", param=f"{where}.type",
                           code="missing_required_parameter")
        if tool["type"] != "function":
            out.append(tool)  # hosted tools are echoed, never called
            continue
        name = tool.get("name")
        if not isinstance(name, str):
            raise _invalid(f"Missing required parameter: '{where}.name'.", param=f"{where}.name",
                           code="missing_required_parameter")
        if not _TOOL_NAME_RE.fullmatch(name):
            raise _invalid(f"Invalid '{where}.name': string does not match pattern. Expected a string that matches "
                           "the pattern '^[a-zA-Z0-9_-]+$'.", param=f"{where}.name", code="invalid_value")
        if name in names:
            raise _invalid(f"Duplicate value for '{where}.name': {name!r}.", param=f"{where}.name",
                           code="duplicate_value")
        names.add(name)
        parameters = tool.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise _invalid_type(f"{where}.parameters", "an object", parameters)
        description = tool.get("description")
        if description is not None and not isinstance(description, str):
            raise _invalid_type(f"{where}.description", "a string", description)
        out.append({"type": "function", "name": name, "description": description, "parameters": parameters,
                    "strict": tool.get("strict", True)})
    return out


@dataclass(frozen=True)
class _Extra:
    """The Responses-only knobs, on top of the shared ``wire.Knobs``."""

    reply_tokens: int = text.DEFAULT_REPLY_TOKENS
    tool_call: bool = False
    stream_failure: str | None = None


def _read_extra(request: web.Request) -> _Extra:
    reply_tokens = wire.header_int(request, "x-sim-reply-tokens", text.DEFAULT_REPLY_TOKENS, 1, wire.MAX_TOKENS_LIMIT)
    failure = request.headers.get("x-sim-stream-failure")
    if failure is not None and not _FAILURE_CODE_RE.fullmatch(failure):
        raise _invalid(f"x-sim-stream-failure must be an error code like server_error, got {failure!r}")
    return _Extra(reply_tokens, request.headers.get("x-sim-tool-call") == "1", failure)


@dataclass
class _Request:
    """A validated request."""

    body: dict[str, Any]
    model: str
    items: list[_Item]
    tools: list[dict[str, Any]]
    tool_choice: Any
    stream: bool
    store: bool
    previous: str | None
    max_output_tokens: int | None
    obfuscation: bool


def _validate(body: dict[str, Any]) -> _Request:
    unknown = sorted(set(body) - KNOWN_PARAMETERS)
    if unknown:
        raise _invalid(f"Unknown parameter: '{unknown[0]}'.", param=unknown[0], code="unknown_parameter")
    model = body.get("model")
    if model is None:
        raise _invalid("Missing required parameter: 'model'.", param="model", code="missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise _invalid_type("model", "a string", model)
    status = wire.model_error(model)
    if status is not None:
        raise ApiError(status, wire.simulated_error(status, f"model {model}"))
    for key in ("stream", "store", "parallel_tool_calls", "background"):
        if body.get(key) is not None and not isinstance(body[key], bool):
            raise _invalid_type(key, "a boolean", body[key])
    if body.get("background") is True:
        raise _invalid("The simulator does not run responses in the background.", param="background",
                       code="unsupported_value")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _invalid_type("instructions", "a string", instructions)
    limit = body.get("max_output_tokens")
    if limit is not None:
        if not _is_int(limit):
            raise _invalid_type("max_output_tokens", "an integer", limit)
        if limit < MIN_OUTPUT_TOKENS:
            raise _invalid(f"Invalid 'max_output_tokens': integer below minimum value. Expected a value >= "
                           f"{MIN_OUTPUT_TOKENS}, but got {limit} instead.", param="max_output_tokens",
                           code="integer_below_min_value")
    previous = body.get("previous_response_id")
    if previous is not None and (not isinstance(previous, str) or not previous):
        raise _invalid_type("previous_response_id", "a string", previous)
    if previous is not None and body.get("conversation") is not None:
        raise _invalid("Mutually exclusive parameters: Ensure you are only providing one of: "
                       "'previous_response_id' or 'conversation'.", param=None, code="mutually_exclusive_parameters")
    stream = body.get("stream") is True
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise _invalid_type("stream_options", "an object", options)
        for key in sorted(set(options) - _STREAM_OPTIONS):
            raise _invalid(f"Unknown parameter: 'stream_options.{key}'.", param=f"stream_options.{key}",
                           code="unknown_parameter")
        if not stream:
            raise _invalid("Invalid 'stream_options': stream_options are only allowed when 'stream' is true.",
                           param="stream_options", code="invalid_value")
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise _invalid_type(key, "a number", value)
    tools = _function_tools(body.get("tools"))
    choice = body.get("tool_choice", "auto")
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise _invalid(f"Invalid value: {choice!r}. Supported values are: 'none', 'auto', and 'required'.",
                           param="tool_choice", code="invalid_value")
    elif isinstance(choice, dict):
        if choice.get("type") == "function" and choice.get("name") not in {t.get("name") for t in tools}:
            raise _invalid(f"Tool choice '{choice.get('name')}' not found in 'tools' parameter.",
                           param="tool_choice", code="invalid_value")
    else:
        raise _invalid_type("tool_choice", "one of a string or object", choice)
    if choice == "required" and not any(t["type"] == "function" for t in tools):
        raise _invalid("Tool choice 'required' must be specified with 'tools' parameter.", param="tool_choice",
                       code="invalid_value")
    return _Request(
        body=body, model=model, items=_input_items(body.get("input")), tools=tools, tool_choice=choice,
        stream=stream, store=body.get("store") is not False, previous=previous, max_output_tokens=limit,
        obfuscation=not (isinstance(options, dict) and options.get("include_obfuscation") is False),
    )


def _check_calls(req: _Request, previous: _Stored | None) -> None:
    """Open function calls must be answered, and answers must belong to a call (as the real API checks)."""
    known = set(previous.call_ids if previous else ())
    answered: set[str] = set()
    for item in req.items:
        if item.kind == "function_call" and item.call_id:
            known.add(item.call_id)
        elif item.kind == "function_call_output" and item.call_id:
            if item.call_id not in known:
                raise _invalid(f"No tool call found for function call output with call_id {item.call_id}.",
                               param="input")
            answered.add(item.call_id)
    for call_id in previous.call_ids if previous else ():
        if call_id not in answered:
            raise _invalid(f"No tool output found for function call {call_id}.", param="input")


# -- the reply ---------------------------------------------------------------------------------------


def _hex_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex + uuid.uuid4().hex[:16]


@dataclass
class _Output:
    """One output item: a message, a function call or a reasoning item."""

    type: str
    id: str
    text: str = ""  # message text
    name: str = ""  # function call
    arguments: str = ""
    call_id: str = ""
    incomplete: bool = False

    def item(self, done: bool = True) -> dict[str, Any]:
        """The item as ``output`` lists it; ``done=False`` is its state at output_item.added."""
        if self.type == "reasoning":
            return {"id": self.id, "type": "reasoning", "summary": []}
        status = ("incomplete" if self.incomplete else "completed") if done else "in_progress"
        if self.type == "function_call":
            return {"id": self.id, "type": "function_call", "status": status,
                    "arguments": self.arguments if done else "", "call_id": self.call_id, "name": self.name}
        return {"id": self.id, "type": "message", "status": status,
                "content": [self.part()] if done else [], "role": "assistant"}

    def part(self, text_: str | None = None) -> dict[str, Any]:
        return {"type": "output_text", "annotations": [], "logprobs": [],
                "text": self.text if text_ is None else text_}

    @property
    def tokens(self) -> int:
        if self.type == "function_call":
            return text.call_tokens(self.name, self.arguments)
        return text.count_tokens(self.text)


@dataclass
class _Reply:
    id: str
    created_at: int
    req: _Request
    outputs: list[_Output]
    input_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    incomplete: bool
    report_usage: bool = True

    @property
    def output_tokens(self) -> int:
        return sum(o.tokens for o in self.outputs if o.type != "reasoning") + self.reasoning_tokens

    def usage(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_tokens},
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
            "total_tokens": self.input_tokens + self.output_tokens,
        }

    def response(self, status: str | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        """The response object; ``status`` "in_progress" is its state at response.created."""
        final = self.status if status is None else status
        body = self.req.body
        tools = self.req.tools
        done = final != "in_progress"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": final,
            "background": False,
            "completed_at": self.created_at if final == "completed" else None,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if final == "incomplete" else None,
            "instructions": body.get("instructions"),
            "max_output_tokens": self.req.max_output_tokens,
            "max_tool_calls": body.get("max_tool_calls"),
            "model": self.req.model,
            "output": [o.item() for o in self.outputs] if done and final != "failed" else [],
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": self.req.previous,
            "prompt_cache_key": body.get("prompt_cache_key"),
            "reasoning": body.get("reasoning") or {"effort": None, "summary": None},
            "safety_identifier": body.get("safety_identifier"),
            "service_tier": "default",
            "store": self.req.store,
            "temperature": body.get("temperature", 1.0),
            "text": body.get("text") or {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": self.req.tool_choice,
            "tools": tools,
            "top_logprobs": body.get("top_logprobs", 0),
            "top_p": body.get("top_p", 1.0),
            "truncation": body.get("truncation", "disabled"),
            "usage": self.usage() if done and final != "failed" and self.report_usage else None,
            "user": body.get("user"),
            "metadata": body.get("metadata") or {},
        }

    @property
    def status(self) -> str:
        return "incomplete" if self.incomplete else "completed"


def _input_tokens(req: _Request) -> int:
    total = text.count_tokens(req.body.get("instructions") or "")
    for tool in req.tools:
        if tool["type"] == "function":
            total += text.count_tokens(tool["name"]) + text.count_tokens(tool.get("description") or "")
    for item in req.items:
        total += text.MESSAGE_OVERHEAD + sum(text.count_tokens(t) for t in item.texts)
    return total


def _call_tool(req: _Request, extra: _Extra) -> dict[str, Any] | None:
    functions = [t for t in req.tools if t["type"] == "function"]
    choice = req.tool_choice
    if not functions or choice == "none":
        return None
    if isinstance(choice, dict) and choice.get("type") == "function":
        return next(t for t in functions if t["name"] == choice["name"])
    last = req.items[-1]
    asked = last.kind == "message" and last.role == "user" and _WEATHER_RE.search("\n".join(last.texts))
    if choice == "required" or extra.tool_call or asked:
        return functions[0]
    return None


def _prompt_text(req: _Request) -> str:
    """What the reply echoes: the last user text, or else the last function call output."""
    for item in reversed(req.items):
        if item.kind == "message" and item.role == "user":
            return "\n".join(item.texts)
    for item in reversed(req.items):
        if item.kind == "function_call_output":
            return "\n".join(item.texts)
    return ""


def _reply(req: _Request, knobs: wire.Knobs, extra: _Extra, previous: _Stored | None) -> _Reply:
    input_tokens = _input_tokens(req) + (previous.context_tokens if previous else 0)
    reasoning = knobs.usage.reasoning_tokens
    budget = req.max_output_tokens if req.max_output_tokens is not None else wire.MAX_TOKENS_LIMIT
    outputs: list[_Output] = []
    if reasoning:
        reasoning = min(reasoning, budget)
        outputs.append(_Output("reasoning", _hex_id("rs_")))
        budget -= reasoning
    incomplete = False
    tool = _call_tool(req, extra)
    if tool is not None:
        call = _Output("function_call", _hex_id("fc_"), name=tool["name"],
                       arguments=orjson.dumps(tool_input(tool.get("parameters") or {})).decode(),
                       call_id="call_" + uuid.uuid4().hex[:24])
        if call.tokens <= budget:
            outputs.append(call)
        else:
            tool = None  # no room: answer in text, cut at max_output_tokens
    if tool is None:
        length = min(extra.reply_tokens, budget)
        incomplete = length < extra.reply_tokens
        if length > 0:
            outputs.append(_Output("message", _hex_id("msg_"), text=text.reply_text(_prompt_text(req), length),
                                   incomplete=incomplete))
    return _Reply(
        id=_hex_id("resp_"), created_at=int(time.time()), req=req, outputs=outputs, input_tokens=input_tokens,
        cached_tokens=min(knobs.usage.cached_tokens, input_tokens), reasoning_tokens=reasoning,
        incomplete=incomplete, report_usage=not knobs.usage.omit,
    )


# -- streaming ---------------------------------------------------------------------------------------


def _obfuscation(item_id: str, index: int, delta: str) -> str:
    """Padding the real API adds to deltas so their sizes leak less (deterministic here)."""
    digest = hashlib.blake2b(f"{item_id}:{index}".encode(), digest_size=12).hexdigest()
    return digest[: max(2, 16 - len(delta) % 16)]


Event = tuple[str, dict[str, Any]]


def stream_events(reply: _Reply, chunks: int, failure: str | None = None) -> Iterator[Event | None]:
    """The events of a streamed reply in the API's order, without sequence numbers;
    ``None`` marks a pause point (between deltas)."""
    obfuscate = reply.req.obfuscation
    yield "response.created", {"type": "response.created", "response": reply.response("in_progress")}
    yield "response.in_progress", {"type": "response.in_progress", "response": reply.response("in_progress")}
    first_delta = True

    def pause() -> Iterator[None]:
        nonlocal first_delta
        if not first_delta:
            yield None
        first_delta = False

    def delta(kind: str, item: _Output, index: int, value: str, n: int, **more: Any) -> Event:
        data: dict[str, Any] = {"type": kind, "item_id": item.id, "output_index": index, **more, "delta": value}
        if kind == "response.output_text.delta":
            data["logprobs"] = []
        if obfuscate:
            data["obfuscation"] = _obfuscation(item.id, n, value)
        return kind, data

    for index, output in enumerate(reply.outputs):
        yield "response.output_item.added", {"type": "response.output_item.added", "output_index": index,
                                             "item": output.item(done=False)}
        if output.type == "function_call":
            for n, piece in enumerate(text.split_evenly(output.arguments, chunks)):
                yield from pause()
                yield delta("response.function_call_arguments.delta", output, index, piece, n)
                if failure:
                    yield _failed(reply, failure)
                    return
            yield "response.function_call_arguments.done", {
                "type": "response.function_call_arguments.done", "item_id": output.id, "output_index": index,
                "arguments": output.arguments,
            }
        elif output.type == "message":
            where = {"item_id": output.id, "output_index": index, "content_index": 0}
            yield "response.content_part.added", {"type": "response.content_part.added", **where,
                                                  "part": output.part("")}
            for n, piece in enumerate(text.split_chunks(output.text, chunks)):
                yield from pause()
                yield delta("response.output_text.delta", output, index, piece, n, content_index=0)
                if failure:
                    yield _failed(reply, failure)
                    return
            yield "response.output_text.done", {"type": "response.output_text.done", **where,
                                                "text": output.text, "logprobs": []}
            yield "response.content_part.done", {"type": "response.content_part.done", **where,
                                                 "part": output.part()}
        yield "response.output_item.done", {"type": "response.output_item.done", "output_index": index,
                                            "item": output.item()}
    if failure:  # nothing to stream (all reasoning): fail at the end
        yield _failed(reply, failure)
        return
    final = "response.incomplete" if reply.incomplete else "response.completed"
    yield final, {"type": final, "response": reply.response()}


def _failed(reply: _Reply, code: str) -> Event:
    error = {"code": code, "message": f"Simulated failure {code} (requested via x-sim-stream-failure header)"}
    return "response.failed", {"type": "response.failed", "response": reply.response("failed", error)}


def _headers(request_id: str) -> dict[str, str]:
    return {"x-request-id": request_id, "openai-processing-ms": "1"}


def _numbered(events: Iterator[Event | None]) -> Iterator[Event | None]:
    """The events with the ``sequence_number`` every streamed event carries, from 0."""
    sequence = 0
    for event in events:
        if event is not None:
            event[1]["sequence_number"] = sequence
            sequence += 1
        yield event


def _json(body: bytes, knobs: wire.Knobs, request_id: str) -> web.Response:
    return wire.json_reply(body, knobs.compress, _headers(request_id))


# -- handlers ----------------------------------------------------------------------------------------


async def _create(
    request: web.Request, settings: wire.SimSettings, knobs: wire.Knobs, extra: _Extra
) -> web.StreamResponse:
    req = _validate(parse_body(await request.read()))
    state = _state(settings)
    previous = None
    if req.previous is not None:
        previous = state.stored.get(req.previous)
        if previous is None:
            raise _invalid(f"Previous response with id '{req.previous}' not found.", param="previous_response_id",
                           code="previous_response_not_found")
    _check_calls(req, previous)
    reply = _reply(req, knobs, extra, previous)
    request_id = "req_" + uuid.uuid4().hex
    final = reply.response()
    if req.store and not (req.stream and extra.stream_failure):
        state.remember(reply.id, _Stored(
            context_tokens=reply.input_tokens + reply.output_tokens,
            call_ids=tuple(o.call_id for o in reply.outputs if o.type == "function_call"),
            body=orjson.dumps(final),
        ))
    if req.stream:
        events = _numbered(stream_events(reply, knobs.chunks, extra.stream_failure))
        return await wire.write_named_events(request, knobs, settings, events, _headers(request_id))
    return _json(orjson.dumps(final), knobs, request_id)


def _not_found(response_id: str) -> ApiError:
    return ApiError(404, f"Response with id '{response_id}' not found.", param=None, code=None)


async def dispatch(request: web.Request, settings: wire.SimSettings) -> web.StreamResponse:
    """``POST .../responses``, ``GET`` / ``DELETE .../responses/{id}``; failures become OpenAI errors."""
    try:
        knobs = wire.read_knobs(request, settings)
        extra = _read_extra(request)
        await wire.wait_first_byte(knobs)
        if knobs.error_status is not None:
            raise ApiError(knobs.error_status, wire.simulated_error(knobs.error_status, "x-sim-error header"))
        match = _PATH_RE.search(request.path)
        assert match is not None, "dispatch called for a path matches() refuses"
        response_id = match.group(1)
        if response_id == "input_tokens" and request.method == "POST":  # POST /responses/input_tokens
            tokens = _input_tokens(_validate(parse_body(await request.read())))
            body = orjson.dumps({"object": "response.input_tokens", "input_tokens": tokens})
            return _json(body, knobs, "req_" + uuid.uuid4().hex)
        if response_id is None:
            if request.method != "POST":
                raise ApiError(405, f"Method {request.method} not allowed for {request.path}; use POST.")
            return await _create(request, settings, knobs, extra)
        state = _state(settings)
        if request.method == "GET":
            stored = state.stored.get(response_id)
            if stored is None:
                raise _not_found(response_id)
            return _json(stored.body, knobs, "req_" + uuid.uuid4().hex)
        if request.method == "DELETE":
            if state.stored.pop(response_id, None) is None:
                raise _not_found(response_id)
            body = orjson.dumps({"id": response_id, "object": "response", "deleted": True})
            return _json(body, knobs, "req_" + uuid.uuid4().hex)
        raise ApiError(405, f"Method {request.method} not allowed for {request.path}; use GET or DELETE.")
    except ApiError as exc:
        return error_response(exc.status, exc.message, exc.param, exc.code)
    except wire.KnobError as exc:
        return error_response(400, str(exc))
    except web.HTTPException as exc:  # e.g. body larger than client_max_size
        return error_response(exc.status, exc.reason)
