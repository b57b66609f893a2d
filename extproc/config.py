"""Gateway configuration: one YAML file, validated by pydantic.

Errors name the file, the path of the bad field and what is allowed, because the
person reading them is an operator at a terminal, not a Python developer.
Secrets are *referenced* (env var or file) and resolved once at load into
`SecretStr`, so they never show up in a repr, a log line or an error message.
What the MCP config (`extproc.mcp.config`) shares with this one, the strict model base,
`SecretRef` and the extra-header checks, lives in `extproc.config_base`.
The config used when no file is given is put together in `extproc.config_defaults`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from extproc.auth_config import Auth
from extproc.yaml_file import read_yaml_file
from extproc.config_base import (
    GATEWAY_OWNED_HEADERS,
    HEADER_NAME,
    ConfigError,  # also imported from here by the many callers that catch it
    SecretRef,
    StrictModel,
    check_extra_headers,
    first_repeat,
    resolve_secret_refs,
)
from extproc.contract import (
    CLIENT_CREDENTIAL_HEADERS,
    GATEWAY_HEADER_PREFIX,
    REQUEST_METADATA_KEYS,
    Meta,
)
from extproc.mcp.config import McpSettings
from extproc.redact import is_credential_header
from extproc.usage import BUILTIN_KEYS, CostType, compile_cel

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
# Headers that carry a client's credentials: never copied into metadata, metrics or spans.
CREDENTIAL_HEADERS = frozenset(CLIENT_CREDENTIAL_HEADERS)


def _telemetry_header(value: str | None) -> str | None:
    """A request header whose value may be published: valid, lower-cased, not a credential."""
    if value is None:
        return None
    if not HEADER_NAME.match(value):
        raise ValueError(f"{value!r} is not a valid HTTP header name")
    if value.lower() in CREDENTIAL_HEADERS:
        raise ValueError(f"{value!r} carries credentials and is never copied into metadata, metrics or traces")
    return value.lower()

RESERVED_METADATA_KEYS = BUILTIN_KEYS | REQUEST_METADATA_KEYS  # cost keys may not reuse them

MCP_TOOL_CALL_KEY = Meta.MCP_TOOL_CALL  # the cost a tool budget charges: 1 per call
GEMINI_BASE_URL = "https://generativelanguage.googleapis.com/v1beta"  # Google AI Studio's Gemini API
AWS_SECRET_SEPARATOR = "/aws."  # LoadedConfig.secrets key for a backend's AWS keys: "<backend>/aws.<field>"
VERTEX_CREDENTIALS_SUFFIX = "/vertex.credentials"  # LoadedConfig.secrets key of a backend's Google credential JSON
STATE_REDIS_PASSWORD = "state/redis_password"  # LoadedConfig.secrets key of state.redis_password (no backend has a /)


class Schema(str, Enum):
    """The API a backend speaks; anything but `openai` is translated per attempt by the
    processor's upstream stage (see extproc/upstream.py)."""

    openai = "openai"
    anthropic = "anthropic"
    aws_bedrock = "aws_bedrock"
    azure_openai = "azure_openai"
    gemini = "gemini"
    gcp_vertex_ai = "gcp_vertex_ai"


class AwsSettings(StrictModel):
    """SigV4 signing for Bedrock. Keys left out come from botocore's usual chain
    (environment, shared config/credentials files, container or instance roles)."""

    region: Annotated[str, Field(pattern=r"^[a-z]{2}(-[a-z]+)+-\d+$")]
    access_key_id: SecretRef | None = None
    secret_access_key: SecretRef | None = None
    session_token: SecretRef | None = None

    @model_validator(mode="after")
    def _keys_in_pairs(self) -> AwsSettings:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("set both 'access_key_id' and 'secret_access_key', or neither (botocore's chain)")
        return self


def vertex_host(region: str) -> str:
    """The Vertex AI API host Google documents for a region (as the anthropic SDK picks it)."""
    if region == "global":
        return "aiplatform.googleapis.com"
    if region in ("us", "eu"):  # multi-region endpoints
        return f"aiplatform.{region}.rep.googleapis.com"
    return f"{region}-aiplatform.googleapis.com"


class VertexSettings(StrictModel):
    """Google Cloud Vertex AI: where the models run and how the gateway gets its access
    tokens. With neither `credentials_file` nor `credentials`, google-auth's application
    default credentials are used (GOOGLE_APPLICATION_CREDENTIALS, gcloud's file, the
    metadata server)."""

    project: Annotated[str, Field(pattern=r"^[a-z][a-z0-9.:-]{2,61}[a-z0-9]$", description="the project id")]
    region: Annotated[str, Field(pattern=r"^(global|[a-z]+(-[a-z]+)*\d*)$")]
    credentials_file: Path | None = Field(
        default=None, description="a credential JSON file (service-account key, or any google-auth JSON)"
    )
    credentials: SecretRef | None = Field(default=None, description="the same JSON, from an env var or file")

    @model_validator(mode="after")
    def _one_source(self) -> VertexSettings:
        if self.credentials_file is not None and self.credentials is not None:
            raise ValueError("set 'credentials_file' or 'credentials', not both (neither: application default)")
        return self

    def credentials_ref(self) -> SecretRef | None:
        if self.credentials_file is not None:
            return SecretRef(file=self.credentials_file)
        return self.credentials


class Backend(StrictModel):
    """An upstream LLM API endpoint."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    schema_: Schema = Field(default=Schema.openai, alias="schema")
    base_url: str = Field(
        default="",
        validate_default=True,
        description="openai: https://api.openai.com/v1 (includes /v1); anthropic: https://api.anthropic.com "
        "(no /v1, as in the anthropic SDK); azure_openai: https://RESOURCE.openai.azure.com; aws_bedrock: "
        "default https://bedrock-runtime.REGION.amazonaws.com; gemini: default "
        "https://generativelanguage.googleapis.com/v1beta (includes the API version); gcp_vertex_ai: "
        "default https://REGION-aiplatform.googleapis.com (no /v1)",
    )
    api_key: SecretRef | None = Field(
        default=None,
        description="openai: Bearer token; anthropic: x-api-key; azure_openai: api-key header; gemini: x-goog-api-key",
    )
    anthropic_version: str = Field(default="2023-06-01", pattern=r"^\d{4}-\d{2}-\d{2}$")
    api_version: str | None = Field(default=None, description="azure_openai: the api-version query parameter")
    deployment: str | None = Field(
        default=None, description="azure_openai: deployment name (default: the model the backend is asked for)"
    )
    aws: AwsSettings | None = None
    vertex: VertexSettings | None = None
    model_name_override: str | None = None
    strip_model_prefix: str | None = Field(
        default=None,
        description="clients name this backend's models with this prefix (e.g. groq/), which is removed "
        "before the request reaches the backend; model_name_override, when set, wins",
    )
    headers: dict[str, str] = Field(default_factory=dict)
    client_key_header: str | None = Field(
        default=None, description="a request header in which a client may send its own key for this backend, used "
        "instead of api_key for that request (bring your own key); removed before the backend")
    request_timeout_seconds: float = Field(default=0, ge=0, description="whole-request limit; 0 = none (long streams)")
    # 600 s: what the OpenAI and Anthropic SDKs wait by default; reasoning models can think
    # for minutes before the first byte of a non-streaming answer.
    idle_timeout_seconds: float = Field(default=600, gt=0, description="limit on silence within a request")

    model_config = ConfigDict(populate_by_name=True)  # added to StrictModel's: `schema_` or `schema`

    @model_validator(mode="before")
    @classmethod
    def _default_url(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("schema") == "gemini" and not data.get("base_url"):
            return {**data, "base_url": GEMINI_BASE_URL}
        if isinstance(data, dict) and data.get("schema") == "aws_bedrock" and not data.get("base_url"):
            region = (data.get("aws") or {}).get("region") if isinstance(data.get("aws"), dict) else None
            if isinstance(region, str) and region:
                return {**data, "base_url": f"https://bedrock-runtime.{region}.amazonaws.com"}
        if isinstance(data, dict) and data.get("schema") == "gcp_vertex_ai" and not data.get("base_url"):
            vertex = data.get("vertex")
            region = vertex.get("region") if isinstance(vertex, dict) else None
            if isinstance(region, str) and region:
                return {**data, "base_url": f"https://{vertex_host(region)}"}
        return data

    @model_validator(mode="after")
    def _schema_fields(self) -> Backend:
        schema = self.schema_
        if schema is Schema.aws_bedrock:
            if self.aws is None:
                raise ValueError("an aws_bedrock backend needs 'aws: {region: ...}'")
            if self.api_key is not None:
                raise ValueError("aws_bedrock signs with AWS credentials ('aws'), not 'api_key'")
        elif self.aws is not None:
            raise ValueError("'aws' is only for aws_bedrock backends")
        if schema is Schema.gcp_vertex_ai:
            if self.vertex is None:
                raise ValueError("a gcp_vertex_ai backend needs 'vertex: {project: ..., region: ...}'")
            if self.api_key is not None:
                raise ValueError("gcp_vertex_ai uses Google access tokens ('vertex.credentials_file' or "
                                 "application default credentials), not 'api_key'")
        elif self.vertex is not None:
            raise ValueError("'vertex' is only for gcp_vertex_ai backends")
        if schema is Schema.azure_openai:
            if not self.api_version:
                raise ValueError("an azure_openai backend needs 'api_version' (e.g. 2024-10-21)")
        elif self.api_version is not None or self.deployment is not None:
            raise ValueError("'api_version' and 'deployment' are only for azure_openai backends")
        if self.client_key_header is not None and schema in (Schema.aws_bedrock, Schema.gcp_vertex_ai):
            raise ValueError("client_key_header: a client's own key works for backends that take a key in a header, "
                             "not for AWS SigV4 or Google access tokens")
        for value, what in ((self.api_version, "api_version"), (self.deployment, "deployment")):
            if value is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", value):
                raise ValueError(f"'{what}' may only hold letters, digits and . _ -")
        return self

    @field_validator("base_url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        if not value:
            raise ValueError("required (aws_bedrock and gcp_vertex_ai backends default it from their region)")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host, e.g. https://api.openai.com/v1")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query string or fragment")
        if not parts.path.isascii() or any(c in parts.path for c in " \t\r\n"):
            raise ValueError("the path must be ASCII without spaces (percent-encode other characters)")
        return value.rstrip("/")

    @field_validator("model_name_override", "strip_model_prefix")
    @classmethod
    def _clean_override(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or any(c in value for c in "\r\n\0")):
            raise ValueError("must be a non-empty model name without control characters")
        return value

    @field_validator("headers")
    @classmethod
    def _valid_headers(cls, value: dict[str, str]) -> dict[str, str]:
        return check_extra_headers(value, GATEWAY_OWNED_HEADERS, (GATEWAY_HEADER_PREFIX,))

    @field_validator("client_key_header")
    @classmethod
    def _client_key_header(cls, value: str | None) -> str | None:
        if value is None:
            return None
        lowered = value.lower()
        if not HEADER_NAME.match(value) or lowered.startswith(GATEWAY_HEADER_PREFIX):
            raise ValueError(f"{value!r} is not a header name a client may set")
        if lowered in CREDENTIAL_HEADERS:
            raise ValueError(f"{value!r} carries the client's credentials for the gateway; pick a header of its own "
                             "(e.g. x-provider-key)")
        if not is_credential_header(lowered):
            raise ValueError(f"{value!r}: the name must contain 'key', 'token' or 'secret', so that logs redact it "
                             "(e.g. x-provider-key)")
        return lowered

    @property
    def url(self) -> ParsedUrl:
        return ParsedUrl.of(self.base_url)


@dataclass(frozen=True, slots=True)
class ParsedUrl:
    """The parts of a backend base URL that Envoy and the processor each need."""

    scheme: str
    host: str
    port: int
    path_prefix: str  # without the trailing slash, "" for none

    @classmethod
    def of(cls, url: str) -> ParsedUrl:
        parts = urlsplit(url)
        scheme = parts.scheme
        port = parts.port or (443 if scheme == "https" else 80)
        return cls(scheme=scheme, host=parts.hostname or "", port=port, path_prefix=parts.path.rstrip("/"))

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def authority(self) -> str:
        default = 443 if self.tls else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


class WeightedBackend(StrictModel):
    name: str
    weight: int = Field(default=1, ge=1, le=1_000_000, description="share among backends of the same priority")
    priority: int = Field(
        default=0, ge=0, le=9,
        description="0 is tried first; on connect failure, 5xx or 429 Envoy retries on the next priority",
    )


class ModelMatch(StrictModel):
    """How a route matches the requested model: exactly one of the fields."""

    model: str | list[str] | None = Field(default=None, description="exact model name(s)")
    prefix: str | None = None
    glob: str | None = Field(default=None, description="shell-style pattern, e.g. 'gpt-4o*'")

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelMatch:
        given = [k for k in ("model", "prefix", "glob") if getattr(self, k) not in (None, "", [])]
        if len(given) != 1:
            raise ValueError("set exactly one of 'model', 'prefix' or 'glob'")
        return self

    @property
    def exact_models(self) -> list[str]:
        if self.model is None:
            return []
        return [self.model] if isinstance(self.model, str) else list(self.model)


class Route(StrictModel):
    """Requests whose model matches go to one of `backends` (weighted random); backends
    with a higher `priority` number are fallbacks, tried by Envoy when earlier ones fail."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    match: ModelMatch | None = None
    default: bool = False
    backends: list[WeightedBackend] = Field(min_length=1)
    request_timeout_seconds: float | None = Field(
        default=None, gt=0, le=86_400,
        description="whole-request limit for this route, fallback attempts included (overrides the backends')",
    )

    @model_validator(mode="after")
    def _match_or_default(self) -> Route:
        if self.default == (self.match is not None):
            raise ValueError("a route needs either 'match' or 'default: true' (not both)")
        levels = sorted({b.priority for b in self.backends})
        if levels != list(range(len(levels))):
            raise ValueError(f"backend priorities must be 0, 1, ... without gaps (got {levels})")
        return self

    @property
    def has_fallback(self) -> bool:
        return any(b.priority for b in self.backends)


class Limits(StrictModel):
    max_request_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)


class Cost(StrictModel):
    """A number Envoy can charge, written as dynamic metadata at the end of each response."""

    metadata_key: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.]{0,62}$")]
    type: CostType
    cel: str | None = Field(default=None, description="CEL expression, for type 'cel'")

    @model_validator(mode="after")
    def _cel_matches_type(self) -> Cost:
        if self.metadata_key in RESERVED_METADATA_KEYS or self.metadata_key.startswith("ratelimit_"):
            raise ValueError(f"metadata_key {self.metadata_key!r} is written by the gateway itself; pick another name")
        if self.type is CostType.cel:
            if not self.cel:
                raise ValueError("type 'cel' needs a 'cel' expression")
            compile_cel(self.cel)  # raises ValueError with the parser's message
        elif self.cel is not None:
            raise ValueError(f"'cel' is only allowed with type 'cel' (this cost has type {self.type.value!r})")
        return self


class UsageSettings(StrictModel):
    """How token usage is obtained."""

    force_stream_usage: bool = Field(
        default=True, description="ask backends for usage on streams the client did not ask it for"
    )
    estimate_when_missing: bool = Field(
        default=False, description="count tokens offline when a backend reports none (marked estimated)"
    )
    max_response_bytes: int = Field(default=32 * 1024 * 1024, ge=64 * 1024, le=1024 * 1024 * 1024)


class RequestMetadata(StrictModel):
    """Request headers whose values become dynamic metadata (and later span attributes)."""

    session_id_header: str = "agent-session-id"

    @field_validator("session_id_header")
    @classmethod
    def _header_name(cls, value: str | None) -> str | None:
        return _telemetry_header(value)


_ENDPOINT = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$")
_GRPC_METADATA_KEY = re.compile(r"^[a-z0-9_.-]+$")


class OtlpAccessLog(StrictModel):
    """Envoy's OpenTelemetry access logger: every access-log field as a log-record attribute,
    sent over OTLP/gRPC by Envoy itself (no hop through the processor)."""

    endpoint: str = Field(description="host:port of an OTLP/gRPC collector (plaintext HTTP/2)")
    headers: dict[str, str] = Field(
        default_factory=dict, description="gRPC metadata sent with every export (e.g. an auth token)")
    resource_attributes: dict[str, str] = Field(
        default_factory=dict, description="OpenTelemetry resource attributes, e.g. service.name")

    @field_validator("endpoint")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if not _ENDPOINT.match(value) or not 0 < int(value.rpartition(":")[2]) < 65536:
            raise ValueError(f"{value!r} is not host:port (an OTLP/gRPC collector, e.g. otel-collector:4317)")
        return value

    @field_validator("headers")
    @classmethod
    def _metadata(cls, value: dict[str, str]) -> dict[str, str]:
        out = {}
        for key, item in value.items():
            key = key.lower()
            if not _GRPC_METADATA_KEY.match(key) or key.endswith("-bin"):
                raise ValueError(f"{key!r} is not a gRPC metadata key (lowercase letters, digits, '-', '_', '.')")
            if not item.isprintable():
                raise ValueError(f"the value of header {key!r} is not printable text")
            out[key] = item
        return out


class AccessLogSettings(StrictModel):
    """Where access logs go besides Envoy's stdout JSON (which always stays)."""

    otlp: OtlpAccessLog | None = None


SpanConvention = Literal["openinference", "gen_ai"]


def _openinference_only() -> list[SpanConvention]:
    return ["openinference"]


class TelemetrySettings(StrictModel):
    """Metrics and traces. Export targets come from the standard OTEL_* variables."""

    metric_header_attributes: dict[str, str] = Field(
        default_factory=dict, description="request header -> metric attribute name (off by default)"
    )
    max_attribute_values: int = Field(
        default=100, ge=1, le=100_000, description="distinct values per mapped attribute before 'other'"
    )
    tenant_attribute: str | None = Field(
        default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_.]{0,127}$",
        description="metric attribute carrying the authenticated tenant (JWT claim, key, header...), e.g. tenant; "
        "capped by max_attribute_values like the header attributes; off by default",
    )
    user_id_header: str | None = Field(default=None, description="request header copied to span user.id")
    max_content_chars: int = Field(
        default=32_768, ge=256, le=16 * 1024 * 1024, description="longest text recorded in a span attribute"
    )
    access_log: AccessLogSettings = Field(default_factory=AccessLogSettings)
    span_conventions: list[SpanConvention] = Field(
        default_factory=_openinference_only, min_length=1,
        description="attribute conventions of the LLM spans: OpenInference, the OpenTelemetry GenAI "
        "semantic conventions (gen_ai.*), or both",
    )

    @field_validator("metric_header_attributes")
    @classmethod
    def _valid_mapping(cls, value: dict[str, str]) -> dict[str, str]:
        out = {}
        for header, attribute in value.items():
            _telemetry_header(header)
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_.]{0,127}$", attribute):
                raise ValueError(f"{attribute!r} is not a valid attribute name")
            out[header.lower()] = attribute
        return out

    @field_validator("user_id_header")
    @classmethod
    def _header_name(cls, value: str | None) -> str | None:
        return _telemetry_header(value)

    @field_validator("span_conventions")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("each span convention may be listed once")
        return value


_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def _check_globs(value: list[str] | None) -> list[str] | None:
    """Shell globs (`*`, `?`, `[...]`) over names: non-empty, printable."""
    for glob in value or ():
        if not glob or not glob.isprintable():
            raise ValueError(f"{glob!r} is not a glob (a non-empty printable name pattern)")
    return value


class ApiKeyTenant(StrictModel):
    """A client API key (as sent in Authorization: Bearer or x-api-key) that identifies a tenant."""

    key: SecretRef
    tenant: Annotated[str, Field(pattern=NAME_PATTERN)]
    models: list[str] | None = Field(
        default=None, description="globs over client model names this key may use, within its tenant's (none: the tenant's)")
    tools: list[str] | None = Field(
        default=None, description="globs over MCP tool names '<server>__<tool>' this key may call, within its tenant's")

    @field_validator("models", "tools")
    @classmethod
    def _globs(cls, value: list[str] | None) -> list[str] | None:
        return _check_globs(value)


class RedisKeyStoreSettings(StrictModel):
    """Keys shared by every gateway in Redis, read live through a short cache."""

    url: str = Field(description="redis://host:port/db (rediss:// for TLS)")
    prefix: str = Field(default="extproc:keys:", min_length=1, max_length=64)
    cache_seconds: float = Field(
        default=2.0, ge=0.1, le=30, description="how long a lookup (found or not) is reused: the revocation delay"
    )
    cache_entries: int = Field(default=10_000, ge=100, le=10_000_000)
    timeout_ms: int = Field(default=500, ge=10, le=10_000, description="a slower Redis answer is a 503")


class KeyStoreSettings(StrictModel):
    """Client API keys kept hashed outside the config (`extproc keys` manages them)."""

    file: str | None = Field(default=None, description="JSON-lines file of key records, watched for changes")
    redis: RedisKeyStoreSettings | None = None
    poll_seconds: float = Field(default=1.0, gt=0, le=60, description="how often the file is checked")

    @model_validator(mode="after")
    def _one_store(self) -> KeyStoreSettings:
        if (self.file is None) == (self.redis is None):
            raise ValueError("set exactly one of 'file' and 'redis'")
        return self


class Tenancy(StrictModel):
    """Who a request is charged to. Without this section there are no tenants."""

    header: str | None = Field(default=None, description="request header naming the tenant, e.g. x-tenant-id")
    api_keys: list[ApiKeyTenant] = Field(default_factory=list, description="client API key -> tenant")
    key_store: KeyStoreSettings | None = Field(default=None, description="hashed client API keys in a file or Redis")
    default_tenant: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    reject_status: Literal[401, 403] = Field(
        default=401, description="answer for requests with no tenant when there is no default_tenant"
    )
    hosts: dict[str, Annotated[str, Field(pattern=NAME_PATTERN)]] = Field(
        default_factory=dict, description="host name (the request's :authority, without port) -> tenant"
    )
    host_pattern: str | None = Field(
        default=None, description="a host name with one '{tenant}' label, e.g. '{tenant}.gw.example.com'"
    )

    @field_validator("header")
    @classmethod
    def _header_name(cls, value: str | None) -> str | None:
        return _telemetry_header(value)

    @field_validator("hosts")
    @classmethod
    def _host_names(cls, value: dict[str, str]) -> dict[str, str]:
        out = {}
        for host, tenant in value.items():
            if not _HOST_NAME.match(host):
                raise ValueError(f"{host!r} is not a host name (letters, digits, '-' and '.', no port)")
            out[host.lower()] = tenant
        return out

    @field_validator("host_pattern")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is None:
            return None
        first, marker, rest = value.lower().partition("{tenant}")
        if not marker or "{" in first + rest or "}" in first + rest:
            raise ValueError("must hold '{tenant}' exactly once, e.g. '{tenant}.gw.example.com'")
        if not (first == "" or first.endswith(".")) or not rest.startswith(".") or not _HOST_NAME.match(
                (first + "x" + rest)):
            raise ValueError("'{tenant}' must be a whole label of a host name, e.g. '{tenant}.gw.example.com'")
        return value.lower()

    @model_validator(mode="after")
    def _some_source(self) -> Tenancy:
        if (self.header is None and not self.api_keys and self.key_store is None and not self.hosts
                and self.host_pattern is None):
            raise ValueError(
                "set 'header', 'api_keys', 'key_store', 'hosts' and/or 'host_pattern' to say where the tenant comes from")
        return self


class TenantGrants(StrictModel):
    """What one tenant may use; a list left out allows everything of its kind."""

    models: list[str] | None = Field(default=None, description="globs over the client's model names")
    tools: list[str] | None = Field(default=None, description="globs over MCP tool names '<server>__<tool>'")

    @field_validator("models", "tools")
    @classmethod
    def _globs(cls, value: list[str] | None) -> list[str] | None:
        return _check_globs(value)


class Authorization(StrictModel):
    """Which models and MCP tools each tenant may use. Without this section: everything.
    A tenant not listed gets the '*' entry; with no '*' entry, nothing."""

    tenants: dict[str, TenantGrants] = Field(description="tenant name or '*' -> its grants")

    @field_validator("tenants")
    @classmethod
    def _tenant_names(cls, value: dict[str, TenantGrants]) -> dict[str, TenantGrants]:
        for name in value:
            if name != "*" and not re.match(NAME_PATTERN, name):
                raise ValueError(f"{name!r} is not a tenant name (letters, digits, _.-) or '*'")
        return value


RateUnit = Literal["second", "minute", "hour", "day"]


class Budget(StrictModel):
    """A token budget per tenant and window, enforced by Envoy's global rate-limit filter."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")]
    tenant: str = Field(default="*", description="a tenant name, or '*' for each tenant separately")
    model: str | None = Field(default=None, description="only requests for this model (the client's name)")
    tool: str | None = Field(
        default=None, description="only MCP tools/call of this tool (the name clients see, '<server>__<tool>')"
    )
    unit: RateUnit
    limit: int = Field(ge=1, le=4_294_967_295, description="at most 2^32-1, the rate limit protocol's range")
    cost: str = Field(
        default="llm_total_token",
        description="metadata key charged: a token key, a cost key, or mcp_tool_call (1 per MCP tool call)",
    )

    @model_validator(mode="after")
    def _one_filter(self) -> Budget:
        if self.model is not None and self.tool is not None:
            raise ValueError("a budget filters on 'model' or on 'tool', not both")
        if self.tool is not None and self.cost != MCP_TOOL_CALL_KEY:
            raise ValueError(f"a tool budget counts calls: set cost: {MCP_TOOL_CALL_KEY}")
        return self


class RequestLimit(StrictModel):
    """Requests per tenant and window, enforced by each Envoy alone (local rate-limit filter)."""

    tenant: str = "*"
    unit: RateUnit
    requests: int = Field(ge=1)


class RateLimitService(StrictModel):
    """The rate limit service Envoy asks. 'builtin' runs it inside the processor."""

    address: str = Field(default="builtin", description="'builtin', or host:port of an envoyproxy/ratelimit peer")
    store: str = Field(default="memory", description="builtin only: 'memory' (one node) or redis://host:port/db")
    failure_mode: Literal["open", "closed"] = Field(
        default="open", description="when the service or its store is down: let requests through, or refuse them"
    )
    domain: str = "ai-gateway"
    reserve: bool = Field(
        default=False, description="charge an estimate at request time and settle after (bounds overshoot)"
    )
    timeout_ms: int = Field(default=500, ge=10, le=30_000)

    @field_validator("store")
    @classmethod
    def _store_url(cls, value: str) -> str:
        if value != "memory" and not value.startswith(("redis://", "rediss://")):
            raise ValueError("must be 'memory' or a redis:// / rediss:// URL")
        return value


class StateSettings(StrictModel):
    """State replicas share (Responses affinity, the MCP session key; budgets by default)."""

    redis: str | None = Field(
        default=None,
        description="redis:// / rediss:// URL shared by every replica; absent: per-host state (one machine)",
    )
    redis_password: SecretRef | None = Field(
        default=None,
        description="the Redis password, from the environment or a file (keeps it out of the config); "
                    "also used by budgets while ratelimit.store follows state.redis",
    )
    affinity_ttl_seconds: float = Field(
        default=30 * 24 * 3600, gt=0, description="how long a Responses id keeps pointing at its backend")

    @field_validator("redis")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://")):
            raise ValueError("must be a redis:// or rediss:// URL")
        return value

    @model_validator(mode="after")
    def _password_needs_redis(self) -> StateSettings:
        if self.redis_password is not None and self.redis is None:
            raise ValueError("redis_password needs redis")
        return self


class EnvoySettings(StrictModel):
    """Where the bundled Envoy listens."""

    listen_address: str = "127.0.0.1"
    listen_port: int = Field(default=1975, ge=0, le=65535)
    admin_port: int = Field(default=9901, ge=0, le=65535)


class ProcessorSettings(StrictModel):
    """Where the processor listens; `grpc_address` is host:port or unix:/path."""

    grpc_address: str = "127.0.0.1:1063"
    admin_address: str = "127.0.0.1"
    admin_port: int = Field(default=1064, ge=0, le=65535)
    grace_period_seconds: float = Field(default=15, ge=0, le=3600)
    message_timeout_ms: int = Field(default=5000, ge=50, le=60_000)
    workers: int = Field(
        default=0, ge=0, le=256, description="processor processes; 0 = one per core. Worker i uses ports + 10*i"
    )
    failure_mode_allow: bool = Field(
        default=False,
        description="processor unreachable: false = clients get a 5xx in their API's shape; true = requests go "
        "unprocessed to the default route's first backend (no credentials, no accounting), counted by Envoy",
    )
    watch_config: bool = Field(default=True, description="reload the config file when it changes (and on SIGHUP)")


class GatewayConfig(StrictModel):
    """The whole gateway: backends, routes, limits and listening addresses."""

    version: Literal[1] = 1
    backends: list[Backend] = Field(min_length=1)
    routes: list[Route] = Field(min_length=1)
    limits: Limits = Field(default_factory=Limits)
    costs: list[Cost] = Field(default_factory=list)
    usage: UsageSettings = Field(default_factory=UsageSettings)
    metadata: RequestMetadata = Field(default_factory=RequestMetadata)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    tenancy: Tenancy | None = None
    auth: Auth = Field(default_factory=Auth, description="callers' proof of identity (JWTs checked by Envoy)")
    budgets: list[Budget] = Field(default_factory=list)
    request_limits: list[RequestLimit] = Field(default_factory=list)
    ratelimit: RateLimitService = Field(default_factory=RateLimitService)
    state: StateSettings = Field(default_factory=StateSettings, description="state shared by replicas (Redis)")
    envoy: EnvoySettings = Field(default_factory=EnvoySettings)
    processor: ProcessorSettings = Field(default_factory=ProcessorSettings)
    mcp: McpSettings | None = Field(default=None, description="MCP servers served behind the gateway's MCP paths")
    authorization: Authorization | None = Field(
        default=None, description="which models and MCP tools each tenant may use (absent: everything)")

    @model_validator(mode="before")
    @classmethod
    def _budgets_follow_state(cls, data: Any) -> Any:
        """Budgets count in state.redis unless ratelimit.store says otherwise."""
        if not isinstance(data, dict):
            return data
        state, ratelimit = data.get("state"), data.get("ratelimit")
        redis = state.get("redis") if isinstance(state, dict) else None
        if isinstance(redis, str) and (ratelimit is None or (isinstance(ratelimit, dict) and "store" not in ratelimit)):
            data = {**data, "ratelimit": {**(ratelimit or {}), "store": redis}}
        return data

    @model_validator(mode="after")
    def _cross_references(self) -> GatewayConfig:
        names = [b.name for b in self.backends]
        _no_duplicates(names, "backends", "backend")
        _no_duplicates([r.name for r in self.routes], "routes", "route")
        known = set(names)
        for i, route in enumerate(self.routes):
            for j, ref in enumerate(route.backends):
                if ref.name not in known:
                    raise _FieldError(
                        ("routes", i, "backends", j, "name"),
                        f"unknown backend {ref.name!r}; defined backends: {', '.join(names)}",
                    )
        cost_keys = [cost.metadata_key for cost in self.costs]
        if repeat := first_repeat(cost_keys):
            raise _FieldError(("costs", repeat[0], "metadata_key"), f"duplicate cost key {repeat[1]!r}")
        chargeable = BUILTIN_KEYS | set(cost_keys) | {MCP_TOOL_CALL_KEY}
        _no_duplicates([b.name for b in self.budgets], "budgets", "budget")
        for i, budget in enumerate(self.budgets):
            if budget.cost not in chargeable:
                raise _FieldError(
                    ("budgets", i, "cost"),
                    f"unknown cost {budget.cost!r}; use a token key ({', '.join(sorted(BUILTIN_KEYS))}) "
                    "or a metadata_key from 'costs'",
                )
        if (self.budgets or self.request_limits) and self.tenancy is None and self.auth.jwt is None:
            where = "budgets" if self.budgets else "request_limits"
            raise _FieldError((where,), "limits are per tenant: add a 'tenancy' section (or auth.jwt) saying where "
                              "tenants come from")
        if self.authorization is not None and self.tenancy is None and self.auth.jwt is None:
            raise _FieldError(("authorization",), "authorization is per tenant: add a 'tenancy' section (or auth.jwt) "
                              "saying where tenants come from")
        self._client_key_headers()
        defaults = [i for i, r in enumerate(self.routes) if r.default]
        if len(defaults) > 1:
            raise _FieldError(("routes", defaults[1], "default"), "only one route may be the default")
        return self

    def _client_key_headers(self) -> None:
        """A client's provider key never follows a fallback (Envoy reuses the request's
        headers across attempts, so a removed header is gone for the next one) and its
        header is never copied into metadata or telemetry."""
        byok = {b.name: b.client_key_header for b in self.backends if b.client_key_header}
        for i, route in enumerate(self.routes):
            if route.has_fallback and (names := [ref.name for ref in route.backends if ref.name in byok]):
                raise _FieldError(("routes", i, "backends"), f"backend {names[0]!r} takes the client's own key "
                                  "(client_key_header), which cannot follow fallback attempts; use it on routes "
                                  "without fallbacks")
        published = {self.metadata.session_id_header, self.telemetry.user_id_header,
                     *self.telemetry.metric_header_attributes, self.tenancy.header if self.tenancy else None}
        for i, backend in enumerate(self.backends):
            if backend.client_key_header is not None and backend.client_key_header in published:
                raise _FieldError(("backends", i, "client_key_header"), "this header is also copied into metadata "
                                  "or telemetry; a client's key must never be")

    def backend(self, name: str) -> Backend:
        for backend in self.backends:
            if backend.name == name:
                return backend
        raise KeyError(name)


class _FieldError(ValueError):
    """A cross-field error that still knows which field it is about."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


def _no_duplicates(names: list[str], section: str, what: str) -> None:
    if repeat := first_repeat(names):
        raise _FieldError((section, repeat[0], "name"), f"duplicate {what} name {repeat[1]!r}")


class LoadedConfig(BaseModel):
    """A validated config plus the secrets it references, resolved."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    config: GatewayConfig
    source: str
    secrets: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="backend name -> api key; '<backend>/aws.<field>' -> AWS key; 'state/redis_password'",
    )
    tenant_keys: dict[str, ApiKeyTenant] = Field(
        default_factory=dict, description="sha256 of a client API key -> its entry (keys themselves are not kept)"
    )

    def redis_password(self, url: str) -> str | None:
        """The password for a connection to `url`: state.redis_password when `url` is state.redis."""
        secret = self.secrets.get(STATE_REDIS_PASSWORD)
        return secret.get_secret_value() if secret is not None and url == self.config.state.redis else None


def format_loc(loc: tuple[str | int, ...]) -> str:
    """('routes', 0, 'backends', 1, 'name') -> 'routes[0].backends[1].name'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _describe_error(error: Mapping[str, Any]) -> str:
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith(("function-", "tagged-union"))))
    ctx = error.get("ctx") or {}
    inner = ctx.get("error")
    if isinstance(inner, _FieldError):
        return f"{format_loc(inner.loc)}: {inner.message}"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown field (check the spelling; see the README's config reference)"
    elif error["type"] == "missing":
        message = "required field is missing"
    value = error.get("input")
    shown = ""
    if error["type"] not in ("missing", "extra_forbidden") and isinstance(value, str | int | float | bool):
        shown = f" (got {value!r})"
    return f"{format_loc(loc)}: {message}{shown}"


def parse_config(data: Any, source: str = "<config>") -> GatewayConfig:
    """Validate a decoded YAML document, raising ConfigError naming every bad field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with 'backends' and 'routes'")
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"  {_describe_error(e)}" for e in exc.errors()]
        raise ConfigError(f"{source}: invalid configuration:\n" + "\n".join(lines)) from None


def key_digest(key: str) -> str:
    """How client API keys are looked up: by digest, so the table holds no usable key."""
    return hashlib.sha256(key.encode()).hexdigest()


def resolve_tenant_keys(config: GatewayConfig, environ: Mapping[str, str], source: str) -> dict[str, ApiKeyTenant]:
    """Client API key digests -> their entries (tenant, grants), from `tenancy.api_keys`."""
    if config.tenancy is None:
        return {}
    entries = config.tenancy.api_keys
    keys = resolve_secret_refs(
        ((i, f"tenancy.api_keys[{i}].key", entry.key) for i, entry in enumerate(entries)),
        environ,
        f"{source}: cannot resolve tenant API keys",
    )
    return {key_digest(keys[i].get_secret_value()): entry for i, entry in enumerate(entries)}


def resolve_secrets(config: GatewayConfig, environ: Mapping[str, str], source: str) -> dict[str, SecretStr]:
    """Resolve every backend's credential reference (and the state Redis password); errors
    name the field, never a value."""
    refs: list[tuple[str, str, SecretRef]] = []
    for i, backend in enumerate(config.backends):
        fields: list[tuple[str, str, SecretRef | None]] = [(backend.name, "api_key", backend.api_key)]
        if backend.aws is not None:
            fields += [
                (f"{backend.name}{AWS_SECRET_SEPARATOR}{field}", f"aws.{field}", getattr(backend.aws, field))
                for field in ("access_key_id", "secret_access_key", "session_token")
            ]
        if backend.vertex is not None:
            field = "vertex.credentials_file" if backend.vertex.credentials_file else "vertex.credentials"
            fields.append((backend.name + VERTEX_CREDENTIALS_SUFFIX, field, backend.vertex.credentials_ref()))
        refs += [(key, f"backends[{i}].{field}", ref) for key, field, ref in fields if ref is not None]
    if config.state.redis_password is not None:
        refs.append((STATE_REDIS_PASSWORD, "state.redis_password", config.state.redis_password))
    secrets = resolve_secret_refs(refs, environ, f"{source}: cannot resolve credentials", multiline=_is_json_secret)
    for i, backend in enumerate(config.backends):
        if (json_text := secrets.get(backend.name + VERTEX_CREDENTIALS_SUFFIX)) is not None:
            _check_google_credentials(json_text.get_secret_value(), f"{source}: backends[{i}].vertex")
    return secrets


def _is_json_secret(key: str) -> bool:
    """A credential JSON file spans lines; other secrets travel in a header and may not."""
    return key.endswith(VERTEX_CREDENTIALS_SUFFIX)


def _check_google_credentials(text: str, where: str) -> None:
    """Refuse at load what google-auth could never use; the message names no value."""
    try:
        info = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ConfigError(f"{where}: the credentials are not JSON (expected a Google credential file)") from None
    kind = info.get("type") if isinstance(info, dict) else None
    if kind not in ("service_account", "authorized_user"):
        raise ConfigError(f"{where}: the credentials must be a service-account key or an authorized-user file "
                          f"(type {kind!r}); for other kinds use application default credentials")
    assert isinstance(info, dict)
    needed = ("client_email", "private_key", "token_uri") if kind == "service_account" else (
        "client_id", "client_secret", "refresh_token")
    missing = [k for k in needed if not isinstance(info.get(k), str)]
    if missing:
        raise ConfigError(f"{where}: the {kind} credentials lack {', '.join(missing)}")


def load_config(path: str | Path, environ: Mapping[str, str] | None = None, *, with_secrets: bool = True) -> LoadedConfig:
    """Read, validate and (optionally) resolve the secrets of a config file."""
    source = str(path)
    data = read_yaml_file(path, ConfigError)
    config = parse_config(data, source)
    env = os.environ if environ is None else environ
    if not with_secrets:
        return LoadedConfig(config=config, source=source)
    return LoadedConfig(
        config=config,
        source=source,
        secrets=resolve_secrets(config, env, source),
        tenant_keys=resolve_tenant_keys(config, env, source),
    )
