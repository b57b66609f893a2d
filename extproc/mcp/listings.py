"""What the servers of a session offer: their listings merged, and the exact-name check.

Why a module of its own: `tools/list` and `prompts/list` read every server of the session
(all pages, following `nextCursor`) and merge the items into one page, each renamed
`<server>__<name>`, the route's allow/deny globs hiding tools; and a `tools/call` is
forwarded only for a name its server listed byte for byte (`extproc.mcp.toolnames`),
listing that server again when the remembered names do not know it. Both read the same
listings and fill the same remembered names.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any, Final

import orjson
from aiohttp import web

from extproc.mcp.access import ToolCheck
from extproc.mcp.config import McpRoute
from extproc.mcp.jsonrpc import INVALID_PARAMS, METHOD_NOT_FOUND, SERVER_UNAVAILABLE, Message, prefixed
from extproc.mcp.observation import Observation
from extproc.mcp.replies import error_reply, result_reply
from extproc.mcp.sessions import GatewaySession, ServerSession
from extproc.mcp.toolnames import ToolsKey
from extproc.mcp.upstream import GATEWAY_NAME, ServerPool, SessionGone, UpstreamError

log = logging.getLogger("extproc.mcp.gateway")  # the gateway's log lines keep their logger name

__all__ = ["LISTS", "Listings"]

MAX_PAGES: Final = 100  # pages read from one server for one listing
LISTING_ID_PREFIX: Final = f"{GATEWAY_NAME}/tools/list/"  # ids of the gateway's own tools/list requests

# list method -> result key
LISTS: Final = {"tools/list": "tools", "prompts/list": "prompts"}


class _ServerFailed(Exception):
    """A server answered a gateway request with a JSON-RPC error."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Listings:
    """Lists the servers of a session; remembers the tool names each server session listed."""

    __slots__ = ("_pool", "_listing_ids")

    def __init__(self, pool: ServerPool) -> None:
        self._pool = pool
        self._listing_ids = itertools.count(1)

    async def list_all(self, route: McpRoute, session: GatewaySession, message: Message,
                       observation: Observation, allowed: ToolCheck | None = None) -> web.Response:
        """Answer a `tools/list` or `prompts/list`: every server's items in one page
        (tools: those the route offers and, with `allowed`, the caller may call)."""
        method = message.method or ""
        key = LISTS[method]
        if message.params.get("cursor") is not None:
            return error_reply(observation, message.id, INVALID_PARAMS,
                               "Invalid params: unknown cursor (this gateway returns every item in one page)")
        names = [name for name in route.servers if name in session.servers and name in self._pool.clients]
        outcomes = await asyncio.gather(
            *(self._list_server(name, session.servers[name], message, key, observation) for name in names),
            return_exceptions=True,
        )
        merged: list[dict[str, Any]] = []
        failures: list[UpstreamError | _ServerFailed] = []
        for name, outcome in zip(names, outcomes, strict=True):
            if isinstance(outcome, SessionGone):
                raise outcome
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, (UpstreamError, _ServerFailed)):
                    raise outcome
                log.warning("%s of MCP server %r left out: %s", method, name, outcome.message)
                failures.append(outcome)
                continue
            if key == "tools":
                self._pool.listed.remember((name, session.servers[name].session_id), (item["name"] for item in outcome))
            for item in outcome:
                renamed = {**item, "name": prefixed(name, item["name"])}
                if key == "tools" and (
                        not route.offers(renamed["name"]) or (allowed is not None and not allowed(renamed["name"]))):
                    continue
                merged.append(renamed)
        if failures and len(failures) == len(names):
            first = failures[0]
            return error_reply(observation, message.id, first.code, first.message)
        return result_reply(observation, message.id, {key: merged})

    async def _list_server(self, name: str, server_session: ServerSession, message: Message, key: str,
                           observation: Observation) -> list[dict[str, Any]]:
        """Every item of one server's listing (all pages); -32601 from the server: none."""
        client = self._pool.clients[name]
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        seen: set[str] = set()
        base_params = {k: v for k, v in message.params.items() if k != "cursor"}
        for _ in range(MAX_PAGES):
            params = dict(base_params)
            if cursor is not None:
                params["cursor"] = cursor
            body = orjson.dumps({"jsonrpc": "2.0", "id": message.id, "method": message.method, "params": params})
            reply = await client.call(body, message.id, server_session, observation.trace_out)
            answer = reply.message or {}
            error = answer.get("error")
            if error is not None:
                code = error.get("code") if isinstance(error, dict) else None
                if code == METHOD_NOT_FOUND:
                    return items
                text = error.get("message") if isinstance(error, dict) else None
                raise _ServerFailed(code if isinstance(code, int) else SERVER_UNAVAILABLE,
                                    f"MCP server {name!r} failed {message.method}: {text or 'error'}")
            result = answer.get("result")
            if not isinstance(result, dict):
                raise UpstreamError(name, SERVER_UNAVAILABLE, f"answered {message.method} without a result")
            for item in result.get(key) or ():
                if isinstance(item, dict) and isinstance(item.get("name"), str) and item["name"]:
                    items.append(item)
            cursor = result.get("nextCursor")
            if not isinstance(cursor, str) or not cursor or cursor in seen:
                return items
            seen.add(cursor)
        log.warning("MCP server %r: %s listing cut at %d pages", name, message.method, MAX_PAGES)
        return items

    async def refuse_unlisted(self, route: McpRoute, server: str, server_session: ServerSession, name: str,
                              original: str, message: Message, observation: Observation) -> web.Response | None:
        """None when `server` listed a tool named exactly `original` (as remembered, else as
        it lists now); otherwise the answer the client gets, so the call never reaches the
        server. Exact names only: a server that matches loosely must not see variants."""
        key: ToolsKey = (server, server_session.session_id)
        listed = self._pool.listed.names(key)
        if listed is None or original not in listed:
            try:
                listed = await self._list_tool_names(key, server_session, observation)
            except (UpstreamError, _ServerFailed) as exc:
                observation.server = server
                return error_reply(observation, message.id, exc.code,
                                   f"{exc.message} (listing its tools to check {name!r})")
        if original in listed:
            return None
        log.info("tool %r refused on %s: MCP server %r lists no tool named exactly %r", name, route.path, server,
                 original)
        return error_reply(observation, message.id, INVALID_PARAMS, f"Unknown tool: {name}")

    async def _list_tool_names(self, key: ToolsKey, server_session: ServerSession,
                               observation: Observation) -> frozenset[str]:
        """List one server's tools (all pages) through its session, and remember the names."""
        request_id = f"{LISTING_ID_PREFIX}{next(self._listing_ids)}"
        listing = Message("request", {"jsonrpc": "2.0", "id": request_id, "method": "tools/list"})
        items = await self._list_server(key[0], server_session, listing, "tools", observation)
        return self._pool.listed.remember(key, (item["name"] for item in items))
