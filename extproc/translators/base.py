"""The shape every (client API, backend schema) pair has in the upstream stage.

An attempt of a request goes to one backend; its translator turns the client's request
into that backend's (path, body, API headers) and, where the two APIs differ, the
backend's answer back into the client's API: a whole JSON body or error at once, a
stream event by event. Credentials are not the translator's business (backend_auth).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from extproc.contract import ClientApi
from extproc.schemas import forms, openai
from extproc.schemas.forms import FormRequest

if TYPE_CHECKING:
    from extproc.client_apis import ClientApiSpec
    from extproc.routing import BackendTarget


@dataclass(frozen=True, slots=True)
class Attempt:
    """What a translator knows of the attempt it serves."""

    target: BackendTarget
    client_api: ClientApi
    model: str  # the model the backend is asked for (the target's override, else the client's)
    stream: bool
    include_usage: bool  # the client asked for the usage event (stream_options.include_usage)
    form: FormRequest | None = None  # a multipart/form-data body, as read (else the body is JSON)


@dataclass(slots=True)
class UpstreamRequest:
    """The request as the backend takes it; credentials are added after."""

    path: str  # with the query, if any
    body: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)


class StreamTranslator(Protocol):
    """A backend's stream into the client's, in any chunking."""

    def feed(self, data: bytes) -> bytes:
        """The client's bytes to send now for these backend bytes (b"" if none yet)."""

    def finish(self) -> bytes:
        """The end of the backend's body: whatever the client still needs."""


class Translator:
    """A pair whose two sides speak the same API: the body passes through (the model
    rewritten if the backend serves it under another name) and the answer is untouched."""

    translates_response = False  # True: the answer is read and rewritten into the client's API
    translates_errors = False  # True: only error answers are (the same API in another error shape)

    def __init__(self, attempt: Attempt) -> None:
        self.attempt = attempt

    def request(self, body: dict[str, Any], raw: bytes) -> UpstreamRequest:
        raise NotImplementedError

    def stream_translator(self) -> StreamTranslator | None:
        """For a successful streamed answer: its translator (None: not translated)."""
        return None

    def whole_response(self, status: int, body: bytes, error_type: str | None) -> bytes:
        """A whole JSON answer or error, in the client's API. `error_type`: the backend's
        own error-type header, where it has one (Bedrock's x-amzn-errortype)."""
        return body

    def body_with_model(self, body: dict[str, Any], raw: bytes) -> bytes:
        """The client's body with the backend's model name (the same bytes if unchanged);
        of a multipart form, only the model value is replaced."""
        if self.attempt.model == body["model"]:
            return raw
        if self.attempt.form is not None:
            return forms.with_model(raw, self.attempt.form, self.attempt.model)
        return openai.with_updates(raw, body, {"model": self.attempt.model})


def content_type(spec: ClientApiSpec) -> list[tuple[str, bytes]]:
    """The API's request content type; a form keeps the client's (its boundary)."""
    return [] if spec.form else [("content-type", b"application/json")]
