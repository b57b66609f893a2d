"""extproc.mcp.config: the MCP gateway's settings and their credentials."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from extproc.config import ConfigError
from extproc.mcp.config import McpSettings, glob_matches, resolve_mcp_secrets


def settings(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "servers": [
            {"name": "github", "url": "https://mcp.example.com/mcp", "api_key": {"env": "GH_TOKEN"}},
            {"name": "search-1", "url": "http://127.0.0.1:8931/mcp", "headers": {"x-team": "platform"}},
        ],
        "routes": [{"path": "/mcp", "servers": ["github", "search-1"], "deny_tools": ["github__delete_*"]}],
    }
    data.update(overrides)
    return data


def test_defaults_and_shape() -> None:
    parsed = McpSettings.model_validate(settings())
    assert parsed.port == 1065 and parsed.session_secret is None
    # Agents keep tool calls open for minutes: waiting for an answer may take 10 minutes by
    # default; connecting to a server has its own short bound.
    assert parsed.request_timeout_seconds == 600 and parsed.connect_timeout_seconds == 10
    assert parsed.routes[0].allow_tools is None
    assert parsed.server("search-1").headers == {"x-team": "platform"}
    with pytest.raises(ValidationError):
        parsed.port = 1  # type: ignore[misc]  # frozen
    trailing = McpSettings.model_validate(settings(routes=[{"path": "/tools/", "servers": ["github"]}]))
    assert trailing.routes[0].path == "/tools"


def test_route_offers() -> None:
    route = McpSettings.model_validate(settings(routes=[{
        "path": "/mcp", "servers": ["github"], "allow_tools": ["github__*"], "deny_tools": ["*__delete_*"],
    }])).routes[0]
    assert route.offers("github__list_issues")
    assert not route.offers("github__delete_repo")
    assert not route.offers("search-1__query")
    open_route = McpSettings.model_validate(settings()).routes[0]
    assert open_route.offers("search-1__query") and not open_route.offers("github__delete_repo")


@pytest.mark.parametrize(
    ("name", "pattern", "matches"),
    [
        ("github__delete_repo", "github__delete_*", True),
        ("github__DELETE_REPO", "github__delete_*", False),  # case-sensitive, on every platform
        ("github__Delete_repo", "github__delete_*", False),
        ("github__delete_repo", "GITHUB__*", False),
        ("github__delete_repo", "github__delete_repo", True),
        ("github__delete_repo", "github__delete", False),  # the whole name, not a prefix
        ("github__x/y_z", "github__*", True),  # '*' takes '/' and '_'
        ("github__ab", "github__a?", True),
        ("github__a", "github__a?", False),
        ("github__b1", "github__[ab]1", True),
        ("github__c1", "github__[!ab]1", True),
        ("github__a1", "github__[!ab]1", False),
        ("github__a.b", "github__a.b", True),
        ("github__aXb", "github__a.b", False),  # '.' is itself, not a regex
    ],
)
def test_glob_matching(name: str, pattern: str, matches: bool) -> None:
    assert glob_matches(name, pattern) is matches


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"servers": [{"name": "a__b", "url": "http://x/mcp"}]}, "__"),
        ({"servers": [{"name": "a_", "url": "http://x/mcp"}]}, "trailing"),
        ({"servers": [{"name": "a.b", "url": "http://x/mcp"}]}, "letters"),
        ({"servers": [{"name": "session_secret", "url": "http://x/mcp"}]}, "reserved"),
        ({"servers": [{"name": "a", "url": "ftp://x/mcp"}]}, "http"),
        ({"servers": [{"name": "a", "url": "http://x/mcp#frag"}]}, "fragment"),
        ({"servers": [{"name": "a", "url": "http://x/mcp", "headers": {"Mcp-Session-Id": "x"}}]}, "reserved"),
        ({"servers": [{"name": "a", "url": "http://x/mcp", "headers": {"x-a": "1\r\n2"}}]}, "CR"),
        ({"servers": [{"name": "a", "url": "http://x/mcp", "api_key": {"env": "K"},
                       "headers": {"Authorization": "Bearer x"}}]}, "not both"),
        ({"servers": [{"name": "a", "url": "http://x/mcp"}, {"name": "a", "url": "http://y/mcp"}]}, "duplicate"),
        ({"routes": [{"path": "/mcp", "servers": ["nope"]}]}, "unknown MCP server 'nope'"),
        ({"routes": [{"path": "mcp", "servers": ["github"]}]}, "absolute path"),
        ({"routes": [{"path": "/mcp?x=1", "servers": ["github"]}]}, "absolute path"),
        ({"routes": [{"path": "/mcp", "servers": ["github", "github"]}]}, "twice"),
        ({"routes": [{"path": "/mcp", "servers": []}]}, "at least 1"),
        ({"routes": [{"path": "/m", "servers": ["github"]}, {"path": "/m", "servers": ["github"]}]}, "another route"),
        ({"port": 70000}, "less than or equal"),
        ({"request_timeout_seconds": 0}, "greater than 0"),
        ({"connect_timeout_seconds": 0}, "greater than 0"),
        ({"extra": 1}, "Extra inputs"),
    ],
)
def test_refused(change: dict[str, Any], words: str) -> None:
    data = settings(**change)
    if "servers" in change and "routes" not in change:
        data["routes"] = [{"path": "/mcp", "servers": [change["servers"][0]["name"]]}]
    with pytest.raises(ValidationError) as error:
        McpSettings.model_validate(data)
    assert words in str(error.value)


def test_resolve_secrets(tmp_path: Any) -> None:
    secret_file = tmp_path / "session"
    secret_file.write_text("file-secret\n")
    parsed = McpSettings.model_validate(settings(session_secret={"file": str(secret_file)}))
    assert resolve_mcp_secrets(parsed, {"GH_TOKEN": "ghp_123"}) == {
        "github": "ghp_123", "session_secret": "file-secret"
    }
    with pytest.raises(ConfigError) as error:
        resolve_mcp_secrets(parsed.model_copy(update={"session_secret": None}), {"GH_TOKEN": ""})
    assert "mcp.servers[0].api_key" in str(error.value) and "GH_TOKEN" in str(error.value)


@pytest.mark.parametrize("first", ["extproc.config", "extproc.mcp.config", "extproc.mcp"])
def test_imports_in_any_order_without_aiohttp(first: str) -> None:
    """extproc.config and extproc.mcp.config refer to each other; either may be imported first,
    and neither loads aiohttp (only the process running the gateway does)."""
    import subprocess
    import sys

    code = (f"import sys, {first}; import extproc.config, extproc.mcp.config; "
            "assert 'aiohttp' not in sys.modules, 'aiohttp loaded'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
