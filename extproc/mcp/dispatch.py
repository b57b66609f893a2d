"""What the gateway does with each JSON-RPC message a client posts.

Why a module of its own: this is the gateway's behaviour as an MCP server, method by
method, apart from HTTP (`extproc.mcp.gateway`), the relay of one call to one server
(`extproc.mcp.relay`) and the merged listings (`extproc.mcp.listings`): `initialize` goes to
every server of the route and signs the session id; other messages need a session of the
route; notifications go to every server of the session; a client's answer goes back to the
server that asked; `ping` is answered here; `tools/list` and `prompts/list` are merged;
`tools/call` and `prompts/get` pick their server by the name's prefix; any other method is
-32601. The full contract is in `extproc.mcp.gateway`'s docstring.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Final

import orjson
from aiohttp import web

from extproc import __version__
from extproc.mcp.access import ToolCheck, tool_check
from extproc.mcp.config import McpRoute
from extproc.mcp.jsonrpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    SERVER_UNAVAILABLE,
    Message,
    error_response,
    split_tool_name,
)
from extproc.mcp.listings import LISTS, Listings
from extproc.mcp.observation import Observation
from extproc.mcp.relay import Relay, server_request_origin
from extproc.mcp.replies import error_reply, json_reply, result_reply
from extproc.mcp.sessions import SESSION_HEADER, GatewaySession, ServerSession, SessionCodec
from extproc.mcp.upstream import GATEWAY_NAME, ServerPool, SessionGone, UpstreamError

if TYPE_CHECKING:
    from extproc.authorization import Policy

log = logging.getLogger("extproc.mcp.gateway")  # the gateway's log lines keep their logger name

__all__ = ["Dispatcher"]

# the method that uses one item by name -> the listing's result key
_BY_NAME: Final = {"tools/call": "tools", "prompts/get": "prompts"}


class Dispatcher:
    """Answers one client message of a route (after the HTTP front has parsed it)."""

    __slots__ = ("_codec", "_pool", "_listings", "_relay", "authorization")

    def __init__(self, codec: SessionCodec, pool: ServerPool, authorization: Policy | None = None) -> None:
        self._codec = codec
        self._pool = pool
        self.authorization = authorization  # which tools each caller may use (None: all the route offers)
        self._listings = Listings(pool)
        self._relay = Relay(pool)

    async def dispatch(self, request: web.Request, route: McpRoute, message: Message,
                       observation: Observation) -> web.StreamResponse:
        """The answer to `message`; what happened is noted in `observation`. An exception
        out of here is unexpected (the HTTP front answers it with -32603)."""
        if message.kind == "request" and message.method == "initialize":
            return await self._initialize(route, message, observation)
        session = self._session(request, route, observation)
        if isinstance(session, web.Response):
            return session
        if message.kind == "notification":
            await self._broadcast(session, message, observation)
            return web.Response(status=202)
        if message.kind == "response":
            return await self._route_response(session, message, observation)
        method = message.method
        if method == "ping":
            return result_reply(observation, message.id, {})
        try:
            allowed = tool_check(self.authorization, request.headers)
            if method in LISTS:
                return await self._listings.list_all(route, session, message, observation, allowed)
            if method in _BY_NAME:
                return await self._by_name(request, route, session, message, observation, allowed)
        except SessionGone as exc:
            log.info("%s", exc)
            observation.http_failure(404, str(exc))
            return json_reply(error_response(message.id, INVALID_REQUEST, f"session not found: {exc}"), 404)
        return error_reply(observation, message.id, METHOD_NOT_FOUND,
                           f"Method not found: {method} (this MCP gateway serves tools/list, tools/call, "
                           "prompts/list, prompts/get and ping)")

    def _session(self, request: web.Request, route: McpRoute,
                 observation: Observation) -> GatewaySession | web.Response:
        token = request.headers.get(SESSION_HEADER)
        if not token:
            observation.http_failure(400, "missing session id")
            return json_reply(error_response(None, INVALID_REQUEST, "Bad Request: Mcp-Session-Id header is required "
                                             "(send initialize first)"), 400)
        session = self._codec.decode_for_route(token, route.path)
        if session is None:
            observation.http_failure(404, "unknown session")
            return json_reply(error_response(None, INVALID_REQUEST, "Session not found: start a new session with "
                                             "initialize"), 404)
        return session

    # -- initialize ------------------------------------------------------------------------

    async def _initialize(self, route: McpRoute, message: Message, observation: Observation) -> web.Response:
        requested = message.params.get("protocolVersion")
        if not isinstance(requested, str) or not requested:
            return error_reply(observation, message.id, INVALID_PARAMS,
                               "Invalid params: initialize needs params.protocolVersion")
        body = orjson.dumps(message.body)
        names = [name for name in route.servers if name in self._pool.clients]
        outcomes = await asyncio.gather(
            *(self._pool.clients[name].call(body, message.id, None, observation.trace_out) for name in names),
            return_exceptions=True,
        )
        joined: dict[str, ServerSession] = {}
        results: dict[str, dict[str, Any]] = {}
        problems: list[str] = []
        for name, outcome in zip(names, outcomes, strict=True):
            if isinstance(outcome, UpstreamError):
                problems.append(outcome.message)
                continue
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome
                problems.append(f"MCP server {name!r} failed ({type(outcome).__name__})")
                continue
            answer = outcome.message or {}
            result = answer.get("result")
            if not isinstance(result, dict) or not isinstance(result.get("protocolVersion"), str):
                error = answer.get("error")
                why = error.get("message") if isinstance(error, dict) else "no InitializeResult"
                problems.append(f"MCP server {name!r} refused initialize: {why}")
                continue
            joined[name] = ServerSession(outcome.session_id, result["protocolVersion"])
            results[name] = result
        for problem in problems:
            log.warning("MCP session on %s starts without a server: %s", route.path, problem)
        if not joined:
            return error_reply(observation, message.id, SERVER_UNAVAILABLE,
                               "no MCP server of this endpoint could be initialized: " + "; ".join(problems))
        versions = {session.protocol_version for session in joined.values() if session.protocol_version}
        agreed = requested if versions == {requested} else min(versions)
        capabilities: dict[str, Any] = {"tools": {"listChanged": False}}
        if any(isinstance(result.get("capabilities"), dict) and "prompts" in result["capabilities"]
               for result in results.values()):
            capabilities["prompts"] = {"listChanged": False}
        gateway_result: dict[str, Any] = {
            "protocolVersion": agreed,
            "capabilities": capabilities,
            "serverInfo": {"name": GATEWAY_NAME, "version": __version__},
        }
        instructions = [
            f"[{name}] {result['instructions']}" for name, result in results.items()
            if isinstance(result.get("instructions"), str) and result["instructions"].strip()
        ]
        if instructions:
            gateway_result["instructions"] = "\n\n".join(instructions)
        token = self._codec.encode(GatewaySession(route.path, agreed, joined))
        return result_reply(observation, message.id, gateway_result, {SESSION_HEADER: token})

    # -- notifications and client answers --------------------------------------------------

    async def _broadcast(self, session: GatewaySession, message: Message, observation: Observation) -> None:
        body = orjson.dumps(message.body)
        names = [name for name in session.servers if name in self._pool.clients]
        outcomes = await asyncio.gather(
            *(self._pool.clients[name].call(body, None, session.servers[name], observation.trace_out)
              for name in names),
            return_exceptions=True,
        )
        for name, outcome in zip(names, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome
                log.info("notification %s not delivered to MCP server %r: %s", message.method, name, outcome)

    async def _route_response(self, session: GatewaySession, message: Message,
                              observation: Observation) -> web.Response:
        """The client answers a request a server sent it through the gateway."""
        target = server_request_origin(message.id)
        if target is None or target[0] not in session.servers or target[0] not in self._pool.clients:
            observation.http_failure(400, "answer to an unknown request")
            return json_reply(error_response(None, INVALID_REQUEST, "no server request has this id"), 400)
        name, original_id = target
        observation.server = name
        body = orjson.dumps({**message.body, "id": original_id})
        try:
            await self._pool.clients[name].call(body, None, session.servers[name], observation.trace_out)
        except (UpstreamError, SessionGone) as exc:
            log.info("answer for MCP server %r not delivered: %s", name, exc)
            observation.fail(SERVER_UNAVAILABLE, str(exc))
        return web.Response(status=202)

    # -- tools/call, prompts/get ---------------------------------------------------------

    async def _by_name(self, request: web.Request, route: McpRoute, session: GatewaySession, message: Message,
                       observation: Observation, allowed: ToolCheck | None = None) -> web.StreamResponse:
        method = message.method or ""
        kind = _BY_NAME[method]
        what = "tool" if kind == "tools" else "prompt"
        params = message.params
        name = params.get("name")
        if not isinstance(name, str) or not name:
            return error_reply(observation, message.id, INVALID_PARAMS, f"Invalid params: {what} name missing")
        split = split_tool_name(name)
        offered = (
            split is not None and split[0] in route.servers and split[0] in self._pool.clients
            and (kind != "tools" or route.offers(name))
        )
        # A tool this caller may not use is refused with the same words as one that does not exist.
        permitted = kind != "tools" or allowed is None or allowed(name)
        if not offered or not permitted or split is None:
            if split is not None and split[0] in route.servers and kind == "tools":
                why = "the route's allow/deny rules" if not offered else "the caller's authorization"
                log.info("tool %r refused on %s: not offered by %s", name, route.path, why)
            return error_reply(observation, message.id, INVALID_PARAMS, f"Unknown {what}: {name}")
        server, original = split
        server_session = session.servers.get(server)
        if server_session is None:
            observation.server = server
            return error_reply(
                observation, message.id, SERVER_UNAVAILABLE,
                f"MCP server {server!r} is not part of this session (it could not be reached when the session "
                "began); start a new session to use it",
            )
        if kind == "tools":
            refusal = await self._listings.refuse_unlisted(route, server, server_session, name, original, message,
                                                           observation)
            if refusal is not None:
                return refusal
            observation.tool = name
            observation.original_tool = original
        observation.server = server
        body = orjson.dumps({**message.body, "params": {**params, "name": original}})
        return await self._relay.relay(request, server, server_session, body, message, observation)
