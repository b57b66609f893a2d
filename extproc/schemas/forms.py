"""multipart/form-data request bodies (OpenAI's audio transcriptions and translations).

The gateway needs two fields of such a body, `model` and `stream`; the uploaded file
(up to 25 MB) is never copied or decoded. python-multipart's streaming parser scans the
body once (about 10 ms for 25 MB: its boundary search skips through file data) and its
callbacks give the byte offsets of each part's value in the buffer, so a route's model
override rewrites exactly the model value and leaves every other byte as the client sent it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from extproc.schemas.openai import bad_request, valid_model

FORM_DATA = b"multipart/form-data"
MAX_FIELD_BYTES = 64 * 1024  # a longer text field (a long prompt) is passed on but not kept for spans


@dataclass(slots=True)
class FormRequest:
    """The facts the gateway needs from a form body: its text fields (files left out,
    for spans), the model, and where the model's value is in the raw body."""

    body: dict[str, Any]
    model: str
    stream: bool
    model_span: tuple[int, int]


class _Reader:
    """python-multipart callbacks: each part's name, and the value of small text parts."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.fields: dict[str, str] = {}
        self.spans: dict[str, tuple[int, int]] = {}
        self.duplicates: set[str] = set()
        self.ended = False
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name: str | None = None
        self._value: bytearray | None = None  # None: a file, or a field too long to keep
        self._span: tuple[int, int] | None = None

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self.part_begin, "on_header_field": self.header_field,
            "on_header_value": self.header_value, "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished, "on_part_data": self.part_data,
            "on_part_end": self.part_end, "on_end": self.end,
        }

    def part_begin(self) -> None:
        self._disposition = b""
        self._name, self._value, self._span = None, None, None

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def headers_finished(self) -> None:
        kind, options = parse_options_header(self._disposition)
        name = options.get(b"name")
        if kind != b"form-data" or name is None:
            raise bad_request("Each part of a multipart/form-data body needs a Content-Disposition with a name.")
        self._name = name.decode("utf-8", "replace")
        self._value = None if b"filename" in options else bytearray()

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self._value is None:
            return
        if len(self._value) + end - start > MAX_FIELD_BYTES:
            self._value, self._span = None, None
            return
        self._value += data[start:end]
        # Offsets into the body when the parser hands out the body itself, in one run
        # (it can also replay bytes it held back; such a value has no single span).
        if data is not self.raw:
            self._span = (-1, -1)
        elif self._span is None:
            self._span = (start, end)
        elif self._span[1] == start:
            self._span = (self._span[0], end)
        else:
            self._span = (-1, -1)

    def part_end(self) -> None:
        name, value = self._name, self._value
        if name is None or value is None:
            return
        if name in self.fields:
            self.duplicates.add(name)
        try:
            self.fields[name] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise bad_request(f"The form field '{name}' is not UTF-8 text.", param=name) from None
        self.spans[name] = self._span or (0, 0)

    def end(self) -> None:
        self.ended = True


def parse_form(raw: bytes, content_type: str) -> FormRequest:
    """Read a multipart/form-data body; 400 (OpenAI's shape) for anything that is not one
    or has no usable `model` field."""
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != FORM_DATA or not boundary:
        raise bad_request("This endpoint takes a multipart/form-data body (with a boundary in its Content-Type).")
    if not raw:
        raise bad_request("The request body is empty; expected a multipart/form-data body with a 'model' field.")
    reader = _Reader(raw)
    try:
        parser = MultipartParser(boundary, reader.callbacks())  # type: ignore[arg-type]
        parser.write(raw)
        parser.finalize()
    except MultipartParseError as exc:
        raise bad_request(f"The multipart/form-data body is malformed: {exc}") from None
    if not reader.ended:
        raise bad_request("The multipart/form-data body is incomplete: its closing boundary is missing.")
    if "model" in reader.duplicates:
        raise bad_request("The form has more than one 'model' field.", param="model")
    model = reader.fields.get("model")
    if model is None:
        raise bad_request("you must provide a model parameter", param="model", code="missing_required_parameter")
    valid_model(model)
    start, end = reader.spans["model"]
    if start < 0 or raw[start:end] != model.encode():
        raise bad_request("The form's 'model' field could not be read as one value.", param="model")
    stream = reader.fields.get("stream", "").strip().lower() == "true"
    return FormRequest(body=dict(reader.fields), model=model, stream=stream, model_span=(start, end))


def with_model(raw: bytes, form: FormRequest, model: str) -> bytes:
    """The body with the model field's value replaced; every other byte kept."""
    start, end = form.model_span
    return b"".join((raw[:start], model.encode(), raw[end:]))

