"""Shared fixtures: two simulated upstreams and one gateway routing to them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from extproc.sim import SimServer
from tests.integration.harness import RunningGateway, free_port, running_gateway

BACKEND_A_KEY = "sk-backend-a-9f8e7d6c5b4a"  # the provider credential the gateway injects
CLIENT_KEY = "sk-client-only-1a2b3c4d"  # what clients send; must never reach a provider
BODY_LIMIT = 64 * 1024


@pytest.fixture(scope="session")
def sim_a() -> Iterator[SimServer]:
    with SimServer() as sim:
        yield sim


@pytest.fixture(scope="session")
def sim_b() -> Iterator[SimServer]:
    with SimServer() as sim:
        yield sim


def gateway_config(sim_a: SimServer, sim_b: SimServer) -> dict[str, Any]:
    return {
        "backends": [
            {
                "name": "provider-a",
                "schema": "openai",
                "base_url": sim_a.base_url,
                "api_key": {"env": "TEST_BACKEND_A_KEY"},
                "headers": {"OpenAI-Organization": "org-gateway"},
            },
            {
                "name": "provider-b",
                "schema": "openai",
                "base_url": f"{sim_b.url}/openai/v1",  # a base URL with a path prefix
                "model_name_override": "upstream-model-b",
            },
            {"name": "unreachable", "schema": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1"},
        ],
        "routes": [
            {"name": "model-a", "match": {"model": "model-a"}, "backends": [{"name": "provider-a"}]},
            {"name": "model-b", "match": {"model": ["model-b", "model-b-alias"]}, "backends": [{"name": "provider-b"}]},
            {"name": "embeddings", "match": {"prefix": "embed-"}, "backends": [{"name": "provider-a"}]},
            {"name": "down", "match": {"model": "down-model"}, "backends": [{"name": "unreachable"}]},
            {
                "name": "split",
                "match": {"glob": "split-*"},
                "backends": [{"name": "provider-a", "weight": 1}, {"name": "provider-b", "weight": 1}],
            },
        ],
        "limits": {"max_request_body_bytes": BODY_LIMIT},
    }


@pytest.fixture(scope="session")
def gateway(sim_a: SimServer, sim_b: SimServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    tmp: Path = tmp_path_factory.mktemp("gateway")
    with running_gateway(gateway_config(sim_a, sim_b), tmp, env={"TEST_BACKEND_A_KEY": BACKEND_A_KEY}) as gw:
        yield gw


@pytest.fixture
def client(gateway: RunningGateway) -> openai.OpenAI:
    """The official SDK pointed at the gateway; no retries so errors surface as they are."""
    return openai.OpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0, timeout=30)


@pytest.fixture(autouse=True)
def _clear_recordings(request: pytest.FixtureRequest) -> None:
    for name in ("sim_a", "sim_b"):
        if name in request.fixturenames:
            request.getfixturevalue(name).clear()
