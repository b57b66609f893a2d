"""Helpers for `scripts/bench`: request/response bodies, Envoy configs, wrk, /proc, the report.

Everything here except `procs` is pure (no processes, no network) and unit-tested in
tests/unit/test_bench.py.
"""
