"""Decode a *copy* of a compressed response body, chunk by chunk, for accounting.

The client always gets the upstream's original bytes; only the processor's view is
decompressed. Output is capped so a decompression bomb cannot exhaust memory.
"""

from __future__ import annotations

import zlib
from typing import Protocol

import brotli


NO_LIMIT = 1 << 40


class OutputLimitExceeded(ValueError):
    """The body decompresses to more than the caller allows (a bomb, or just too big)."""


class ChunkDecoder(Protocol):
    def decode(self, chunk: bytes, limit: int = NO_LIMIT) -> bytes:
        """Decompress `chunk`; raise OutputLimitExceeded rather than produce over `limit` bytes."""
        ...


class _Zlib:
    __slots__ = ("_inner",)

    def __init__(self, wbits: int) -> None:
        self._inner = zlib.decompressobj(wbits)

    def decode(self, chunk: bytes, limit: int = NO_LIMIT) -> bytes:
        out = self._inner.decompress(chunk, max(limit, 1))
        if self._inner.unconsumed_tail:
            raise OutputLimitExceeded(f"decompressed body exceeds {limit} bytes")
        return out


class _Brotli:
    __slots__ = ("_inner",)

    def __init__(self) -> None:
        self._inner = brotli.Decompressor()

    def decode(self, chunk: bytes, limit: int = NO_LIMIT) -> bytes:
        out = self._inner.process(chunk, output_buffer_limit=max(limit, 1))
        if len(out) >= limit and not self._inner.can_accept_more_data():
            raise OutputLimitExceeded(f"decompressed body exceeds {limit} bytes")
        return out


def decoder_for(content_encoding: str) -> ChunkDecoder | None:
    """A streaming decoder for a Content-Encoding value; None for identity or unknown codings.

    Raises ValueError for a coding we recognise but cannot read (e.g. stacked codings).
    """
    coding = content_encoding.strip().lower()
    if coding in ("", "identity"):
        return None
    if coding in ("gzip", "x-gzip"):
        return _Zlib(16 + zlib.MAX_WBITS)
    if coding == "deflate":
        return _Zlib(zlib.MAX_WBITS)  # zlib-wrapped, as RFC 9110 defines "deflate"
    if coding == "br":
        return _Brotli()
    raise ValueError(f"unsupported content-encoding {content_encoding!r}")
