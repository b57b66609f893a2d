"""One span per upstream attempt, under the request's span, through real Envoy.

A fallback route tries a backend that always fails (503) and then an Anthropic backend;
the OTLP receiver must get the request's span (the client's OpenAI view) and, as its
children, one span per attempt: the failed one with its error, the translated one with
the Anthropic-shaped body the backend really received and answered.
"""

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
from extproc.sim.bedrock_api import SIM_AWS_ACCESS_KEY_ID, SIM_AWS_SECRET_ACCESS_KEY
from tests.integration.harness import RunningGateway, running_gateway
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan

USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is Envoy?"}]
ANTHROPIC_KEY = "sk-ant-attempts-91b2"
BEDROCK_MODEL = "anthropic.claude-3-haiku-20240307-v1:0"


def _config(sim: SimServer) -> dict[str, Any]:
    return {
        "backends": [
            # Always 503 (the simulator fails models named sim-error-NNN): a backend that is down.
            {"name": "failing", "base_url": sim.base_url, "model_name_override": "sim-error-503"},
            {"name": "claude", "schema": "anthropic", "base_url": sim.url, "api_key": {"env": "T_ATT_ANTHROPIC_KEY"}},
            {"name": "bedrock", "schema": "aws_bedrock", "base_url": sim.url,
             "aws": {"region": "us-east-1", "access_key_id": {"env": "T_ATT_AK"}, "secret_access_key": {"env": "T_ATT_SK"}}},
        ],
        "routes": [
            {"name": "bedrock", "match": {"prefix": "anthropic."}, "backends": [{"name": "bedrock"}]},
            {"name": "resilient", "default": True,
             "backends": [{"name": "failing"}, {"name": "claude", "priority": 1}]},
        ],
    }


def _env(receiver: OtlpReceiver, **extra: str) -> dict[str, str]:
    return receiver.exporter_env(T_ATT_ANTHROPIC_KEY=ANTHROPIC_KEY, T_ATT_AK=SIM_AWS_ACCESS_KEY_ID,
                                 T_ATT_SK=SIM_AWS_SECRET_ACCESS_KEY, **extra)


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as otlp:
        yield otlp


@pytest.fixture(scope="module")
def gateway(sim_a: SimServer, receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    with running_gateway(_config(sim_a), tmp_path_factory.mktemp("attempts"), env=_env(receiver)) as running:
        yield running


def _trace(receiver: OtlpReceiver, trace_id: str) -> tuple[ReceivedSpan, list[ReceivedSpan]]:
    """The request's span and its two attempt spans, in start order."""
    spans = receiver.wait_for_spans(lambda spans: sum(s.trace_id == trace_id for s in spans) >= 3)
    mine = [s for s in spans if s.trace_id == trace_id]
    request = next(s for s in mine if s.name == "ChatCompletion")
    attempts = sorted((s for s in mine if s.name.startswith("UpstreamAttempt")), key=lambda s: s.start_time_ns)
    return request, attempts


def _call(gateway: RunningGateway, trace_id: str, client_span: str, **kwargs: Any) -> Any:
    client = openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0)
    return client.chat.completions.create(
        model="claude-haiku-4-5", messages=USER, max_tokens=20,
        extra_headers={"traceparent": f"00-{trace_id}-{client_span}-01"}, **kwargs)


def test_fallback_gives_two_attempt_spans_under_one_request_span(
    gateway: RunningGateway, receiver: OtlpReceiver, sim_a: SimServer
) -> None:
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    completion = _call(gateway, trace_id, client_span)
    request, attempts = _trace(receiver, trace_id)

    # The request span keeps the client's view: its OpenAI body, the usage the client got.
    assert request.parent_span_id == client_span
    assert json.loads(request.attributes["input.value"])["messages"] == USER
    assert request.attributes["llm.token_count.prompt"] == completion.usage.prompt_tokens
    assert request.attributes["llm.token_count.completion"] == completion.usage.completion_tokens

    assert [a.name for a in attempts] == ["UpstreamAttempt failing", "UpstreamAttempt claude"]
    assert all(a.parent_span_id == request.span_id for a in attempts)
    failed, served = attempts
    assert failed.end_time_ns <= served.start_time_ns  # one after the other
    # Each backend was told its own attempt's span as the parent (for its own traces).
    assert [r.headers["traceparent"].split("-")[1:3] for r in sim_a.requests[-2:]] == [
        [trace_id, failed.span_id], [trace_id, served.span_id]]
    assert request.start_time_ns <= failed.start_time_ns and served.end_time_ns <= request.end_time_ns

    # The failed attempt: what the first backend was sent, and its error.
    assert failed.status_code == "ERROR" and failed.status_message == "backend status 503"
    assert failed.attributes["http.response.status_code"] == 503
    assert failed.attributes["error.type"] == "503"
    assert failed.attributes["llm.model_name"] == "sim-error-503"
    assert failed.attributes["url.path"] == "/v1/chat/completions"
    sent_first = json.loads(failed.attributes["input.value"])
    assert sent_first["model"] == "sim-error-503" and sent_first["messages"] == USER
    assert json.loads(failed.attributes["metadata"])["backend"] == "failing"

    # The served attempt: the Anthropic Messages body the backend received and its answer.
    assert served.status_code == "OK"
    assert served.attributes["http.response.status_code"] == 200
    assert served.attributes["llm.provider"] == "anthropic"
    assert served.attributes["url.path"] == "/v1/messages"
    assert served.attributes["input.mime_type"] == "application/json"
    received = json.loads(served.attributes["input.value"])
    assert received == sim_a.requests[-1].json  # exactly what the backend got
    assert received["system"] in ("Be brief.", [{"type": "text", "text": "Be brief."}])
    assert received["messages"] == [{"role": "user", "content": "What is Envoy?"}]
    assert received["max_tokens"] == 20
    answer = json.loads(served.attributes["output.value"])
    assert answer["type"] == "message"  # Anthropic's shape, before translation back to OpenAI
    assert answer["content"][0]["text"] == completion.choices[0].message.content
    assert answer["usage"]["output_tokens"] == completion.usage.completion_tokens
    metadata = json.loads(served.attributes["metadata"])
    assert metadata["backend"] == "claude" and metadata["provider"] == "anthropic"
    assert metadata["client_api"] == "openai.chat" and metadata["response_headers_ms"] >= 0
    assert not any(ANTHROPIC_KEY in str(v) for a in attempts for v in a.attributes.values())


def test_streamed_attempt_records_the_providers_event_stream(gateway: RunningGateway, receiver: OtlpReceiver) -> None:
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    client = openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0)
    stream = client.chat.completions.create(
        model="claude-haiku-4-5", messages=USER, max_tokens=20, stream=True,
        extra_headers={"traceparent": f"00-{trace_id}-{client_span}-01"})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    _, (failed, served) = _trace(receiver, trace_id)

    assert failed.status_code == "ERROR" and failed.attributes["http.response.status_code"] == 503
    assert served.status_code == "OK" and json.loads(served.attributes["input.value"])["stream"] is True
    assert served.attributes["output.mime_type"] == "text/plain"
    events = served.attributes["output.value"]
    assert events.startswith("event: message_start") and "event: message_stop" in events
    deltas = [json.loads(line[len("data: "):]) for line in events.splitlines() if line.startswith("data: ")]
    streamed = "".join(d["delta"].get("text", "") for d in deltas if d["type"] == "content_block_delta")
    assert streamed == text


def test_bedrock_attempt_shows_the_converse_request_it_received(
    gateway: RunningGateway, receiver: OtlpReceiver, sim_a: SimServer
) -> None:
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    client = anthropic.Anthropic(base_url=f"{gateway.url}/anthropic", api_key="k", max_retries=0)
    message = client.messages.create(
        model=BEDROCK_MODEL, messages=[USER[1]], system="Be brief.", max_tokens=20,
        extra_headers={"traceparent": f"00-{trace_id}-{client_span}-01"})
    spans = receiver.wait_for_spans(lambda spans: sum(s.trace_id == trace_id for s in spans) >= 2)
    request = next(s for s in spans if s.trace_id == trace_id and s.name == "Messages")
    attempt = next(s for s in spans if s.trace_id == trace_id and s.name == "UpstreamAttempt bedrock")

    assert attempt.parent_span_id == request.span_id and attempt.status_code == "OK"
    assert attempt.attributes["llm.provider"] == "aws"
    assert attempt.attributes["url.path"] == f"/model/{BEDROCK_MODEL.replace(':', '%3A')}/converse"  # as sent
    received = json.loads(attempt.attributes["input.value"])
    assert received == sim_a.requests[-1].json  # Converse's shape, exactly what Bedrock got
    assert received["messages"] == [{"role": "user", "content": [{"text": "What is Envoy?"}]}]
    assert received["inferenceConfig"]["maxTokens"] == 20
    answer = json.loads(attempt.attributes["output.value"])
    assert answer["usage"]["outputTokens"] == message.usage.output_tokens
    assert answer["output"]["message"]["content"][0]["text"] == message.content[0].text  # type: ignore[union-attr]
    assert json.loads(attempt.attributes["metadata"])["client_api"] == "anthropic.messages"
    assert json.loads(request.attributes["input.value"])["system"] == "Be brief."  # the client's own shape
    assert not any(SIM_AWS_SECRET_ACCESS_KEY in str(v) for v in attempt.attributes.values())


def test_hidden_inputs_and_outputs_hide_the_provider_bodies(sim_a: SimServer, tmp_path: Path) -> None:
    with OtlpReceiver() as receiver:
        env = _env(receiver, OPENINFERENCE_HIDE_INPUTS="true", OPENINFERENCE_HIDE_OUTPUTS="true")
        with running_gateway(_config(sim_a), tmp_path, env=env) as gateway:
            trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
            _call(gateway, trace_id, client_span)
            _, attempts = _trace(receiver, trace_id)
    assert len(attempts) == 2
    for attempt in attempts:
        assert attempt.attributes.get("input.value") in (None, "__REDACTED__")
        assert attempt.attributes.get("output.value") in (None, "__REDACTED__")
        assert "What is Envoy?" not in str(attempt.attributes)
    assert attempts[1].attributes["http.response.status_code"] == 200
