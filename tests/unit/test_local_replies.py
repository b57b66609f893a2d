"""Envoy's own replies named from their response code details (strings as Envoy 1.40 sends them)."""

from __future__ import annotations

import pytest

from extproc.local_replies import local_reply_error_type


@pytest.mark.parametrize(("details", "expected"), [
    ("via_upstream", None),  # a backend's own answer: its body names the error
    ("", None),
    ("upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}",
     "backend_unavailable"),
    ("upstream_reset_before_response_started{connection_timeout}", "backend_unavailable"),
    ("upstream_reset_before_response_started{overflow}", "backend_unavailable"),
    ("no_healthy_upstream", "backend_unavailable"),
    ("upstream_reset_before_response_started{connection_termination}", "backend_error"),
    ("upstream_reset_before_response_started{protocol_error}", "backend_error"),
    ("response_timeout", "backend_timeout"),
    ("stream_idle_timeout", "backend_timeout"),
    ("upstream_per_try_timeout", "backend_timeout"),
    ("request_rate_limited", "gateway_rate_limited"),
    ("local_rate_limited", "gateway_rate_limited"),
    ("rate_limiter_error", "ratelimit_unavailable"),
    ("request_payload_too_large", "request_too_large"),
    ("something_new_in_a_later_envoy", "gateway_error"),
])
def test_envoy_replies_are_named_apart_from_backend_answers(details: str, expected: str | None) -> None:
    assert local_reply_error_type(details) == expected
