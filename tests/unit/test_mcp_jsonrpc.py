"""extproc.mcp.jsonrpc: parsing client messages, building answers, naming tools."""

from __future__ import annotations

import orjson
import pytest

from extproc.mcp import jsonrpc
from extproc.mcp.jsonrpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    PARSE_ERROR,
    Message,
    RpcError,
    error_response,
    parse_message,
    prefixed,
    result_response,
    split_tool_name,
    tool_name_of,
)


def test_request_notification_and_response() -> None:
    request = parse_message(b'{"jsonrpc":"2.0","id":7,"method":"tools/list","params":{}}')
    assert isinstance(request, Message)
    assert (request.kind, request.id, request.method, request.params) == ("request", 7, "tools/list", {})

    string_id = parse_message(b'{"jsonrpc":"2.0","id":"a-1","method":"ping"}')
    assert isinstance(string_id, Message) and string_id.id == "a-1" and string_id.params == {}

    note = parse_message(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')
    assert isinstance(note, Message) and note.kind == "notification" and note.id is None

    answer = parse_message(b'{"jsonrpc":"2.0","id":"mcpgw/a/1","result":{}}')
    assert isinstance(answer, Message) and answer.kind == "response" and answer.method is None


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        (b"{not json", PARSE_ERROR, "not valid JSON"),
        (b"", PARSE_ERROR, "not valid JSON"),
        (b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]', INVALID_REQUEST, "batches"),
        (b"[]", INVALID_REQUEST, "batches"),
        (b'"ping"', INVALID_REQUEST, "JSON object"),
        (b'{"id":1,"method":"ping"}', INVALID_REQUEST, "jsonrpc"),
        (b'{"jsonrpc":"1.0","id":1,"method":"ping"}', INVALID_REQUEST, "jsonrpc"),
        (b'{"jsonrpc":"2.0","id":1,"method":""}', INVALID_REQUEST, "method"),
        (b'{"jsonrpc":"2.0","id":1,"method":5}', INVALID_REQUEST, "method"),
        (b'{"jsonrpc":"2.0","id":null,"method":"ping"}', INVALID_REQUEST, "id"),
        (b'{"jsonrpc":"2.0","id":true,"method":"ping"}', INVALID_REQUEST, "id"),
        (b'{"jsonrpc":"2.0","id":1.5,"method":"ping"}', INVALID_REQUEST, "id"),
        (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":[1]}', INVALID_PARAMS, "params"),
        (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":"x"}', INVALID_REQUEST, "params"),
        (b'{"jsonrpc":"2.0","id":1}', INVALID_REQUEST, "method"),
        (b'{"jsonrpc":"2.0","id":1,"result":{},"error":{}}', INVALID_REQUEST, "method"),
    ],
)
def test_refusals(body: bytes, code: int, words: str) -> None:
    error = parse_message(body)
    assert isinstance(error, RpcError)
    assert error.code == code
    assert words in error.message
    decoded = orjson.loads(error.to_bytes())
    assert decoded["jsonrpc"] == "2.0" and decoded["error"]["code"] == code


def test_refusal_keeps_a_readable_id() -> None:
    error = parse_message(b'{"jsonrpc":"2.0","id":9,"method":"x","params":[]}')
    assert isinstance(error, RpcError) and error.id == 9
    assert orjson.loads(error.to_bytes())["id"] == 9
    unreadable = parse_message(b'{"jsonrpc":"2.0","id":{"a":1},"method":"x"}')
    assert isinstance(unreadable, RpcError) and unreadable.id is None


def test_tool_name_of() -> None:
    call = parse_message(b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a__add"}}')
    other = parse_message(b'{"jsonrpc":"2.0","id":1,"method":"prompts/get","params":{"name":"a__p"}}')
    nameless = parse_message(b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":3}}')
    assert isinstance(call, Message) and isinstance(other, Message) and isinstance(nameless, Message)
    assert tool_name_of(call) == "a__add"
    assert tool_name_of(other) is None
    assert tool_name_of(nameless) is None


def test_answers() -> None:
    assert orjson.loads(result_response(3, {"x": 1})) == {"jsonrpc": "2.0", "id": 3, "result": {"x": 1}}
    assert orjson.loads(error_response(None, -32601, "nope")) == {
        "jsonrpc": "2.0", "id": None, "error": {"code": -32601, "message": "nope"}
    }
    with_data = orjson.loads(error_response("k", -32602, "bad", {"tool": "t"}))
    assert with_data["error"]["data"] == {"tool": "t"}


def test_tool_names() -> None:
    assert prefixed("srv", "tool") == "srv__tool"
    assert split_tool_name("srv__tool") == ("srv", "tool")
    assert split_tool_name("srv__my__tool") == ("srv", "my__tool")  # server names hold no "__"
    assert split_tool_name(prefixed("a-b_c", "x_y")) == ("a-b_c", "x_y")
    for bad in ("tool", "__tool", "srv__", "", "srv_tool"):
        assert split_tool_name(bad) is None
    assert jsonrpc.SEPARATOR == "__"
