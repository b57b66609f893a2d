"""Which tools one MCP caller may see and call, from what the request stage established.

The request stage (extproc/exchange.py) runs for MCP paths too, and names the caller for
this gateway in two gateway-owned headers: the tenant (`x-ai-eg-tenant`) and the caller's
own tool globs (`x-ai-eg-tools`, a JSON array, when its key or token has some). It always
sets or removes both, and Envoy drops clients' copies before any filter runs, so they can
be trusted here. A message without a tenant while authorization is on is a caller nobody
named: it may use no tool (fail closed).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import orjson

from extproc.contract import TENANT_HEADER, TOOL_GRANTS_HEADER

if TYPE_CHECKING:
    from extproc.authorization import Policy

ToolCheck = Callable[[str], bool]  # prefixed tool name -> may this caller see and call it


def tool_check(policy: Policy | None, headers: Mapping[str, str]) -> ToolCheck | None:
    """The caller's check; None: no authorization (every tool the route offers)."""
    if policy is None:
        return None
    tenant = headers.get(TENANT_HEADER) or None
    own = _own_tools(headers.get(TOOL_GRANTS_HEADER))
    return lambda tool: policy.allows_tool(tenant, own, tool)


def _own_tools(value: str | None) -> tuple[str, ...] | None:
    """The caller's own globs; a value that is not a JSON array of strings allows nothing."""
    if value is None:
        return None
    try:
        globs = orjson.loads(value)
    except orjson.JSONDecodeError:
        return ()
    if not isinstance(globs, list) or not all(isinstance(g, str) for g in globs):
        return ()
    return tuple(globs)
