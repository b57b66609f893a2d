"""The MCP gateway's configuration: the MCP servers it aggregates and the paths it serves them on.

Same conventions as `extproc.config`, from the base both share (`extproc.config_base`):
strict pydantic models (`extra="forbid"`, frozen), errors phrased for an operator,
credentials *referenced* (`SecretRef`) and resolved once by `resolve_mcp_secrets`.

```yaml
mcp:
  port: 1065                        # the gateway's own HTTP port (processor worker 0)
  connect_timeout_seconds: 10       # opening a connection to a server
  request_timeout_seconds: 600      # its answer: first byte, and each silence in a streamed answer
  session_secret: {env: MCP_SESSION_SECRET}   # HMAC key for session ids (default: random per start)
  servers:
    - {name: github, url: "https://mcp.example.com/mcp", api_key: {env: GITHUB_MCP_TOKEN}}
    - {name: search, url: "http://127.0.0.1:8931/mcp", headers: {x-team: platform}}
  routes:
    - path: /mcp
      servers: [github, search]
      allow_tools: ["github__*", "search__query"]   # globs over <server>__<tool>; omit = all
      deny_tools: ["github__delete_*"]
```
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from extproc.config_base import (
    GATEWAY_OWNED_HEADERS,
    SecretRef,
    StrictModel,
    check_extra_headers,
    first_repeat,
    resolve_secret_refs,
)

__all__ = [
    "McpRoute",
    "glob_matches",
    "McpServer",
    "McpSettings",
    "SESSION_SECRET_KEY",
    "TOOL_SEPARATOR",
    "resolve_mcp_secrets",
]

TOOL_SEPARATOR = "__"  # a tool `t` of server `s` is offered to clients as `s__t`
SESSION_SECRET_KEY = "session_secret"  # resolve_mcp_secrets' key for the session HMAC key

# Letters, digits, '_' and '-'; no "__" and no trailing '_', so "<server>__<tool>" splits
# unambiguously at its first "__".
_SERVER_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]|_(?!_))*$")
# Headers the gateway sets itself on every request to a server.
_RESERVED_HEADERS = GATEWAY_OWNED_HEADERS | frozenset(
    {"content-type", "accept", "mcp-session-id", "mcp-protocol-version", "last-event-id", "traceparent",
     "tracestate", "upgrade", "te", "keep-alive", "proxy-connection"}
)
_PATH = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$")


def glob_matches(name: str, pattern: str) -> bool:
    """Does the prefixed tool name `name` match an `allow_tools`/`deny_tools` glob?

    The whole name, case-sensitively on every platform (`fnmatchcase`; `fnmatch.fnmatch`
    would fold case where the OS does, e.g. Windows): `*` matches any run of characters
    (none, `_` and `/` included), `?` exactly one character, `[abc]` / `[!abc]` one character
    in / not in the set; every other character matches only itself.
    """
    return fnmatch.fnmatchcase(name, pattern)


class McpServer(StrictModel):
    """An MCP server reached over the Streamable HTTP transport."""

    name: Annotated[str, Field(min_length=1, max_length=63, description="letters, digits, '_' and '-'")]
    url: str = Field(description="the server's Streamable HTTP endpoint, e.g. https://mcp.example.com/mcp")
    api_key: SecretRef | None = Field(default=None, description="sent as 'Authorization: Bearer <key>'")
    headers: dict[str, str] = Field(default_factory=dict, description="extra headers sent to this server")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not _SERVER_NAME.match(value) or value.endswith("_"):
            raise ValueError(
                "use letters, digits, '_' and '-' (starting with a letter or digit, without '__' and without "
                "a trailing '_': tools are offered as <server>__<tool>)"
            )
        if value == SESSION_SECRET_KEY:
            raise ValueError(f"{SESSION_SECRET_KEY!r} is reserved")
        return value

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host, e.g. https://mcp.example.com/mcp")
        if parts.fragment:
            raise ValueError("must not carry a fragment")
        if not value.isascii() or any(c in value for c in " \t\r\n"):
            raise ValueError("must be ASCII without spaces (percent-encode other characters)")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ValueError("has an invalid port") from None
        return value

    @field_validator("headers")
    @classmethod
    def _valid_headers(cls, value: dict[str, str]) -> dict[str, str]:
        return check_extra_headers(value, _RESERVED_HEADERS)

    @model_validator(mode="after")
    def _one_authorization(self) -> McpServer:
        if self.api_key is not None and any(name.lower() == "authorization" for name in self.headers):
            raise ValueError("set 'api_key' or an 'Authorization' header, not both")
        return self


class McpRoute(StrictModel):
    """A path clients connect to, serving the tools of some servers as one MCP server."""

    path: str = Field(description="the MCP endpoint clients use, e.g. /mcp")
    servers: list[str] = Field(min_length=1, description="names from mcp.servers")
    allow_tools: list[str] | None = Field(
        default=None, description="glob patterns over <server>__<tool>; only matching tools are offered (omit: all)"
    )
    deny_tools: list[str] = Field(default_factory=list, description="glob patterns over <server>__<tool> never offered")

    @field_validator("path")
    @classmethod
    def _valid_path(cls, value: str) -> str:
        if not _PATH.match(value) or "//" in value or "/./" in value or "/../" in value:
            raise ValueError("must be an absolute path such as /mcp (no query string, no '//', '.' or '..' segments)")
        if len(value) > 1:
            value = value.rstrip("/")
        return value

    @field_validator("servers")
    @classmethod
    def _no_repeats(cls, value: list[str]) -> list[str]:
        if repeat := first_repeat(value):
            raise ValueError(f"server {repeat[1]!r} is listed twice")
        return value

    @field_validator("allow_tools", "deny_tools")
    @classmethod
    def _valid_globs(cls, value: list[str] | None) -> list[str] | None:
        for pattern in value or ():
            if not pattern or any(c in pattern for c in "\r\n\0"):
                raise ValueError(f"{pattern!r} is not a usable glob pattern")
        return value

    def offers(self, tool: str) -> bool:
        """Is the prefixed tool name `tool` visible on this route (allowed and not denied)?
        Matched with `glob_matches`, case-sensitively."""
        if self.allow_tools is not None and not any(glob_matches(tool, p) for p in self.allow_tools):
            return False
        return not any(glob_matches(tool, p) for p in self.deny_tools)


class McpSettings(StrictModel):
    """The MCP gateway run by processor worker 0 (Streamable HTTP, on its own port)."""

    servers: list[McpServer] = Field(min_length=1)
    routes: list[McpRoute] = Field(min_length=1)
    port: int = Field(default=1065, ge=0, le=65535, description="HTTP port of the gateway (0: any free port)")
    session_secret: SecretRef | None = Field(
        default=None, description="HMAC key for session ids; default: a random key per process start"
    )
    connect_timeout_seconds: float = Field(
        default=10, gt=0, le=600,
        description="limit on opening a connection to a server (a server that is down fails fast)",
    )
    request_timeout_seconds: float = Field(
        default=600, gt=0, le=3600,
        description="limit on waiting for a server's answer: its first byte and each silence in a stream "
                    "(agents keep tool calls open for minutes)",
    )

    @model_validator(mode="after")
    def _cross_references(self) -> McpSettings:
        names = [server.name for server in self.servers]
        if repeat := first_repeat(names):
            raise ValueError(f"duplicate MCP server name {repeat[1]!r}")
        known = set(names)
        paths: set[str] = set()
        for i, route in enumerate(self.routes):
            if route.path in paths:
                raise ValueError(f"routes[{i}].path: {route.path!r} is used by another route")
            paths.add(route.path)
            for name in route.servers:
                if name not in known:
                    raise ValueError(
                        f"routes[{i}].servers: unknown MCP server {name!r}; defined servers: {', '.join(names)}"
                    )
        return self

    def server(self, name: str) -> McpServer:
        for server in self.servers:
            if server.name == name:
                return server
        raise KeyError(name)


def resolve_mcp_secrets(settings: McpSettings, environ: Mapping[str, str]) -> dict[str, str]:
    """Read every credential the MCP settings reference.

    Returns server name -> API key (servers without `api_key` are absent), plus
    `"session_secret"` -> the HMAC key when `session_secret` is set. Raises `ConfigError`
    naming every field that could not be resolved (never a value).
    """
    refs = [
        (server.name, f"mcp.servers[{i}].api_key", server.api_key)
        for i, server in enumerate(settings.servers)
        if server.api_key is not None
    ]
    if settings.session_secret is not None:
        refs.append((SESSION_SECRET_KEY, "mcp.session_secret", settings.session_secret))
    resolved = resolve_secret_refs(refs, environ, "cannot resolve MCP credentials")
    return {key: secret.get_secret_value() for key, secret in resolved.items()}
