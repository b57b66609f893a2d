"""Token accounting as Envoy sees it: the access log prints the metadata the processor set."""

from __future__ import annotations

import gzip
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import brotli
import httpx
import openai
import orjson
import pytest

from extproc.sim import SimServer
from tests.integration.harness import RunningGateway, running_gateway

USER = [{"role": "user", "content": "Count the tokens of this request, please"}]
CEL_COST = "double(input_tokens) * 2.5 + double(output_tokens) * 10.0 + (model == 'priced' ? 1000.0 : 0.0)"


@pytest.fixture(scope="module")
def accounting_gateway(sim_a: SimServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    config = {
        "backends": [{"name": "sim", "base_url": sim_a.base_url}],
        "routes": [{"name": "everything", "default": True, "backends": [{"name": "sim"}]}],
        "costs": [
            {"metadata_key": "budget_tokens", "type": "total_token"},
            {"metadata_key": "micro_usd", "type": "cel", "cel": CEL_COST},
        ],
        "usage": {"estimate_when_missing": True},
        "tenancy": {"header": "x-tenant-id", "default_tenant": "nobody"},
    }
    with running_gateway(config, tmp_path_factory.mktemp("accounting")) as gateway:
        yield gateway


@pytest.fixture
def client(accounting_gateway: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=accounting_gateway.base_url, api_key="k", max_retries=0, timeout=30)


def _tagged() -> tuple[str, dict[str, str]]:
    request_id = str(uuid.uuid4())
    return request_id, {"x-request-id": request_id}


def _log(gateway: RunningGateway, request_id: str) -> dict[str, Any]:
    return gateway.wait_access_log(lambda e: e.get("request_id") == request_id)


def _sse_events(raw: bytes) -> list[bytes]:
    return [block.removeprefix(b"data: ") for block in raw.split(b"\n\n") if block.strip()]


def test_json_chat_usage_is_logged_exactly(client: openai.OpenAI, accounting_gateway: RunningGateway) -> None:
    request_id, headers = _tagged()
    headers.update({"x-sim-cached-tokens": "4", "x-sim-reasoning-tokens": "3", "agent-session-id": "sess-42",
                    "x-tenant-id": "team-blue"})
    completion = client.chat.completions.create(model="priced", messages=USER, extra_headers=headers)
    usage = completion.usage
    assert usage is not None

    entry = _log(accounting_gateway, request_id)
    assert entry["input_tokens"] == usage.prompt_tokens
    assert entry["output_tokens"] == usage.completion_tokens
    assert entry["total_tokens"] == usage.total_tokens
    assert entry["cached_input_tokens"] == 4 == usage.prompt_tokens_details.cached_tokens
    assert entry["reasoning_tokens"] == 3 == usage.completion_tokens_details.reasoning_tokens
    assert entry["response_model"] == "priced"
    assert entry["session_id"] == "sess-42"
    assert entry["tenant"] == "team-blue"
    assert entry["usage_estimated"] is None
    assert entry["cost_budget_tokens"] == usage.total_tokens
    assert entry["cost_micro_usd"] == pytest.approx(usage.prompt_tokens * 2.5 + usage.completion_tokens * 10 + 1000)
    assert entry["ttft_ms"] is None  # latency per token is a streaming measure


def test_stream_with_usage_is_logged_exactly(client: openai.OpenAI, accounting_gateway: RunningGateway) -> None:
    request_id, headers = _tagged()
    stream = client.chat.completions.create(
        model="m", messages=USER, stream=True, stream_options={"include_usage": True},
        extra_headers={**headers, "x-sim-chunks": "6", "x-sim-chunk-delay-ms": "5"},
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []  # the client asked for the usage chunk and got it

    entry = _log(accounting_gateway, request_id)
    assert (entry["input_tokens"], entry["output_tokens"], entry["total_tokens"]) == (
        usage.prompt_tokens, usage.completion_tokens, usage.total_tokens,
    )
    assert entry["ttft_ms"] > 0
    assert entry["itl_ms"] > 0
    assert entry["cost_micro_usd"] == pytest.approx(usage.prompt_tokens * 2.5 + usage.completion_tokens * 10)


def test_forced_usage_stream_reaches_the_client_unchanged_in_shape(
    accounting_gateway: RunningGateway, sim_a: SimServer
) -> None:
    """The client did not ask for usage: the gateway asks the backend for it, accounts
    it, and the client receives exactly the events a backend would have sent it."""
    body = {"model": "m", "messages": USER, "stream": True}
    knobs = {"x-sim-chunks": "5"}
    direct = httpx.post(f"{sim_a.base_url}/chat/completions", json=body, headers=knobs, timeout=30)
    request_id, headers = _tagged()
    via = httpx.post(
        f"{accounting_gateway.base_url}/chat/completions", json=body, headers={**knobs, **headers}, timeout=30
    )

    upstream = sim_a.requests[-1]
    assert upstream.json["stream_options"] == {"include_usage": True}  # the gateway asked for it
    expected, got = _sse_events(direct.content), _sse_events(via.content)
    assert len(got) == len(expected) and got[-1] == b"[DONE]"
    for mine, theirs in zip(got[:-1], expected[:-1], strict=True):
        mine_json, their_json = orjson.loads(mine), orjson.loads(theirs)
        assert "usage" not in mine_json
        assert mine_json["choices"] == their_json["choices"]
        assert set(mine_json) == set(their_json)
    assert b'"usage"' not in via.content

    entry = _log(accounting_gateway, request_id)
    full = httpx.post(f"{sim_a.base_url}/chat/completions", json={**body, "stream": False}, timeout=30).json()
    assert entry["output_tokens"] == full["usage"]["completion_tokens"]
    assert entry["input_tokens"] == full["usage"]["prompt_tokens"]
    assert entry["usage_estimated"] is None


def test_forced_usage_stream_through_the_sdk(client: openai.OpenAI, accounting_gateway: RunningGateway) -> None:
    request_id, headers = _tagged()
    chunks = list(client.completions.create(model="m", prompt="Write", stream=True, max_tokens=9, extra_headers=headers))
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert _log(accounting_gateway, request_id)["output_tokens"] == 9


def test_usage_on_the_last_choice_chunk_is_not_lost(client: openai.OpenAI, accounting_gateway: RunningGateway) -> None:
    request_id, headers = _tagged()
    stream = client.chat.completions.create(
        model="m", messages=USER, stream=True, stream_options={"include_usage": True},
        extra_headers={**headers, "x-sim-usage-in-last-choice": "1"},
    )
    chunks = list(stream)
    last_with_choices = [c for c in chunks if c.choices][-1]
    assert last_with_choices.usage is not None  # the backend put usage beside the finish reason
    entry = _log(accounting_gateway, request_id)
    assert entry["output_tokens"] == last_with_choices.usage.completion_tokens
    assert entry["total_tokens"] == last_with_choices.usage.total_tokens


@pytest.mark.parametrize("coding", ["gzip", "br", "deflate"])
def test_compressed_json_is_accounted_and_the_client_gets_the_original_bytes(
    accounting_gateway: RunningGateway, sim_a: SimServer, coding: str
) -> None:
    request_id, headers = _tagged()
    with httpx.stream(
        "POST", f"{accounting_gateway.base_url}/chat/completions", json={"model": "m", "messages": USER},
        headers={**headers, "x-sim-compress": coding, "accept-encoding": coding}, timeout=30,
    ) as response:
        raw = b"".join(response.iter_raw())
        assert response.headers["content-encoding"] == coding
    decoded = {"gzip": gzip.decompress, "br": brotli.decompress, "deflate": zlib.decompress}[coding](raw)
    usage = orjson.loads(decoded)["usage"]
    entry = _log(accounting_gateway, request_id)
    assert (entry["input_tokens"], entry["output_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])


def test_compressed_stream_is_accounted(client: openai.OpenAI, accounting_gateway: RunningGateway) -> None:
    request_id, headers = _tagged()
    stream = client.chat.completions.create(
        model="m", messages=USER, stream=True, stream_options={"include_usage": True},
        extra_headers={**headers, "x-sim-compress": "gzip"},
    )
    usage = list(stream)[-1].usage
    assert usage is not None
    assert _log(accounting_gateway, request_id)["output_tokens"] == usage.completion_tokens


def test_embeddings_usage(client: openai.OpenAI, accounting_gateway: RunningGateway) -> None:
    request_id, headers = _tagged()
    result = client.embeddings.create(model="e", input=["alpha beta", "gamma"], extra_headers=headers)
    entry = _log(accounting_gateway, request_id)
    assert entry["input_tokens"] == result.usage.prompt_tokens
    assert entry["total_tokens"] == result.usage.total_tokens
    assert entry["output_tokens"] == 0


def test_error_responses_charge_nothing(client: openai.OpenAI, accounting_gateway: RunningGateway) -> None:
    request_id, headers = _tagged()
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="m", messages=USER, extra_headers={**headers, "x-sim-error": "500"})
    entry = _log(accounting_gateway, request_id)
    assert entry["status"] == 500
    assert entry["error_type"] == "server_error"  # the provider's own error type
    assert entry["total_tokens"] is None and entry["cost_budget_tokens"] is None
    assert entry["backend_name"] == "sim"


def test_missing_usage_is_estimated_and_marked(client: openai.OpenAI, accounting_gateway: RunningGateway) -> None:
    request_id, headers = _tagged()
    chunks = list(client.chat.completions.create(
        model="m", messages=USER, stream=True, stream_options={"include_usage": True},
        extra_headers={**headers, "x-sim-no-usage": "1"},
    ))
    assert all(c.usage is None for c in chunks)
    entry = _log(accounting_gateway, request_id)
    assert entry["usage_estimated"] is True
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # cl100k tokens of the reply: a handful per word, never zero, never more than characters
    assert 0 < entry["output_tokens"] <= len(text)
    assert entry["input_tokens"] > 0
    assert entry["total_tokens"] == entry["input_tokens"] + entry["output_tokens"]


def test_client_hanging_up_mid_stream_is_recorded_and_harmless(
    accounting_gateway: RunningGateway, sim_a: SimServer, client: openai.OpenAI
) -> None:
    hold = f"cut-{uuid.uuid4().hex}"
    request_id, headers = _tagged()
    with httpx.stream(
        "POST", f"{accounting_gateway.base_url}/chat/completions",
        json={"model": "cut-model", "messages": USER, "stream": True},
        headers={**headers, "x-sim-hold": hold}, timeout=30,
    ) as response:
        first = next(response.iter_bytes())
        assert b"data:" in first
    # the client is gone; let the upstream finish into the void
    sim_a.release(hold)
    entry = _log(accounting_gateway, request_id)
    assert entry["response_flags"] == "DC"
    assert entry["request_model"] == "cut-model" and entry["backend_name"] == "sim"
    accounting_gateway.wait_stderr(lambda line: "response cut off before completion" in line and "cut-model" in line)
    # the gateway is unharmed
    assert client.chat.completions.create(model="m", messages=USER).choices[0].message.content
