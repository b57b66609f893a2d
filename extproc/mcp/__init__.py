"""The MCP gateway: several MCP servers behind one Streamable HTTP endpoint per route.

`McpGateway` (`extproc.mcp.gateway`) runs in processor worker 0 on its own port;
`McpSettings` (`extproc.mcp.config`) is its configuration. Nothing is imported eagerly, so
`from extproc.mcp.config import McpSettings` (in the gateway config) does not load aiohttp;
only a process that runs the gateway does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# extproc.config and extproc.mcp.config import each other (GatewayConfig.mcp is McpSettings;
# McpServer.api_key is a SecretRef). Loading extproc.config first, whichever of the two a
# caller imports, makes the cycle resolve as long as extproc.config imports
# extproc.mcp.config after defining SecretRef and ConfigError (not at its top).
import extproc.config  # noqa: F401

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
