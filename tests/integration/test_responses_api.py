"""The OpenAI Responses API through real Envoy, with the openai SDK as the client.

The simulators keep the responses they issued, as OpenAI does: a follow-up
(`previous_response_id`) sent to the other backend fails with 400
`previous_response_not_found`, so a passing chain proves the follow-ups stuck to the
backend holding the state, even though the route splits new conversations 50/50.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.sim import SimServer
from tests.integration.harness import RunningGateway, running_gateway


@pytest.fixture(scope="module")
def gateway(sim_a: SimServer, sim_b: SimServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    config = {
        "backends": [
            {"name": "a", "base_url": sim_a.base_url},
            {"name": "b", "base_url": sim_b.base_url},
            {"name": "renamed", "base_url": sim_a.base_url, "model_name_override": "upstream-responses-model"},
        ],
        "routes": [
            {"name": "split", "match": {"model": "resp-model"},
             "backends": [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}]},
            {"name": "renamed", "match": {"model": "client-name"}, "backends": [{"name": "renamed"}]},
        ],
    }
    with running_gateway(config, tmp_path_factory.mktemp("responses")) as gw:
        yield gw


@pytest.fixture
def client(gateway: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="client-key", max_retries=0, timeout=30)


def _entry(gateway: RunningGateway, request_id: str) -> dict[str, Any]:
    return gateway.wait_access_log(lambda e: e.get("request_id") == request_id)


def test_json_response_with_exact_usage_and_model_override(
    client: openai.OpenAI, gateway: RunningGateway, sim_a: SimServer
) -> None:
    response = client.responses.create(model="client-name", input="Say hello", max_output_tokens=30,
                                       extra_headers={"x-request-id": "resp-json", "x-sim-cached-tokens": "2"})
    assert response.output_text and response.usage is not None
    sent = sim_a.requests[-1]
    assert sent.path == "/v1/responses" and sent.json["model"] == "upstream-responses-model"
    assert "stream_options" not in sent.json  # chat's include_usage has no place in this API
    entry = _entry(gateway, "resp-json")
    usage = response.usage
    assert (int(entry["input_tokens"]), int(entry["output_tokens"]), int(entry["total_tokens"])) == (
        usage.input_tokens, usage.output_tokens, usage.total_tokens)
    assert int(entry["cached_input_tokens"]) == 2
    assert entry["model_name_override"] == "upstream-responses-model" and entry["backend_name"] == "renamed"


def test_streaming_response_usage_comes_from_response_completed(client: openai.OpenAI, gateway: RunningGateway) -> None:
    events = list(client.responses.create(model="client-name", input="Stream please", stream=True,
                                          extra_headers={"x-request-id": "resp-stream", "x-sim-chunks": "5"}))
    completed = [e for e in events if e.type == "response.completed"]
    assert len(completed) == 1
    usage = completed[0].response.usage
    assert usage is not None
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == completed[0].response.output_text
    entry = _entry(gateway, "resp-stream")
    assert (int(entry["input_tokens"]), int(entry["output_tokens"])) == (usage.input_tokens, usage.output_tokens)
    assert float(entry["ttft_ms"]) > 0

    text_metrics = httpx.get(f"http://127.0.0.1:{gateway.processor_admin_port}/metrics", timeout=10).text
    outputs = [
        s.value for f in text_string_to_metric_families(text_metrics) if f.name.startswith("gen_ai_client_token_usage")
        for s in f.samples if s.name.endswith("_sum") and s.labels.get("gen_ai_token_type") == "output"
        and s.labels.get("gen_ai_request_model") == "upstream-responses-model"
    ]
    assert sum(outputs) >= usage.output_tokens


def test_stateful_follow_ups_stick_to_the_backend_that_holds_the_state(
    client: openai.OpenAI, gateway: RunningGateway
) -> None:
    for conversation in range(4):
        first = client.responses.create(model="resp-model", input=f"Conversation {conversation}",
                                        extra_headers={"x-request-id": f"root-{conversation}"})
        served_by = _entry(gateway, f"root-{conversation}")["backend_name"]
        previous = first.id
        for turn in range(3):
            follow = client.responses.create(  # a 50/50 route: a wrong pick would be a 400 from the other backend
                model="resp-model", input=f"turn {turn}", previous_response_id=previous,
                extra_headers={"x-request-id": f"turn-{conversation}-{turn}"})
            assert _entry(gateway, f"turn-{conversation}-{turn}")["backend_name"] == served_by
            previous = follow.id


def test_unknown_previous_response_is_the_backends_own_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="client-name", input="hi", previous_response_id="resp_never_issued")
    assert info.value.code == "previous_response_not_found"
