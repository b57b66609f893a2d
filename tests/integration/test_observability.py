"""Metrics on the admin port and OpenInference traces over OTLP, through real Envoy."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from extproc.sim import SimServer
from tests.integration.harness import RunningGateway, running_gateway
from tests.otlp_receiver import OtlpReceiver

USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is Envoy?"}]
ANTHROPIC_KEY = "sk-ant-observability-5e6f"  # the gateway's credential for the Anthropic backend


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as otlp:
        yield otlp


def _config(sim: SimServer) -> dict[str, Any]:
    return {
        "backends": [
            {"name": "sim", "base_url": sim.base_url},
            {"name": "renamed", "base_url": sim.base_url, "model_name_override": "upstream-name"},
            {"name": "claude", "schema": "anthropic", "base_url": sim.url, "api_key": {"env": "T_OBS_ANTHROPIC_KEY"}},
        ],
        "routes": [
            {"name": "renamed", "match": {"model": "client-name"}, "backends": [{"name": "renamed"}]},
            {"name": "claude", "match": {"glob": "claude-*"}, "backends": [{"name": "claude"}]},
            {"name": "all", "default": True, "backends": [{"name": "sim"}]},
        ],
        "telemetry": {"metric_header_attributes": {"x-team": "team"}, "user_id_header": "x-user-id"},
    }


def _otel_env(receiver: OtlpReceiver, **extra: str) -> dict[str, str]:
    return receiver.exporter_env(OTEL_SERVICE_NAME="gateway-under-test", T_OBS_ANTHROPIC_KEY=ANTHROPIC_KEY, **extra)


@pytest.fixture(scope="module")
def observed(sim_a: SimServer, receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    with running_gateway(_config(sim_a), tmp_path_factory.mktemp("observed"), env=_otel_env(receiver)) as gateway:
        yield gateway



def _metrics(gateway: RunningGateway) -> dict[str, list[Any]]:
    text = httpx.get(f"http://127.0.0.1:{gateway.processor_admin_port}/metrics", timeout=10).text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def _sample_sum(samples: list[Any], suffix: str, **labels: str) -> float:
    return sum(
        s.value for s in samples if s.name.endswith(suffix) and all(s.labels.get(k) == v for k, v in labels.items())
    )


def _family(metrics: dict[str, list[Any]], prefix: str) -> list[Any]:
    names = [name for name in metrics if name.startswith(prefix)]
    assert names, f"no metric family starting with {prefix}: {sorted(metrics)}"
    return metrics[names[0]]


def test_token_metrics_equal_upstream_usage(observed: RunningGateway) -> None:
    client = openai.OpenAI(base_url=observed.base_url, api_key="k", max_retries=0)
    model = f"metrics-{secrets.token_hex(4)}"
    usages = [
        client.chat.completions.create(model=model, messages=USER, max_tokens=n, extra_headers={"x-team": "blue"}).usage
        for n in (3, 5, 8)
    ]
    streamed = list(client.chat.completions.create(
        model=model, messages=USER, stream=True, stream_options={"include_usage": True}, extra_headers={"x-team": "blue"}
    ))
    usages.append(streamed[-1].usage)
    assert all(u is not None for u in usages)

    tokens = _family(_metrics(observed), "gen_ai_client_token_usage")
    labels = {"gen_ai_request_model": model, "gen_ai_operation_name": "chat", "gen_ai_provider_name": "openai"}
    assert _sample_sum(tokens, "_sum", gen_ai_token_type="input", **labels) == sum(u.prompt_tokens for u in usages)
    assert _sample_sum(tokens, "_sum", gen_ai_token_type="output", **labels) == sum(u.completion_tokens for u in usages)
    assert _sample_sum(tokens, "_count", gen_ai_token_type="output", **labels) == 4
    assert _sample_sum(tokens, "_count", gen_ai_token_type="output", team="blue", **labels) == 4

    metrics = _metrics(observed)
    duration = _family(metrics, "gen_ai_server_request_duration")
    assert _sample_sum(duration, "_count", gen_ai_request_model=model) == 4
    ttft = _family(metrics, "gen_ai_server_time_to_first_token")
    assert _sample_sum(ttft, "_count", gen_ai_request_model=model) == 1  # the one stream
    overhead = _family(metrics, "extproc_processor_duration")
    assert _sample_sum(overhead, "_count") >= 4


def _messages(gateway: RunningGateway) -> dict[tuple[str, str], float]:
    samples = _family(_metrics(gateway), "extproc_processor_messages")
    return {(s.labels["stage"], s.labels["phase"]): s.value for s in samples if s.name.endswith("_total")}


def test_messages_per_request_are_counted_by_phase(observed: RunningGateway) -> None:
    """extproc_processor_messages_total tells any deployment what each request costs in
    ext_proc messages (the processor's main cost): here 4 for JSON, 3 plus one per chunk
    up to [DONE] for a stream."""
    client = openai.OpenAI(base_url=observed.base_url, api_key="k", max_retries=0)
    before = _messages(observed)
    for _ in range(5):
        client.chat.completions.create(model="m", messages=USER)
    json_requests = _messages(observed)
    delta = {key: json_requests.get(key, 0) - before.get(key, 0) for key in json_requests}
    assert {k: v for k, v in delta.items() if v} == {
        ("request", "request_headers"): 5, ("request", "request_body"): 5,
        ("request", "response_headers"): 5, ("request", "response_body"): 5,
    }
    list(client.chat.completions.create(model="m", messages=USER, stream=True, extra_headers={"x-sim-chunks": "4"}))
    after = _messages(observed)
    body_messages = after[("request", "response_body")] - json_requests[("request", "response_body")]
    assert sum(after.values()) - sum(json_requests.values()) == 3 + body_messages
    assert 1 <= body_messages <= 8  # role, 4 pieces, finish, usage, [DONE]: however Envoy groups them


def test_overridden_model_keeps_the_original_as_an_attribute(observed: RunningGateway) -> None:
    client = openai.OpenAI(base_url=observed.base_url, api_key="k", max_retries=0)
    client.chat.completions.create(model="client-name", messages=USER)
    tokens = _family(_metrics(observed), "gen_ai_client_token_usage")
    assert _sample_sum(
        tokens, "_count", gen_ai_request_model="upstream-name", gen_ai_original_model="client-name",
        gen_ai_response_model="upstream-name", gen_ai_token_type="input",
    ) >= 1


def test_failures_carry_error_type(observed: RunningGateway) -> None:
    client = openai.OpenAI(base_url=observed.base_url, api_key="k", max_retries=0)
    model = f"failing-{secrets.token_hex(4)}"
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=model, messages=USER, extra_headers={"x-sim-error": "429"})
    duration = _family(_metrics(observed), "gen_ai_server_request_duration")
    failures = [s for s in duration if s.labels.get("gen_ai_request_model") == model and s.name.endswith("_count")]
    assert failures and all(s.labels.get("error_type") for s in failures)


def test_span_joins_the_client_trace_and_parents_the_upstream_call(
    observed: RunningGateway, receiver: OtlpReceiver, sim_a: SimServer
) -> None:
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    client = openai.OpenAI(base_url=observed.base_url, api_key="k", max_retries=0)
    completion = client.chat.completions.create(
        model="traced-model", messages=USER, temperature=0.5, max_tokens=6,
        extra_headers={
            "traceparent": f"00-{trace_id}-{client_span}-01",
            "tracestate": "vendor=abc",
            "agent-session-id": "session-7",
            "x-user-id": "user-9",
        },
    )
    span = receiver.wait_for_request_span(trace_id)
    attributes = span.attributes

    assert span.name == "ChatCompletion"
    assert span.parent_span_id == client_span
    upstream = sim_a.requests[-1].headers
    assert upstream["traceparent"].split("-")[1] == trace_id
    assert upstream["traceparent"].split("-")[2] == span.span_id  # the provider call's parent is the gateway span
    assert upstream["tracestate"] == "vendor=abc"

    assert attributes["openinference.span.kind"] == "LLM"
    assert attributes["llm.model_name"] == "traced-model"
    assert attributes["llm.provider"] == "openai"
    assert attributes["session.id"] == "session-7"
    assert attributes["user.id"] == "user-9"
    assert json.loads(attributes["llm.invocation_parameters"]) == {"temperature": 0.5, "max_tokens": 6}
    assert attributes["llm.input_messages.0.message.role"] == "system"
    assert attributes["llm.input_messages.1.message.content"] == "What is Envoy?"
    assert attributes["llm.output_messages.0.message.content"] == completion.choices[0].message.content
    assert attributes["llm.token_count.prompt"] == completion.usage.prompt_tokens
    assert attributes["llm.token_count.completion"] == completion.usage.completion_tokens
    assert attributes["llm.token_count.total"] == completion.usage.total_tokens
    assert attributes["input.mime_type"] == "application/json"
    assert json.loads(attributes["input.value"])["messages"] == USER
    assert span.resource["service.name"] == "gateway-under-test"


def test_streamed_output_is_assembled_in_the_span(observed: RunningGateway, receiver: OtlpReceiver) -> None:
    trace_id = secrets.token_hex(16)
    client = openai.OpenAI(base_url=observed.base_url, api_key="k", max_retries=0)
    chunks = list(client.chat.completions.create(
        model="m", messages=USER, stream=True, extra_headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    span = receiver.wait_for_request_span(trace_id)
    assert span.attributes["llm.output_messages.0.message.content"] == text
    assert span.attributes["llm.token_count.completion"] > 0  # forced usage reached the span too


def _traceparent() -> tuple[str, dict[str, str]]:
    trace_id = secrets.token_hex(16)
    return trace_id, {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}


def _anthropic_client(gateway: RunningGateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{gateway.url}/anthropic", api_key="client-key", max_retries=0, timeout=30)


def _assert_anthropic_span(span: Any, text: str, usage: anthropic.types.Usage) -> None:
    """What Phoenix shows for an Anthropic-SDK call served by Anthropic."""
    attributes = span.attributes
    assert span.name == "Messages"
    assert attributes["llm.system"] == "anthropic"
    assert attributes["llm.provider"] == "anthropic"
    assert attributes["llm.model_name"].startswith("claude-haiku")
    assert attributes["llm.input_messages.0.message.role"] == "system"
    assert attributes["llm.input_messages.0.message.content"] == "Answer in one line."
    assert attributes["llm.input_messages.1.message.role"] == "user"
    assert attributes["llm.input_messages.1.message.content"] == "Describe the sea"  # one text block: the text
    assert attributes["llm.output_messages.0.message.role"] == "assistant"
    assert attributes["llm.output_messages.0.message.content"] == text
    assert attributes["output.value"] == text
    assert attributes["llm.finish_reason"] == "end_turn"
    assert json.loads(attributes["llm.invocation_parameters"])["max_tokens"] == 24
    prompt = usage.input_tokens + (usage.cache_read_input_tokens or 0) + (usage.cache_creation_input_tokens or 0)
    assert attributes["llm.token_count.prompt"] == prompt
    assert attributes["llm.token_count.prompt_details.cache_read"] == usage.cache_read_input_tokens == 3
    assert attributes["llm.token_count.completion"] == usage.output_tokens
    assert attributes["llm.token_count.total"] == prompt + usage.output_tokens


ANTHROPIC_SYSTEM = "Answer in one line."
ANTHROPIC_MESSAGES: Any = [{"role": "user", "content": [{"type": "text", "text": "Describe the sea"}]}]


def test_anthropic_sdk_span_names_anthropic_and_carries_the_answer(
    observed: RunningGateway, receiver: OtlpReceiver
) -> None:
    trace_id, headers = _traceparent()
    message = _anthropic_client(observed).messages.create(
        model="claude-haiku-obs", max_tokens=24, system=ANTHROPIC_SYSTEM, messages=ANTHROPIC_MESSAGES,
        extra_headers={**headers, "x-sim-cached-tokens": "3"},
    )
    text = "".join(block.text for block in message.content if block.type == "text")
    assert text
    span = receiver.wait_for_request_span(trace_id)
    _assert_anthropic_span(span, text, message.usage)
    assert json.loads(span.attributes["input.value"])["system"] == ANTHROPIC_SYSTEM


def test_anthropic_sdk_stream_span_assembles_the_answer(observed: RunningGateway, receiver: OtlpReceiver) -> None:
    trace_id, headers = _traceparent()
    with _anthropic_client(observed).messages.stream(
        model="claude-haiku-obs", max_tokens=24, system=ANTHROPIC_SYSTEM, messages=ANTHROPIC_MESSAGES,
        extra_headers={**headers, "x-sim-cached-tokens": "3", "x-sim-chunks": "5"},
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text
    span = receiver.wait_for_request_span(trace_id)
    _assert_anthropic_span(span, text, final.usage)
    assert json.loads(span.attributes["metadata"])["stream"] is True


def test_anthropic_sdk_streamed_tool_call_in_the_span(observed: RunningGateway, receiver: OtlpReceiver) -> None:
    trace_id, headers = _traceparent()
    tool = {"name": "get_weather", "description": "Weather for a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    with _anthropic_client(observed).messages.stream(
        model="claude-haiku-obs", max_tokens=64, tools=[tool],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "What is the weather in Paris?"}], extra_headers=headers,
    ) as stream:
        final = stream.get_final_message()
    (call,) = [block for block in final.content if block.type == "tool_use"]
    span = receiver.wait_for_request_span(trace_id)
    attributes = span.attributes
    assert attributes["llm.input_messages.0.message.content"] == "What is the weather in Paris?"
    assert json.loads(attributes["llm.tools.0.tool.json_schema"]) == tool
    prefix = "llm.output_messages.0.message.tool_calls.0.tool_call"
    assert attributes[f"{prefix}.id"] == call.id
    assert attributes[f"{prefix}.function.name"] == "get_weather"
    assert json.loads(attributes[f"{prefix}.function.arguments"]) == call.input
    assert attributes["llm.finish_reason"] == "tool_use"


def _assert_responses_span(span: Any, text: str, usage: Any) -> None:
    """What Phoenix shows for a Responses API call (openai SDK)."""
    attributes = span.attributes
    assert span.name == "Response"
    assert attributes["llm.system"] == "openai"
    assert attributes["llm.provider"] == "openai"
    assert attributes["llm.input_messages.0.message.role"] == "system"
    assert attributes["llm.input_messages.0.message.content"] == "Be brief."
    assert attributes["llm.input_messages.1.message.role"] == "user"
    assert attributes["llm.input_messages.1.message.content"] == "What is Envoy?"
    assert attributes["llm.output_messages.0.message.role"] == "assistant"
    assert attributes["llm.output_messages.0.message.content"] == text
    assert attributes["output.value"] == text
    assert json.loads(attributes["llm.invocation_parameters"]) == {"max_output_tokens": 40, "temperature": 0.2}
    assert attributes["llm.token_count.prompt"] == usage.input_tokens
    assert attributes["llm.token_count.completion"] == usage.output_tokens
    assert attributes["llm.token_count.total"] == usage.total_tokens


def test_responses_api_span_carries_input_and_output(observed: RunningGateway, receiver: OtlpReceiver) -> None:
    trace_id, headers = _traceparent()
    client = openai.OpenAI(base_url=observed.base_url, api_key="k", max_retries=0)
    response = client.responses.create(model="resp-obs", instructions="Be brief.", input="What is Envoy?",
                                       max_output_tokens=40, temperature=0.2, extra_headers=headers)
    assert response.output_text and response.usage is not None
    span = receiver.wait_for_request_span(trace_id)
    _assert_responses_span(span, response.output_text, response.usage)
    assert span.attributes["llm.model_name"] == response.model


def test_responses_api_stream_span_assembles_the_output(observed: RunningGateway, receiver: OtlpReceiver) -> None:
    trace_id, headers = _traceparent()
    client = openai.OpenAI(base_url=observed.base_url, api_key="k", max_retries=0)
    events = list(client.responses.create(
        model="resp-obs", instructions="Be brief.", input="What is Envoy?", max_output_tokens=40, temperature=0.2,
        stream=True, extra_headers={**headers, "x-sim-chunks": "5"},
    ))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    (completed,) = [e for e in events if e.type == "response.completed"]
    assert text and text == completed.response.output_text
    span = receiver.wait_for_request_span(trace_id)
    _assert_responses_span(span, text, completed.response.usage)
    assert json.loads(span.attributes["metadata"])["client_api"] == "openai.responses"


def test_embedding_span(observed: RunningGateway, receiver: OtlpReceiver) -> None:
    trace_id = secrets.token_hex(16)
    client = openai.OpenAI(base_url=observed.base_url, api_key="k", max_retries=0)
    client.embeddings.create(model="embedder", input="vector me",
                             extra_headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"})
    span = receiver.wait_for_request_span(trace_id)
    assert span.attributes["openinference.span.kind"] == "EMBEDDING"
    assert span.attributes["embedding.model_name"] == "embedder"


def test_error_span_has_error_status(observed: RunningGateway, receiver: OtlpReceiver) -> None:
    trace_id = secrets.token_hex(16)
    client = openai.OpenAI(base_url=observed.base_url, api_key="k", max_retries=0)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="m", messages=USER, extra_headers={
            "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01", "x-sim-error": "503"})
    span = receiver.wait_for_request_span(trace_id)
    assert span.status_code == "ERROR"


def test_hidden_inputs_are_absent(sim_a: SimServer, receiver: OtlpReceiver, tmp_path: Path) -> None:
    env = _otel_env(receiver, OPENINFERENCE_HIDE_INPUTS="true", OPENINFERENCE_HIDE_OUTPUTS="true")
    with running_gateway(_config(sim_a), tmp_path, env=env) as gateway:
        trace_id = secrets.token_hex(16)
        client = openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0)
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "my secret plan"}],
                                       extra_headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"})
        spans = [receiver.wait_for_request_span(trace_id)]
        # The other client APIs' shapes are hidden the same way.
        anthropic_trace, headers = _traceparent()
        _anthropic_client(gateway).messages.create(
            model="claude-hidden", max_tokens=16, system="my secret system",
            messages=[{"role": "user", "content": "my secret plan"}], extra_headers=headers)
        responses_trace, headers = _traceparent()
        client.responses.create(model="m", instructions="my secret system", input="my secret plan",
                                extra_headers=headers)
        spans.append(receiver.wait_for_request_span(anthropic_trace))
        spans.append(receiver.wait_for_request_span(responses_trace))
    assert [s.name for s in spans] == ["ChatCompletion", "Messages", "Response"]
    for span in spans:
        attributes = span.attributes
        assert not [k for k in attributes if k.startswith("llm.input_messages")]
        assert "my secret" not in json.dumps(attributes)
        assert attributes["input.value"] == "__REDACTED__"
        assert attributes["output.value"] == "__REDACTED__"  # the simulator echoes the prompt in its reply
        assert not [k for k in attributes if k.startswith("llm.output_messages")]
        assert attributes["llm.token_count.total"] > 0  # counts are not content: still recorded


OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"  # as Prometheus asks


def test_openmetrics_buckets_carry_the_request_span_as_exemplar(observed: RunningGateway, receiver: OtlpReceiver) -> None:
    trace_id, headers = _traceparent()
    model = f"exemplar-{secrets.token_hex(4)}"
    client = openai.OpenAI(base_url=observed.base_url, api_key="k", max_retries=0)
    assert list(client.chat.completions.create(model=model, messages=USER, stream=True, extra_headers=headers))
    span = receiver.wait_for_request_span(trace_id)

    response = httpx.get(f"http://127.0.0.1:{observed.processor_admin_port}/metrics",
                         headers={"accept": OPENMETRICS}, timeout=10)
    assert response.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert response.text.endswith("# EOF\n")
    families = {f.name: f.samples for f in openmetrics_families(response.text)}  # the parser validates the format

    for family in ("gen_ai_server_request_duration_seconds", "gen_ai_server_time_to_first_token_seconds"):
        exemplars = [s for s in families[family] if s.labels.get("gen_ai_request_model") == model and s.exemplar]
        assert len(exemplars) == 1, family  # on the one bucket the request's duration fell in
        (bucket,) = exemplars
        assert bucket.exemplar.labels == {"trace_id": trace_id, "span_id": span.span_id}
        assert bucket.exemplar.value <= float(bucket.labels["le"])
        assert bucket.value >= 1
    overhead = [s.exemplar.labels["trace_id"] for s in families["extproc_processor_duration_seconds"] if s.exemplar]
    assert trace_id in overhead

    plain = httpx.get(f"http://127.0.0.1:{observed.processor_admin_port}/metrics", timeout=10)
    assert plain.headers["content-type"].startswith("text/plain")
    assert trace_id not in plain.text and "# EOF" not in plain.text
    assert _family(_metrics(observed), "gen_ai_server_request_duration")  # still the Prometheus text format
