"""extproc: an Envoy external processor that makes Envoy an AI gateway."""

__version__ = "0.1.0"
