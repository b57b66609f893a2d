"""The MCP gateway: several MCP servers offered to clients as one, over Streamable HTTP.

Processor worker 0 runs it on its own port (`mcp.port`); Envoy routes each configured
route path (e.g. `/mcp`) to it. A client connects to a route as to any MCP server; the
gateway keeps one session per server behind the client's one session:

- `initialize` goes to every server of the route at once, with the client's own params
  (its protocol version, capabilities and clientInfo). Each server that answers joins the
  session; its `Mcp-Session-Id` and protocol version go into the gateway's session id (see
  `extproc.mcp.sessions`: signed, nothing is stored, any process with the key can serve
  it). The client gets the gateway's own InitializeResult: serverInfo
  `extproc-mcp-gateway`, capabilities `tools` (and `prompts` when a server has prompts),
  `listChanged: false`, and the client's protocol version when every server accepted it
  (else the oldest version a server answered). A server that cannot be reached at
  `initialize` stays out of that session (logged); only when none answers does
  `initialize` fail. A client gets such a server back by starting a new session.
- `tools/list` (and `prompts/list`): every server of the session, all pages of each
  (following `nextCursor`), merged into one page; each tool is renamed `<server>__<tool>`
  and the route's `allow_tools`/`deny_tools` globs hide tools, and so does the caller's
  authorization (the gateway config's `authorization`: its tenant's tool globs narrowed by
  its key's or token's own, as the request stage names them; `extproc.mcp.access`). A
  failing server is left out of the listing (logged) unless all fail.
- `tools/call` (and `prompts/get`): the prefixed name picks the server; an unknown name, an
  unknown server or a tool the route or the caller's authorization hides is refused with
  -32602 ("Unknown tool: ...", the same words for hidden and missing tools) and never
  forwarded. A `tools/call` name
  must also be exactly `<server>__<tool>` for a tool that server listed, byte for byte
  (`extproc.mcp.toolnames`), so a server's own loose name matching cannot let a variant
  past a deny rule; when the gateway's listing of that server session does not know the
  name, it lists the server again first. Otherwise the message goes to that server with
  its own tool name, session id and credentials,
  and its answer comes back as it arrives: JSON as JSON, an event stream event by event
  (progress notifications, log messages, then the result). A client that does not accept
  `text/event-stream` gets the final JSON. Requests a server sends the client inside
  that stream (sampling, elicitation, roots) get the id `mcpgw/<server>/<original id as
  JSON>`, so the client's answer can be routed back to that server.
- `ping` is answered by the gateway.
- notifications (`notifications/initialized`, `notifications/cancelled`, ...) go to every
  server of the session, and are answered 202 once the servers have them (so
  `notifications/initialized` reaches them before the client's next request).
- `DELETE` ends the session on every server. `GET` (the server-to-client stream) is
  answered 405, which the spec allows: this gateway sends nothing outside of a request's
  own stream (all `listChanged` capabilities are false).
- Not supported, answered -32601: `resources/*` (resource URIs are not namespaced per
  server), `completion/complete`, `logging/setLevel`, `server/discover` (the 2026 stateless
  revision; clients in auto mode then fall back to `initialize`), `subscriptions/*`,
  `tasks/*` and anything else.

HTTP: malformed JSON-RPC gets HTTP 400 with a JSON-RPC error (-32700 parse error, -32600
invalid request, including a batch array); a request without `Mcp-Session-Id` 400; a
session id that is not one this gateway signed (or one for another route) 404, as the
spec says for an unknown session; a server no longer knowing our session (404) makes the
client's session 404 as well, so it starts over. Failures of a server (unreachable,
timeout, 5xx, garbage) are JSON-RPC errors naming it with code -32050, or -32051 when it
does not answer within `request_timeout_seconds` (not connecting within
`connect_timeout_seconds` is -32050: unreachable), never an HTTP 500. The client's own
`Authorization` (or any header but the trace context) is never forwarded; each server gets
its own credentials.

Observability: one span per request (OpenInference kind TOOL for `tools/call`, CHAIN for
the others), a child of the client's W3C trace context: `params._meta.traceparent` (and
`tracestate`) when the message carries a valid one (it is per message; SEP-414), else the
`traceparent`/`tracestate` HTTP headers. The servers get the gateway span's context as
`traceparent`/`tracestate` headers (the incoming context when tracing is off); the
message's `_meta` is passed on unchanged. Metrics `mcp.requests` and
`mcp.request.duration` count every message answered, with `mcp.method.name`,
`mcp.tool.name` (prefixed), `mcp.server` and `error.type` (the JSON-RPC error code,
`tool_error` for a result with `isError`, or the HTTP status class).

This module is the HTTP front: listening, routes, POST/DELETE/GET, reading and parsing the
body, and the last word when something fails unexpectedly. What each message does is in
`extproc.mcp.dispatch`, merged listings and the tool-name check in `extproc.mcp.listings`,
forwarding one call and streaming its answer in `extproc.mcp.relay`, spans and metrics in
`extproc.mcp.observation`, HTTP to one server in `extproc.mcp.upstream`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

import aiohttp
from aiohttp import web

from extproc.mcp.config import SESSION_SECRET_KEY, McpRoute, McpSettings
from extproc.mcp.dispatch import Dispatcher
from extproc.mcp.jsonrpc import INTERNAL_ERROR, INVALID_REQUEST, RpcError, error_response, parse_message
from extproc.mcp.observation import Observer
from extproc.mcp.replies import json_reply
from extproc.mcp.sessions import SESSION_HEADER, SessionCodec
from extproc.mcp.toolnames import ListedTools
from extproc.mcp.upstream import GATEWAY_NAME, ServerClient, ServerPool

if TYPE_CHECKING:
    from extproc.authorization import Policy
    from extproc.telemetry import Telemetry

log = logging.getLogger(__name__)

__all__ = ["GATEWAY_NAME", "McpGateway"]

MAX_BODY_BYTES: Final = 4 * 1024 * 1024  # one client message


class McpGateway:
    """Streamable HTTP MCP endpoint aggregating the configured servers per route."""

    def __init__(self, settings: McpSettings, secrets: Mapping[str, str] | None = None,
                 telemetry: Telemetry | None = None, authorization: Policy | None = None) -> None:
        """`secrets`: from `resolve_mcp_secrets` (server name -> API key, "session_secret" -> key).
        `authorization`: which tools each caller may see and call (`extproc.mcp.access`)."""
        self.telemetry = telemetry
        self._secrets = dict(secrets or {})
        self._codec = SessionCodec(self._secrets.get(SESSION_SECRET_KEY))
        self._settings = settings
        self._routes: dict[str, McpRoute] = {route.path: route for route in settings.routes}
        self._pool = ServerPool()
        self._http: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._dispatcher = Dispatcher(self._codec, self._pool, authorization)
        self._observer = Observer(telemetry)
        self.port: int | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int | None = None, *, shutdown_timeout: float = 5.0) -> int:
        """Listen on host:port (default `settings.port`; 0 = any free port) and return the bound
        port. `shutdown_timeout`: how long `stop` lets requests in flight (streams) finish."""
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1024),
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # servers' cookies must not leak across clients
        )
        self._build_clients()
        app = web.Application(client_max_size=MAX_BODY_BYTES, handler_args={"max_field_size": 16 * 1024})
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, self._settings.port if port is None else port, reuse_address=True)
            await site.start()
        except BaseException:
            await runner.cleanup()
            await self._http.close()
            self._http = None
            raise
        self._runner = runner
        address = runner.addresses[0]
        self.port = int(address[1])
        log.info("MCP gateway listening on http://%s:%d (%s)", host, self.port,
                 ", ".join(f"{r.path} -> {'+'.join(r.servers)}" for r in self._settings.routes))
        return self.port

    async def stop(self) -> None:
        """Stop listening, let requests in flight finish (up to `shutdown_timeout`), close."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        http, self._http = self._http, None
        if http is not None:
            await http.close()

    def update(self, settings: McpSettings, secrets: Mapping[str, str] | None = None,
               authorization: Policy | None = None) -> None:
        """Use new servers, routes and authorization for new requests (a config reload). The
        port and the session key stay as they were until a restart; sessions keep working
        as long as their route and servers do."""
        self._settings = settings
        self._dispatcher.authorization = authorization
        self._secrets = dict(secrets or {})  # the session key in it is ignored: the codec keeps its own
        self._routes = {route.path: route for route in settings.routes}
        self._pool.listed = ListedTools()  # a server name may now stand for another server
        if self._http is not None:
            self._build_clients()

    def _build_clients(self) -> None:
        assert self._http is not None
        settings = self._settings
        self._pool.clients = {
            server.name: ServerClient(server, self._secrets.get(server.name), self._http,
                                      settings.request_timeout_seconds, settings.connect_timeout_seconds)
            for server in settings.servers
        }

    # -- HTTP ----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        route = self._routes.get(path if len(path) <= 1 else path.rstrip("/"))
        if route is None:
            return json_reply(error_response(None, INVALID_REQUEST, f"no MCP endpoint at {path}"), 404)
        if request.method == "POST":
            return await self._post(request, route)
        if request.method == "DELETE":
            return await self._delete(request, route)
        if request.method == "GET":
            return json_reply(
                error_response(None, INVALID_REQUEST, "this MCP endpoint offers no server-to-client stream (GET)"),
                405, {"Allow": "POST, DELETE"},
            )
        return json_reply(error_response(None, INVALID_REQUEST, f"method {request.method} not allowed"), 405,
                          {"Allow": "POST, DELETE"})

    async def _post(self, request: web.Request, route: McpRoute) -> web.StreamResponse:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            observation = self._observer.observe(request, None)
            observation.http_failure(413, "request body too large")
            observation.finish()
            return json_reply(error_response(None, INVALID_REQUEST, f"the message is over {MAX_BODY_BYTES} bytes"), 413)
        parsed = parse_message(body)
        if isinstance(parsed, RpcError):
            observation = self._observer.observe(request, None)
            observation.fail(parsed.code, parsed.message)
            observation.finish()
            return json_reply(parsed.to_bytes(), 400)
        message = parsed
        observation = self._observer.observe(request, message)
        try:
            return await self._dispatcher.dispatch(request, route, message, observation)
        except Exception as exc:  # never an HTTP 500 for a JSON-RPC request
            log.exception("MCP gateway: %s failed", message.method or message.kind)
            observation.fail(INTERNAL_ERROR, f"internal error: {type(exc).__name__}")
            if message.kind != "request":
                return json_reply(error_response(None, INTERNAL_ERROR, "internal error in the MCP gateway"), 500)
            return json_reply(error_response(message.id, INTERNAL_ERROR, "internal error in the MCP gateway"))
        finally:
            observation.finish()

    # -- DELETE --------------------------------------------------------------------------

    async def _delete(self, request: web.Request, route: McpRoute) -> web.Response:
        token = request.headers.get(SESSION_HEADER)
        if not token:
            return json_reply(
                error_response(None, INVALID_REQUEST, "Bad Request: Mcp-Session-Id header is required"), 400
            )
        session = self._codec.decode_for_route(token, route.path)
        if session is None:
            return json_reply(error_response(None, INVALID_REQUEST, "Session not found"), 404)
        names = [name for name, s in session.servers.items() if s.session_id and name in self._pool.clients]
        await asyncio.gather(*(self._pool.clients[name].delete(session.servers[name]) for name in names),
                             return_exceptions=True)
        return web.Response(status=200)
