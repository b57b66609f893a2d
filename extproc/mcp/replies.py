"""The gateway's own HTTP answers to a client: JSON bodies, a JSON-RPC result or error.

Why a module of its own: the HTTP front, dispatch, listings and relay all answer clients
this way, and a result or error the gateway writes itself is noted in the message's
`Observation` as it is built, so metrics and spans never miss one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from extproc.mcp.jsonrpc import RequestId, error_response, result_response
from extproc.mcp.observation import Observation

__all__ = ["error_reply", "json_reply", "result_reply"]


def json_reply(body: bytes, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


def result_reply(observation: Observation, id: RequestId | None, result: Any,  # noqa: A002
                 headers: Mapping[str, str] | None = None) -> web.Response:
    observation.answered({"result": result})
    return json_reply(result_response(id, result), headers=headers)


def error_reply(observation: Observation, id: RequestId | None, code: int, text: str,  # noqa: A002
                data: Any = None) -> web.Response:
    observation.fail(code, text)
    return json_reply(error_response(id, code, text, data))
