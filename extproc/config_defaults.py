"""The config the `extproc` commands use when given no `--config` file.

A separate concern from `extproc.config` (what a config file may say): here the
gateway is put together from the variables each provider's official SDK reads, or,
with none set, from the offline demo backend (`extproc.sim`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from extproc.config import GEMINI_BASE_URL, LoadedConfig, parse_config, resolve_secrets

DEMO_BACKEND = "demo"
DEMO_PORT = 1976
DEMO_SOURCE = "<built-in demo>"  # LoadedConfig.source of the demo; is_demo() checks it

# Bedrock model ids start with the provider (or a cross-region inference prefix).
BEDROCK_MODEL_PREFIXES = ("anthropic.", "amazon.", "meta.", "mistral.", "cohere.", "ai21.", "deepseek.", "qwen.",
                          "writer.", "us.", "eu.", "apac.", "global.")


@dataclass(frozen=True, slots=True)
class CompatibleCloud:
    """An OpenAI-compatible provider `extproc run` configures from its SDK's usual key
    variable; clients name its models `<name>/<model>` (the prefix is removed upstream)."""

    name: str
    key_variable: str | None  # None: no key (a local server), configured from url_variable alone
    base_url: str
    url_variable: str | None = None  # overrides base_url when set
    url_suffix: str = ""  # appended to url_variable's value (Ollama's OLLAMA_HOST has no /v1)


COMPATIBLE_CLOUDS = (
    CompatibleCloud("groq", "GROQ_API_KEY", "https://api.groq.com/openai/v1", "GROQ_BASE_URL"),
    CompatibleCloud("mistral", "MISTRAL_API_KEY", "https://api.mistral.ai/v1"),
    CompatibleCloud("deepseek", "DEEPSEEK_API_KEY", "https://api.deepseek.com"),
    CompatibleCloud("together", "TOGETHER_API_KEY", "https://api.together.xyz/v1", "TOGETHER_BASE_URL"),
    CompatibleCloud("openrouter", "OPENROUTER_API_KEY", "https://openrouter.ai/api/v1"),
    CompatibleCloud("ollama", None, "http://127.0.0.1:11434/v1", "OLLAMA_HOST", "/v1"),
)


def _compatible_cloud_backend(cloud: CompatibleCloud, env: Mapping[str, str]) -> dict[str, Any] | None:
    """The cloud's backend when its variable is set, else None."""
    if cloud.key_variable is not None and not env.get(cloud.key_variable):
        return None
    url = env.get(cloud.url_variable) if cloud.url_variable else None
    if cloud.key_variable is None and not url:
        return None
    if url:
        url = url.rstrip("/")
        if "://" not in url:  # OLLAMA_HOST may be host:port alone
            url = f"http://{url}"
        url += cloud.url_suffix if not url.endswith(cloud.url_suffix) else ""
    backend: dict[str, Any] = {"name": cloud.name, "schema": "openai", "base_url": url or cloud.base_url,
                               "strip_model_prefix": f"{cloud.name}/"}
    if cloud.key_variable is not None:
        backend["api_key"] = {"env": cloud.key_variable}
    return backend


def _aws_region(env: Mapping[str, str]) -> str | None:
    return env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None


def _aws_credentials_present(env: Mapping[str, str]) -> bool:
    """Explicit AWS credentials in the environment (keys or a named profile); the
    processor then signs with botocore's chain, which also finds files and roles."""
    return bool((env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY")) or env.get("AWS_PROFILE"))


def _gemini_backend(env: Mapping[str, str]) -> dict[str, Any] | None:
    """A Gemini API backend from the google-genai SDK's variables: GOOGLE_API_KEY, else
    GEMINI_API_KEY (the SDK's own order); GOOGLE_GEMINI_BASE_URL without the version, which
    GOOGLE_GENAI_API_VERSION may name (default v1beta)."""
    key_var = next((v for v in ("GOOGLE_API_KEY", "GEMINI_API_KEY") if env.get(v)), None)
    if key_var is None:
        return None
    backend: dict[str, Any] = {"name": "gemini", "schema": "gemini", "api_key": {"env": key_var}}
    base = env.get("GOOGLE_GEMINI_BASE_URL")
    version = env.get("GOOGLE_GENAI_API_VERSION")
    if base or version:
        root = (base or GEMINI_BASE_URL.rsplit("/", 1)[0]).rstrip("/")
        backend["base_url"] = f"{root}/{'v1beta' if version in (None, '', 'beta') else version}"
    return backend


def _vertex_backends(env: Mapping[str, str]) -> list[tuple[dict[str, Any], str]]:
    """Vertex AI backends (with the glob each serves) from the SDKs' own variables, with
    application default credentials: google-genai's GOOGLE_GENAI_USE_VERTEXAI +
    GOOGLE_CLOUD_PROJECT + GOOGLE_CLOUD_LOCATION for `gemini-*`; the anthropic SDK's
    ANTHROPIC_VERTEX_PROJECT_ID + CLOUD_ML_REGION for `claude-*`. One backend when both
    name the same project and region."""
    wanted: list[tuple[str, str, str]] = []  # (project, region, glob)
    if env.get("GOOGLE_GENAI_USE_VERTEXAI", "").lower() in ("true", "1"):
        project, region = env.get("GOOGLE_CLOUD_PROJECT"), env.get("GOOGLE_CLOUD_LOCATION")
        if project and region:
            wanted.append((project, region, "gemini-*"))
    project, region = env.get("ANTHROPIC_VERTEX_PROJECT_ID"), env.get("CLOUD_ML_REGION")
    if project and region:
        wanted.append((project, region, "claude-*"))
    out: list[tuple[dict[str, Any], str]] = []
    for project, region, glob in wanted:
        same = next((backend for backend, _ in out if backend["vertex"] == {"project": project, "region": region}), None)
        backend = same or {"name": "vertex" if not out else "vertex-anthropic", "schema": "gcp_vertex_ai",
                           "vertex": {"project": project, "region": region}}
        out.append((backend, glob))
    return out


def config_from_environment(environ: Mapping[str, str] | None = None, demo_port: int = DEMO_PORT) -> LoadedConfig:
    """The config `extproc run` uses when given none, from each official SDK's variables.

    OPENAI_API_KEY (+ OPENAI_BASE_URL, which includes /v1 as in the openai SDK);
    ANTHROPIC_API_KEY (+ ANTHROPIC_BASE_URL, without /v1 as in the anthropic SDK) for
    `claude-*`; AZURE_OPENAI_API_KEY + AZURE_OPENAI_ENDPOINT + OPENAI_API_VERSION
    (default route, or OpenAI's fallback when both are set); AWS credentials + AWS_REGION
    for Bedrock model ids; GOOGLE_API_KEY or GEMINI_API_KEY (+ GOOGLE_GEMINI_BASE_URL) for
    `gemini-*`; Vertex AI with application default credentials (see _vertex_backends, ahead
    of Gemini's API as in google-genai, after Anthropic's own API); for each of COMPATIBLE_CLOUDS its key (Ollama: OLLAMA_HOST) for
    models named `<cloud>/<model>`. Base URLs keep any path prefix they carry. With no provider
    variable set, the built-in demo backend (extproc.sim) answers, offline.
    """
    env = os.environ if environ is None else environ
    backends: list[dict[str, Any]] = []
    routes: list[dict[str, Any]] = []
    default: list[dict[str, Any]] = []
    if env.get("ANTHROPIC_API_KEY"):
        backends.append({"name": "anthropic", "schema": "anthropic", "api_key": {"env": "ANTHROPIC_API_KEY"},
                         "base_url": env.get("ANTHROPIC_BASE_URL") or "https://api.anthropic.com"})
        routes.append({"name": "anthropic", "match": {"glob": "claude-*"}, "backends": [{"name": "anthropic"}]})
    for vertex, glob in _vertex_backends(env):
        if vertex not in backends:
            backends.append(vertex)
        routes.append({"name": f"{vertex['name']}-{glob.rstrip('-*')}", "match": {"glob": glob},
                       "backends": [{"name": vertex["name"]}]})
    gemini = _gemini_backend(env)
    if gemini is not None:
        backends.append(gemini)
        routes.append({"name": "gemini", "match": {"glob": "gemini-*"}, "backends": [{"name": "gemini"}]})
    region = _aws_region(env)
    if region and _aws_credentials_present(env):
        backends.append({"name": "bedrock", "schema": "aws_bedrock", "aws": {"region": region}})
        routes += [
            {"name": f"bedrock-{prefix.rstrip('.')}", "match": {"prefix": prefix}, "backends": [{"name": "bedrock"}]}
            for prefix in BEDROCK_MODEL_PREFIXES
        ]
    if env.get("OPENAI_API_KEY"):
        backends.append({"name": "openai", "schema": "openai", "api_key": {"env": "OPENAI_API_KEY"},
                         "base_url": env.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"})
        default.append({"name": "openai", "priority": 0})
    if env.get("AZURE_OPENAI_API_KEY") and env.get("AZURE_OPENAI_ENDPOINT"):
        backends.append({"name": "azure", "schema": "azure_openai", "api_key": {"env": "AZURE_OPENAI_API_KEY"},
                         "base_url": env["AZURE_OPENAI_ENDPOINT"],
                         "api_version": env.get("OPENAI_API_VERSION") or "2024-10-21"})
        default.append({"name": "azure", "priority": len(default)})  # OpenAI's fallback when both are set
    for cloud in COMPATIBLE_CLOUDS:
        backend = _compatible_cloud_backend(cloud, env)
        if backend is not None:
            backends.append(backend)
            routes.append({"name": cloud.name, "match": {"prefix": f"{cloud.name}/"},
                           "backends": [{"name": cloud.name}]})
    if not backends:
        config = parse_config(demo_config_data(demo_port), DEMO_SOURCE)
        return LoadedConfig(config=config, source=DEMO_SOURCE)
    if default:
        routes.append({"name": "default", "default": True, "backends": default})
    names = sorted(b["name"] for b in backends)
    source = f"<environment: {', '.join(names)}>"
    config = parse_config({"backends": backends, "routes": routes}, source)
    return LoadedConfig(config=config, source=source, secrets=resolve_secrets(config, env, source))


def demo_config_data(demo_port: int = DEMO_PORT) -> dict[str, Any]:
    """The built-in demo: every model is served by the local simulator."""
    return {
        "backends": [{"name": DEMO_BACKEND, "schema": "openai", "base_url": f"http://127.0.0.1:{demo_port}/v1"}],
        "routes": [
            {"name": "demo-models", "match": {"model": ["demo-model", "demo-embedding"]}, "backends": [{"name": DEMO_BACKEND}]},
            {"name": "default", "default": True, "backends": [{"name": DEMO_BACKEND}]},
        ],
    }


def is_demo(loaded: LoadedConfig) -> bool:
    return loaded.source == DEMO_SOURCE
