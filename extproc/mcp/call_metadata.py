"""What the request stage tells Envoy about one MCP message: the metadata its access log
and rate limits (tool-call budgets) read. The MCP gateway itself serves the call."""

from __future__ import annotations

import hashlib
from typing import Any

from extproc.contract import Meta
from extproc.mcp import jsonrpc
from extproc.request_headers import MAX_HEADER_VALUE


def message_metadata(body: bytes) -> dict[str, Any]:
    """Method, request id, tool and its server of one JSON-RPC message; anything
    unreadable is left to the MCP server, which answers it with the proper error."""
    values: dict[str, Any] = {}
    message = jsonrpc.parse_message(body)  # the MCP gateway's own reading of the message
    if not isinstance(message, jsonrpc.Message):
        return values
    method = message.method
    if method is not None and method.isprintable():
        values[Meta.MCP_METHOD] = method[:MAX_HEADER_VALUE]
    if message.id is not None:
        values[Meta.MCP_REQUEST_ID] = str(message.id)[:MAX_HEADER_VALUE]
    name = jsonrpc.tool_name_of(message)
    if name is not None and name.isprintable():
        values[Meta.MCP_TOOL_NAME] = name[:MAX_HEADER_VALUE]
        if (parts := jsonrpc.split_tool_name(name)) is not None:
            values[Meta.MCP_BACKEND] = parts[0]
            values[Meta.MCP_TOOL_CALL] = 1
    return values


def session_label(value: bytes | None) -> str | None:
    """MCP session ids can be long signed tokens: metadata gets a short, stable digest."""
    if not value:
        return None
    return "mcp-" + hashlib.sha256(value).hexdigest()[:16]
