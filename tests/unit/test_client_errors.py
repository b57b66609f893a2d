"""One renderer for the gateway's own refusals, in the client API's error shape, used by
both stages (the request stage refuses before routing, the upstream stage per attempt)."""

from __future__ import annotations

import json

import pytest

from extproc.client_errors import error_body, error_reply
from extproc.contract import ClientApi, PROCESSOR_DETAILS_PREFIX, UPSTREAM_DETAILS_PREFIX
from extproc.schemas import openai
from extproc.schemas.anthropic import AnthropicRequestError
from extproc.schemas.openai import RequestError


@pytest.mark.parametrize(("status", "expected"), [
    (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
    (404, "not_found_error"), (413, "request_too_large"), (429, "rate_limit_error"), (500, "api_error"),
    (502, "api_error"), (504, "timeout_error"), (529, "overloaded_error"), (422, "invalid_request_error"),
])
def test_an_anthropic_client_gets_anthropics_type_for_the_status(status: int, expected: str) -> None:
    body = json.loads(error_body(ClientApi.ANTHROPIC_MESSAGES, RequestError(status, "no", "invalid_request_error")))
    assert body == {"type": "error", "error": {"type": expected, "message": "no"}}


def test_too_large_is_request_too_large_for_anthropic_clients_whoever_refused() -> None:
    """The request stage (before routing) and the upstream stage render it the same way."""
    for error in (openai.too_large(1024), AnthropicRequestError(413, "too big", "invalid_request_error")):
        body = json.loads(error_body(ClientApi.ANTHROPIC_MESSAGES, error))
        assert body["error"]["type"] == "request_too_large"


def test_an_anthropic_check_keeps_its_own_type() -> None:
    error = AnthropicRequestError(400, "max_tokens: Field required", "invalid_request_error")
    assert json.loads(error_body(ClientApi.ANTHROPIC_MESSAGES, error))["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("client_api", [None, ClientApi.OPENAI_CHAT, ClientApi.OPENAI_RESPONSES])
def test_every_other_client_gets_openais_shape(client_api: ClientApi | None) -> None:
    error = openai.model_not_found("gpt-x")
    body = json.loads(error_body(client_api, error))
    assert body == {"error": {"message": error.message, "type": "invalid_request_error", "param": "model",
                              "code": "model_not_found"}}


@pytest.mark.parametrize("prefix", [PROCESSOR_DETAILS_PREFIX, UPSTREAM_DETAILS_PREFIX])
def test_the_reply_names_the_error_in_its_code_details(prefix: str) -> None:
    reply = error_reply(ClientApi.OPENAI_CHAT, openai.model_not_found("m"), prefix)
    assert reply.immediate_response.status.code == 404
    assert reply.immediate_response.details == prefix + "model_not_found"
    reply = error_reply(ClientApi.ANTHROPIC_MESSAGES, AnthropicRequestError(400, "bad", "invalid_request_error"), prefix)
    assert reply.immediate_response.details == prefix + "invalid_request_error"
