"""Helpers for `scripts/bench`: request/response bodies, Envoy configs, wrk, /proc, the report.

Everything here except `procs` and `noop_processor` (the floor's do-nothing ext_proc
server, which the bench starts as `python -m bench_lib.noop_processor`) is pure (no
processes, no network) and unit-tested in tests/unit/test_bench.py; the no-op
processor's handler is tested there too, without a network.
"""
