"""Gateway config: what an operator sees when a config loads, or does not."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from pydantic import ValidationError
from hypothesis import strategies as st

from extproc.config import (
    ConfigError,
    LoadedConfig,
    load_config,
    parse_config,
    resolve_secrets,
)
from extproc.config_defaults import config_from_environment, is_demo
from extproc.routing import Router

SECRET = "sk-live-7f3a9c-DO-NOT-LEAK"


def minimal() -> dict[str, Any]:
    """The smallest valid config: one backend, one default route."""
    return {
        "backends": [{"name": "a", "base_url": "https://api.example.com/v1"}],
        "routes": [{"name": "all", "default": True, "backends": [{"name": "a"}]}],
    }


def with_backend(**fields: Any) -> dict[str, Any]:
    data = minimal()
    data["backends"][0].update(fields)
    return data


def error_of(data: Any, source: str = "gateway.yaml") -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source)
    return str(info.value)


def write(tmp_path: Path, text: str, name: str = "gateway.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# -- valid configs -------------------------------------------------------------


def test_full_config_loads(tmp_path: Path) -> None:
    """Every section of a realistic config is read back as written."""
    key_file = tmp_path / "local.key"
    key_file.write_text("sk-local\n", encoding="utf-8")
    path = write(
        tmp_path,
        f"""
        version: 1
        backends:
          - name: openai
            schema: openai
            base_url: https://api.openai.com/v1/
            api_key: {{env: OPENAI_KEY}}
            headers: {{OpenAI-Organization: org-42}}
            request_timeout_seconds: 30
          - name: local
            base_url: http://127.0.0.1:8080/proxy/v1
            api_key: {{file: {key_file}}}
            model_name_override: llama-3-8b
        routes:
          - name: gpt
            match: {{glob: "gpt-*"}}
            backends: [{{name: openai, weight: 3}}, {{name: local}}]
          - name: llama
            match: {{model: [llama, llama-3]}}
            backends: [{{name: local}}]
          - name: fallback
            default: true
            backends: [{{name: local}}]
        limits: {{max_request_body_bytes: 2097152}}
        envoy: {{listen_port: 8080, admin_port: 8081}}
        processor: {{grpc_address: "unix:/tmp/extproc.sock", admin_port: 8082}}
        """,
    )
    loaded = load_config(path, {"OPENAI_KEY": SECRET})
    config = loaded.config
    assert loaded.source == str(path)
    assert [b.name for b in config.backends] == ["openai", "local"]
    assert config.backend("openai").base_url == "https://api.openai.com/v1"  # trailing slash dropped
    assert config.backend("openai").headers == {"OpenAI-Organization": "org-42"}
    assert config.backend("openai").request_timeout_seconds == 30
    assert config.backend("local").model_name_override == "llama-3-8b"
    assert config.backend("local").url.path_prefix == "/proxy/v1"
    assert [r.name for r in config.routes] == ["gpt", "llama", "fallback"]
    assert [(w.name, w.weight) for w in config.routes[0].backends] == [("openai", 3), ("local", 1)]
    assert config.routes[1].match is not None and config.routes[1].match.exact_models == ["llama", "llama-3"]
    assert config.routes[2].default
    assert config.limits.max_request_body_bytes == 2 * 1024 * 1024
    assert (config.envoy.listen_port, config.envoy.admin_port) == (8080, 8081)
    assert (config.processor.grpc_address, config.processor.admin_port) == ("unix:/tmp/extproc.sock", 8082)
    assert loaded.secrets["openai"].get_secret_value() == SECRET
    assert loaded.secrets["local"].get_secret_value() == "sk-local"


def test_defaults() -> None:
    """Unset sections take the documented defaults (4 MiB body, ports 1975/9901/1063/1064)."""
    config = parse_config(minimal())
    assert config.limits.max_request_body_bytes == 4 * 1024 * 1024
    assert config.envoy.listen_port == 1975
    assert config.envoy.admin_port == 9901
    assert config.processor.grpc_address.rsplit(":", 1)[1] == "1063"
    assert config.processor.admin_port == 1064
    backend = config.backends[0]
    assert backend.schema_.value == "openai"
    assert backend.request_timeout_seconds == 0  # no whole-request cut-off for long streams
    assert backend.api_key is None and backend.model_name_override is None and backend.headers == {}
    assert config.routes[0].backends[0].weight == 1


def test_parse_config_does_not_modify_input() -> None:
    """Validating a document leaves the caller's dict untouched."""
    data = with_backend(base_url="https://api.example.com/v1/")
    before = copy.deepcopy(data)
    parse_config(data)
    assert data == before


# -- error messages: file, field path, what is allowed --------------------------


def test_unknown_schema_names_field_and_allowed_value() -> None:
    message = error_of(with_backend(schema="antropic"))
    assert message.startswith("gateway.yaml")
    assert "backends[0].schema" in message
    assert "'openai'" in message
    assert "antropic" in message


@pytest.mark.parametrize(
    "url",
    [
        "ftp://api.example.com/v1",
        "https:///v1",
        "api.example.com/v1",
        "https://api.example.com/v1?api-version=1",
        "https://api.example.com/v1#frag",
    ],
)
def test_bad_base_url(url: str) -> None:
    """Non-http(s) schemes, a missing host and query strings are rejected with an example."""
    message = error_of(with_backend(base_url=url))
    assert "gateway.yaml" in message
    assert "backends[0].base_url" in message


def test_bad_base_url_messages_say_what_is_allowed() -> None:
    assert "https://" in error_of(with_backend(base_url="ftp://api.example.com/v1"))
    assert "https://" in error_of(with_backend(base_url="https:///v1"))
    assert "query" in error_of(with_backend(base_url="https://api.example.com/v1?x=1"))


@given(scheme=st.from_regex(r"\A[a-z][a-z0-9+]{0,8}\Z").filter(lambda s: s not in ("http", "https")))
def test_any_other_url_scheme_is_rejected(scheme: str) -> None:
    message = error_of(with_backend(base_url=f"{scheme}://api.example.com/v1"))
    assert "backends[0].base_url" in message


def test_unknown_field_is_named() -> None:
    """A typo is reported at its own path, not silently ignored."""
    data = with_backend()
    data["backends"][0]["api_kye"] = {"env": "X"}
    message = error_of(data)
    assert "backends[0].api_kye" in message
    assert "unknown field" in message


def test_unknown_top_level_field_is_named() -> None:
    data = minimal()
    data["limit"] = {"max_request_body_bytes": 2048}
    assert "limit: unknown field" in error_of(data)


def test_missing_required_field() -> None:
    data = minimal()
    del data["backends"][0]["base_url"]
    message = error_of(data)
    assert "backends[0].base_url" in message
    assert "required" in message


def test_missing_routes_section() -> None:
    data = minimal()
    del data["routes"]
    assert "routes" in error_of(data)


def test_every_bad_field_is_reported() -> None:
    """Two independent mistakes are both listed, so the operator fixes them in one go."""
    data = with_backend(schema="nope", base_url="ftp://x/v1")
    message = error_of(data)
    assert "backends[0].schema" in message
    assert "backends[0].base_url" in message


def test_route_with_both_match_and_default() -> None:
    data = minimal()
    data["routes"][0]["match"] = {"model": "gpt-4o"}
    message = error_of(data)
    assert "routes[0]" in message
    assert "match" in message and "default" in message


def test_route_with_neither_match_nor_default() -> None:
    data = minimal()
    data["routes"].append({"name": "second", "backends": [{"name": "a"}]})
    message = error_of(data)
    assert "routes[1]" in message
    assert "match" in message and "default" in message


@pytest.mark.parametrize(
    "match",
    [
        {},
        {"model": "a", "prefix": "b"},
        {"model": "a", "glob": "b*"},
        {"prefix": "a", "glob": "b*"},
        {"model": []},
    ],
)
def test_match_needs_exactly_one_of_model_prefix_glob(match: dict[str, Any]) -> None:
    data = minimal()
    data["routes"].insert(0, {"name": "m", "match": match, "backends": [{"name": "a"}]})
    message = error_of(data)
    assert "routes[0].match" in message
    for allowed in ("model", "prefix", "glob"):
        assert allowed in message


def test_duplicate_backend_name() -> None:
    data = minimal()
    data["backends"].append({"name": "a", "base_url": "https://other.example.com/v1"})
    message = error_of(data)
    assert "backends[1].name" in message
    assert "duplicate" in message and "'a'" in message


def test_duplicate_route_name() -> None:
    data = minimal()
    data["routes"].insert(0, {"name": "all", "match": {"prefix": "gpt"}, "backends": [{"name": "a"}]})
    message = error_of(data)
    assert "routes[1].name" in message
    assert "duplicate" in message


def test_two_default_routes() -> None:
    data = minimal()
    data["routes"].append({"name": "other", "default": True, "backends": [{"name": "a"}]})
    message = error_of(data)
    assert "routes[1].default" in message
    assert "only one" in message


def test_unknown_backend_reference_lists_defined_backends() -> None:
    data = minimal()
    data["backends"].append({"name": "b", "base_url": "http://localhost:8000/v1"})
    data["routes"].insert(0, {"name": "m", "match": {"prefix": "gpt"}, "backends": [{"name": "openia"}]})
    message = error_of(data)
    assert "routes[0].backends[0].name" in message
    assert "openia" in message
    assert "a, b" in message


def test_unknown_backend_reference_in_second_route() -> None:
    data = minimal()
    data["routes"].append(
        {"name": "m", "match": {"prefix": "gpt"}, "backends": [{"name": "a"}, {"name": "missing"}]}
    )
    assert "routes[1].backends[1].name" in error_of(data)


def test_weight_zero() -> None:
    data = minimal()
    data["routes"][0]["backends"][0]["weight"] = 0
    message = error_of(data)
    assert "routes[0].backends[0].weight" in message
    assert "1" in message


@pytest.mark.parametrize(
    "name",
    ["host", "Host", "content-length", "Content-Length", "x-ai-eg-model", "X-AI-EG-Backend", "x-ai-eg-anything", ":path", ":authority"],
)
def test_reserved_extra_header_names(name: str) -> None:
    """The gateway owns these headers; a backend may not set them."""
    message = error_of(with_backend(headers={name: "v"}))
    assert "backends[0].headers" in message
    assert repr(name) in message


@pytest.mark.parametrize("name", ["bad header", "x:y", ""])
def test_invalid_extra_header_names(name: str) -> None:
    assert "backends[0].headers" in error_of(with_backend(headers={name: "v"}))


@given(
    before=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=10),
    bad=st.sampled_from(["\r", "\n", "\r\n", "\0"]),
    after=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=10),
)
def test_extra_header_value_with_cr_lf_is_rejected(before: str, bad: str, after: str) -> None:
    """Header injection through config is impossible."""
    message = error_of(with_backend(headers={"x-team": before + bad + after}))
    assert "backends[0].headers" in message
    assert "'x-team'" in message


def test_plain_extra_headers_are_accepted() -> None:
    config = parse_config(with_backend(headers={"OpenAI-Organization": "org-1", "x-team": "a b;c=d"}))
    assert config.backends[0].headers["x-team"] == "a b;c=d"


@pytest.mark.parametrize("override", ["llama\n3", "llama\r", "", "   ", "a\0b"])
def test_model_name_override_must_be_clean(override: str) -> None:
    message = error_of(with_backend(model_name_override=override))
    assert "backends[0].model_name_override" in message


@pytest.mark.parametrize("name", ["", "has space", "-leading-dash", "x" * 64, "slash/name"])
def test_invalid_backend_names(name: str) -> None:
    data = minimal()
    data["backends"][0]["name"] = name
    data["routes"][0]["backends"][0]["name"] = name
    assert "backends[0].name" in error_of(data)


def test_body_limit_bounds() -> None:
    data = minimal()
    data["limits"] = {"max_request_body_bytes": 10}
    assert "limits.max_request_body_bytes" in error_of(data)


def test_parse_config_source_defaults_to_placeholder() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(with_backend(schema="x"))
    assert str(info.value).startswith("<config>")


# -- files -----------------------------------------------------------------------


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        backends:
          - name: a
           base_url: https://api.example.com/v1
        routes: []
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    message = str(info.value)
    assert str(path) in message
    assert "YAML" in message
    assert "line 3" in message


def test_invalid_yaml_unclosed_bracket(tmp_path: Path) -> None:
    path = write(tmp_path, "backends: [\n  {name: a\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(path) in str(info.value)
    assert "line " in str(info.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    message = str(info.value)
    assert str(path) in message
    assert "mapping" in message


def test_parse_config_rejects_non_mapping() -> None:
    assert "mapping" in error_of(["backends"])


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(path) in str(info.value)
    assert "cannot read" in str(info.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, {})
    assert str(tmp_path) in str(info.value)


def test_validation_error_from_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(with_backend(schema="bedrock")), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(info.value).startswith(str(path))
    assert "backends[0].schema" in str(info.value)


# -- secrets ----------------------------------------------------------------------


def secret_config(tmp_path: Path, *api_keys: dict[str, Any]) -> Path:
    data = minimal()
    data["backends"] = [
        {"name": f"b{i}", "base_url": "https://api.example.com/v1", "api_key": key} for i, key in enumerate(api_keys)
    ]
    data["routes"][0]["backends"] = [{"name": "b0"}]
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_secret_from_env(tmp_path: Path) -> None:
    loaded = load_config(secret_config(tmp_path, {"env": "MY_KEY"}), {"MY_KEY": SECRET})
    assert loaded.secrets["b0"].get_secret_value() == SECRET


def test_secret_from_file_is_stripped(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(f"  {SECRET}\n\n", encoding="utf-8")
    loaded = load_config(secret_config(tmp_path, {"file": str(key_file)}), {})
    assert loaded.secrets["b0"].get_secret_value() == SECRET


def test_secret_from_env_is_stripped(tmp_path: Path) -> None:
    """A key exported with a trailing newline (e.g. from `$(cat key)` plus echo) still works."""
    loaded = load_config(secret_config(tmp_path, {"env": "MY_KEY"}), {"MY_KEY": f"{SECRET}\n"})
    assert loaded.secrets["b0"].get_secret_value() == SECRET


@pytest.mark.parametrize("inner", ["\n", "\r\n", "\r", "\0"])
def test_secret_with_line_break_inside_is_rejected(tmp_path: Path, inner: str) -> None:
    """The key becomes an Authorization header value; one that cannot be a header value is a load error."""
    key_file = tmp_path / "key"
    key_file.write_text(f"{SECRET}{inner}sk-second-line", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(secret_config(tmp_path, {"file": str(key_file)}), {})
    assert "backends[0].api_key" in str(info.value)
    assert SECRET not in str(info.value)


def test_backend_without_key_has_no_secret(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(minimal()), encoding="utf-8")
    assert load_config(path, {}).secrets == {}


def test_missing_env_var_is_named_and_no_secret_leaks(tmp_path: Path) -> None:
    """The error says which variable is missing and never prints another backend's key."""
    path = secret_config(tmp_path, {"env": "GOOD_KEY"}, {"env": "MISSING_KEY"})
    with pytest.raises(ConfigError) as info:
        load_config(path, {"GOOD_KEY": SECRET, "UNRELATED": "x"})
    message = str(info.value)
    assert str(path) in message
    assert "backends[1].api_key" in message
    assert "MISSING_KEY" in message
    assert SECRET not in message
    assert SECRET not in repr(info.value)


def test_empty_env_var_counts_as_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(secret_config(tmp_path, {"env": "EMPTY_KEY"}), {"EMPTY_KEY": ""})
    assert "EMPTY_KEY" in str(info.value)


def test_empty_secret_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(" \n\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(secret_config(tmp_path, {"file": str(key_file)}), {})
    message = str(info.value)
    assert "backends[0].api_key" in message
    assert str(key_file) in message
    assert "empty" in message


def test_missing_secret_file(tmp_path: Path) -> None:
    key_file = tmp_path / "absent.key"
    with pytest.raises(ConfigError) as info:
        load_config(secret_config(tmp_path, {"file": str(key_file)}), {})
    assert str(key_file) in str(info.value)


def test_all_credential_problems_listed_without_values(tmp_path: Path) -> None:
    empty = tmp_path / "empty.key"
    empty.write_text("", encoding="utf-8")
    path = secret_config(tmp_path, {"env": "A_KEY"}, {"env": "B_KEY"}, {"file": str(empty)})
    with pytest.raises(ConfigError) as info:
        load_config(path, {"B_KEY": SECRET})
    message = str(info.value)
    assert "backends[0].api_key" in message and "A_KEY" in message
    assert "backends[2].api_key" in message
    assert "backends[1]" not in message
    assert SECRET not in message


@pytest.mark.parametrize("ref", [{}, {"env": "K", "file": "/tmp/k"}])
def test_api_key_needs_exactly_one_source(ref: dict[str, Any]) -> None:
    message = error_of(with_backend(api_key=ref))
    assert "backends[0].api_key" in message
    assert "env" in message and "file" in message


def test_with_secrets_false_skips_resolution(tmp_path: Path) -> None:
    loaded = load_config(secret_config(tmp_path, {"env": "NOT_SET_ANYWHERE"}), {}, with_secrets=False)
    assert loaded.secrets == {}
    assert loaded.config.backends[0].api_key is not None


def test_secrets_never_shown(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    file_secret = "sk-file-0b5e-ALSO-SECRET"
    key_file.write_text(file_secret, encoding="utf-8")
    loaded = load_config(secret_config(tmp_path, {"env": "K"}, {"file": str(key_file)}), {"K": SECRET})
    for shown in (repr(loaded), str(loaded), repr(loaded.secrets), loaded.model_dump_json()):
        assert SECRET not in shown
        assert file_secret not in shown
    assert loaded.secrets["b1"].get_secret_value() == file_secret


def test_secret_from_os_environ_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXTPROC_TEST_KEY_FROM_OS", SECRET)
    loaded = load_config(secret_config(tmp_path, {"env": "EXTPROC_TEST_KEY_FROM_OS"}))
    assert loaded.secrets["b0"].get_secret_value() == SECRET


# -- config_from_environment -------------------------------------------------------


def test_no_provider_env_gives_demo() -> None:
    loaded = config_from_environment({})
    config = loaded.config
    assert is_demo(loaded)
    assert [b.name for b in config.backends] == ["demo"]
    assert config.backend("demo").base_url == "http://127.0.0.1:1976/v1"
    assert any(r.default for r in config.routes)
    assert loaded.secrets == {}


def test_demo_port_is_configurable() -> None:
    assert config_from_environment({}, demo_port=2999).config.backend("demo").url.port == 2999


def test_openai_api_key_gives_openai_backend() -> None:
    loaded = config_from_environment({"OPENAI_API_KEY": SECRET})
    config = loaded.config
    assert not is_demo(loaded)
    assert [b.name for b in config.backends] == ["openai"]
    assert config.backend("openai").base_url == "https://api.openai.com/v1"
    assert loaded.secrets["openai"].get_secret_value() == SECRET
    defaults = [r for r in config.routes if r.default]
    assert len(defaults) == 1 and [w.name for w in defaults[0].backends] == ["openai"]
    assert SECRET not in repr(loaded)


def test_openai_base_url_keeps_path_prefix() -> None:
    loaded = config_from_environment({"OPENAI_API_KEY": SECRET, "OPENAI_BASE_URL": "http://host:8080/proxy/v1/"})
    backend = loaded.config.backend("openai")
    assert backend.base_url == "http://host:8080/proxy/v1"
    assert (backend.url.host, backend.url.port, backend.url.path_prefix) == ("host", 8080, "/proxy/v1")


def test_bad_openai_base_url_is_an_error_without_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_environment({"OPENAI_API_KEY": SECRET, "OPENAI_BASE_URL": "ftp://host/v1"})
    assert "base_url" in str(info.value)
    assert SECRET not in str(info.value)


def test_base_url_alone_does_not_select_openai() -> None:
    """Without a key there is no provider: the demo still answers."""
    assert is_demo(config_from_environment({"OPENAI_BASE_URL": "http://host:8080/v1"}))


def test_loaded_config_is_immutable() -> None:
    loaded = config_from_environment({})
    assert isinstance(loaded, LoadedConfig)
    with pytest.raises(ValidationError):
        loaded.config.backends[0].base_url = "http://evil/v1"  # type: ignore[misc]


@pytest.mark.parametrize(
    "section",
    [
        {"telemetry": {"metric_header_attributes": {"Authorization": "auth"}}},
        {"telemetry": {"user_id_header": "cookie"}},
        {"tenancy": {"header": "x-api-key"}},
        {"metadata": {"session_id_header": "Proxy-Authorization"}},
    ],
)
def test_credential_headers_are_never_published(section: dict) -> None:
    """A header carrying credentials cannot be mapped into metadata, metrics or spans."""
    base = {
        "backends": [{"name": "a", "base_url": "http://127.0.0.1:1/v1"}],
        "routes": [{"name": "r", "default": True, "backends": [{"name": "a"}]}],
    }
    with pytest.raises(ConfigError, match="carries credentials"):
        parse_config({**base, **section}, "gw.yaml")


# -- more providers from the environment ----------------------------------------------


def test_anthropic_key_serves_claude_models_with_sdk_base_url_convention() -> None:
    loaded = config_from_environment({"ANTHROPIC_API_KEY": SECRET, "ANTHROPIC_BASE_URL": "http://proxy:9000/anthropic/"})
    backend = loaded.config.backend("anthropic")
    assert backend.schema_.value == "anthropic"
    # The anthropic SDK's base URL has no /v1 (the gateway appends /v1/messages); a prefix is kept.
    assert backend.url.path_prefix == "/anthropic"
    assert loaded.secrets["anthropic"].get_secret_value() == SECRET
    route = next(r for r in loaded.config.routes if r.name == "anthropic")
    assert route.match is not None and route.match.glob == "claude-*"
    assert not any(r.default for r in loaded.config.routes)


def test_azure_alone_is_the_default_and_openai_falls_back_to_it() -> None:
    azure_env = {"AZURE_OPENAI_API_KEY": SECRET, "AZURE_OPENAI_ENDPOINT": "https://res.openai.azure.com",
                 "OPENAI_API_VERSION": "2024-06-01"}
    alone = config_from_environment(azure_env).config
    assert alone.backend("azure").api_version == "2024-06-01"
    assert [(b.name, b.priority) for b in alone.routes[-1].backends] == [("azure", 0)]
    both = config_from_environment({**azure_env, "OPENAI_API_KEY": "sk-other"}).config
    default = next(r for r in both.routes if r.default)
    assert [(b.name, b.priority) for b in default.backends] == [("openai", 0), ("azure", 1)]
    assert default.has_fallback


def test_aws_credentials_and_region_give_bedrock_for_bedrock_model_ids() -> None:
    loaded = config_from_environment({"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": SECRET,
                                      "AWS_REGION": "eu-west-1"})
    backend = loaded.config.backend("bedrock")
    assert backend.base_url == "https://bedrock-runtime.eu-west-1.amazonaws.com"
    assert backend.aws is not None and backend.aws.region == "eu-west-1" and backend.aws.access_key_id is None
    prefixes = [r.match.prefix for r in loaded.config.routes if r.match is not None]
    assert "anthropic." in prefixes and "us." in prefixes
    assert SECRET not in repr(loaded)
    # A region alone (no credentials) is not a provider.
    assert is_demo(config_from_environment({"AWS_REGION": "eu-west-1"}))


@pytest.mark.parametrize(
    ("backend", "needle"),
    [
        ({"name": "b", "schema": "aws_bedrock"}, "aws"),
        ({"name": "b", "schema": "aws_bedrock", "aws": {"region": "us-east-1"}, "api_key": {"env": "K"}}, "api_key"),
        ({"name": "b", "schema": "azure_openai", "base_url": "https://r.openai.azure.com"}, "api_version"),
        ({"name": "b", "schema": "openai", "base_url": "https://x/v1", "deployment": "d"}, "azure_openai"),
        ({"name": "b", "schema": "aws_bedrock", "aws": {"region": "us-east-1", "access_key_id": {"env": "A"}}},
         "secret_access_key"),
        ({"name": "b", "schema": "aws_bedrock", "aws": {"region": "mars"}}, "region"),
    ],
)
def test_provider_fields_are_checked_per_schema(backend: dict, needle: str) -> None:
    data = {"backends": [backend], "routes": [{"name": "r", "default": True, "backends": [{"name": "b"}]}]}
    assert needle in error_of(data)


def test_fallback_priorities_must_not_skip_a_level() -> None:
    data = minimal()
    data["backends"].append({"name": "second", "base_url": "http://127.0.0.1:2/v1"})
    data["routes"][0]["backends"] = [{"name": data["backends"][0]["name"]}, {"name": "second", "priority": 2}]
    assert "priorities" in error_of(data)


def test_aws_keys_from_config_are_resolved_as_secrets() -> None:
    data = {
        "backends": [{"name": "br", "schema": "aws_bedrock", "aws": {
            "region": "us-east-1", "access_key_id": {"env": "MY_AK"}, "secret_access_key": {"env": "MY_SK"}}}],
        "routes": [{"name": "r", "default": True, "backends": [{"name": "br"}]}],
    }
    config = parse_config(data)
    secrets = resolve_secrets(config, {"MY_AK": "AKIDX", "MY_SK": SECRET}, "<test>")
    assert secrets["br/aws.access_key_id"].get_secret_value() == "AKIDX"
    assert secrets["br/aws.secret_access_key"].get_secret_value() == SECRET
    with pytest.raises(ConfigError) as info:
        resolve_secrets(config, {"MY_AK": "AKIDX"}, "<test>")
    assert "backends[0].aws.secret_access_key" in str(info.value)


# -- OpenAI-compatible clouds from the environment --------------------------------------


@pytest.mark.parametrize(
    ("variables", "name", "base_url", "client_model", "backend_model"),
    [
        ({"GROQ_API_KEY": SECRET}, "groq", "https://api.groq.com/openai/v1",
         "groq/llama-3.3-70b-versatile", "llama-3.3-70b-versatile"),
        ({"MISTRAL_API_KEY": SECRET}, "mistral", "https://api.mistral.ai/v1",
         "mistral/mistral-large-latest", "mistral-large-latest"),
        ({"DEEPSEEK_API_KEY": SECRET}, "deepseek", "https://api.deepseek.com", "deepseek/deepseek-chat",
         "deepseek-chat"),
        ({"TOGETHER_API_KEY": SECRET, "TOGETHER_BASE_URL": "http://proxy:8080/together/v1/"}, "together",
         "http://proxy:8080/together/v1", "together/meta-llama/Llama-3.3-70B-Instruct-Turbo",
         "meta-llama/Llama-3.3-70B-Instruct-Turbo"),
        ({"OPENROUTER_API_KEY": SECRET}, "openrouter", "https://openrouter.ai/api/v1",
         "openrouter/anthropic/claude-sonnet-4", "anthropic/claude-sonnet-4"),
        ({"OLLAMA_HOST": "127.0.0.1:11434"}, "ollama", "http://127.0.0.1:11434/v1", "ollama/llama3.2:3b",
         "llama3.2:3b"),
    ],
)
def test_compatible_cloud_keys_serve_prefixed_models(
    variables: dict[str, str], name: str, base_url: str, client_model: str, backend_model: str
) -> None:
    """Each cloud's SDK variable gives a backend; clients name its models `<cloud>/<model>`
    and the backend is asked for the model without that prefix."""
    loaded = config_from_environment(variables)
    backend = loaded.config.backend(name)
    assert backend.base_url == base_url
    if name == "ollama":
        assert backend.api_key is None and name not in loaded.secrets
    else:
        assert loaded.secrets[name].get_secret_value() == SECRET
    assert SECRET not in repr(loaded)
    route, target = Router(loaded.config, loaded.secrets).select(client_model) or (None, None)
    assert route is not None and target is not None and target.name == name
    assert target.model_for(client_model) == backend_model
    assert Router(loaded.config, loaded.secrets).select("gpt-4o-mini") is None  # no default route: unrouted


def test_strip_model_prefix_leaves_other_names_and_yields_to_the_override() -> None:
    data = {
        "backends": [
            {"name": "g", "base_url": "http://127.0.0.1:1/v1", "strip_model_prefix": "groq/"},
            {"name": "o", "base_url": "http://127.0.0.1:2/v1", "strip_model_prefix": "groq/",
             "model_name_override": "fixed"},
        ],
        "routes": [{"name": "g", "match": {"prefix": "groq/"}, "backends": [{"name": "g"}]},
                   {"name": "r", "default": True, "backends": [{"name": "o"}]}],
    }
    router = Router(parse_config(data, "gw.yaml"), {})
    g, o = router.targets["g"], router.targets["o"]
    assert g.model_for("groq/llama") == "llama"
    assert g.model_for("llama") == "llama"  # without the prefix: as sent
    assert g.model_for("groq/") == "groq/"  # nothing would be left: as sent
    assert o.model_for("groq/llama") == "fixed"
    bad = {**data, "backends": [{"name": "g", "base_url": "http://127.0.0.1:1/v1", "strip_model_prefix": " "}]}
    assert "strip_model_prefix" in error_of(bad)


# -- Vertex AI from the SDKs' variables -----------------------------------------------------


def test_vertex_from_google_genai_and_anthropic_vertex_variables() -> None:
    """google-genai's Vertex switch serves gemini-* (ahead of a Gemini API key, as the SDK
    prefers it); the anthropic SDK's Vertex variables serve claude-* (after Anthropic's own
    key); one backend when both name the same project and region; tokens from application
    default credentials, so nothing is read at load."""
    env = {"GOOGLE_GENAI_USE_VERTEXAI": "true", "GOOGLE_CLOUD_PROJECT": "my-project",
           "GOOGLE_CLOUD_LOCATION": "us-east5", "ANTHROPIC_VERTEX_PROJECT_ID": "my-project",
           "CLOUD_ML_REGION": "us-east5", "GEMINI_API_KEY": SECRET}
    loaded = config_from_environment(env)
    vertex = loaded.config.backend("vertex")
    assert vertex.schema_.value == "gcp_vertex_ai" and vertex.base_url == "https://us-east5-aiplatform.googleapis.com"
    assert vertex.vertex is not None and vertex.vertex.credentials_file is None and vertex.vertex.credentials is None
    assert [b.name for b in loaded.config.backends] == ["vertex", "gemini"]
    router = Router(loaded.config, loaded.secrets)
    assert router.targets["vertex"] is (router.select("gemini-2.5-flash") or (None, None))[1]
    assert router.targets["vertex"] is (router.select("claude-sonnet-4-5") or (None, None))[1]
    # Anthropic's own key keeps claude-*; another region gets its own backend.
    other = config_from_environment({**env, "CLOUD_ML_REGION": "europe-west1", "ANTHROPIC_API_KEY": SECRET})
    assert other.config.backend("vertex-anthropic").vertex.region == "europe-west1"  # type: ignore[union-attr]
    picked = Router(other.config, other.secrets).select("claude-sonnet-4-5")
    assert picked is not None and picked[1].name == "anthropic"
    # The switch alone, or a project without a region, is no provider.
    assert is_demo(config_from_environment({"GOOGLE_GENAI_USE_VERTEXAI": "true", "GOOGLE_CLOUD_PROJECT": "p"}))
    assert is_demo(config_from_environment({"ANTHROPIC_VERTEX_PROJECT_ID": "my-project"}))
