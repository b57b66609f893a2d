"""Access logs over OTLP: Envoy's OpenTelemetry access logger, through real Envoy, to a real gRPC receiver."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from extproc.sim import SimServer
from tests.integration.harness import RunningGateway, free_port, running_gateway
from tests.otlp_logs_receiver import OtlpLogsReceiver, ReceivedLog
from tests.otlp_receiver import OtlpReceiver

USER: list[Any] = [{"role": "user", "content": "What is Envoy?"}]


@pytest.fixture(scope="module")
def spans() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as otlp:
        yield otlp


@pytest.fixture(scope="module")
def logs() -> Iterator[OtlpLogsReceiver]:
    with OtlpLogsReceiver() as receiver:
        yield receiver


def _config(sim: SimServer, endpoint: str) -> dict[str, Any]:
    return {
        "backends": [{"name": "sim", "base_url": sim.base_url}],
        "routes": [{"name": "all", "default": True, "backends": [{"name": "sim"}]}],
        "telemetry": {"access_log": {"otlp": {
            "endpoint": endpoint,
            "headers": {"x-collector-token": "tok-123"},
            "resource_attributes": {"service.name": "ai-gateway-under-test", "deployment.environment": "test"},
        }}},
    }


@pytest.fixture(scope="module")
def gateway(
    sim_a: SimServer, spans: OtlpReceiver, logs: OtlpLogsReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    with running_gateway(_config(sim_a, logs.endpoint), tmp_path_factory.mktemp("otlplogs"),
                         env=spans.exporter_env()) as gw:
        yield gw


def _record_for(logs: OtlpLogsReceiver, model: str) -> ReceivedLog:
    return logs.wait_for_record(lambda r: r.attributes.get("request_model") == model)


def test_record_carries_exact_usage_and_the_request_span_ids(
    gateway: RunningGateway, spans: OtlpReceiver, logs: OtlpLogsReceiver
) -> None:
    model = f"otlp-log-{secrets.token_hex(4)}"
    client = openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0)
    completion = client.chat.completions.create(model=model, messages=USER, max_tokens=7,
                                                extra_headers={"agent-session-id": "s-42"})
    assert completion.usage is not None

    record = _record_for(logs, model)
    span = spans.wait_for_span(lambda s: s.attributes.get("llm.model_name") == model)
    attributes = record.attributes
    assert int(attributes["input_tokens"]) == completion.usage.prompt_tokens
    assert int(attributes["output_tokens"]) == completion.usage.completion_tokens
    assert int(attributes["total_tokens"]) == completion.usage.total_tokens
    assert attributes["trace_id"] == span.trace_id  # the log links to the request's span
    assert attributes["span_id"] == span.span_id
    assert attributes["backend_name"] == "sim"
    assert attributes["route_name"] == "all"
    assert attributes["session_id"] == "s-42"
    assert attributes["response_model"] == completion.model
    assert attributes["status"] == "200"
    assert attributes["path"] == "/v1/chat/completions"
    assert record.body == "POST /v1/chat/completions 200"
    assert record.resource["service.name"] == "ai-gateway-under-test"
    assert record.resource["deployment.environment"] == "test"
    assert record.metadata["x-collector-token"] == "tok-123"
    assert record.time_unix_nano > 0


def test_streamed_record_matches_the_usage_chunk_and_the_stdout_log_stays(
    gateway: RunningGateway, spans: OtlpReceiver, logs: OtlpLogsReceiver
) -> None:
    model = f"otlp-stream-{secrets.token_hex(4)}"
    trace_id = secrets.token_hex(16)
    client = openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0)
    chunks = list(client.chat.completions.create(
        model=model, messages=USER, stream=True, stream_options={"include_usage": True},
        extra_headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
    ))
    usage = chunks[-1].usage
    assert usage is not None

    record = _record_for(logs, model)
    span = spans.wait_for_span(lambda s: s.trace_id == trace_id)
    assert int(record.attributes["input_tokens"]) == usage.prompt_tokens
    assert int(record.attributes["output_tokens"]) == usage.completion_tokens
    assert record.attributes["trace_id"] == trace_id == span.trace_id  # the client's trace, joined
    assert record.attributes["span_id"] == span.span_id
    assert float(record.attributes["ttft_ms"]) >= 0

    stdout = gateway.wait_access_log(lambda line: line.get("request_model") == model)
    assert stdout["trace_id"] == trace_id and stdout["span_id"] == span.span_id
    assert stdout["input_tokens"] == usage.prompt_tokens
    assert set(record.attributes) == set(stdout)  # every field of the JSON log, by the same name


def test_a_refused_request_is_logged_with_its_error_type(gateway: RunningGateway, logs: OtlpLogsReceiver) -> None:
    model = f"otlp-refused-{secrets.token_hex(4)}"
    client = openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[])  # no messages: refused by the processor
    record = _record_for(logs, model)
    assert record.attributes["status"] == "400"
    assert record.attributes["error_type"] == "invalid_request_error"
    assert record.attributes["input_tokens"] == "-"  # Envoy's mark for a value never set, as in text logs


def test_an_unreachable_collector_costs_the_client_nothing(sim_a: SimServer, tmp_path: Path) -> None:
    """Envoy exports on its own; a collector that is down loses log records, never a request."""
    config = _config(sim_a, f"127.0.0.1:{free_port()}")  # nothing listens there
    with running_gateway(config, tmp_path) as gw:
        model = f"otlp-down-{secrets.token_hex(4)}"
        client = openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0)
        completion = client.chat.completions.create(model=model, messages=USER, max_tokens=4)
        assert completion.usage is not None and completion.usage.completion_tokens == 4
        line = gw.wait_access_log(lambda entry: entry.get("request_model") == model)
        assert line["output_tokens"] == 4  # the stdout JSON log is unaffected
