"""Incremental Server-Sent Events decoder for response streams passing through.

Envoy hands the processor a response body as arbitrary byte chunks. The decoder
pulls the events out as they pass, without touching the bytes, following the
WHATWG "event stream interpretation" rules
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):

* lines end with CRLF, LF or a lone CR; one UTF-8 BOM at the very start is skipped;
* ``:comment`` lines are ignored; ``field:value`` loses one space after the colon;
  a line without a colon is a field name with an empty value;
* ``data`` values are joined with ``\\n``; ``event`` is the last one in the block;
  ``id`` sets the last-event-ID (ignored if it contains NUL) which, as in the spec
  and in the openai SDK, carries over to later events until another ``id`` changes
  it; ``retry`` and unknown fields are ignored;
* a blank line ends the block.

Every block is returned, including ones without data (comment keep-alives, a
stray blank line), so a re-emitter can pass them on; consumers that only want
what the spec dispatches skip ``has_data == False``.

Everything stays bytes: a UTF-8 character cut across chunks is only looked at
once its line is complete. Each ``feed`` costs the chunk plus the one incomplete
block: line ends are searched for from where the last search stopped, and the
buffer is compacted after every call so it never holds more than that block
(only its incomplete line without ``keep_raw``).

A CR at the very end of the buffer may be the first half of a CRLF. A line it
ends is processed at once, and an LF that starts the next chunk is swallowed as
the rest of that line end. If that line is the blank line ending a block, the
block is returned at once without ``keep_raw``; with ``keep_raw`` it is held
until the next byte (or ``flush``) so that its ``raw`` includes the whole line
end. That way block boundaries and ``raw`` never depend on how the stream was
chunked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["SSEDecoder", "SSEEvent"]

_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"
_CR = 13
_LF = 10
_COLON = 58
_SPACE = 32


@dataclass(slots=True)
class SSEEvent:
    """One block of the stream, up to and including its terminating blank line."""

    data: bytes
    """``data`` field values joined by ``b"\\n"`` (no trailing newline)."""
    event: str | None
    """The block's ``event`` field (UTF-8, errors replaced), None if absent."""
    id: str | None
    """The last event ID at this block (spec semantics: it persists), None if never set."""
    has_data: bool
    """A ``data`` field was present; the spec dispatches only such blocks."""
    raw: bytes
    """The exact bytes of the block as received; b"" unless ``keep_raw``."""


class SSEDecoder:
    """Feed byte chunks, get back every block they complete."""

    __slots__ = (
        "_keep_raw",
        "_buf",
        "_block_start",
        "_line_start",
        "_scan",
        "_skip_lf",
        "_deferred",
        "_bom",
        "_nonempty",
        "_data",
        "_has_data",
        "_event",
        "_last_id",
    )

    def __init__(self, keep_raw: bool = False) -> None:
        self._keep_raw = keep_raw
        self._reset()

    def _reset(self) -> None:
        self._buf = bytearray()
        # Offsets into _buf: where the incomplete block starts (only meaningful
        # with keep_raw), where the incomplete line starts, and where the search
        # for the next line end resumes.
        self._block_start = 0
        self._line_start = 0
        self._scan = 0
        # The last line ended with a CR at the end of the buffer: an LF first
        # thing in the next chunk belongs to that line end.
        self._skip_lf = False
        # keep_raw only: that line was the blank line ending the block, which
        # is returned once the next byte shows whether an LF follows.
        self._deferred = False
        self._bom = True  # still at the very start: a BOM may be there
        self._nonempty = False  # the current block has consumed a line (or the BOM)
        self._data: list[bytes] = []
        self._has_data = False
        self._event: bytes | None = None
        self._last_id: str | None = None

    @property
    def pending(self) -> int:
        """Bytes held back: the incomplete block (its incomplete line without keep_raw)."""
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Every block completed by this chunk, in order (blocks without data too)."""
        if not chunk:
            return []
        buf = self._buf
        buf += chunk
        out: list[SSEEvent] = []

        if self._bom:
            head = bytes(buf[:3])
            if len(head) < 3 and _BOM.startswith(head):
                return out  # can't tell yet
            self._bom = False
            if head == _BOM:
                self._line_start = self._scan = 3
                self._nonempty = True

        pos = self._scan
        if self._skip_lf:
            self._skip_lf = False
            if buf[pos] == _LF:
                pos += 1
                self._line_start = pos
            if self._deferred:
                self._deferred = False
                out.append(self._dispatch(pos))

        if not self._nonempty and pos == self._line_start:
            pos = self._single_line_blocks(pos, out)

        search = _LINE_END.search
        keep_raw = self._keep_raw
        while True:
            m = search(buf, pos)
            if m is None:
                break
            start, pos = m.span()
            cr_at_end = pos == len(buf) and buf[pos - 1] == _CR  # a lone CR, not CRLF
            if start == self._line_start:  # blank line: the block ends here
                self._line_start = pos
                if cr_at_end:
                    self._skip_lf = True
                    if keep_raw:
                        self._deferred = True
                        break
                out.append(self._dispatch(pos))
            else:
                self._line(start)
                self._line_start = pos
                if cr_at_end:
                    self._skip_lf = True
        self._scan = len(buf)

        cut = self._block_start if keep_raw else self._line_start
        if cut:
            del buf[:cut]
            self._block_start -= cut
            self._line_start -= cut
            self._scan -= cut
        return out

    def flush(self) -> list[SSEEvent]:
        """End of stream: the last block even without its blank line (lenient).

        With keep_raw its ``raw`` is whatever was held back, so the ``raw`` of
        everything returned adds up to the whole input. The decoder is then
        ready for a new stream.
        """
        buf = self._buf
        out: list[SSEEvent] = []
        if self._deferred:
            out.append(self._dispatch(len(buf)))
        else:
            end = len(buf)
            if self._line_start < end:  # an unterminated last line (or a lone partial BOM)
                self._line(end)
                self._line_start = end
            if self._nonempty or (self._keep_raw and self._block_start < end):
                out.append(self._dispatch(end))
        self._reset()
        return out

    # -- internals ---------------------------------------------------------

    def _single_line_blocks(self, pos: int, out: list[SSEEvent]) -> int:
        """The shape nearly every provider sends, taken without the general line loop:
        blocks of one `data:` line ended by LF LF. Stops (for the general loop to go on
        from there) at anything else: another field, a CR, a block not yet complete.
        Returns where it stopped, a block boundary."""
        buf = self._buf
        size = len(buf)
        keep_raw = self._keep_raw
        start = pos
        while buf.startswith(b"data:", pos):
            line_end = buf.find(b"\n", pos)
            if line_end < 0 or line_end + 1 >= size or buf[line_end + 1] != _LF or buf.find(b"\r", pos, line_end) >= 0:
                break
            value = pos + 5
            if value < line_end and buf[value] == _SPACE:
                value += 1
            end = line_end + 2
            out.append(SSEEvent(
                data=bytes(buf[value:line_end]), event=None, id=self._last_id, has_data=True,
                raw=bytes(buf[pos:end]) if keep_raw else b"",
            ))
            pos = end
        if pos != start:
            self._line_start = self._block_start = pos
        return pos

    def _line(self, end: int) -> None:
        """Apply the complete, non-blank line buf[line_start:end] to the block."""
        self._nonempty = True
        buf = self._buf
        start = self._line_start
        colon = buf.find(_COLON, start, end)
        if colon == start:
            return  # comment
        if colon < 0:
            colon = vstart = end
        else:
            vstart = colon + 1
            if vstart < end and buf[vstart] == _SPACE:
                vstart += 1
        n = colon - start
        if n == 4 and buf.startswith(b"data", start):
            self._data.append(bytes(buf[vstart:end]))
            self._has_data = True
        elif n == 5 and buf.startswith(b"event", start):
            self._event = bytes(buf[vstart:end])
        elif n == 2 and buf.startswith(b"id", start):
            value = bytes(buf[vstart:end])
            if b"\0" not in value:
                self._last_id = value.decode("utf-8", "replace")
        # retry and unknown fields: ignored

    def _dispatch(self, end: int) -> SSEEvent:
        """Close the block that ends at buf[end]; the next one starts there."""
        event = self._event
        data = self._data
        ev = SSEEvent(
            data=data[0] if len(data) == 1 else b"\n".join(data),
            event=None if event is None else event.decode("utf-8", "replace"),
            id=self._last_id,
            has_data=self._has_data,
            raw=bytes(self._buf[self._block_start : end]) if self._keep_raw else b"",
        )
        self._block_start = end
        self._data = []
        self._has_data = False
        self._event = None
        self._nonempty = False
        return ev
