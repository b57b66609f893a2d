"""A real OTLP/gRPC logs receiver for tests: what a collector gets from Envoy's OpenTelemetry access logger.

    with OtlpLogsReceiver() as logs:
        config["telemetry"] = {"access_log": {"otlp": {"endpoint": logs.endpoint}}}
        ...
        record = logs.wait_for_record(lambda r: r.attributes.get("request_model") == "m")

Serves opentelemetry-proto's LogsService on 127.0.0.1 (port picked at run time) with grpcio,
keeps every decoded log record with its resource and the metadata of the export call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc

from tests.otlp_receiver import any_value

__all__ = ["OtlpLogsReceiver", "ReceivedLog"]


@dataclass(frozen=True)
class ReceivedLog:
    body: Any
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope: str
    trace_id: str  # hex, "" when the record has none
    span_id: str
    time_unix_nano: int
    metadata: dict[str, str]  # gRPC metadata of the export call that carried it


class OtlpLogsReceiver(logs_service_pb2_grpc.LogsServiceServicer):
    """An OTLP/gRPC logs endpoint (plaintext HTTP/2) served by a small thread pool."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._records: list[ReceivedLog] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    @property
    def endpoint(self) -> str:
        """host:port, as `telemetry.access_log.otlp.endpoint` takes it."""
        return f"127.0.0.1:{self.port}"

    def Export(  # noqa: N802 - the gRPC method's name
        self, request: logs_service_pb2.ExportLogsServiceRequest, context: grpc.ServicerContext
    ) -> logs_service_pb2.ExportLogsServiceResponse:
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        out = []
        for resource_logs in request.resource_logs:
            resource = {kv.key: any_value(kv.value) for kv in resource_logs.resource.attributes}
            for scope_logs in resource_logs.scope_logs:
                for record in scope_logs.log_records:
                    out.append(ReceivedLog(
                        body=any_value(record.body),
                        attributes={kv.key: any_value(kv.value) for kv in record.attributes},
                        resource=resource,
                        scope=scope_logs.scope.name,
                        trace_id=record.trace_id.hex(),
                        span_id=record.span_id.hex(),
                        time_unix_nano=record.time_unix_nano,
                        metadata=metadata,
                    ))
        with self._lock:
            self._records.extend(out)
            self._lock.notify_all()
        return logs_service_pb2.ExportLogsServiceResponse()

    def records(self) -> list[ReceivedLog]:
        with self._lock:
            return list(self._records)

    def wait_for_record(self, predicate: Callable[[ReceivedLog], bool], timeout: float = 15.0) -> ReceivedLog:
        """The first record for which `predicate` holds; TimeoutError (naming what came) otherwise."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = next((r for r in self._records if predicate(r)), None)
                if found is not None:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no matching log record after {timeout}s; received {len(self._records)}")
                self._lock.wait(min(remaining, 0.1))

    def close(self) -> None:
        self._server.stop(grace=None)

    def __enter__(self) -> OtlpLogsReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
