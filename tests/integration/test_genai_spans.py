"""GenAI semantic-convention spans through real Envoy: `telemetry.span_conventions` with
gen_ai, spans read from a real OTLP receiver, compared with what the official SDKs got."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from extproc.sim import SimServer
from tests.integration.harness import RunningGateway, running_gateway
from tests.otlp_receiver import OtlpReceiver

USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is Envoy?"}]
ANTHROPIC_KEY = "sk-ant-genai-spans-77a1"


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as otlp:
        yield otlp


def _config(sim: SimServer, conventions: list[str]) -> dict[str, Any]:
    return {
        "backends": [
            {"name": "sim", "base_url": sim.base_url},
            {"name": "claude", "schema": "anthropic", "base_url": sim.url, "api_key": {"env": "T_GENAI_ANTHROPIC_KEY"}},
        ],
        "routes": [
            {"name": "claude", "match": {"glob": "claude-*"}, "backends": [{"name": "claude"}]},
            {"name": "all", "default": True, "backends": [{"name": "sim"}]},
        ],
        "telemetry": {"span_conventions": conventions},
    }


def _env(receiver: OtlpReceiver, **extra: str) -> dict[str, str]:
    return receiver.exporter_env(T_GENAI_ANTHROPIC_KEY=ANTHROPIC_KEY, **extra)


@pytest.fixture(scope="module")
def both(sim_a: SimServer, receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    config = _config(sim_a, ["openinference", "gen_ai"])
    with running_gateway(config, tmp_path_factory.mktemp("genai"), env=_env(receiver)) as gateway:
        yield gateway


def _traced() -> tuple[str, dict[str, str]]:
    trace_id = secrets.token_hex(16)
    return trace_id, {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}


def _openai(gateway: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0)


def test_chat_span_in_both_conventions(both: RunningGateway, receiver: OtlpReceiver) -> None:
    trace_id, headers = _traced()
    completion = _openai(both).chat.completions.create(
        model="genai-model", messages=USER, temperature=0.5, max_tokens=6, top_p=0.9, extra_headers=headers,
    )
    span = receiver.wait_for_request_span(trace_id)
    a = span.attributes
    assert span.name == "chat genai-model"
    assert a["openinference.span.kind"] == "LLM"  # OpenInference still there
    assert a["llm.token_count.prompt"] == completion.usage.prompt_tokens
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "genai-model"
    assert a["gen_ai.response.model"] == completion.model
    assert a["gen_ai.response.id"] == completion.id
    assert a["gen_ai.request.temperature"] == 0.5
    assert a["gen_ai.request.max_tokens"] == 6
    assert a["gen_ai.request.top_p"] == 0.9
    assert a["gen_ai.response.finish_reasons"] == [completion.choices[0].finish_reason]
    assert a["gen_ai.usage.input_tokens"] == completion.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == completion.usage.completion_tokens
    assert json.loads(a["gen_ai.input.messages"]) == [
        {"role": "system", "parts": [{"type": "text", "content": "Be brief."}]},
        {"role": "user", "parts": [{"type": "text", "content": "What is Envoy?"}]},
    ]
    assert json.loads(a["gen_ai.output.messages"]) == [{
        "role": "assistant", "finish_reason": completion.choices[0].finish_reason,
        "parts": [{"type": "text", "content": completion.choices[0].message.content}],
    }]


def test_streamed_chat_span(both: RunningGateway, receiver: OtlpReceiver) -> None:
    trace_id, headers = _traced()
    chunks = list(_openai(both).chat.completions.create(
        model="genai-stream", messages=USER, stream=True, stream_options={"include_usage": True}, extra_headers=headers,
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = next(c.usage for c in chunks if c.usage is not None)
    a = receiver.wait_for_request_span(trace_id).attributes
    assert a["gen_ai.response.id"] == chunks[0].id
    assert json.loads(a["gen_ai.output.messages"])[0]["parts"] == [{"type": "text", "content": text}]
    assert a["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert a["gen_ai.usage.input_tokens"] == usage.prompt_tokens


def test_anthropic_span_has_system_instructions_apart(both: RunningGateway, receiver: OtlpReceiver) -> None:
    trace_id, headers = _traced()
    client = anthropic.Anthropic(base_url=f"{both.url}/anthropic", api_key="client-key", max_retries=0, timeout=30)
    message = client.messages.create(
        model="claude-haiku-genai", max_tokens=24, system="Answer in one line.",
        messages=[{"role": "user", "content": "Describe the sea"}], extra_headers=headers,
    )
    text = "".join(block.text for block in message.content if block.type == "text")
    span = receiver.wait_for_request_span(trace_id)
    a = span.attributes
    assert span.name == "chat claude-haiku-genai"
    assert a["gen_ai.provider.name"] == "anthropic"
    assert a["gen_ai.response.id"] == message.id
    assert json.loads(a["gen_ai.system_instructions"]) == [{"type": "text", "content": "Answer in one line."}]
    assert json.loads(a["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": "Describe the sea"}]}]
    assert json.loads(a["gen_ai.output.messages"])[0]["parts"] == [{"type": "text", "content": text}]
    assert a["gen_ai.response.finish_reasons"] == [message.stop_reason]
    assert a["gen_ai.usage.output_tokens"] == message.usage.output_tokens


def test_completions_span_records_prompts_and_choices(both: RunningGateway, receiver: OtlpReceiver) -> None:
    trace_id, headers = _traced()
    completion = _openai(both).completions.create(
        model="instruct-genai", prompt="Say hello", max_tokens=7, extra_headers=headers)
    span = receiver.wait_for_request_span(trace_id)
    a = span.attributes
    assert span.name == "text_completion instruct-genai"
    assert a["llm.prompts.0.prompt.text"] == "Say hello"
    assert a["llm.choices.0.completion.text"] == completion.choices[0].text
    assert a["gen_ai.operation.name"] == "text_completion"
    assert json.loads(a["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": "Say hello"}]}]
    assert json.loads(a["gen_ai.output.messages"])[0]["parts"] == [
        {"type": "text", "content": completion.choices[0].text}]
    assert a["gen_ai.usage.output_tokens"] == completion.usage.completion_tokens


def test_embeddings_span_records_inputs_and_a_vector_summary(both: RunningGateway, receiver: OtlpReceiver) -> None:
    trace_id, headers = _traced()
    # the SDK asks for base64 vectors by default: measured, never decoded nor recorded
    result = _openai(both).embeddings.create(model="embedder", input=["vector me", "and me"], dimensions=12,
                                             extra_headers=headers)
    span = receiver.wait_for_request_span(trace_id)
    a = span.attributes
    assert span.name == "embeddings embedder"
    assert a["embedding.embeddings.0.embedding.text"] == "vector me"
    assert a["embedding.embeddings.1.embedding.text"] == "and me"
    assert len(result.data[0].embedding) == 12
    assert json.loads(a["metadata"])["embeddings"] == {"count": 2, "dimensions": 12}
    assert not [k for k in a if k.endswith("embedding.vector")]
    assert a["gen_ai.operation.name"] == "embeddings"
    assert a["gen_ai.embeddings.dimension.count"] == 12
    assert a["gen_ai.usage.input_tokens"] == result.usage.prompt_tokens
    assert "gen_ai.usage.output_tokens" not in a


def test_gen_ai_only_with_hidden_inputs(sim_a: SimServer, receiver: OtlpReceiver, tmp_path: Path) -> None:
    env = _env(receiver, OPENINFERENCE_HIDE_INPUTS="true")
    with running_gateway(_config(sim_a, ["gen_ai"]), tmp_path, env=env) as gateway:
        trace_id, headers = _traced()
        completion = _openai(gateway).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "my secret plan"}], max_tokens=5, extra_headers=headers)
        span = receiver.wait_for_request_span(trace_id)
    a = span.attributes
    assert span.name == "chat m"
    assert span.kind == "CLIENT"
    assert not [k for k in a if k.startswith(("llm.", "input.", "output.", "openinference.", "metadata"))]
    assert "gen_ai.input.messages" not in a
    assert "my secret" not in json.dumps(a)
    assert a["gen_ai.usage.input_tokens"] == completion.usage.prompt_tokens
    assert a["gen_ai.request.max_tokens"] == 5
    assert json.loads(a["gen_ai.output.messages"])[0]["parts"][0]["content"] == completion.choices[0].message.content
