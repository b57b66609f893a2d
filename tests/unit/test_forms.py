"""multipart/form-data bodies: the model and stream fields found, the model value alone
rewritten, and every malformed body a 400 in OpenAI's shape. Bodies are encoded by httpx
(the openai SDK's encoder), not by hand, except where a broken body is the point."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.schemas.forms import MAX_FIELD_BYTES, parse_form, with_model
from extproc.schemas.openai import RequestError


def encoded(
    data: dict[str, str], files: dict[str, tuple[str, bytes]] | None = None, boundary: str | None = None
) -> tuple[bytes, str]:
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"} if boundary else None
    request = httpx.Request("POST", "http://x/v1/audio/transcriptions", data=data, files=files or {}, headers=headers)
    return request.read(), request.headers["content-type"]


AUDIO = bytes(range(256)) * 8


def test_model_stream_and_text_fields_are_read_and_files_left_out() -> None:
    raw, content_type = encoded({"model": "gpt-4o-transcribe", "stream": "true", "language": "en"},
                                {"file": ("a.wav", AUDIO)})
    form = parse_form(raw, content_type)
    assert form.model == "gpt-4o-transcribe" and form.stream
    assert form.body == {"model": "gpt-4o-transcribe", "stream": "true", "language": "en"}
    start, end = form.model_span
    assert raw[start:end] == b"gpt-4o-transcribe"


def test_only_the_model_value_is_rewritten() -> None:
    raw, content_type = encoded({"model": "short"}, {"file": ("a.wav", AUDIO)})
    form = parse_form(raw, content_type)
    rewritten = with_model(raw, form, "a-much-longer-backend-model")
    assert rewritten == raw.replace(b"\r\n\r\nshort\r\n", b"\r\n\r\na-much-longer-backend-model\r\n")
    again = parse_form(rewritten, content_type)
    assert again.model == "a-much-longer-backend-model" and again.body == {"model": "a-much-longer-backend-model"}


@settings(max_examples=60, deadline=None)
@given(
    model=st.text(st.characters(codec="utf-8", categories=("L", "N", "P", "S")), min_size=1, max_size=40),
    audio=st.binary(max_size=3000),
    prompt=st.text(max_size=200),
    file_first=st.booleans(),
)
def test_any_model_and_file_bytes_survive(model: str, audio: bytes, prompt: str, file_first: bool) -> None:
    data = {"prompt": prompt, "model": model} if file_first else {"model": model, "prompt": prompt}
    raw, content_type = encoded(data, {"file": ("f.bin", audio)})
    form = parse_form(raw, content_type)
    assert form.model == model and form.body["prompt"] == prompt
    assert with_model(raw, form, model) == raw
    replaced = with_model(raw, form, "backend-model")
    assert replaced.count(audio) >= 1 and parse_form(replaced, content_type).model == "backend-model"


def test_a_value_with_part_of_the_boundary_in_it_is_read_whole() -> None:
    """The parser holds back bytes that may start the boundary and replays them: such a
    field is read whole, and the model after it still has its exact place."""
    tricky = "line\r\n--bound tail\r\n--boundar"
    raw, content_type = encoded({"prompt": tricky, "model": "whisper-1"}, {"file": ("a.wav", AUDIO)}, "boundary42")
    form = parse_form(raw, content_type)
    assert form.body["prompt"] == tricky and form.model == "whisper-1"
    assert raw[form.model_span[0]:form.model_span[1]] == b"whisper-1"


def test_a_long_text_field_is_passed_on_but_not_kept() -> None:
    raw, content_type = encoded({"model": "whisper-1", "prompt": "x" * (MAX_FIELD_BYTES + 1)}, {"file": ("a", b"")})
    form = parse_form(raw, content_type)
    assert form.model == "whisper-1" and "prompt" not in form.body


def test_a_quoted_boundary_is_understood() -> None:
    body = b'--a b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--a b--\r\n'
    assert parse_form(body, 'multipart/form-data; boundary="a b"').model == "whisper-1"


FIELD = b'--B\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
END = b"--B--\r\n"


@pytest.mark.parametrize(("body", "content_type", "words"), [
    (FIELD % (b"model", b"m") + END, "application/json", "takes a multipart/form-data body"),
    (FIELD % (b"model", b"m") + END, "multipart/form-data", "with a boundary"),
    (b"", "multipart/form-data; boundary=B", "body is empty"),
    (FIELD % (b"model", b"m"), "multipart/form-data; boundary=B", "closing boundary is missing"),
    (b"no boundary here at all", "multipart/form-data; boundary=B", "malformed"),
    (FIELD % (b"language", b"en") + END, "multipart/form-data; boundary=B", "you must provide a model parameter"),
    (FIELD % (b"model", b"a") + FIELD % (b"model", b"b") + END, "multipart/form-data; boundary=B", "more than one"),
    (FIELD % (b"model", b"\xff\xfe") + END, "multipart/form-data; boundary=B", "not UTF-8"),
    (FIELD % (b"model", b"x" * 300) + END, "multipart/form-data; boundary=B", "printable characters"),
    (FIELD % (b"model", b"") + END, "multipart/form-data; boundary=B", "you must provide a model parameter"),
    (b'--B\r\nContent-Disposition: form-data\r\n\r\nm\r\n' + END, "multipart/form-data; boundary=B",
     "needs a Content-Disposition with a name"),
    (b'--B\r\nContent-Disposition: form-data; name="model"; filename="m.txt"\r\n\r\nm\r\n' + END,
     "multipart/form-data; boundary=B", "you must provide a model parameter"),
])
def test_bad_forms_are_400s(body: bytes, content_type: str, words: str) -> None:
    with pytest.raises(RequestError) as raised:
        parse_form(body, content_type)
    assert raised.value.status == 400 and raised.value.error_type == "invalid_request_error"
    assert words in raised.value.message


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([
    b"--B", b"\r\n", b"--", b"Content-Disposition: form-data; name=\"model\"", b"; filename=\"f\"", b"\r\n\r\n",
    b"whisper-1", b"\xff", b"\0", b":", b"--B--", b"X-A: b", b"\r",
]), max_size=30))
def test_any_bytes_are_a_form_or_a_400(pieces: list[bytes]) -> None:
    try:
        form = parse_form(b"".join(pieces), "multipart/form-data; boundary=B")
    except RequestError as exc:
        assert exc.status == 400
    else:
        assert form.model
