"""Decode a *copy* of a compressed response body, chunk by chunk, for accounting.

The client always gets the upstream's original bytes; only the processor's view is
decompressed. Output is capped so a decompression bomb cannot exhaust memory.
"""

from __future__ import annotations

import zlib
from typing import Protocol

import brotli


class ChunkDecoder(Protocol):
    def decode(self, chunk: bytes) -> bytes: ...


class _Zlib:
    __slots__ = ("_inner",)

    def __init__(self, wbits: int) -> None:
        self._inner = zlib.decompressobj(wbits)

    def decode(self, chunk: bytes) -> bytes:
        return self._inner.decompress(chunk)


class _Brotli:
    __slots__ = ("_inner",)

    def __init__(self) -> None:
        self._inner = brotli.Decompressor()

    def decode(self, chunk: bytes) -> bytes:
        return self._inner.process(chunk)


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
