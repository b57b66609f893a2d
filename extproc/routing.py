"""Model -> route -> backend selection.

Routes are tried in file order; the default route (if any) is the last resort,
wherever it appears. Results per model name are cached in a bounded dict so the
per-request cost is one dict lookup plus one weighted pick.
"""

from __future__ import annotations

import fnmatch
import random
import re
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import accumulate

from pydantic import SecretStr

from extproc.backend_auth import KEY_HEADERS, BackendAuth, auth_for
from extproc.config import Backend, GatewayConfig, ModelMatch, Route
from extproc.contract import CLIENT_CREDENTIAL_HEADERS, ROUTE_HEADER, STAGE_HEADER

_CACHE_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class BackendTarget:
    """What the processor needs to send a request to one backend, precomputed."""

    name: str
    backend: Backend
    path_prefix: str
    authority: str
    host: str  # server.address / server.port in telemetry
    port: int
    auth: BackendAuth  # the backend's credentials (extproc/backend_auth.py)
    # The request stage's per-request header work, done once: what it sets for this
    # backend (credentials, configured headers) and what it removes (the client's own
    # credentials, except a header the backend's credentials overwrite; the routing
    # headers a client must not pick).
    request_headers: tuple[tuple[str, bytes], ...] = field(repr=False)  # holds the key: never in a repr
    removed_client_headers: tuple[str, ...]
    model_name_override: str | None
    strip_model_prefix: str | None
    # Bring your own key: the request header a client's own key comes in, and the header
    # (with scheme) it is sent to the backend in, with the configured headers but no key.
    client_key_header: str | None = None
    client_key_credential: tuple[str, bytes] = ("", b"")
    extra_headers: tuple[tuple[str, bytes], ...] = ()

    def credentials(self, client_keys: Mapping[str, bytes]) -> tuple[tuple[str, bytes], ...]:
        """The credential and configured headers for one request: the client's own key
        when it sent one in this backend's `client_key_header`, else the configured one."""
        key = client_keys.get(self.client_key_header) if self.client_key_header is not None else None
        if key is None:
            return self.request_headers
        header, scheme = self.client_key_credential
        return ((header, scheme + key), *self.extra_headers)

    def model_for(self, client_model: str) -> str:
        """The name this backend knows the client's model by: the override, else the
        client's name without the backend's prefix (`groq/llama-3.3-70b` -> `llama-3.3-70b`)."""
        if self.model_name_override is not None:
            return self.model_name_override
        prefix = self.strip_model_prefix
        if prefix is not None and client_model.startswith(prefix) and len(client_model) > len(prefix):
            return client_model[len(prefix):]
        return client_model


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    """A route with its matcher and weighted backends ready for picking.

    `targets` are the priority-0 backends (the processor picks one of them); with
    `fallback`, Envoy itself picks per attempt among all priorities (see envoyconfig)."""

    name: str
    targets: tuple[BackendTarget, ...]
    cumulative_weights: tuple[int, ...]
    fallback: bool = False
    members: frozenset[str] = frozenset()  # every backend of the route, fallbacks included
    timeout_ms: bytes | None = None  # sent as x-envoy-upstream-rq-timeout-ms: Envoy's router honours it

    def pick(self, rng: random.Random) -> BackendTarget:
        if len(self.targets) == 1:
            return self.targets[0]
        point = rng.random() * self.cumulative_weights[-1]
        return self.targets[bisect_right(self.cumulative_weights, point)]


def _matcher(match: ModelMatch) -> re.Pattern[str] | frozenset[str] | str:
    if match.model is not None:
        return frozenset(match.exact_models)
    if match.prefix is not None:
        return match.prefix
    assert match.glob is not None
    return re.compile(fnmatch.translate(match.glob))


def _matches(matcher: re.Pattern[str] | frozenset[str] | str, model: str) -> bool:
    if isinstance(matcher, frozenset):
        return model in matcher
    if isinstance(matcher, str):
        return model.startswith(matcher)
    return matcher.match(model) is not None


class Router:
    """Picks the route and backend for a model name."""

    def __init__(self, config: GatewayConfig, secrets: dict[str, SecretStr], rng: random.Random | None = None) -> None:
        targets = {b.name: _target(b, auth_for(b, secrets)) for b in config.backends}
        self.targets: dict[str, BackendTarget] = targets  # by backend name
        self._rng = rng or random.Random()
        self._routes: list[tuple[re.Pattern[str] | frozenset[str] | str, CompiledRoute]] = []
        self._default: CompiledRoute | None = None
        for route in config.routes:
            compiled = _compile(route, targets)
            if route.match is None:
                self._default = compiled
            else:
                self._routes.append((_matcher(route.match), compiled))
        self._cache: dict[str, CompiledRoute | None] = {}
        self.listed_models: tuple[str, ...] = tuple(
            dict.fromkeys(m for r in config.routes if r.match for m in r.match.exact_models)
        )

    def route_for(self, model: str) -> CompiledRoute | None:
        """The first route in file order matching `model`, else the default route."""
        try:
            return self._cache[model]
        except KeyError:
            pass
        found = next((route for matcher, route in self._routes if _matches(matcher, model)), self._default)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[model] = found
        return found

    def select(self, model: str) -> tuple[CompiledRoute, BackendTarget] | None:
        route = self.route_for(model)
        if route is None:
            return None
        return route, route.pick(self._rng)


def _compile(route: Route, targets: dict[str, BackendTarget]) -> CompiledRoute:
    primary = [ref for ref in route.backends if ref.priority == 0]
    chosen = tuple(targets[ref.name] for ref in primary)
    weights = tuple(accumulate(ref.weight for ref in primary))
    timeout = route.request_timeout_seconds
    return CompiledRoute(
        name=route.name, targets=chosen, cumulative_weights=weights, fallback=route.has_fallback,
        members=frozenset(ref.name for ref in route.backends),
        timeout_ms=str(max(1, round(timeout * 1000))).encode() if timeout is not None else None,
    )


def _target(backend: Backend, auth: BackendAuth) -> BackendTarget:
    url = backend.url
    extra_headers = tuple((k.lower(), v.encode()) for k, v in backend.headers.items())
    credentials = auth.headers()
    overwritten = {name for name, _ in credentials}
    return BackendTarget(
        name=backend.name,
        backend=backend,
        path_prefix=url.path_prefix,
        authority=url.authority,
        host=url.host,
        port=url.port,
        auth=auth,
        model_name_override=backend.model_name_override,
        strip_model_prefix=backend.strip_model_prefix,
        request_headers=credentials + extra_headers,
        client_key_header=backend.client_key_header,
        client_key_credential=KEY_HEADERS.get(backend.schema_, ("", b"")),
        extra_headers=extra_headers,
        removed_client_headers=(
            *(h for h in CLIENT_CREDENTIAL_HEADERS if h not in overwritten), ROUTE_HEADER, STAGE_HEADER),
    )
