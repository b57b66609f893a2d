"""OpenAI-compatible clouds and servers need no code: each is a `schema: openai` backend
whose base URL carries its own path convention. Through real Envoy and the openai SDK,
each request reaches the path the provider serves, with that provider's key (or none),
and is accounted exactly. The simulator answers on any path prefix, as these providers do."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from extproc.sim import SimServer
from tests.integration.harness import RunningGateway, running_gateway

# provider: (base URL path as documented by the provider, model, key variable or None)
PROVIDERS: dict[str, tuple[str, str, str | None]] = {
    "groq": ("/openai/v1", "llama-3.3-70b-versatile", "GROQ_API_KEY"),
    "mistral": ("/v1", "mistral-large-latest", "MISTRAL_API_KEY"),
    "deepseek": ("", "deepseek-chat", "DEEPSEEK_API_KEY"),  # https://api.deepseek.com (also /v1)
    "together": ("/v1", "meta-llama/Llama-3.3-70B-Instruct-Turbo", "TOGETHER_API_KEY"),
    "openrouter": ("/api/v1", "anthropic/claude-sonnet-4", "OPENROUTER_API_KEY"),
    "vllm": ("/v1", "Qwen/Qwen2.5-7B-Instruct", "VLLM_API_KEY"),  # `vllm serve --api-key`
    "ollama": ("/v1", "llama3.2:3b", None),  # no key
}
KEYS = {var: f"sk-{name}-{uuid.uuid4().hex[:8]}" for name, (_, _, var) in PROVIDERS.items() if var}
USER = [{"role": "user", "content": "Which path did I reach?"}]


@pytest.fixture(scope="module")
def clouds(sim_a: SimServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    backends: list[dict[str, Any]] = []
    routes: list[dict[str, Any]] = []
    for name, (path, model, var) in PROVIDERS.items():
        backend: dict[str, Any] = {"name": name, "schema": "openai", "base_url": sim_a.url + path,
                                   "strip_model_prefix": f"{name}/"}
        if var:
            backend["api_key"] = {"env": var}
        if name == "openrouter":  # OpenRouter's optional attribution headers, set per backend
            backend["headers"] = {"HTTP-Referer": "https://gateway.example", "X-Title": "extproc"}
        backends.append(backend)
        routes.append({"name": name, "match": {"model": [model]}, "backends": [{"name": name}]})
        routes.append({"name": f"{name}-prefixed", "match": {"prefix": f"{name}/"}, "backends": [{"name": name}]})
    config = {"backends": backends, "routes": routes}
    with running_gateway(config, tmp_path_factory.mktemp("clouds"), env=KEYS) as gw:
        yield gw


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("name", list(PROVIDERS))
def test_each_provider_is_reached_on_its_own_path_with_its_key(
    clouds: RunningGateway, sim_a: SimServer, name: str, stream: bool
) -> None:
    path, model, var = PROVIDERS[name]
    request_id = f"cloud-{name}-{uuid.uuid4().hex[:8]}"
    client = openai.OpenAI(base_url=clouds.base_url, api_key="client-key", max_retries=0)
    if stream:
        chunks = list(client.chat.completions.create(
            model=model, messages=USER, stream=True, stream_options={"include_usage": True},
            extra_headers={"x-request-id": request_id}))
        usage = chunks[-1].usage
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        reply = client.chat.completions.create(model=model, messages=USER, extra_headers={"x-request-id": request_id})
        usage = reply.usage
        assert reply.choices[0].message.content
    assert usage is not None

    sent = next(r for r in reversed(sim_a.requests) if r.headers.get("x-request-id") == request_id)
    assert sent.path == f"{path}/chat/completions"
    assert sent.json["model"] == model
    if var:
        assert sent.headers["authorization"] == f"Bearer {KEYS[var]}"
    else:
        assert "authorization" not in sent.headers  # the client's own key never goes on
    if name == "openrouter":
        assert sent.headers["http-referer"] == "https://gateway.example" and sent.headers["x-title"] == "extproc"

    entry = clouds.wait_access_log(lambda e: e.get("request_id") == request_id)
    assert entry["backend_name"] == name and entry["status"] == 200
    assert (entry["input_tokens"], entry["output_tokens"], entry["total_tokens"]) == (
        usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)


@pytest.mark.parametrize("name", ["groq", "openrouter", "ollama"])
def test_a_provider_prefixed_model_reaches_the_provider_without_the_prefix(
    clouds: RunningGateway, sim_a: SimServer, name: str
) -> None:
    """`extproc run` names these clouds' models `<cloud>/<model>` (as LiteLLM does): the
    prefix picks the backend and is removed before the provider sees the model."""
    path, model, _ = PROVIDERS[name]
    request_id = f"prefixed-{name}-{uuid.uuid4().hex[:8]}"
    client = openai.OpenAI(base_url=clouds.base_url, api_key="client-key", max_retries=0)
    chunks = list(client.chat.completions.create(
        model=f"{name}/{model}", messages=USER, stream=True, extra_headers={"x-request-id": request_id}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert all(c.usage is None for c in chunks)  # usage was not asked for: the forced usage event is hidden

    sent = next(r for r in reversed(sim_a.requests) if r.headers.get("x-request-id") == request_id)
    assert sent.path == f"{path}/chat/completions" and sent.json["model"] == model
    entry = clouds.wait_access_log(lambda e: e.get("request_id") == request_id)
    assert (entry["backend_name"], entry["route_name"]) == (name, f"{name}-prefixed")
    assert (entry["request_model"], entry["model_name_override"]) == (f"{name}/{model}", model)
    assert entry["input_tokens"] > 0 and entry["output_tokens"] > 0
    assert entry["total_tokens"] == entry["input_tokens"] + entry["output_tokens"]
