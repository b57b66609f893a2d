"""Exchange driven with real ext_proc messages, checked the way Envoy and the client see it."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.config import LoadedConfig, parse_config, resolve_secrets
from extproc.exchange import Exchange
from extproc.runtime import Runtime

NAMESPACE = "io.envoy.ai_gateway"
OPENAI_KEY = "sk-test-openai-5a1b"
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
LIMIT = 1024

CLIENT_CREDENTIALS = (
    ("authorization", b"Bearer client-own-key"),
    ("x-api-key", b"client-anthropic-key"),
    ("api-key", b"client-azure-key"),
)


def config_data(default: bool = True) -> dict[str, Any]:
    routes: list[dict[str, Any]] = [
        {"name": "gpt", "match": {"glob": "gpt-*"}, "backends": [{"name": "openai"}]},
        {"name": "llama", "match": {"model": ["llama", "local-model"]}, "backends": [{"name": "local"}]},
        {"name": "emb", "match": {"model": "text-embedding-3-small"}, "backends": [{"name": "emb"}]},
    ]
    if default:
        routes.append({"name": "fallback", "default": True, "backends": [{"name": "local"}]})
    return {
        "backends": [
            {
                "name": "openai",
                "base_url": "https://api.openai.com/v1",
                "api_key": {"env": "OPENAI_KEY"},
                "headers": {"OpenAI-Organization": "org-42", "x-team": "search"},
            },
            {"name": "local", "base_url": "http://127.0.0.1:8080/proxy/v1/", "model_name_override": "llama-3-8b"},
            {"name": "emb", "base_url": "https://emb.example.com/api"},
        ],
        "routes": routes,
        "limits": {"max_request_body_bytes": LIMIT},
    }


def make_runtime(default: bool = True) -> Runtime:
    config = parse_config(config_data(default), "test.yaml")
    secrets = resolve_secrets(config, {"OPENAI_KEY": OPENAI_KEY}, "test.yaml")
    return Runtime.build(LoadedConfig(config=config, source="test.yaml", secrets=secrets))


RUNTIME = make_runtime()
RUNTIME_NO_DEFAULT = make_runtime(default=False)


# -- message builders ---------------------------------------------------------------


def headers_request(
    method: str, path: str, extra: Iterable[tuple[str, bytes]] = (), end_of_stream: bool = False
) -> ep.ProcessingRequest:
    values = [(":method", method.encode()), (":path", path.encode()), (":authority", b"gateway.local")]
    values += [("content-type", b"application/json"), *extra]
    return ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v) for k, v in values]),
            end_of_stream=end_of_stream,
        )
    )


def body_request(body: bytes) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True))


def send(
    body: bytes | dict[str, Any],
    path: str = "/v1/chat/completions",
    extra: Iterable[tuple[str, bytes]] = (),
    runtime: Runtime = RUNTIME,
) -> tuple[ep.ProcessingResponse, ep.ProcessingResponse]:
    """Headers then body through one Exchange; returns both answers."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    exchange = Exchange(runtime)
    first = exchange.handle(headers_request("POST", path, [("content-length", str(len(raw)).encode()), *extra]))
    assert first.WhichOneof("response") == "request_headers", first
    return first, exchange.handle(body_request(raw))


def chat(model: Any = "gpt-4o", **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}


def common(response: ep.ProcessingResponse) -> ep.CommonResponse:
    assert response.WhichOneof("response") == "request_body", response
    return response.request_body.response


def set_headers(response: ep.ProcessingResponse) -> dict[str, base_pb2.HeaderValueOption]:
    return {h.header.key.lower(): h for h in common(response).header_mutation.set_headers}


def header_values(response: ep.ProcessingResponse) -> dict[str, bytes]:
    return {k: h.header.raw_value for k, h in set_headers(response).items()}


def removed(response: ep.ProcessingResponse) -> set[str]:
    return {h.lower() for h in common(response).header_mutation.remove_headers}


def metadata(response: ep.ProcessingResponse) -> dict[str, Any]:
    return json_format.MessageToDict(response.dynamic_metadata)[NAMESPACE]


def immediate(response: ep.ProcessingResponse) -> tuple[int, dict[str, Any], dict[str, bytes], str]:
    """Status, parsed JSON body, headers and details of an immediate response."""
    assert response.WhichOneof("response") == "immediate_response", response
    reply = response.immediate_response
    headers = {h.header.key.lower(): h.header.raw_value for h in reply.headers.set_headers}
    for h in reply.headers.set_headers:
        assert h.header.value == ""
    return reply.status.code, json.loads(reply.body), headers, reply.details


def assert_openai_error(response: ep.ProcessingResponse, status: int, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    got_status, body, headers, details = immediate(response)
    assert got_status == status
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert headers.get("content-type") == b"application/json"
    assert details.startswith("extproc_")
    assert " " not in details
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


# -- the happy path ------------------------------------------------------------------------


def test_chat_request_is_routed() -> None:
    """The body answer re-routes (clear_route_cache) with model, backend and upstream path set."""
    _, response = send(chat("gpt-4o"))
    assert common(response).clear_route_cache
    values = header_values(response)
    assert values["x-ai-eg-model"] == b"gpt-4o"
    assert values["x-ai-eg-backend"] == b"openai"
    assert values[":path"] == b"/v1/chat/completions"


def test_upstream_path_uses_backend_prefix_and_keeps_query() -> None:
    _, response = send(chat("llama"), path="/v1/chat/completions?api-version=2024-06-01&x=a%20b")
    values = header_values(response)
    assert values["x-ai-eg-backend"] == b"local"
    assert values[":path"] == b"/proxy/v1/chat/completions?api-version=2024-06-01&x=a%20b"


@given(query=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters="#"), max_size=40))
def test_any_ascii_query_string_is_kept(query: str) -> None:
    path = "/v1/chat/completions" + (f"?{query}" if query else "")
    _, response = send(chat("llama"), path=path)
    expected = "/proxy/v1/chat/completions" + (f"?{query}" if query else "")
    assert header_values(response)[":path"] == expected.encode()


def test_header_values_travel_in_raw_value_only() -> None:
    """Envoy fact 1: a mutation with `value` set would blank the header."""
    _, response = send(chat("gpt-4o"), extra=CLIENT_CREDENTIALS)
    options = common(response).header_mutation.set_headers
    assert options
    for option in options:
        assert option.header.value == ""
        assert option.header.raw_value != b""


def test_backend_key_replaces_client_credentials() -> None:
    _, response = send(chat("gpt-4o"), extra=CLIENT_CREDENTIALS)
    auth = set_headers(response)["authorization"]
    assert auth.header.raw_value == f"Bearer {OPENAI_KEY}".encode()
    assert auth.append_action == OVERWRITE
    gone = removed(response)
    assert {"x-api-key", "api-key"} <= gone
    assert "authorization" not in gone  # removing it would drop the backend key just set


def test_backend_without_key_drops_client_authorization() -> None:
    """A client's own key must never reach a backend the gateway holds no key for."""
    _, response = send(chat("llama"), extra=CLIENT_CREDENTIALS)
    assert "authorization" not in set_headers(response)
    assert {"authorization", "x-api-key", "api-key"} <= removed(response)


def test_every_set_header_overwrites() -> None:
    """A client cannot smuggle a second x-ai-eg-backend or :path value past the processor."""
    _, response = send(chat("gpt-4o"), extra=[("x-ai-eg-backend", b"emb"), ("x-ai-eg-model", b"other")])
    for option in common(response).header_mutation.set_headers:
        assert option.append_action == OVERWRITE, option
    assert header_values(response)["x-ai-eg-backend"] == b"openai"


def test_extra_headers_from_config_are_set() -> None:
    _, response = send(chat("gpt-4o"))
    values = header_values(response)
    assert values["openai-organization"] == b"org-42"
    assert values["x-team"] == b"search"
    _, other = send(chat("llama"))
    assert "openai-organization" not in header_values(other)


def test_dynamic_metadata() -> None:
    _, response = send(chat("gpt-4o"))
    assert metadata(response) == {
        "request_model": "gpt-4o",
        "model_name_override": "gpt-4o",
        "backend_name": "openai",
        "route_name": "gpt",
    }


def test_dynamic_metadata_with_override_and_default_route() -> None:
    _, response = send(chat("unlisted-model"))
    assert metadata(response) == {
        "request_model": "unlisted-model",
        "model_name_override": "llama-3-8b",
        "backend_name": "local",
        "route_name": "fallback",
    }


# -- model override and body rewriting ------------------------------------------------------


def mutated_body(response: ep.ProcessingResponse) -> bytes:
    mutation = common(response).body_mutation
    assert mutation.WhichOneof("mutation") == "body", mutation
    return mutation.body


def test_model_override_rewrites_body_and_content_length() -> None:
    original = chat("llama", temperature=0.2, stream=True, stream_options={"include_usage": True})
    _, response = send(original)
    body = mutated_body(response)
    assert json.loads(body) == {**original, "model": "llama-3-8b"}
    # Envoy fact 4: content-length must match the rewritten body.
    assert header_values(response)["content-length"] == str(len(body)).encode()
    assert header_values(response)["x-ai-eg-model"] == b"llama"


def test_no_override_leaves_body_and_content_length_alone() -> None:
    _, response = send(chat("gpt-4o"))
    assert not common(response).HasField("body_mutation")
    assert "content-length" not in header_values(response)
    assert "content-length" not in removed(response)


def test_override_equal_to_requested_model_is_not_a_rewrite() -> None:
    _, response = send(chat("llama-3-8b"))  # falls to the default route -> local backend
    assert header_values(response)["x-ai-eg-backend"] == b"local"
    assert not common(response).HasField("body_mutation")
    assert "content-length" not in header_values(response)


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    # int64 range; see test_override_keeps_large_integers_exact for wider integers
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=15,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": st.text()},
        optional={"name": st.text(max_size=10), "extra": json_values},
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    extra=st.dictionaries(st.text(max_size=12).filter(lambda k: k != "model"), json_values, max_size=6),
    msgs=messages,
    ensure_ascii=st.booleans(),
)
def test_override_preserves_every_other_field(extra: dict[str, Any], msgs: list[Any], ensure_ascii: bool) -> None:
    """Only `model` changes; everything else survives the rewrite, and the length header matches."""
    original = {"model": "local-model", "messages": msgs, **extra}
    raw = json.dumps(original, ensure_ascii=ensure_ascii).encode()
    if len(raw) > LIMIT:
        return
    _, response = send(raw)
    body = mutated_body(response)
    assert json.loads(body) == {**original, "model": "llama-3-8b"}
    assert list(json.loads(body)) == list(original)  # key order kept too
    assert header_values(response)["content-length"] == str(len(body)).encode()


@pytest.mark.parametrize("number", [2**64 + 1, 123456789012345678901234567890, -(2**63) - 1])
def test_override_keeps_large_integers_exact(number: int) -> None:
    """A valid JSON integer outside int64 must not silently become a float during the rewrite."""
    original = chat("llama", seed=number, logit_bias={"50256": number})
    _, response = send(original)
    assert json.loads(mutated_body(response)) == {**original, "model": "llama-3-8b"}


@pytest.mark.parametrize("depth", [1000, 1020])
def test_override_on_deeply_nested_body_is_not_a_server_error(depth: int) -> None:
    """JSON nested as deep as the parser accepts, with a wide integer, still gets a clean answer.

    Without the override such a body is forwarded; with it the gateway must not answer 500.
    """
    config = parse_config({**config_data(), "limits": {"max_request_body_bytes": 64 * 1024}}, "test.yaml")
    runtime = Runtime.build(LoadedConfig(config=config, source="test.yaml", secrets={}))
    nested = b"[" * depth + b"12345678901234567890" + b"]" * depth
    plain = b'{"model": "gpt-4o", "messages": [], "x": ' + nested + b"}"
    _, forwarded = send(plain, runtime=runtime)
    assert forwarded.WhichOneof("response") == "request_body"  # accepted as valid JSON
    _, response = send(plain.replace(b"gpt-4o", b"llama"), runtime=runtime)
    if response.WhichOneof("response") == "immediate_response":
        assert immediate(response)[0] == 400
    else:
        assert json.loads(mutated_body(response))["model"] == "llama-3-8b"


# -- other endpoints ----------------------------------------------------------------------------


def test_completions_path() -> None:
    _, response = send({"model": "llama", "prompt": "Say hi"}, path="/v1/completions")
    assert header_values(response)[":path"] == b"/proxy/v1/completions"


def test_embeddings_path() -> None:
    _, response = send({"model": "text-embedding-3-small", "input": "hi"}, path="/v1/embeddings")
    values = header_values(response)
    assert values["x-ai-eg-backend"] == b"emb"
    assert values[":path"] == b"/api/embeddings"


def test_models_list() -> None:
    """GET /v1/models is answered by the gateway in OpenAI's list shape."""
    exchange = Exchange(RUNTIME)
    response = exchange.handle(headers_request("GET", "/v1/models", end_of_stream=True))
    status, body, headers, details = immediate(response)
    assert status == 200
    assert headers.get("content-type") == b"application/json"
    assert details.startswith("extproc_")
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["llama", "local-model", "text-embedding-3-small"]
    for model in body["data"]:
        assert model["object"] == "model"
        assert isinstance(model["created"], int)
        assert isinstance(model["owned_by"], str)


# -- errors ----------------------------------------------------------------------------------------


def test_malformed_json() -> None:
    _, response = send(b'{"model": "gpt-4o", ')
    assert_openai_error(response, 400)


def test_json_array_body() -> None:
    _, response = send(b'[{"model": "gpt-4o"}]')
    assert_openai_error(response, 400)


@pytest.mark.parametrize("body", [{"messages": []}, {"model": None}, {"model": ""}])
def test_missing_model(body: dict[str, Any]) -> None:
    _, response = send(body)
    assert_openai_error(response, 400, code="missing_required_parameter", param="model")


@pytest.mark.parametrize("model", [42, ["gpt-4o"], {"name": "gpt-4o"}, True])
def test_non_string_model(model: Any) -> None:
    _, response = send(chat(model))
    assert_openai_error(response, 400, code="invalid_type", param="model")


@pytest.mark.parametrize("model", ["gpt-4o\r\nx-ai-eg-backend: emb", "gpt-4o\n", "\rgpt", "gpt\x00"])
def test_model_with_control_characters(model: str) -> None:
    """A model name cannot inject headers through x-ai-eg-model."""
    _, response = send(chat(model))
    assert_openai_error(response, 400, code="invalid_value", param="model")


def test_empty_body() -> None:
    _, response = send(b"")
    assert_openai_error(response, 400)


def test_post_without_body() -> None:
    exchange = Exchange(RUNTIME)
    response = exchange.handle(headers_request("POST", "/v1/chat/completions", end_of_stream=True))
    assert_openai_error(response, 400)


def test_unknown_model_without_default_route() -> None:
    _, response = send(chat("claude-3-opus"), runtime=RUNTIME_NO_DEFAULT)
    error = assert_openai_error(response, 404, code="model_not_found")
    assert "claude-3-opus" in error["message"]


def test_known_model_without_default_route_still_routes() -> None:
    _, response = send(chat("gpt-4o"), runtime=RUNTIME_NO_DEFAULT)
    assert header_values(response)["x-ai-eg-backend"] == b"openai"


@pytest.mark.parametrize("path", ["/v1/chat", "/chat/completions", "/v2/chat/completions", "/", "/v1/models/gpt-4o"])
def test_unknown_path(path: str) -> None:
    exchange = Exchange(RUNTIME)
    response = exchange.handle(headers_request("POST", path))
    assert_openai_error(response, 404, code="unknown_url")


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/chat/completions"), ("PUT", "/v1/embeddings"), ("POST", "/v1/models"), ("DELETE", "/v1/completions")],
)
def test_wrong_method_on_known_path(method: str, path: str) -> None:
    exchange = Exchange(RUNTIME)
    response = exchange.handle(headers_request(method, path))
    assert_openai_error(response, 404, code="unknown_url")


def test_content_length_above_limit_rejected_at_headers() -> None:
    exchange = Exchange(RUNTIME)
    response = exchange.handle(
        headers_request("POST", "/v1/chat/completions", [("content-length", str(LIMIT + 1).encode())])
    )
    error = assert_openai_error(response, 413, code="request_too_large")
    assert str(LIMIT) in error["message"]


def test_content_length_at_limit_is_accepted() -> None:
    exchange = Exchange(RUNTIME)
    response = exchange.handle(headers_request("POST", "/v1/chat/completions", [("content-length", str(LIMIT).encode())]))
    assert response.WhichOneof("response") == "request_headers"


def padded(size: int) -> bytes:
    """A valid chat request of exactly `size` bytes."""
    raw = json.dumps(chat("gpt-4o", user="")).encode()
    return raw.replace(b'"user": ""', b'"user": "' + b"x" * (size - len(raw)) + b'"')


def test_body_above_limit() -> None:
    body = padded(LIMIT + 1)
    assert len(body) == LIMIT + 1
    exchange = Exchange(RUNTIME)
    exchange.handle(headers_request("POST", "/v1/chat/completions"))  # chunked: no content-length
    assert_openai_error(exchange.handle(body_request(body)), 413, code="request_too_large")


def test_body_at_limit_is_accepted() -> None:
    body = padded(LIMIT)
    assert len(body) == LIMIT
    _, response = send(body)
    assert header_values(response)["x-ai-eg-backend"] == b"openai"


# -- response phases --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (ep.ProcessingRequest(response_headers=ep.HttpHeaders(end_of_stream=False)), "response_headers"),
        (ep.ProcessingRequest(response_body=ep.HttpBody(body=b"data: {}\n\n", end_of_stream=False)), "response_body"),
        (ep.ProcessingRequest(response_body=ep.HttpBody(body=b"", end_of_stream=True)), "response_body"),
        (ep.ProcessingRequest(response_trailers=ep.HttpTrailers()), "response_trailers"),
        (ep.ProcessingRequest(request_trailers=ep.HttpTrailers()), "request_trailers"),
    ],
)
def test_every_phase_gets_its_own_response_type(request_: ep.ProcessingRequest, expected: str) -> None:
    """Envoy fact 2: an answer of the wrong (or no) type fails the request with 500."""
    exchange = Exchange(RUNTIME)
    send_first = exchange.handle(headers_request("POST", "/v1/chat/completions"))
    assert send_first.WhichOneof("response") == "request_headers"
    exchange.handle(body_request(json.dumps(chat("gpt-4o")).encode()))
    response = exchange.handle(request_)
    assert response.WhichOneof("response") == expected


def test_response_phases_change_nothing() -> None:
    exchange = Exchange(RUNTIME)
    response = exchange.handle(ep.ProcessingRequest(response_body=ep.HttpBody(body=b"abc", end_of_stream=True)))
    assert response.WhichOneof("response") == "response_body"
    assert not response.response_body.response.HasField("body_mutation")
    assert not response.response_body.response.header_mutation.set_headers


# -- fuzz --------------------------------------------------------------------------------------------

bodies = st.one_of(
    st.binary(max_size=LIMIT + 64),
    st.builds(lambda v: json.dumps(v).encode(), json_values),
    st.builds(
        lambda model, extra: json.dumps({"model": model, **extra}).encode(),
        st.one_of(st.text(max_size=20), st.sampled_from(["gpt-4o", "llama", "local-model"]), json_scalars),
        st.dictionaries(st.text(max_size=5), json_values, max_size=4),
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies, default=st.booleans())
def test_arbitrary_body_never_breaks_the_exchange(body: bytes, default: bool) -> None:
    """Any body gets a clean client error or a routing answer; never an exception or a 500."""
    exchange = Exchange(RUNTIME if default else RUNTIME_NO_DEFAULT)
    exchange.handle(headers_request("POST", "/v1/chat/completions"))
    response = exchange.handle(body_request(body))
    kind = response.WhichOneof("response")
    assert kind in ("immediate_response", "request_body")
    if kind == "immediate_response":
        status, error_body, _, _ = immediate(response)
        assert status in (400, 404, 413)
        assert set(error_body["error"]) == {"message", "type", "param", "code"}
    else:
        assert common(response).clear_route_cache


@settings(max_examples=200, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]),
    path=st.one_of(
        st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"]),
        st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map("/".__add__),
    ),
    length=st.one_of(st.none(), st.integers(min_value=0, max_value=10**20).map(str), st.text(max_size=5)),
    end_of_stream=st.booleans(),
)
def test_arbitrary_request_headers_get_a_clean_answer(method: str, path: str, length: str | None, end_of_stream: bool) -> None:
    """The headers phase either lets the body come or answers the client itself; never a 500."""
    extra = [] if length is None else [("content-length", length.encode())]
    response = Exchange(RUNTIME).handle(headers_request(method, path, extra, end_of_stream=end_of_stream))
    kind = response.WhichOneof("response")
    assert kind in ("immediate_response", "request_headers")
    if kind == "immediate_response":
        status, body, _, _ = immediate(response)
        assert status in (200, 400, 404, 413)
        if status == 200:
            assert (method, path.partition("?")[0]) == ("GET", "/v1/models")
        else:
            assert set(body["error"]) == {"message", "type", "param", "code"}
    else:
        assert method == "POST" and not end_of_stream


# -- when the processor ends the stream ----------------------------------------------------------
# The processor ends each stream itself right after its last answer (server.answer_last):
# Envoy then treats the request as processed and passes any later bytes unread. So `done`
# must never come before the accounting, nor while the processor withholds bytes.

SSE_HEADERS = [(":status", b"200"), ("content-type", b"text/event-stream")]
USAGE_EVENT = b'data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
CONTENT_EVENT = b'data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}\n\n'
FORCED_STREAM = CONTENT_EVENT + USAGE_EVENT + b"data: [DONE]\n\n"


def response_headers(values: list[tuple[str, bytes]], end_of_stream: bool = False) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(response_headers=ep.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v) for k, v in values]),
        end_of_stream=end_of_stream,
    ))


def body_chunk(data: bytes, end: bool = False) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(response_body=ep.HttpBody(body=data, end_of_stream=end))


def routed(body: dict[str, Any]) -> Exchange:
    exchange = Exchange(RUNTIME)
    raw = json.dumps(body).encode()
    exchange.handle(headers_request("POST", "/v1/chat/completions", [("content-length", str(len(raw)).encode())]))
    exchange.handle(body_request(raw))
    assert not exchange.done
    return exchange


def test_a_json_response_ends_the_stream_with_its_accounted_body() -> None:
    exchange = routed(chat("gpt-4o"))
    body = b'{"id":"x","object":"chat.completion","model":"gpt-4o","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}'
    exchange.handle(response_headers([(":status", b"200"), ("content-type", b"application/json")]))
    assert not exchange.done
    answer = exchange.handle(body_chunk(body, end=True))
    assert exchange.done
    assert metadata(answer)["llm_total_token"] == 5


def test_a_stream_ends_at_done_not_before() -> None:
    exchange = routed(chat("gpt-4o", stream=True, stream_options={"include_usage": True}))
    exchange.handle(response_headers(SSE_HEADERS))
    exchange.handle(body_chunk(CONTENT_EVENT))
    assert not exchange.done
    answer = exchange.handle(body_chunk(USAGE_EVENT + b"data: [DONE]\n\n"))
    assert exchange.done
    assert metadata(answer)["llm_total_token"] == 5


def test_a_response_without_a_body_to_read_ends_at_its_headers() -> None:
    exchange = routed(chat("gpt-4o"))
    answer = exchange.handle(response_headers([(":status", b"204")], end_of_stream=True))
    assert exchange.done and answer.WhichOneof("response") == "response_headers"


def test_an_mcp_message_ends_the_stream_with_its_metadata() -> None:
    runtime = Runtime.build(LoadedConfig(
        config=parse_config({**config_data(), "mcp": {
            "servers": [{"name": "alpha", "url": "http://127.0.0.1:9/mcp"}], "routes": [{"path": "/mcp", "servers": ["alpha"]}],
        }}, "test.yaml"),
        source="test.yaml", secrets={}))
    exchange = Exchange(runtime)
    exchange.handle(headers_request("POST", "/mcp"))
    assert not exchange.done
    answer = exchange.handle(body_request(b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"alpha__x"}}'))
    assert exchange.done and metadata(answer)["mcp_tool_name"] == "alpha__x"


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=len(FORCED_STREAM) - 1), max_size=6, unique=True))
def test_a_rewritten_stream_never_ends_while_it_withholds_bytes(cuts: list[int]) -> None:
    """The client gets the answers' bytes up to the last one, then the rest unread from Envoy:
    together exactly the stream it asked for (the forced usage event removed), however the
    upstream's bytes were cut into chunks."""
    exchange = routed(chat("gpt-4o", stream=True))  # no include_usage: the gateway forces it
    exchange.handle(response_headers(SSE_HEADERS))
    bounds = [0, *sorted(cuts), len(FORCED_STREAM)]
    chunks = [FORCED_STREAM[a:b] for a, b in zip(bounds, bounds[1:])]
    client = b""
    for index, chunk in enumerate(chunks):
        if exchange.done:  # Envoy no longer asks the processor: the bytes pass as they are
            client += chunk
            continue
        answer = exchange.handle(body_chunk(chunk, end=index == len(chunks) - 1))
        mutation = answer.response_body.response.body_mutation
        client += mutation.body if mutation.HasField("body") else (b"" if mutation.clear_body else chunk)
    assert exchange.done and exchange.finished
    assert client == CONTENT_EVENT.replace(b',"usage":null', b"") + b"data: [DONE]\n\n"
