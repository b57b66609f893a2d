"""Content-Encoding decoders: the processor's decompressed view of a response body."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable, Sequence

import brotli
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.decoding import decoder_for

COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,  # zlib-wrapped, as RFC 9110 defines "deflate"
    "br": brotli.compress,
}

SAMPLE = b'{"model":"gpt-4o","usage":{"prompt_tokens":3,"completion_tokens":4}}' * 20


def split(raw: bytes, cuts: Sequence[int]) -> list[bytes]:
    """Cut raw at the given offsets (repeats and 0/len give empty chunks)."""
    bounds = [0, *sorted(cuts), len(raw)]
    return [raw[a:b] for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("coding", ["", "identity", "IDENTITY", "  identity ", " "])
def test_identity_needs_no_decoder(coding: str) -> None:
    """No coding (or identity, any case/whitespace) means the bytes are read as they are."""
    assert decoder_for(coding) is None


@pytest.mark.parametrize(
    ("coding", "compress"),
    [
        ("gzip", gzip.compress),
        ("GZIP", gzip.compress),
        (" Gzip ", gzip.compress),
        ("x-gzip", gzip.compress),
        ("X-GZip", gzip.compress),
        ("deflate", zlib.compress),
        ("Deflate", zlib.compress),
        ("br", brotli.compress),
        ("BR", brotli.compress),
    ],
)
def test_known_codings_decode_one_shot(coding: str, compress: Callable[[bytes], bytes]) -> None:
    """Each supported coding (case-insensitive) gets a decoder that restores the body."""
    decoder = decoder_for(coding)
    assert decoder is not None
    assert decoder.decode(compress(SAMPLE)) == SAMPLE


def test_each_call_gets_a_fresh_decoder() -> None:
    """Two responses never share decompression state."""
    a, b = decoder_for("gzip"), decoder_for("gzip")
    assert a is not b
    body = gzip.compress(SAMPLE)
    assert a is not None and b is not None
    assert a.decode(body[:10]) + a.decode(body[10:]) == SAMPLE
    assert b.decode(body) == SAMPLE


@pytest.mark.parametrize("coding", ["zstd", "compress", "gzip, br", "br, gzip", "gzip;q=1", "deflate-raw", "bogus"])
def test_unknown_coding_raises_value_error(coding: str) -> None:
    """A coding the processor cannot read is a ValueError naming it (the caller skips accounting)."""
    with pytest.raises(ValueError, match="content-encoding") as info:
        decoder_for(coding)
    assert repr(coding) in str(info.value)


def test_corrupt_input_raises_instead_of_returning_garbage() -> None:
    """Bytes that are not in the announced coding fail loudly (ResponseObserver catches it)."""
    for coding in ("gzip", "deflate", "br"):
        decoder = decoder_for(coding)
        assert decoder is not None
        with pytest.raises(Exception):  # noqa: B017 - zlib.error / brotli.error
            decoder.decode(b"definitely not compressed data" * 4)


@settings(max_examples=150, deadline=None)
@given(
    coding=st.sampled_from(sorted(COMPRESSORS)),
    data=st.binary(max_size=3000) | st.just(SAMPLE),
    cut_seed=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
    one_byte=st.booleans(),
)
def test_streaming_decode_equals_one_shot(coding: str, data: bytes, cut_seed: list[int], one_byte: bool) -> None:
    """However the compressed body is chunked (1-byte pieces, empty chunks), the output is the same."""
    compressed = COMPRESSORS[coding](data)
    if one_byte:
        chunks = [compressed[i : i + 1] for i in range(len(compressed))] + [b""]
    else:
        chunks = split(compressed, [c % (len(compressed) + 1) for c in cut_seed])
    decoder = decoder_for(coding)
    assert decoder is not None
    streamed = b"".join(decoder.decode(c) for c in chunks)
    one_shot = decoder_for(coding)
    assert one_shot is not None
    assert streamed == one_shot.decode(compressed) == data
