"""The MCP gateway: several MCP servers behind one Streamable HTTP endpoint per route.

`McpGateway` (`extproc.mcp.gateway`) runs in processor worker 0 on its own port;
`McpSettings` (`extproc.mcp.config`) is its configuration. Nothing is imported eagerly, so
`from extproc.mcp.config import McpSettings` (in the gateway config) does not load aiohttp;
only a process that runs the gateway does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from extproc.mcp.config import McpRoute, McpServer, McpSettings, resolve_mcp_secrets
    from extproc.mcp.gateway import McpGateway

__all__ = ["McpGateway", "McpRoute", "McpServer", "McpSettings", "resolve_mcp_secrets"]


def __getattr__(name: str) -> Any:
    if name == "McpGateway":
        from extproc.mcp.gateway import McpGateway

        return McpGateway
    if name in ("McpRoute", "McpServer", "McpSettings", "resolve_mcp_secrets"):
        from extproc.mcp import config

        return getattr(config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
