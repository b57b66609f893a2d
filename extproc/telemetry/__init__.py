"""Metrics and traces built from per-request records."""
