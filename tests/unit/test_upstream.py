"""The upstream stage, driven with real ext_proc messages as Envoy sends them per attempt."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from botocore.credentials import Credentials
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2

from extproc import aws_credentials
from extproc.aws_credentials import ChainCredentials
from extproc.config import LoadedConfig, parse_config, resolve_secrets
from extproc.runtime import Runtime
from extproc.sim.bedrock_api import (
    SIM_AWS_ACCESS_KEY_ID,
    SIM_AWS_SECRET_ACCESS_KEY,
    SIM_AWS_SESSION_ACCESS_KEY_ID,
    SIM_AWS_SESSION_SECRET_ACCESS_KEY,
    SIM_AWS_SESSION_TOKEN,
    verify_sigv4,
)
from extproc.protocol import Answer
from extproc.upstream import UpstreamExchange, backend_of_host, is_upstream_stream

NS = "io.envoy.ai_gateway"
ANTHROPIC_KEY = "sk-ant-unit-1"
OPENAI_KEY = "sk-openai-unit-2"
AZURE_KEY = "azure-unit-3"


def _runtime() -> Runtime:
    config = parse_config({
        "backends": [
            {"name": "claude", "schema": "anthropic", "base_url": "https://api.anthropic.com/prefix",
             "api_key": {"env": "AK"}, "model_name_override": "claude-real"},
            {"name": "oa", "schema": "openai", "base_url": "https://api.openai.com/v1", "api_key": {"env": "OK"}},
            {"name": "az", "schema": "azure_openai", "base_url": "https://res.openai.azure.com", "api_key": {"env": "ZK"},
             "api_version": "2024-10-21", "deployment": "gpt4o-prod"},
            {"name": "br", "schema": "aws_bedrock", "base_url": "http://127.0.0.1:4566",
             "aws": {"region": "us-east-1", "access_key_id": {"env": "AWS_AK"}, "secret_access_key": {"env": "AWS_SK"}}},
            {"name": "chain", "schema": "aws_bedrock", "base_url": "http://127.0.0.1:4566", "aws": {"region": "us-east-1"}},
        ],
        "routes": [{"name": "r", "default": True, "backends": [
            {"name": "oa"}, {"name": "claude", "priority": 1}, {"name": "az", "priority": 2}, {"name": "br", "priority": 3}]}],
    })
    env = {"AK": ANTHROPIC_KEY, "OK": OPENAI_KEY, "ZK": AZURE_KEY, "AWS_AK": SIM_AWS_ACCESS_KEY_ID,
           "AWS_SK": SIM_AWS_SECRET_ACCESS_KEY}
    return Runtime.build(LoadedConfig(config=config, source="t", secrets=resolve_secrets(config, env, "t")))


RUNTIME = _runtime()


def host_metadata(backend: str) -> str:
    """The endpoint metadata exactly as Envoy 1.40 sends it: protobuf text format."""
    return f'filter_metadata {{ key: "{NS}" value {{ fields {{ key: "backend" value {{ string_value: "{backend}" }} }} }} }} '


def headers_message(backend: str, client_api: str = "openai.chat", extra: dict[str, bytes] | None = None) -> ep.ProcessingRequest:
    values = {":method": b"POST", ":path": b"/v1/chat/completions", ":authority": b"gateway", **(extra or {})}
    request = ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v) for k, v in values.items()])))
    attributes = struct_pb2.Struct()
    attributes.update({"xds.upstream_host_metadata": host_metadata(backend)})
    request.attributes["envoy.filters.http.ext_proc"].CopyFrom(attributes)
    forwarded = struct_pb2.Struct()
    forwarded.update({"client_api": client_api, "request_model": "m"})
    request.metadata_context.filter_metadata[NS].CopyFrom(forwarded)
    return request


def attempt(backend: str, body: dict[str, Any], client_api: str = "openai.chat") -> tuple[UpstreamExchange, Answer]:
    exchange = UpstreamExchange(RUNTIME)
    first = headers_message(backend, client_api)
    assert is_upstream_stream(first)
    assert exchange.handle(first).WhichOneof("response") == "request_headers"
    raw = json.dumps(body).encode()
    return exchange, exchange.handle(ep.ProcessingRequest(request_body=ep.HttpBody(body=raw, end_of_stream=True)))


def mutation(response: ep.ProcessingResponse) -> tuple[dict[str, bytes], list[str], bytes | None]:
    common = response.request_body.response
    headers = {h.header.key: h.header.raw_value for h in common.header_mutation.set_headers}
    body = common.body_mutation.body if common.body_mutation.WhichOneof("mutation") == "body" else None
    return headers, list(common.header_mutation.remove_headers), body


def metadata(response: ep.ProcessingResponse) -> dict[str, Any]:
    return {k: v.string_value for k, v in response.dynamic_metadata.fields[NS].struct_value.fields.items()}


CHAT = {"model": "client-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7}


def test_backend_is_read_from_envoys_text_metadata() -> None:
    assert backend_of_host(host_metadata("claude")) == "claude"
    assert backend_of_host("not { protobuf") is None
    assert backend_of_host("") is None


def test_request_stage_streams_are_not_upstream_streams() -> None:
    plain = ep.ProcessingRequest(request_headers=ep.HttpHeaders())
    assert not is_upstream_stream(plain)


def test_anthropic_attempt_translates_sets_its_headers_and_removes_the_rest() -> None:
    _, response = attempt("claude", CHAT)
    headers, remove, body = mutation(response)
    assert headers[":path"] == b"/prefix/v1/messages"
    assert headers[":authority"] == b"api.anthropic.com"
    assert headers["x-api-key"] == ANTHROPIC_KEY.encode() and headers["anthropic-version"] == b"2023-06-01"
    assert headers["accept-encoding"] == b"identity"
    assert body is not None and int(headers["content-length"]) == len(body)
    sent = orjson.loads(body)
    assert sent["model"] == "claude-real" and sent["max_tokens"] == 7 and sent["messages"][0]["role"] == "user"
    # Whatever an earlier attempt set for another provider is removed (mutations persist across attempts).
    assert {"authorization", "api-key", "x-amz-date", "x-amz-security-token"} <= set(remove)
    assert metadata(response) == {"backend_name": "claude", "model_name_override": "claude-real"}


def test_openai_attempt_keeps_the_body_and_uses_bearer() -> None:
    _, response = attempt("oa", CHAT)
    headers, remove, body = mutation(response)
    assert headers[":path"] == b"/v1/chat/completions"
    assert headers["authorization"] == b"Bearer " + OPENAI_KEY.encode()
    assert body is None and int(headers["content-length"]) == len(json.dumps(CHAT))
    assert "x-api-key" in remove and "anthropic-version" in remove


def test_azure_attempt_uses_deployment_path_api_version_and_api_key() -> None:
    _, response = attempt("az", CHAT)
    headers, remove, _ = mutation(response)
    assert headers[":path"] == b"/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
    assert headers["api-key"] == AZURE_KEY.encode() and "authorization" in remove


def test_bedrock_attempt_is_signed_over_the_translated_body() -> None:
    _, response = attempt("br", {**CHAT, "stream": True})
    headers, _, body = mutation(response)
    assert body is not None
    path = headers[":path"].decode()
    assert path == "/model/client-model/converse-stream"
    assert headers["accept"] == b"application/vnd.amazon.eventstream"
    received = [(k, v.decode()) for k, v in headers.items() if not k.startswith(":")] + [("host", "127.0.0.1:4566")]
    assert verify_sigv4("POST", f"http://127.0.0.1:4566{path}", received, body) == SIM_AWS_ACCESS_KEY_ID
    assert json.loads(body)["inferenceConfig"]["maxTokens"] == 7


def _signed_by(response: ep.ProcessingResponse) -> str:
    """The access key the simulator's SigV4 check accepts for this request body mutation."""
    headers, _, body = mutation(response)
    assert body is not None
    path = headers[":path"].decode()
    received = [(k, v.decode()) for k, v in headers.items() if not k.startswith(":")] + [("host", "127.0.0.1:4566")]
    return verify_sigv4("POST", f"http://127.0.0.1:4566{path}", received, body)


async def test_bedrock_attempt_waits_for_the_chains_credentials_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without configured keys the first attempt's answer is a coroutine the server awaits
    (the chain runs in a thread); later attempts sign at once from memory."""
    found: list[int] = []

    def find() -> Credentials:
        found.append(1)
        return Credentials(SIM_AWS_SESSION_ACCESS_KEY_ID, SIM_AWS_SESSION_SECRET_ACCESS_KEY, SIM_AWS_SESSION_TOKEN)

    monkeypatch.setattr(aws_credentials, "_SHARED", ChainCredentials(find))
    _, answer = attempt("chain", CHAT)
    assert not isinstance(answer, ep.ProcessingResponse)
    assert _signed_by(await answer) == SIM_AWS_SESSION_ACCESS_KEY_ID
    _, again = attempt("chain", CHAT)
    assert isinstance(again, ep.ProcessingResponse)
    assert _signed_by(again) == SIM_AWS_SESSION_ACCESS_KEY_ID
    assert found == [1]


async def test_bedrock_attempt_without_any_credentials_is_a_503_in_openai_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aws_credentials, "_SHARED", ChainCredentials(lambda: None))
    _, answer = attempt("chain", CHAT)
    assert not isinstance(answer, ep.ProcessingResponse)
    reply = (await answer).immediate_response
    assert reply.status.code == 503
    error = json.loads(reply.body)["error"]
    assert error["code"] == "backend_credentials_missing" and error["type"] == "server_error"
    assert "chain" in error["message"]


@pytest.mark.parametrize(("backend", "client_api", "shape"), [
    ("claude", "openai.embeddings", "openai"),
    ("br", "openai.completions", "openai"),
])
def test_an_api_the_backend_cannot_serve_is_a_400_in_the_clients_shape(backend: str, client_api: str, shape: str) -> None:
    _, response = attempt(backend, {"model": "m", "input": "x", "messages": [], "max_tokens": 1}, client_api)
    reply = response.immediate_response
    assert reply.status.code == 400
    body = json.loads(reply.body)
    if shape == "openai":
        assert body["error"]["type"] == "invalid_request_error"
    else:
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"


def test_an_anthropic_client_on_an_openai_backend_gets_a_chat_request_or_anthropics_400() -> None:
    _, response = attempt("oa", CHAT, "anthropic.messages")
    headers, _, body = mutation(response)
    assert headers[":path"].endswith(b"/chat/completions") and body is not None
    assert json.loads(body)["messages"] == CHAT["messages"]
    for bad in ({**CHAT, "thinking": {"type": "enabled", "budget_tokens": 9}}, {**CHAT, "messages": []},
                {"model": "m", "messages": "x"}, {**CHAT, "max_tokens": "many"}):
        _, response = attempt("oa", bad, "anthropic.messages")
        reply = response.immediate_response
        assert reply.status.code == 400
        assert json.loads(reply.body)["error"]["type"] == "invalid_request_error"


def test_translated_json_reply_and_error_come_back_in_openai_shape() -> None:
    exchange, _ = attempt("claude", CHAT)
    headers = ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=":status", raw_value=b"200"),
        base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"),
        base_pb2.HeaderValue(key="content-length", raw_value=b"300")])))
    answer = exchange.handle(headers)
    assert not exchange.done  # the body is translated: the attempt's stream goes on
    set_headers = {h.header.key: h.header.raw_value for h in answer.response_headers.response.header_mutation.set_headers}
    assert set_headers["x-ai-eg-backend"] == b"claude"
    assert "content-length" in answer.response_headers.response.header_mutation.remove_headers
    assert answer.mode_override.response_body_mode == processing_mode_pb2.ProcessingMode.BUFFERED
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-real",
               "content": [{"type": "text", "text": "Hello"}], "stop_reason": "end_turn",
               "usage": {"input_tokens": 5, "output_tokens": 2}}
    body = exchange.handle(ep.ProcessingRequest(response_body=ep.HttpBody(body=orjson.dumps(message), end_of_stream=True)))
    assert exchange.done  # the translated body was the attempt's last answer
    chat = orjson.loads(body.response_body.response.body_mutation.body)
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"] == "Hello"
    assert chat["usage"]["prompt_tokens"] == 5 and chat["usage"]["completion_tokens"] == 2


def test_openai_backend_reply_passes_untouched_with_the_served_header() -> None:
    exchange, _ = attempt("oa", CHAT)
    answer = exchange.handle(ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=":status", raw_value=b"200"),
        base_pb2.HeaderValue(key="content-type", raw_value=b"application/json")]))))
    mutation_ = answer.response_headers.response.header_mutation
    assert [h.header.key for h in mutation_.set_headers] == ["x-ai-eg-backend"]
    assert not answer.HasField("mode_override")  # no body round trip for a reply nobody rewrites
    assert exchange.done  # nothing more to see in this attempt: the processor ends its stream
