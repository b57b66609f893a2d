"""The gemini backend schema in a config file and from the environment, and its credential."""

from __future__ import annotations

import pytest

from extproc.backend_auth import CREDENTIAL_HEADERS, auth_for
from extproc.config import GEMINI_BASE_URL, ConfigError, parse_config, resolve_secrets
from extproc.config_defaults import config_from_environment, is_demo

SECRET = "AIza-secret-gemini-key-0123"


def _config(**backend: object) -> dict[str, object]:
    return {"backends": [{"name": "g", "schema": "gemini", **backend}],
            "routes": [{"name": "r", "default": True, "backends": [{"name": "g"}]}]}


def test_base_url_defaults_to_ai_studio_with_the_version() -> None:
    backend = parse_config(_config()).backend("g")
    assert backend.base_url == GEMINI_BASE_URL == "https://generativelanguage.googleapis.com/v1beta"
    assert backend.url.path_prefix == "/v1beta" and backend.url.tls
    assert parse_config(_config(base_url="http://proxy:8080/gemini/v1/")).backend("g").url.path_prefix == "/gemini/v1"


def test_the_key_goes_in_x_goog_api_key_only() -> None:
    config = parse_config(_config(api_key={"env": "GK"}))
    secrets = resolve_secrets(config, {"GK": SECRET}, "<test>")
    auth = auth_for(config.backend("g"), secrets)
    assert auth.headers() == (("x-goog-api-key", SECRET.encode()),)
    assert SECRET not in repr(auth)
    assert "x-goog-api-key" in CREDENTIAL_HEADERS  # removed on attempts to other backends
    assert auth_for(config.backend("g"), {}).headers() == ()  # no key configured: none sent


@pytest.mark.parametrize(("extra", "needle"), [
    ({"aws": {"region": "us-east-1"}}, "aws"),
    ({"api_version": "2024-10-21"}, "azure_openai"),
    ({"base_url": "https://x/v1beta?key=abc"}, "query"),
])
def test_fields_of_other_schemas_are_refused(extra: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_config(**extra), "gw.yaml")
    assert needle in str(info.value)


def test_google_or_gemini_api_key_serves_gemini_models() -> None:
    loaded = config_from_environment({"GEMINI_API_KEY": SECRET})
    backend = loaded.config.backend("gemini")
    assert backend.schema_.value == "gemini" and backend.base_url == GEMINI_BASE_URL
    assert loaded.secrets["gemini"].get_secret_value() == SECRET
    route = next(r for r in loaded.config.routes if r.name == "gemini")
    assert route.match is not None and route.match.glob == "gemini-*"
    assert not any(r.default for r in loaded.config.routes)
    assert SECRET not in repr(loaded)
    # The google-genai SDK's order: GOOGLE_API_KEY wins over GEMINI_API_KEY.
    both = config_from_environment({"GEMINI_API_KEY": "other", "GOOGLE_API_KEY": SECRET})
    assert both.secrets["gemini"].get_secret_value() == SECRET
    assert is_demo(config_from_environment({"GOOGLE_GEMINI_BASE_URL": "http://proxy:1"}))  # a URL alone: no provider


def test_sdk_base_url_and_version_variables() -> None:
    env = {"GOOGLE_API_KEY": SECRET, "GOOGLE_GEMINI_BASE_URL": "http://proxy:9000/google/"}
    assert config_from_environment(env).config.backend("gemini").base_url == "http://proxy:9000/google/v1beta"
    versioned = config_from_environment({**env, "GOOGLE_GENAI_API_VERSION": "v1"}).config.backend("gemini")
    assert versioned.base_url == "http://proxy:9000/google/v1"
    only_version = config_from_environment({"GOOGLE_API_KEY": SECRET, "GOOGLE_GENAI_API_VERSION": "v1"})
    assert only_version.config.backend("gemini").base_url == "https://generativelanguage.googleapis.com/v1"
