"""Router: which route and backend a model name goes to."""

from __future__ import annotations

import fnmatch
import random
from collections import Counter
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from extproc import routing
from extproc.config import parse_config
from extproc.routing import Router


def backend(name: str) -> dict[str, Any]:
    return {"name": name, "base_url": f"https://{name}.example.com/v1"}


def router(routes: list[dict[str, Any]], backends: tuple[str, ...] = ("a", "b", "c"), seed: int = 0) -> Router:
    config = parse_config({"backends": [backend(n) for n in backends], "routes": routes})
    return Router(config, {}, random.Random(seed))


def route(name: str, match: dict[str, Any] | None = None, *backends: str, weights: tuple[int, ...] = ()) -> dict[str, Any]:
    refs = [{"name": b, "weight": w} for b, w in zip(backends, weights or (1,) * len(backends), strict=True)]
    data: dict[str, Any] = {"name": name, "backends": refs}
    if match is None:
        data["default"] = True
    else:
        data["match"] = match
    return data


def route_name(r: Router, model: str) -> str | None:
    found = r.route_for(model)
    return None if found is None else found.name


# -- matching ------------------------------------------------------------------------


def test_exact_string() -> None:
    r = router([route("exact", {"model": "gpt-4o"}, "a")])
    assert route_name(r, "gpt-4o") == "exact"
    assert route_name(r, "gpt-4o-mini") is None
    assert route_name(r, "GPT-4O") is None
    assert route_name(r, "gpt-4") is None


def test_exact_list() -> None:
    r = router([route("exact", {"model": ["llama", "mistral"]}, "a")])
    assert route_name(r, "llama") == "exact"
    assert route_name(r, "mistral") == "exact"
    assert route_name(r, "llama2") is None
    assert route_name(r, "['llama', 'mistral']") is None


def test_prefix() -> None:
    r = router([route("p", {"prefix": "claude-"}, "a")])
    assert route_name(r, "claude-3-opus") == "p"
    assert route_name(r, "claude-") == "p"
    assert route_name(r, "claude") is None
    assert route_name(r, "my-claude-3") is None


def test_glob() -> None:
    r = router([route("g", {"glob": "gpt-4o*"}, "a"), route("q", {"glob": "o?-mini"}, "b")])
    assert route_name(r, "gpt-4o") == "g"
    assert route_name(r, "gpt-4o-mini") == "g"
    assert route_name(r, "xgpt-4o") is None  # the whole name must match
    assert route_name(r, "gpt-4") is None
    assert route_name(r, "o1-mini") == "q"
    assert route_name(r, "o1-mini-2024") is None


def test_glob_character_class_and_literal_dots() -> None:
    r = router([route("g", {"glob": "llama-3.[18]-*"}, "a")])
    assert route_name(r, "llama-3.1-8b") == "g"
    assert route_name(r, "llama-3.8-70b") == "g"
    assert route_name(r, "llama-3x1-8b") is None  # '.' is literal, not regex 'any'
    assert route_name(r, "llama-3.2-1b") is None


model_names = st.text(alphabet="abcgpt-.4o*?[]!", max_size=12)


@given(pattern=model_names.filter(bool), model=model_names)
def test_glob_agrees_with_shell_matching(pattern: str, model: str) -> None:
    """A glob route matches exactly the names a case-sensitive shell pattern would."""
    r = router([route("g", {"glob": pattern}, "a")])
    assert (route_name(r, model) == "g") == fnmatch.fnmatchcase(model, pattern)


@given(prefix=st.text(min_size=1, max_size=6), model=st.text(max_size=12))
def test_prefix_matches_exactly_names_starting_with_it(prefix: str, model: str) -> None:
    r = router([route("p", {"prefix": prefix}, "a")])
    assert (route_name(r, model) == "p") == model.startswith(prefix)
    assert route_name(r, prefix + model) == "p"


def test_file_order_wins_among_matches() -> None:
    first_exact = router([route("exact", {"model": "gpt-4o"}, "a"), route("prefix", {"prefix": "gpt"}, "b")])
    first_prefix = router([route("prefix", {"prefix": "gpt"}, "b"), route("exact", {"model": "gpt-4o"}, "a")])
    assert route_name(first_exact, "gpt-4o") == "exact"
    assert route_name(first_prefix, "gpt-4o") == "prefix"
    assert route_name(first_exact, "gpt-3.5") == "prefix"


def test_default_is_last_resort_even_when_listed_first() -> None:
    r = router(
        [
            route("fallback", None, "c"),
            route("gpt", {"glob": "gpt-*"}, "a"),
            route("llama", {"model": "llama"}, "b"),
        ]
    )
    assert route_name(r, "gpt-4o") == "gpt"
    assert route_name(r, "llama") == "llama"
    assert route_name(r, "something-else") == "fallback"
    assert route_name(r, "") == "fallback"


def test_no_default_means_no_route() -> None:
    r = router([route("gpt", {"prefix": "gpt"}, "a")])
    assert r.route_for("claude") is None
    assert r.select("claude") is None


def test_select_returns_route_and_backend_target() -> None:
    config = parse_config(
        {
            "backends": [
                {"name": "a", "base_url": "https://a.example.com:8443/api/v1", "model_name_override": "m2"},
            ],
            "routes": [route("r", None, "a")],
        }
    )
    selection = Router(config, {"a": SecretStr("sk-a")}).select("anything")
    assert selection is not None
    chosen_route, target = selection
    assert chosen_route.name == "r"
    assert target.name == "a"
    assert target.path_prefix == "/api/v1"
    assert target.authority == "a.example.com:8443"
    assert (target.host, target.port) == ("a.example.com", 8443)
    assert target.auth.headers() == (("authorization", b"Bearer sk-a"),)  # an OpenAI backend: a bearer token
    assert "sk-a" not in repr(target)
    assert target.model_name_override == "m2"


# -- weighted selection ---------------------------------------------------------------


def pick_counts(weights: tuple[int, ...], picks: int, seed: int) -> Counter[str]:
    names = ("a", "b", "c")[: len(weights)]
    r = router([route("w", None, *names, weights=weights)], seed=seed)
    counts: Counter[str] = Counter()
    for _ in range(picks):
        selection = r.select("m")
        assert selection is not None
        counts[selection[1].name] += 1
    return counts


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_weights_are_honoured(seed: int) -> None:
    """3:1 weights over 4000 picks: about 3000/1000 (tolerance is ~5 standard deviations)."""
    counts = pick_counts((3, 1), 4000, seed)
    assert abs(counts["a"] - 3000) < 140
    assert abs(counts["b"] - 1000) < 140


def test_weights_apply_to_the_right_backend() -> None:
    """Reversing the weights reverses the split (the weight follows its backend)."""
    counts = pick_counts((1, 3), 4000, 7)
    assert abs(counts["b"] - 3000) < 140


def test_three_way_split() -> None:
    counts = pick_counts((1, 2, 5), 8000, 3)
    for name, expected in (("a", 1000), ("b", 2000), ("c", 5000)):
        assert abs(counts[name] - expected) < 250, counts


def test_every_weighted_backend_is_reachable() -> None:
    counts = pick_counts((1000, 1), 20000, 11)
    assert counts["b"] > 0
    assert counts["a"] > counts["b"]


def test_single_backend_is_always_picked() -> None:
    counts = pick_counts((5,), 500, 0)
    assert counts == Counter({"a": 500})


def test_default_router_rng_works() -> None:
    """Without an injected RNG the router still picks among the route's backends."""
    config = parse_config({"backends": [backend("a"), backend("b")], "routes": [route("w", None, "a", "b")]})
    r = Router(config, {})
    seen = set()
    for _ in range(200):
        selection = r.select("x")
        assert selection is not None
        seen.add(selection[1].name)
    assert seen == {"a", "b"}


# -- listed models ------------------------------------------------------------------------


def test_listed_models_are_exact_names_in_order_without_duplicates() -> None:
    r = router(
        [
            route("one", {"model": ["gpt-4o", "gpt-4o-mini"]}, "a"),
            route("p", {"prefix": "claude-"}, "b"),
            route("two", {"model": "llama"}, "b"),
            route("g", {"glob": "o1*"}, "c"),
            route("three", {"model": ["gpt-4o", "mistral", "llama"]}, "c"),
            route("d", None, "a"),
        ]
    )
    assert list(r.listed_models) == ["gpt-4o", "gpt-4o-mini", "llama", "mistral"]


def test_no_exact_names_means_empty_listing() -> None:
    assert list(router([route("d", None, "a")]).listed_models) == []


# -- cache ----------------------------------------------------------------------------------


def expected_route(model: str) -> str:
    if model in ("gpt-4o", "llama"):
        return "exact"
    if model.startswith("gpt"):
        return "prefix"
    return "default"


ROUTES = [route("exact", {"model": ["gpt-4o", "llama"]}, "a"), route("prefix", {"prefix": "gpt"}, "b"), route("default", None, "c")]


def test_cache_stays_bounded_with_many_distinct_models() -> None:
    """A client sending endless distinct model names cannot grow memory without limit."""
    r = router(ROUTES)
    limit = routing._CACHE_LIMIT
    for i in range(3 * limit + 17):
        model = f"gpt-{i}" if i % 2 else f"model-{i}"
        assert route_name(r, model) == expected_route(model)
        assert len(r._cache) <= limit
    assert route_name(r, "gpt-4o") == "exact"
    assert route_name(r, "llama") == "exact"


@settings(max_examples=50, deadline=None)
@given(
    models=st.lists(
        st.one_of(st.sampled_from(["gpt-4o", "llama", "gpt", ""]), st.text(max_size=10), st.text(max_size=8).map("gpt".__add__)),
        min_size=1,
        max_size=300,
    ),
    limit=st.integers(min_value=1, max_value=16),
)
def test_cache_bounded_and_correct(models: list[str], limit: int) -> None:
    """Whatever the sequence of names, answers stay right and the cache stays within its limit."""
    with mock.patch.object(routing, "_CACHE_LIMIT", limit):
        r = router(ROUTES)
        for model in models:
            assert route_name(r, model) == expected_route(model)
            assert len(r._cache) <= limit
        # Asking again (cached or evicted) gives the same answers.
        for model in models:
            assert route_name(r, model) == expected_route(model)
