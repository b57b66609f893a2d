"""SSE decoder: what the processor extracts from a response stream, however Envoy chunks it."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import extproc.sse as sse_module
from extproc.sse import SSEDecoder, SSEEvent

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "streams"
FIXTURE_NAMES = sorted(p.name for p in FIXTURES.glob("*.sse"))

Key = tuple[str | None, bytes, str | None, bool]


# -- helpers ---------------------------------------------------------------


def key(e: SSEEvent) -> Key:
    return (e.event, e.data, e.id, e.has_data)


def split(raw: bytes, cuts: Sequence[int]) -> list[bytes]:
    """Cut raw at the given offsets (repeats and 0/len give empty chunks)."""
    bounds = [0, *sorted(cuts), len(raw)]
    return [raw[a:b] for a, b in zip(bounds, bounds[1:])]


def run(chunks: Sequence[bytes], keep_raw: bool = False) -> list[SSEEvent]:
    d = SSEDecoder(keep_raw=keep_raw)
    out: list[SSEEvent] = []
    for c in chunks:
        out += d.feed(c)
    out += d.flush()
    return out


def run_checked(chunks: Sequence[bytes]) -> tuple[list[SSEEvent], list[SSEEvent]]:
    """Feed both modes in lockstep, checking after every chunk that the buffers are compacted."""
    plain, keeping = SSEDecoder(), SSEDecoder(keep_raw=True)
    out_plain: list[SSEEvent] = []
    out_raw: list[SSEEvent] = []
    fed = returned = 0
    for c in chunks:
        out_plain += plain.feed(c)
        got = keeping.feed(c)
        out_raw += got
        fed += len(c)
        returned += sum(len(e.raw) for e in got)
        assert all(e.raw == b"" for e in out_plain)
        # keep_raw holds exactly the incomplete block; without it, at most that.
        assert keeping.pending == fed - returned
        assert plain.pending <= keeping.pending
    out_plain += plain.flush()
    out_raw += keeping.flush()
    assert plain.pending == keeping.pending == 0
    return out_plain, out_raw


def keys(events: Sequence[SSEEvent]) -> list[Key]:
    return [key(e) for e in events]


def data_only(events: Sequence[SSEEvent]) -> list[Key]:
    return [key(e) for e in events if e.has_data]


class CountingSearch:
    """Stands in for the decoder's line-end regex and counts the bytes it scans."""

    def __init__(self) -> None:
        self.scanned = 0
        self.calls = 0

    def search(self, buf: Any, pos: int) -> re.Match[bytes] | None:
        m = ORIGINAL_LINE_END.search(buf, pos)
        self.scanned += (m.end() if m else len(buf)) - pos
        self.calls += 1
        return m


ORIGINAL_LINE_END = sse_module._LINE_END


@contextlib.contextmanager
def counting_scans() -> Iterator[CountingSearch]:
    counter = CountingSearch()
    sse_module._LINE_END = counter  # type: ignore[assignment]
    try:
        yield counter
    finally:
        sse_module._LINE_END = ORIGINAL_LINE_END


# -- hand cases ------------------------------------------------------------


@pytest.mark.parametrize("nl", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_line_endings(nl: bytes) -> None:
    raw = nl.join([b"data: one", b"", b"event: update", b"data: two", b"data: three", b"", b""])
    for chunks in ([raw], [raw[i : i + 1] for i in range(len(raw))]):
        assert keys(run(chunks)) == [
            (None, b"one", None, True),
            ("update", b"two\nthree", None, True),
        ]


def test_comments_are_ignored_and_comment_only_blocks_are_returned() -> None:
    raw = b": keep-alive\n\ndata: a\n: in the middle\ndata: b\n\n:\n\n"
    events = run([raw], keep_raw=True)
    assert keys(events) == [
        (None, b"", None, False),
        (None, b"a\nb", None, True),
        (None, b"", None, False),
    ]
    assert [e.raw for e in events] == [b": keep-alive\n\n", b"data: a\n: in the middle\ndata: b\n\n", b":\n\n"]


def test_event_id_and_retry_fields() -> None:
    raw = (
        b"event: first\nid: 7\nretry: 1000\ndata: x\n\n"
        b"data: y\n\n"  # the last event ID carries over, the event type does not
        b"id: 8\x00bad\ndata: z\n\n"  # an id with NUL is ignored
        b"id\ndata: w\n\n"  # an empty id resets it
        b"retry: soon\nevent:second\nevent: third\ndata: v\n\n"  # last event field wins
    )
    assert keys(run([raw])) == [
        ("first", b"x", "7", True),
        (None, b"y", "7", True),
        (None, b"z", "7", True),
        (None, b"w", "", True),
        ("third", b"v", "", True),
    ]


def test_value_spaces_and_colons() -> None:
    raw = b"data:no-space\ndata:  two spaces\ndata: a: b:c\ndata\ndata:\ndata: \n\n"
    [e] = run([raw])
    assert e.data == b"no-space\n two spaces\na: b:c\n\n\n"


def test_field_without_colon() -> None:
    raw = b"event\ndata\n\nfoo\nDATA\ndata x\n\n"
    assert keys(run([raw])) == [("", b"", None, True), (None, b"", None, False)]


def test_unknown_fields_are_ignored() -> None:
    raw = b"foo: bar\nData: no\ndata2: no\n data: no\ndata: yes\n\n"
    assert keys(run([raw])) == [(None, b"yes", None, True)]


def test_empty_data_line_is_dispatched_with_empty_data() -> None:
    assert keys(run([b"data:\n\n"])) == [(None, b"", None, True)]
    assert keys(run([b"data\n\n"])) == [(None, b"", None, True)]


def test_block_without_data() -> None:
    assert keys(run([b"event: ping\n\n"])) == [("ping", b"", None, False)]
    assert keys(run([b"retry: 5\n\n"])) == [(None, b"", None, False)]


def test_done_marker() -> None:
    raw = b'data: {"x":1}\n\ndata: [DONE]\n\n'
    assert [e.data for e in run([raw])] == [b'{"x":1}', b"[DONE]"]


@pytest.mark.parametrize("keep_raw", [False, True])
def test_bom(keep_raw: bool) -> None:
    raw = b"\xef\xbb\xbfdata: a\n\n\xef\xbb\xbfdata: b\n\n"  # only the very first BOM is skipped
    for chunks in ([raw], [raw[i : i + 1] for i in range(len(raw))], [b"\xef", b"", b"\xbb\xbfd", raw[4:]]):
        events = run(chunks, keep_raw)
        assert keys(events) == [(None, b"a", None, True), (None, b"", None, False)]
        if keep_raw:
            assert [e.raw for e in events] == [b"\xef\xbb\xbfdata: a\n\n", b"\xef\xbb\xbfdata: b\n\n"]


def test_partial_bom_is_not_skipped() -> None:
    assert keys(run([b"\xef", b"\xbbdata: x\n\n"])) == [(None, b"", None, False)]
    assert keys(run([b"\xef\xbb"])) == [(None, b"", None, False)]
    assert keys(run([b"\xef\xbb\xbf"])) == [(None, b"", None, False)]
    assert run([b"\xef\xbb\xbf"], keep_raw=True)[0].raw == b"\xef\xbb\xbf"


def test_cr_at_chunk_end_followed_by_lf() -> None:
    chunks = [b"data: a\r", b"\n\r", b"\ndata: b\r\n\r", b"\n"]
    # Without keep_raw a block ended by a CR is returned at once; the LF that
    # follows is swallowed, not counted as another blank line.
    d = SSEDecoder()
    assert d.feed(chunks[0]) == []
    assert keys(d.feed(chunks[1])) == [(None, b"a", None, True)]
    assert keys(d.feed(chunks[2])) == [(None, b"b", None, True)]
    assert d.feed(chunks[3]) == []
    assert d.flush() == []
    # With keep_raw the block waits for the next byte so its raw has the whole CRLF.
    d = SSEDecoder(keep_raw=True)
    assert d.feed(chunks[0]) == []
    assert d.feed(chunks[1]) == []
    assert [e.raw for e in d.feed(chunks[2])] == [b"data: a\r\n\r\n"]
    assert d.pending == len(b"data: b\r\n\r")
    assert [e.raw for e in d.feed(chunks[3])] == [b"data: b\r\n\r\n"]
    assert d.flush() == []


def test_crlf_at_chunk_end_then_lf_is_a_blank_line() -> None:
    # only a lone CR at the end may be half a CRLF; after a whole CRLF an LF is a new line
    chunks = [b"data: a\r\n", b"\ndata: b\r\n", b"\n"]
    assert keys(run(chunks)) == [(None, b"a", None, True), (None, b"b", None, True)]
    assert [e.raw for e in run(chunks, keep_raw=True)] == [b"data: a\r\n\n", b"data: b\r\n\n"]


def test_cr_at_chunk_end_followed_by_more_cr_lines() -> None:
    raw = b"data: a\r\rdata: b\r\r"
    for i in range(len(raw) + 1):
        assert data_only(run([raw[:i], raw[i:]])) == [(None, b"a", None, True), (None, b"b", None, True)]
        events = run([raw[:i], raw[i:]], keep_raw=True)
        assert [e.raw for e in events] == [b"data: a\r\r", b"data: b\r\r"]


def test_crlf_split_at_every_position_gives_no_extra_blocks() -> None:
    raw = b"data: a\r\n\r\n: ping\r\n\r\ndata: b\r\n\r\n"
    whole = run([raw], keep_raw=True)
    assert len(whole) == 3
    for i in range(len(raw) + 1):
        for keep_raw in (False, True):
            events = run([raw[:i], raw[i:]], keep_raw)
            assert keys(events) == keys(whole)
            if keep_raw:
                assert [e.raw for e in events] == [e.raw for e in whole]


@pytest.mark.parametrize("text", ["é", "漢", "😀", "naïve 漢字 👩‍💻"])
def test_multibyte_utf8_cut_across_chunks(text: str) -> None:
    payload = text.encode()
    raw = b"event: " + payload + b"\ndata: " + payload + b"\n\n"
    for i in range(len(raw) + 1):
        for j in range(i, len(raw) + 1):
            [e] = run([raw[:i], raw[i:j], raw[j:]])
            assert e.data == payload and e.event == text


def test_invalid_utf8_in_event_name_is_replaced_and_data_kept() -> None:
    [e] = run([b"event: a\xffb\ndata: \xff\xfe\n\n"])
    assert e.event == "a\ufffdb" and e.data == b"\xff\xfe"


def test_flush_returns_an_unterminated_last_block() -> None:
    assert keys(run([b"data: a\n\ndata: tail"])) == [(None, b"a", None, True), (None, b"tail", None, True)]
    assert keys(run([b"data: a\n\ndata: tail\n"])) == [(None, b"a", None, True), (None, b"tail", None, True)]
    assert keys(run([b"data: a\n\n: ping"])) == [(None, b"a", None, True), (None, b"", None, False)]
    assert run([]) == []
    assert run([b""]) == []
    events = run([b"data: a\n\ndata: t", b"ail\r"], keep_raw=True)
    assert [e.raw for e in events] == [b"data: a\n\n", b"data: tail\r"]


def test_flush_resets_for_a_new_stream() -> None:
    d = SSEDecoder()
    assert keys(d.feed(b"id: 1\ndata: a\n\ndata: b")) == [(None, b"a", "1", True)]
    assert keys(d.flush()) == [(None, b"b", "1", True)]
    assert keys(d.feed(b"\xef\xbb\xbfdata: c\n\n")) == [(None, b"c", None, True)]


def test_extra_blank_lines_are_empty_blocks() -> None:
    events = run([b"data: a\n\n\n\r\ndata: b\n\n"], keep_raw=True)
    assert keys(events) == [
        (None, b"a", None, True),
        (None, b"", None, False),
        (None, b"", None, False),
        (None, b"b", None, True),
    ]
    assert [e.raw for e in events] == [b"data: a\n\n", b"\n", b"\r\n", b"data: b\n\n"]


def test_raw_only_with_keep_raw() -> None:
    raw = b"data: a\n\n"
    assert run([raw])[0].raw == b""
    assert run([raw], keep_raw=True)[0].raw == raw


def test_pending_counts_held_back_bytes() -> None:
    d = SSEDecoder(keep_raw=True)
    d.feed(b"data: a\n\nid: 1\ndata: par")
    assert d.pending == len(b"id: 1\ndata: par")
    d = SSEDecoder()
    d.feed(b"data: a\n\nid: 1\ndata: par")
    assert d.pending == len(b"data: par")  # without keep_raw only the incomplete line is kept


def test_one_huge_event_in_4k_chunks_is_compacted_and_scanned_once() -> None:
    huge = b"data: " + b"x" * (1 << 20) + b"\n\n"
    stream = b"data: small\n\n: ping\n\n" + huge + b"data: after\n\n"
    chunks = [stream[i : i + 4096] for i in range(0, len(stream), 4096)]
    for keep_raw in (False, True):
        d = SSEDecoder(keep_raw=keep_raw)
        events: list[SSEEvent] = []
        fed = returned = 0
        with counting_scans() as counter:
            for c in chunks:
                got = d.feed(c)
                events += got
                fed += len(c)
                returned += sum(len(e.raw) for e in got)
                if keep_raw:
                    # exactly the incomplete block: everything since the last block end
                    block_start = stream.rfind(b"\n\n", 0, fed) + 2
                    assert d.pending == fed - block_start == fed - returned
                else:
                    line_start = stream.rfind(b"\n", 0, fed) + 1
                    assert d.pending == fed - line_start
                assert d.pending <= len(huge) + 4096
            events += d.flush()
        assert data_only(events) == [
            (None, b"small", None, True),
            (None, b"x" * (1 << 20), None, True),
            (None, b"after", None, True),
        ]
        # every byte looked at once by the line-end search, never re-scanned
        assert counter.scanned <= len(stream)
        assert d.pending == 0


# -- property tests ----------------------------------------------------------

_VALUE = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=10).map(str.encode)
_FIELD = st.tuples(st.sampled_from([b"data", b"data", b"data", b"event", b"id", b"retry", b"foo", b"Data"]), _VALUE)
_COMMENT = st.tuples(st.just(b":"), _VALUE)
_BLOCK = st.lists(st.one_of(_FIELD, _FIELD, _COMMENT), max_size=5)
_ENDINGS = st.sampled_from([b"\n", b"\r\n", b"\r"])


def model(blocks: list[list[tuple[bytes, bytes]]], bom: bool) -> list[Key]:
    """What the spec says the blocks mean, computed from their structure, not their bytes."""
    out: list[Key] = []
    last_id: str | None = None
    for lines in blocks:
        event: str | None = None
        data: list[bytes] = []
        for name, value in lines:
            if name == b"data":
                data.append(value)
            elif name == b"event":
                event = value.decode()
            elif name == b"id" and b"\0" not in value:
                last_id = value.decode()
        out.append((event, b"\n".join(data), last_id, bool(data)))
    if bom and not blocks:
        out.append((None, b"", None, False))  # the BOM alone is a block, so keep_raw can return it
    return out


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[Key]]:
    """A serialised stream with random line endings, colon styles, comments and keep-alives."""
    blocks = draw(st.lists(_BLOCK, max_size=6))
    bom = draw(st.booleans())
    tail = draw(st.sampled_from(["complete", "no-blank-line", "no-line-end"]))
    parts: list[bytes] = [b"\xef\xbb\xbf"] if bom else []
    prev_end = b""
    for lines in blocks:
        for name, value in lines:
            if name == b":":
                line = b":" + value
            elif not value:
                line = name + draw(st.sampled_from([b"", b":", b": "]))
            elif value.startswith(b" "):
                line = name + b": " + value
            else:
                line = name + draw(st.sampled_from([b":", b": "])) + value
            prev_end = draw(_ENDINGS)
            parts += [line, prev_end]
        end = draw(_ENDINGS)
        if prev_end == b"\r" and end == b"\n":
            end = b"\r\n"  # CR then LF would be one line end, not a blank line
        parts.append(end)
        prev_end = end
    if blocks and blocks[-1] and tail != "complete":
        parts.pop()  # the final blank line: flush still returns the block
        if tail == "no-line-end":
            parts.pop()  # and the last line's end: flush still reads it
    return b"".join(parts), model(blocks, bom)


def near_line_ends(raw: bytes) -> list[int]:
    return [i for i in range(len(raw) + 1) if raw[i - 1 : i] in (b"\r", b"\n") or raw[i : i + 1] == b"\n"]


def chunkings(raw: bytes) -> st.SearchStrategy[list[bytes]]:
    """Any split; cuts next to line ends are favoured (CR/LF straddling chunks is the tricky part)."""
    near = near_line_ends(raw)
    cut = st.integers(0, len(raw))
    if near:
        cut = st.one_of(cut, st.sampled_from(near))
    cuts = st.lists(cut, max_size=24)
    one_byte = st.just([raw[i : i + 1] for i in range(len(raw))])
    with_empties = st.just([c for i in range(len(raw)) for c in (b"", raw[i : i + 1])] + [b""])
    return st.one_of(cuts.map(lambda c: split(raw, c)), one_byte, with_empties)


@settings(max_examples=250, deadline=None)
@given(stream=streams(), data=st.data())
def test_any_chunking_gives_the_same_events(stream: tuple[bytes, list[Key]], data: st.DataObject) -> None:
    raw, expected = stream
    whole_plain, whole_raw = run_checked([raw])
    assert keys(whole_plain) == keys(whole_raw) == expected
    assert b"".join(e.raw for e in whole_raw) == raw

    chunks = data.draw(chunkings(raw), label="chunks")
    with counting_scans() as counter:
        plain, keeping = run_checked(chunks)
    assert keys(plain) == keys(keeping) == expected
    # keep_raw: the blocks are cut at the same places whatever the chunking, and add up to the input
    assert [e.raw for e in keeping] == [e.raw for e in whole_raw]
    assert b"".join(e.raw for e in keeping) == raw
    # no byte is scanned twice (two decoders ran)
    assert counter.scanned <= 2 * len(raw)
    # and every two-chunk split at a line end, where a CR or LF may straddle the cut
    for i in near_line_ends(raw):
        assert keys(run([raw[:i], raw[i:]])) == expected
        assert [e.raw for e in run([raw[:i], raw[i:]], keep_raw=True)] == [e.raw for e in whole_raw]


# -- recorded streams --------------------------------------------------------


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def accounting(events: Sequence[SSEEvent]) -> dict[str, Any]:
    """What a usage-accounting consumer takes from an OpenAI stream."""
    text: list[str] = []
    tool_args: dict[int, str] = {}
    finish: list[str] = []
    usage = None
    done = False
    for e in events:
        if not e.has_data:
            continue
        assert not done, "data after [DONE]"
        if e.data == b"[DONE]":
            done = True
            continue
        chunk = orjson.loads(e.data)
        for choice in chunk["choices"]:
            if "text" in choice:
                text.append(choice["text"])
            delta = choice.get("delta") or {}
            if delta.get("content"):
                text.append(delta["content"])
            for call in delta.get("tool_calls") or []:
                tool_args[call["index"]] = tool_args.get(call["index"], "") + call["function"].get("arguments", "")
            if choice.get("finish_reason"):
                finish.append(choice["finish_reason"])
        if chunk.get("usage"):
            usage = chunk["usage"]
    return {"text": "".join(text), "tool_args": tool_args, "finish": finish, "usage": usage, "done": done}


EXPECTED: dict[str, dict[str, Any]] = {
    "openai_chat_include_usage.sse": {
        "text": "The capital of Australia is Canberra, not Sydney.",
        "finish": ["stop"],
        "tokens": (1387, 203, 1590),
        "cached": 1280,
        "reasoning": 192,
    },
    "openai_chat_usage_in_last_choice_chunk.sse": {
        "text": "Hello! How can I help you today?",
        "finish": ["stop"],
        "tokens": (11, 11, 22),
        "cached": 0,
        "reasoning": None,
    },
    "openai_chat_tool_calls.sse": {
        "text": "",
        "finish": ["tool_calls"],
        "tokens": None,
        "tool_args": {0: '{"location": "Paris, France"}', 1: '{"location": "Tokyo, Japan"}'},
    },
    "openai_completions.sse": {
        "text": "\n\n1. Mercury\n2. Venus\n3. Earth",
        "finish": ["length"],
        "tokens": (9, 16, 25),
        "cached": None,
        "reasoning": None,
    },
    "openai_chat_crlf_keepalive.sse": {
        "text": "Sure, here is a haiku:\n\nAutumn moonlight—\na worm digs silently\ninto the chestnut.",
        "finish": ["stop"],
        "tokens": (14, 27, 41),
        "cached": 0,
        "reasoning": 0,
    },
    "openai_chat_non_ascii.sse": {
        "text": "Café crème — naïve façade; 漢字は難しい。 Ünïcödé 🎉👩\u200d💻 Ελληνικά עברית 中文",
        "finish": ["stop"],
        "tokens": (25, 31, 56),
        "cached": 0,
        "reasoning": 0,
    },
}


def test_every_fixture_has_expectations() -> None:
    assert FIXTURE_NAMES == sorted(EXPECTED)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_matches_the_openai_sdk_decoder(name: str) -> None:
    from openai._streaming import SSEDecoder as OpenAISSEDecoder

    raw = fixture(name)
    theirs = [(s.event, s.data, s.id) for s in OpenAISSEDecoder().iter_bytes(iter([raw]))]
    ours = [(e.event, e.data.decode(), e.id) for e in run([raw]) if e.has_data]
    assert ours == theirs
    assert ours[-1][1] == "[DONE]"


@pytest.mark.parametrize("name", [n for n in FIXTURE_NAMES if n.startswith("openai_chat")])
def test_fixture_chat_chunks_validate_as_sdk_types(name: str) -> None:
    from openai.types.chat import ChatCompletionChunk

    for e in run([fixture(name)]):
        if e.has_data and e.data != b"[DONE]":
            obj = orjson.loads(e.data)
            assert ChatCompletionChunk.model_validate(obj).to_dict() == obj


def _sdk_stream(name: str) -> list[Any]:
    """Stream the fixture through a real openai client (HTTP mocked) and collect what it yields."""
    import openai
    import openai._base_client

    # the SDK's HTTP library (httpx, or its fork httpx2 in newer SDKs)
    http = getattr(openai._base_client, "httpx2", None) or openai._base_client.httpx
    raw = fixture(name)

    def respond(request: Any) -> Any:
        return http.Response(200, headers={"content-type": "text/event-stream"}, content=raw)

    client = openai.OpenAI(
        api_key="sk-test", base_url="http://upstream.test/v1", http_client=http.Client(transport=http.MockTransport(respond))
    )
    with client:
        if name.startswith("openai_completions"):
            stream: Any = client.completions.create(model="m", prompt="p", stream=True)
        else:
            stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}], stream=True)
        return list(stream)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_streams_through_the_openai_client(name: str) -> None:
    sdk_chunks = _sdk_stream(name)
    ours = [orjson.loads(e.data) for e in run([fixture(name)]) if e.has_data and e.data != b"[DONE]"]
    assert [c.to_dict() for c in sdk_chunks] == ours
    sdk_usage = next((c.usage.to_dict() for c in reversed(sdk_chunks) if c.usage is not None), None)
    assert sdk_usage == accounting(run([fixture(name)]))["usage"]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_accounting(name: str) -> None:
    want = EXPECTED[name]
    got = accounting(run([fixture(name)]))
    assert got["done"]
    assert got["text"] == want["text"]
    assert got["finish"] == want["finish"]
    if "tool_args" in want:
        assert got["tool_args"] == want["tool_args"]
    if want["tokens"] is None:
        assert got["usage"] is None
        return
    usage = got["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == want["tokens"]
    assert (usage.get("prompt_tokens_details") or {}).get("cached_tokens") == want["cached"]
    assert (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") == want["reasoning"]


def test_crlf_fixture_really_has_crlf_and_keepalives() -> None:
    raw = fixture("openai_chat_crlf_keepalive.sse")
    assert raw.count(b"\r\n") == raw.count(b"\n") and b": keep-alive\r\n\r\n" in raw
    events = run([raw])
    assert sum(1 for e in events if not e.has_data) == 5


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_fixture_any_chunking(name: str, data: st.DataObject) -> None:
    raw = fixture(name)
    whole = run([raw])
    chunks = data.draw(chunkings(raw), label="chunks")
    plain, keeping = run_checked(chunks)
    assert keys(plain) == keys(keeping) == keys(whole)
    assert b"".join(e.raw for e in keeping) == raw
    assert accounting(plain)["usage"] == accounting(whole)["usage"]
