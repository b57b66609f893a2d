"""Local OpenAI-compatible LLM simulator: demo backend, test upstream, benchmark target."""

from extproc.sim.server import RecordedRequest, SimServer

__all__ = ["RecordedRequest", "SimServer"]
