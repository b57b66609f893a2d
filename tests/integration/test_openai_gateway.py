"""OpenAI clients through real Envoy + the processor, against simulated providers."""

from __future__ import annotations

import base64
import uuid

import httpx
import openai
import orjson
import pytest

from extproc.sim import SimServer
from tests.integration.conftest import BACKEND_A_KEY, BODY_LIMIT, CLIENT_KEY
from tests.integration.harness import RunningGateway

USER = [{"role": "user", "content": "Tell me about Envoy"}]


def _only(sim: SimServer, suffix: str) -> object:
    matching = [r for r in sim.requests if r.path.endswith(suffix)]
    assert len(matching) == 1, [r.path for r in sim.requests]
    return matching[0]


def test_chat_non_streaming_reaches_the_backend_for_its_model(client: openai.OpenAI, sim_a: SimServer, sim_b: SimServer) -> None:
    completion = client.chat.completions.create(model="model-a", messages=USER)

    assert completion.choices[0].message.content.startswith("This is a simulated reply to: Tell me about Envoy")
    assert completion.usage is not None
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    upstream = _only(sim_a, "/chat/completions")
    assert upstream.path == "/v1/chat/completions"
    assert upstream.json["model"] == "model-a"
    assert upstream.json["messages"] == USER
    assert sim_b.requests == []


def test_credentials_are_injected_and_client_credentials_stripped(client: openai.OpenAI, sim_a: SimServer) -> None:
    client.chat.completions.create(model="model-a", messages=USER, extra_headers={
        "x-api-key": CLIENT_KEY, "api-key": CLIENT_KEY, "proxy-authorization": f"Basic {CLIENT_KEY}",
        "cookie": f"gateway_session={CLIENT_KEY}",
    })

    headers = _only(sim_a, "/chat/completions").headers
    assert headers["authorization"] == f"Bearer {BACKEND_A_KEY}"
    assert headers["openai-organization"] == "org-gateway"
    assert CLIENT_KEY not in str(headers)
    assert not [name for name in headers if name.startswith("x-ai-eg-")]
    assert not {"x-api-key", "api-key", "proxy-authorization", "cookie"} & set(headers)


def test_backend_without_credential_gets_no_client_credential(client: openai.OpenAI, sim_b: SimServer) -> None:
    client.chat.completions.create(model="model-b", messages=USER)

    headers = _only(sim_b, "/chat/completions").headers
    assert "authorization" not in headers
    assert CLIENT_KEY not in str(headers)


def test_model_override_and_path_prefix_seen_by_upstream(client: openai.OpenAI, sim_b: SimServer) -> None:
    completion = client.chat.completions.create(model="model-b-alias", messages=USER, temperature=0.25, max_tokens=5)

    upstream = _only(sim_b, "/chat/completions")
    assert upstream.path == "/openai/v1/chat/completions"
    assert upstream.json == {"model": "upstream-model-b", "messages": USER, "temperature": 0.25, "max_tokens": 5}
    assert int(upstream.headers["content-length"]) == len(upstream.body)
    assert completion.model == "upstream-model-b"
    assert completion.usage is not None and completion.usage.completion_tokens == 5


def test_two_models_route_to_two_backends(client: openai.OpenAI, sim_a: SimServer, sim_b: SimServer) -> None:
    for _ in range(3):
        client.chat.completions.create(model="model-a", messages=USER)
    client.chat.completions.create(model="model-b", messages=USER)

    assert len(sim_a.requests) == 3
    assert len(sim_b.requests) == 1


def test_weighted_route_uses_both_backends(client: openai.OpenAI, sim_a: SimServer, sim_b: SimServer) -> None:
    for _ in range(40):
        client.chat.completions.create(model="split-1", messages=USER)
    # 1:1 weights over 40 picks: each side is chosen at least 5 times except with
    # probability < 1e-6, so this does not flake.
    assert len(sim_a.requests) >= 5 and len(sim_b.requests) >= 5
    assert len(sim_a.requests) + len(sim_b.requests) == 40


def test_streaming_chunks_reach_the_client_before_the_upstream_finishes(
    gateway: RunningGateway, sim_a: SimServer
) -> None:
    """The upstream pauses after its first content chunk until we say so: if the
    gateway buffered the stream, we could not see that chunk before releasing it."""
    hold = f"hold-{uuid.uuid4().hex}"
    client = openai.OpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0, timeout=30)
    stream = client.chat.completions.create(
        model="model-a",
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-sim-hold": hold, "x-sim-chunks": "4"},
    )
    content: list[str] = []
    released = False
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            content.append(chunk.choices[0].delta.content)
            if not released:
                assert sim_a.hold_outcome(hold) is None, "upstream had already finished the stream"
                sim_a.release(hold)
                released = True

    assert sim_a.hold_outcome(hold) == "released"
    assert len(content) == 4
    full = client.chat.completions.create(model="model-a", messages=USER).choices[0].message.content
    assert "".join(content) == full
    assert usage is not None and usage.completion_tokens > 0


def test_streaming_without_usage_request_gets_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="model-a", messages=USER, stream=True))
    assert chunks and all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completions(client: openai.OpenAI, sim_a: SimServer) -> None:
    completion = client.completions.create(model="model-a", prompt="Say hello", max_tokens=7)
    assert completion.choices[0].text
    assert completion.usage is not None and completion.usage.completion_tokens == 7
    assert _only(sim_a, "/completions").path == "/v1/completions"


def test_embeddings(client: openai.OpenAI, sim_a: SimServer) -> None:
    result = client.embeddings.create(model="embed-small", input=["one", "two"], dimensions=16)
    assert [len(item.embedding) for item in result.data] == [16, 16]
    assert result.usage.prompt_tokens > 0
    upstream = _only(sim_a, "/embeddings")
    assert upstream.path == "/v1/embeddings"
    assert upstream.headers["authorization"] == f"Bearer {BACKEND_A_KEY}"


def test_models_are_listed_from_config(client: openai.OpenAI, sim_a: SimServer, sim_b: SimServer) -> None:
    ids = [model.id for model in client.models.list()]
    assert ids == ["model-a", "model-b", "model-b-alias", "down-model"]
    assert sim_a.requests == [] and sim_b.requests == []


def test_query_string_is_forwarded(gateway: RunningGateway, sim_a: SimServer) -> None:
    response = httpx.post(
        f"{gateway.base_url}/chat/completions?trace=1", json={"model": "model-a", "messages": USER}, timeout=30
    )
    assert response.status_code == 200
    upstream = _only(sim_a, "/chat/completions")
    assert upstream.path == "/v1/chat/completions" and upstream.query == "trace=1"


# -- errors, all in OpenAI's error shape --------------------------------------


def _assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = orjson.loads(response.content)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return error


def test_malformed_json_is_400(gateway: RunningGateway, sim_a: SimServer) -> None:
    response = httpx.post(
        f"{gateway.base_url}/chat/completions", content=b'{"model": "model-a", "messages": [', timeout=30,
        headers={"content-type": "application/json"},
    )
    error = _assert_openai_error(response, 400)
    assert "JSON" in error["message"]
    assert error["type"] == "invalid_request_error"
    assert sim_a.requests == []


def test_missing_model_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(messages=USER, model="")
    assert caught.value.status_code == 400
    assert caught.value.param == "model"


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=USER)
    assert caught.value.code == "model_not_found"
    assert "no-such-model" in caught.value.message


def test_unknown_path_is_404(gateway: RunningGateway) -> None:
    response = httpx.post(f"{gateway.base_url}/fine_tuning/jobs", json={"model": "model-a"}, timeout=30)
    _assert_openai_error(response, 404, "unknown_url")
    response = httpx.get(f"{gateway.url}/", timeout=30)
    _assert_openai_error(response, 404, "unknown_url")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_limit_is_413(gateway: RunningGateway, sim_a: SimServer, chunked: bool) -> None:
    body = orjson.dumps({"model": "model-a", "messages": [{"role": "user", "content": "x" * (BODY_LIMIT + 10)}]})
    content = iter([body]) if chunked else body  # an iterator makes httpx send it chunked
    response = httpx.post(f"{gateway.base_url}/chat/completions", content=content, timeout=30)
    error = _assert_openai_error(response, 413, "request_too_large")
    assert str(BODY_LIMIT) in error["message"]
    assert sim_a.requests == []


def test_unreachable_backend_is_503(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="down-model", messages=USER)
    assert caught.value.status_code == 503
    assert caught.value.code == "backend_unavailable"


def test_backend_errors_pass_through_unchanged(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="model-a", messages=USER, extra_headers={"x-sim-error": "429"})
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "1"


def test_injection_attempts_in_the_model_never_become_headers_or_paths(gateway: RunningGateway, sim_a: SimServer) -> None:
    for model in ("model-a\r\nx-injected: 1", "../../admin", "model-a\nmodel-a"):
        response = httpx.post(f"{gateway.base_url}/chat/completions", json={"model": model, "messages": USER}, timeout=30)
        assert response.status_code in (400, 404), response.text
        _assert_openai_error(response, response.status_code)
    assert sim_a.requests == []


def test_access_log_records_model_and_backend(client: openai.OpenAI, gateway: RunningGateway) -> None:
    request_id = str(uuid.uuid4())
    client.chat.completions.create(model="model-b", messages=USER, extra_headers={"x-request-id": request_id})
    entry = gateway.wait_access_log(lambda e: e.get("request_id") == request_id)
    assert entry["request_model"] == "model-b"
    assert entry["model_name_override"] == "upstream-model-b"
    assert entry["backend_name"] == "provider-b"
    assert entry["route_name"] == "model-b"
    assert entry["status"] == 200
    assert BACKEND_A_KEY not in "\n".join(gateway.stdout_lines + gateway.stderr_lines)


def test_embeddings_base64_is_decodable(client: openai.OpenAI) -> None:
    raw = client.embeddings.with_raw_response.create(model="embed-small", input="hello", encoding_format="base64")
    payload = orjson.loads(raw.content)
    decoded = base64.b64decode(payload["data"][0]["embedding"])
    assert len(decoded) == 8 * 4


def test_model_retrieve(client: openai.OpenAI) -> None:
    assert client.models.retrieve("model-b-alias").id == "model-b-alias"
    assert client.models.retrieve("split-anything").id == "split-anything"  # routable by glob
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"


def test_equivalent_paths_are_normalised(gateway: RunningGateway, sim_a: SimServer) -> None:
    response = httpx.post(
        f"{gateway.url}//v1/./chat//completions", json={"model": "model-a", "messages": USER}, timeout=30
    )
    assert response.status_code == 200, response.text
    assert _only(sim_a, "/chat/completions").path == "/v1/chat/completions"
