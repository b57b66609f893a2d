"""What every exchange shares: the compiled config, built once per (re)load."""

from __future__ import annotations

from dataclasses import dataclass

from extproc.config import LoadedConfig
from extproc.routing import Router
from extproc.schemas import openai


@dataclass(frozen=True, slots=True)
class Runtime:
    """An immutable snapshot: a reload builds a new one; in-flight exchanges keep theirs."""

    loaded: LoadedConfig
    router: Router
    max_request_body_bytes: int
    models_body: bytes

    @classmethod
    def build(cls, loaded: LoadedConfig) -> Runtime:
        router = Router(loaded.config, loaded.secrets)
        return cls(
            loaded=loaded,
            router=router,
            max_request_body_bytes=loaded.config.limits.max_request_body_bytes,
            models_body=openai.models_list(router.listed_models),
        )
