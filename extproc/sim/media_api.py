"""aiohttp handlers for OpenAI's image and audio APIs, routed by path suffix like the rest.

* ``POST .../images/generations`` (JSON): ``n`` small deterministic "images" as base64
  (or URLs for ``response_format: url``). Models named ``gpt-image*`` report ``usage``
  {input_tokens (the prompt's), output_tokens (``IMAGE_TOKENS`` per image),
  total_tokens, input_tokens_details}, as OpenAI does; dall-e models report none.
  ``stream: true`` (gpt-image only): ``partial_images`` partial events, then
  ``image_generation.completed`` with the usage.
* ``POST .../audio/transcriptions`` and ``.../audio/translations`` (multipart/form-data,
  read with the stdlib's email parser, not the gateway's): the "transcript" names the
  file's size and SHA-256 prefix, so a test sees the bytes arrived intact.
  ``response_format`` json (default), text, srt, vtt or verbose_json. Transcription
  models (names containing ``transcribe``) report token usage {type: tokens,
  input_tokens (``AUDIO_BYTES_PER_TOKEN`` bytes of audio each, plus the prompt's),
  output_tokens, total_tokens}; whisper reports {type: duration, seconds}. Translations
  answer only {text}. ``stream: true`` (transcription models): ``transcript.text.delta``
  events, then ``transcript.text.done`` with the usage.
* ``POST .../audio/speech`` (JSON): ``audio/mpeg`` bytes derived from the input,
  streamed in ``x-sim-chunks`` chunks (no usage: OpenAI reports none for speech files).
  ``stream_format: sse`` (gpt-4o-mini-tts only): ``speech.audio.delta`` events with the
  audio in base64, then ``speech.audio.done`` with usage {input_tokens (the input's),
  output_tokens (``SPEECH_BYTES_PER_TOKEN`` bytes of audio each), total_tokens}.

Failures are OpenAI-shaped errors; ``x-sim-error`` and ``sim-error-NNN`` models work as
for the other OpenAI endpoints.
"""

from __future__ import annotations

import base64
import hashlib
import time
from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

import orjson
from aiohttp import web

from extproc.sim import text, wire
from extproc.sim.openai_api import ApiError, error_response, parse_body

IMAGE_TOKENS = 272  # output tokens per generated image (gpt-image-1's low quality square)
AUDIO_BYTES_PER_TOKEN = 1000
AUDIO_BYTES_PER_SECOND = 16_000
SPEECH_BYTES_PER_TOKEN = 64
MAX_IMAGES = 10
_IMAGE_SUFFIX = "/images/generations"
_TRANSCRIPTIONS_SUFFIX = "/audio/transcriptions"
_TRANSLATIONS_SUFFIX = "/audio/translations"
_SPEECH_SUFFIX = "/audio/speech"
_SUFFIXES = (_IMAGE_SUFFIX, _TRANSCRIPTIONS_SUFFIX, _TRANSLATIONS_SUFFIX, _SPEECH_SUFFIX)
_TEXT_FORMATS = {"text": "text/plain", "srt": "text/plain", "vtt": "text/vtt"}


def matches(path: str) -> bool:
    """Is this an image or audio API path (behind any base path)?"""
    return path.rstrip("/").endswith(_SUFFIXES)


async def dispatch(request: web.Request, settings: wire.SimSettings) -> web.StreamResponse:
    """Route by path suffix; every failure becomes an OpenAI-shaped error."""
    try:
        knobs = wire.read_knobs(request, settings)
        await wire.wait_first_byte(knobs)
        if knobs.error_status is not None:
            raise ApiError(knobs.error_status, wire.simulated_error(knobs.error_status, "x-sim-error header"))
        if request.method != "POST":
            raise ApiError(405, f"Method {request.method} not allowed for {request.path}; use POST.")
        path = request.path.rstrip("/")
        raw = await request.read()
        if path.endswith(_IMAGE_SUFFIX):
            return await _images(request, parse_body(raw), knobs, settings)
        if path.endswith(_SPEECH_SUFFIX):
            return await _speech(request, parse_body(raw), knobs, settings)
        form = _form(request.headers.get("content-type", ""), raw)
        return await _audio_text(request, form, knobs, settings, translate=path.endswith(_TRANSLATIONS_SUFFIX))
    except ApiError as exc:
        return error_response(exc.status, exc.message, exc.param, exc.code)
    except wire.KnobError as exc:
        return error_response(400, str(exc))
    except web.HTTPException as exc:  # e.g. body larger than client_max_size
        return error_response(exc.status, exc.reason)


def _model(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ApiError(400, "you must provide a model parameter", param="model", code="missing_required_parameter")
    status = wire.model_error(value)
    if status is not None:
        raise ApiError(status, wire.simulated_error(status, f"model {value}"))
    return value


# -- images -------------------------------------------------------------------------------------


def _image_bytes(prompt: str, index: int) -> bytes:
    """A small deterministic stand-in for a PNG (the signature, then a digest)."""
    return b"\x89PNG\r\n\x1a\n" + hashlib.sha256(f"{index}:{prompt}".encode()).digest()


async def _images(
    request: web.Request, body: dict[str, Any], knobs: wire.Knobs, settings: wire.SimSettings
) -> web.StreamResponse:
    model = _model(body.get("model"))
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "prompt must be a non-empty string", param="prompt")
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES:
        raise ApiError(400, f"n must be an integer between 1 and {MAX_IMAGES}", param="n")
    tokens = model.startswith("gpt-image")
    prompt_tokens = text.count_tokens(prompt)
    usage = {
        "input_tokens": prompt_tokens, "output_tokens": IMAGE_TOKENS * n, "total_tokens": prompt_tokens + IMAGE_TOKENS * n,
        "input_tokens_details": {"text_tokens": prompt_tokens, "image_tokens": 0},
    }
    images = [base64.b64encode(_image_bytes(prompt, i)).decode() for i in range(n)]
    if body.get("stream") is True:
        if not tokens:
            raise ApiError(400, f"Streaming is not supported for model {model}.", param="stream")
        return await wire.write_named_events(request, knobs, settings, _image_events(images, body, usage), {})
    if body.get("response_format") == "url" and not tokens:
        data: list[dict[str, Any]] = [{"url": f"https://sim.invalid/images/{i}.png"} for i in range(n)]
    else:
        data = [{"b64_json": image} for image in images]
    reply: dict[str, Any] = {"created": int(time.time()), "data": data}
    if tokens and not knobs.usage.omit:
        reply.update(usage=usage, size=body.get("size", "1024x1024"), quality=body.get("quality", "low"))
    return wire.json_reply(orjson.dumps(reply), knobs.compress)


def _image_events(images: list[str], body: dict[str, Any], usage: dict[str, Any]) -> Any:
    partials = body.get("partial_images", 0)
    partials = partials if isinstance(partials, int) and not isinstance(partials, bool) and 0 <= partials <= 3 else 0
    created = int(time.time())
    for index in range(partials):
        yield None
        yield "image_generation.partial_image", {
            "type": "image_generation.partial_image", "b64_json": images[0], "created_at": created,
            "partial_image_index": index, "size": "1024x1024", "quality": "low", "background": "opaque",
            "output_format": "png",
        }
    yield None
    yield "image_generation.completed", {
        "type": "image_generation.completed", "b64_json": images[0], "created_at": created, "size": "1024x1024",
        "quality": "low", "background": "opaque", "output_format": "png", "usage": usage,
    }


# -- audio in: transcriptions and translations ---------------------------------------------------


def _form(content_type: str, raw: bytes) -> dict[str, tuple[str | None, bytes]]:
    """name -> (filename, bytes) of a multipart/form-data body."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(400, "This endpoint takes multipart/form-data.")
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
    if not message.is_multipart() or message.defects:
        raise ApiError(400, "The multipart/form-data body could not be parsed.")
    out: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        assert isinstance(part, Message)
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            raise ApiError(400, "A form part has no name.")
        payload = part.get_payload(decode=True)
        out[name] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
    return out


def _field(form: dict[str, tuple[str | None, bytes]], name: str) -> str | None:
    value = form.get(name)
    return value[1].decode() if value is not None else None


async def _audio_text(
    request: web.Request, form: dict[str, tuple[str | None, bytes]], knobs: wire.Knobs, settings: wire.SimSettings,
    translate: bool,
) -> web.StreamResponse:
    model = _model(_field(form, "model"))
    upload = form.get("file")
    if upload is None or upload[0] is None:
        raise ApiError(400, "you must provide a file parameter", param="file", code="missing_required_parameter")
    audio = upload[1]
    digest = hashlib.sha256(audio).hexdigest()[:16]
    transcript = f"{'Translated' if translate else 'Transcribed'} {len(audio)} bytes of {upload[0]} ({digest})."
    prompt = _field(form, "prompt") or ""
    response_format = _field(form, "response_format") or "json"
    tokens = "transcribe" in model and not translate
    output_tokens = text.count_tokens(transcript)
    input_tokens = len(audio) // AUDIO_BYTES_PER_TOKEN + text.count_tokens(prompt)
    usage: dict[str, Any] = (
        {"type": "tokens", "input_tokens": input_tokens, "output_tokens": output_tokens,
         "total_tokens": input_tokens + output_tokens, "input_token_details": {"text_tokens": 0, "audio_tokens": input_tokens}}
        if tokens else {"type": "duration", "seconds": max(1, len(audio) // AUDIO_BYTES_PER_SECOND)}
    )
    if (_field(form, "stream") or "").lower() == "true":
        if not tokens:
            raise ApiError(400, f"Streaming is not supported for model {model}.", param="stream")
        return await _transcript_stream(request, transcript, usage, knobs, settings)
    if response_format in _TEXT_FORMATS:
        return web.Response(text=transcript + "\n", content_type=_TEXT_FORMATS[response_format])
    if response_format not in ("json", "verbose_json"):
        raise ApiError(400, f"response_format {response_format!r} is not supported", param="response_format")
    reply: dict[str, Any] = {"text": transcript}
    if response_format == "verbose_json":
        seconds = max(1, len(audio) // AUDIO_BYTES_PER_SECOND)
        reply.update(task="translate" if translate else "transcribe", language="english", duration=seconds,
                     segments=[{"id": 0, "start": 0.0, "end": float(seconds), "text": transcript}])
    if not translate and not knobs.usage.omit:
        reply["usage"] = usage
    return wire.json_reply(orjson.dumps(reply), knobs.compress)


async def _transcript_stream(
    request: web.Request, transcript: str, usage: dict[str, Any], knobs: wire.Knobs, settings: wire.SimSettings
) -> web.StreamResponse:
    def events() -> Any:
        for piece in text.split_chunks(transcript, knobs.chunks):
            yield None
            yield "transcript.text.delta", {"type": "transcript.text.delta", "delta": piece}
        yield "transcript.text.done", {"type": "transcript.text.done", "text": transcript, "usage": usage}

    return await wire.write_named_events(request, knobs, settings, events(), {})


# -- audio out: speech ---------------------------------------------------------------------------


async def _speech(
    request: web.Request, body: dict[str, Any], knobs: wire.Knobs, settings: wire.SimSettings
) -> web.StreamResponse:
    model = _model(body.get("model"))
    spoken = body.get("input")
    if not isinstance(spoken, str) or not spoken:
        raise ApiError(400, "input must be a non-empty string", param="input")
    if not isinstance(body.get("voice"), str):
        raise ApiError(400, "you must provide a voice parameter", param="voice", code="missing_required_parameter")
    audio = speech_bytes(spoken)
    if body.get("stream_format") == "sse":
        if not model.startswith("gpt-4o"):
            raise ApiError(400, f"stream_format 'sse' is not supported for model {model}.", param="stream_format")
        return await _speech_events(request, spoken, audio, knobs, settings)
    resp = web.StreamResponse(headers={"Content-Type": "audio/mpeg"})
    await resp.prepare(request)
    step = max(1, -(-len(audio) // knobs.chunks))
    for start in range(0, len(audio), step):
        await resp.write(audio[start:start + step])
    await resp.write_eof()
    return resp


async def _speech_events(
    request: web.Request, spoken: str, audio: bytes, knobs: wire.Knobs, settings: wire.SimSettings
) -> web.StreamResponse:
    def events() -> Any:
        step = max(1, -(-len(audio) // knobs.chunks))
        for start in range(0, len(audio), step):
            yield None
            yield "speech.audio.delta", {"type": "speech.audio.delta",
                                         "audio": base64.b64encode(audio[start:start + step]).decode()}
        input_tokens, output_tokens = text.count_tokens(spoken), len(audio) // SPEECH_BYTES_PER_TOKEN
        yield "speech.audio.done", {"type": "speech.audio.done", "usage": {
            "input_tokens": input_tokens, "output_tokens": output_tokens, "total_tokens": input_tokens + output_tokens}}

    return await wire.write_named_events(request, knobs, settings, events(), {})


def speech_bytes(spoken: str) -> bytes:
    """The simulator's "audio" for a text: an ID3 tag, then digest bytes in proportion to its tokens."""
    seed = hashlib.sha256(spoken.encode()).digest()
    return b"ID3" + seed * max(1, text.count_tokens(spoken) * SPEECH_BYTES_PER_TOKEN // len(seed))
