"""JSON-RPC 2.0 as MCP uses it: parse one message, build answers, name tools. Pure functions.

MCP (2025-06-18 and later) removed JSON-RPC batching, so a JSON array is refused with
-32600 and a message saying so. Request ids are strings or integers (never null, never a
boolean); `params`, when present, is an object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

__all__ = [
    "PARSE_ERROR",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "INVALID_PARAMS",
    "INTERNAL_ERROR",
    "SERVER_UNAVAILABLE",
    "SERVER_TIMEOUT",
    "Message",
    "RequestId",
    "RpcError",
    "SEPARATOR",
    "error_response",
    "parse_message",
    "prefixed",
    "result_response",
    "split_tool_name",
    "tool_name_of",
]

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
# The gateway's own codes (JSON-RPC's -32000..-32099 "server error" range; the MCP SDKs use
# -32000 and -32001 for a closed connection and a request timeout on the client side).
SERVER_UNAVAILABLE: Final = -32050  # an MCP server could not be reached or failed (message names it)
SERVER_TIMEOUT: Final = -32051  # an MCP server did not answer within request_timeout_seconds
UNAUTHORIZED: Final = -32052  # the gateway refused the caller (HTTP 401 or 403: no, invalid or unknown identity)

SEPARATOR: Final = "__"

RequestId = str | int


@dataclass(frozen=True, slots=True)
class Message:
    """One well-formed JSON-RPC message from a client."""

    kind: Literal["request", "notification", "response"]
    body: dict[str, Any]
    """The decoded object, as sent."""

    @property
    def id(self) -> RequestId | None:
        return self.body.get("id")

    @property
    def method(self) -> str | None:
        method = self.body.get("method")
        return method if isinstance(method, str) else None

    @property
    def params(self) -> dict[str, Any]:
        params = self.body.get("params")
        return params if isinstance(params, dict) else {}


@dataclass(frozen=True, slots=True)
class RpcError:
    """Why a message was refused; `id` is the request's when it could be read, else None."""

    code: int
    message: str
    id: RequestId | None = None
    data: Any = None

    def to_bytes(self) -> bytes:
        return error_response(self.id, self.code, self.message, self.data)


def _valid_id(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def parse_message(body: bytes | str) -> Message | RpcError:
    """Decode one JSON-RPC message, or say why it is not one (codes -32700, -32600, -32602)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return RpcError(PARSE_ERROR, f"Parse error: the body is not valid JSON ({exc})")
    if isinstance(data, list):
        return RpcError(
            INVALID_REQUEST,
            "Invalid Request: JSON-RPC batches (JSON arrays) are not supported; send one message per HTTP request",
        )
    if not isinstance(data, dict):
        return RpcError(INVALID_REQUEST, "Invalid Request: a JSON-RPC message must be a JSON object")
    raw_id = data.get("id")
    known_id = raw_id if _valid_id(raw_id) else None
    if data.get("jsonrpc") != "2.0":
        return RpcError(INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be "2.0"', known_id)
    if "method" in data:
        method = data["method"]
        if not isinstance(method, str) or not method:
            return RpcError(INVALID_REQUEST, 'Invalid Request: "method" must be a non-empty string', known_id)
        if "id" in data and not _valid_id(raw_id):
            return RpcError(INVALID_REQUEST, 'Invalid Request: "id" must be a string or an integer')
        if "params" in data and not isinstance(data["params"], dict):
            code = INVALID_PARAMS if isinstance(data["params"], list) else INVALID_REQUEST
            return RpcError(code, 'Invalid params: "params" must be an object', known_id)
        return Message("request" if "id" in data else "notification", data)
    # No method: a response to a request the server (through the gateway) sent the client.
    if _valid_id(raw_id) and (("result" in data) != ("error" in data)):
        return Message("response", data)
    return RpcError(INVALID_REQUEST, 'Invalid Request: a message needs "method" (or "id" with "result" or "error")',
                    known_id)


def tool_name_of(message: Message) -> str | None:
    """The tool a `tools/call` request names (None for other methods or a missing name)."""
    if message.method != "tools/call":
        return None
    name = message.params.get("name")
    return name if isinstance(name, str) else None


def error_response(id: RequestId | None, code: int, message: str, data: Any = None) -> bytes:  # noqa: A002
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return orjson.dumps({"jsonrpc": "2.0", "id": id, "error": error})


def result_response(id: RequestId | None, result: Any) -> bytes:  # noqa: A002
    return orjson.dumps({"jsonrpc": "2.0", "id": id, "result": result})


def prefixed(server: str, tool: str) -> str:
    """The name clients see for `tool` of `server`: `<server>__<tool>`."""
    return f"{server}{SEPARATOR}{tool}"


def split_tool_name(name: str) -> tuple[str, str] | None:
    """`"srv__tool"` -> `("srv", "tool")`, split at the first `__` (server names hold none);
    None when there is no separator or either side is empty."""
    server, sep, tool = name.partition(SEPARATOR)
    if not sep or not server or not tool:
        return None
    return server, tool
