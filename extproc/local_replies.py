"""Envoy's own replies, told apart from a provider's answers.

When a backend refuses the connection, resets it or does not answer in time, Envoy answers
the client itself, and the local-reply config puts that answer in OpenAI's error shape with
`type: server_error`, the same words as a provider's own 500. Operators must still be able
to tell "backend down" from "provider error", so the request stage asks Envoy for the
response code details (`response.code_details`, `via_upstream` for every answer a backend
gave) and names Envoy's own replies from them; their bodies are not read.
"""

from __future__ import annotations

VIA_UPSTREAM = "via_upstream"

# Error types of Envoy's replies (metrics' error.type, the access log's error_type). The
# backend ones match the `code` the client gets in the body.
BACKEND_UNAVAILABLE = "backend_unavailable"  # refused, unreachable, no healthy host, overloaded
BACKEND_ERROR = "backend_error"  # reset or broke the protocol before answering
BACKEND_TIMEOUT = "backend_timeout"  # no answer (or silence) within the route's limits
GATEWAY_RATE_LIMITED = "gateway_rate_limited"  # a budget or request limit of this gateway
RATELIMIT_UNAVAILABLE = "ratelimit_unavailable"  # budgets could not be checked (failure_mode: closed)
REQUEST_TOO_LARGE = "request_too_large"
GATEWAY_ERROR = "gateway_error"  # any other reply Envoy made itself

_UNREACHABLE_RESETS = ("connection_failure", "connection_timeout", "connect_error", "overflow")
_TIMEOUTS = frozenset({
    "response_timeout", "upstream_response_timeout", "upstream_per_try_timeout", "upstream_per_try_idle_timeout",
    "stream_idle_timeout",
})
LOCAL_RATE_LIMITED = "local_rate_limited"  # response code details of the request limits' 429
RATE_LIMITER_ERROR = "rate_limiter_error"  # ... of the budget filter when its service failed (closed)
_EXACT = {
    "no_healthy_upstream": BACKEND_UNAVAILABLE,
    "cluster_not_found": BACKEND_UNAVAILABLE,
    "maintenance_mode": BACKEND_UNAVAILABLE,
    "request_rate_limited": GATEWAY_RATE_LIMITED,
    LOCAL_RATE_LIMITED: GATEWAY_RATE_LIMITED,
    RATE_LIMITER_ERROR: RATELIMIT_UNAVAILABLE,
    "request_payload_too_large": REQUEST_TOO_LARGE,
}


def local_reply_error_type(details: str) -> str | None:
    """The error type of a reply Envoy made itself, from its response code details;
    None for an answer a backend gave (or when Envoy sent no details)."""
    if not details or details == VIA_UPSTREAM:
        return None
    if details in _TIMEOUTS:
        return BACKEND_TIMEOUT
    if (known := _EXACT.get(details)) is not None:
        return known
    if details.startswith("upstream_reset_before_response_started"):
        reason = details.partition("{")[2]
        return BACKEND_UNAVAILABLE if any(r in reason for r in _UNREACHABLE_RESETS) else BACKEND_ERROR
    return GATEWAY_ERROR
