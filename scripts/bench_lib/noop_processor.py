"""A processor that changes nothing: the floor the gateway's own code sits on.

    PYTHONPATH=scripts .venv/bin/python -m bench_lib.noop_processor --grpc-address 127.0.0.1:50051 --admin-port 9101

(A module, not a script: run as a script, its directory's envoy.py would hide the
`envoy` protos package.)

One worker per process (scripts/bench starts one per core, as the gateway has): grpc.aio
on uvloop, the same server options and gRPC health service as the gateway's processor,
answering every ext_proc message with the empty CONTINUE of its phase and ending each
stream after its last answer, as `extproc.server.ExternalProcessor.Process` does. It
imports nothing from `extproc`, so its cost is grpc.aio's and protobuf's alone.

Messages answered are counted in a dict and served at `GET /metrics` on the admin port
as `extproc_processor_messages_total{stage="request",phase=...}`, the gateway's own
metric, so the bench reads messages per request the same way for both.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

READY_LINE = "noop processor ready"
TRANSPORTS = ("grpc.aio", "grpclib")  # grpclib is not a dependency: the bench installs it on demand
STAGE = "request"  # the floor has the gateway's request stage only
METRIC = "extproc_processor_messages_total"
SERVICE_NAME = ep.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name
# As the gateway's processor (extproc.server.ProcessorServer.start).
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", 128 * 1024 * 1024),
    ("grpc.max_send_message_length", 128 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
]


def _continue(phase: str) -> ep.ProcessingResponse:
    """The empty answer of `phase`: the field set but empty (an answer with no field set
    at all fails the request)."""
    response = ep.ProcessingResponse()
    getattr(response, phase).SetInParent()
    return response


# One shared answer per phase (never mutated): every phase a ProcessingRequest can carry.
PHASES = [field.name for field in ep.ProcessingRequest.DESCRIPTOR.oneofs_by_name["request"].fields]
ANSWERS = {phase: _continue(phase) for phase in PHASES}


def is_last(request: ep.ProcessingRequest, phase: str) -> bool:
    """Envoy sends nothing after the response's end (trailers are skipped)."""
    if phase == "response_body":
        return request.response_body.end_of_stream
    if phase == "response_headers":
        return request.response_headers.end_of_stream
    return False


class NoopProcessor(ep_grpc.ExternalProcessorServicer):
    """Answers CONTINUE to everything and counts what it answered, by phase."""

    def __init__(self) -> None:
        self.messages: dict[str, int] = {}  # phase -> messages answered

    async def Process(  # noqa: N802 (gRPC method name)
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ep.ProcessingResponse]:
        messages = self.messages
        async for request in request_iterator:
            phase = request.WhichOneof("request")
            if phase is None:
                continue  # nothing to answer (Envoy never sends this)
            messages[phase] = messages.get(phase, 0) + 1
            yield ANSWERS[phase]
            if is_last(request, phase):
                return  # ends the stream with OK: Envoy needs nothing more

    def metrics_text(self) -> str:
        """The counts in Prometheus text, under the gateway's metric name."""
        lines = [f"# TYPE {METRIC} counter"]
        for phase, count in sorted(self.messages.items()):
            lines.append(f'{METRIC}{{stage="{STAGE}",phase="{phase}"}} {count}')
        return "\n".join(lines) + "\n"


async def _admin(processor: NoopProcessor, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Any GET gets the counts: one request per connection, then close."""
    try:
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
            pass  # the request line and headers: the answer is the same whatever they say
        body = processor.metrics_text().encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\n"
            + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
    finally:
        writer.close()


class GrpclibNoopProcessor:
    """The same answers served by grpclib (pure-Python HTTP/2 on h2) instead of grpc.aio:
    measured as a cheaper transport, not adopted (README, "what was tried")."""

    def __init__(self, counts: NoopProcessor) -> None:
        self.counts = counts

    def __mapping__(self) -> dict[str, Any]:  # noqa: PLW3201 (grpclib's service protocol)
        from grpclib.const import Cardinality, Handler

        method = f"/{SERVICE_NAME}/Process"
        return {method: Handler(self.process, Cardinality.STREAM_STREAM, ep.ProcessingRequest, ep.ProcessingResponse)}

    async def process(self, stream: Any) -> None:
        messages = self.counts.messages
        async for request in stream:
            phase = request.WhichOneof("request")
            if phase is None:
                continue
            messages[phase] = messages.get(phase, 0) + 1
            await stream.send_message(ANSWERS[phase])
            if is_last(request, phase):
                return


async def _start_grpc_aio(processor: NoopProcessor, grpc_address: str) -> Callable[[], Awaitable[None]]:
    # Imported here: grpclib registers its own copy of the health protos.
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.aio.server(options=SERVER_OPTIONS)
    ep_grpc.add_ExternalProcessorServicer_to_server(processor, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(grpc_address)
    await server.start()
    for name in ("", SERVICE_NAME):  # Envoy's health check asks for the service by name
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return lambda: server.stop(1)


async def _start_grpclib(processor: NoopProcessor, grpc_address: str) -> Callable[[], Awaitable[None]]:
    from grpclib.health.service import Health
    from grpclib.server import Server

    server = Server([GrpclibNoopProcessor(processor), Health()])  # Health: SERVING for every service
    host, _, port = grpc_address.rpartition(":")
    if grpc_address.startswith("unix:"):
        await server.start(path=grpc_address.removeprefix("unix:"))
    else:
        await server.start(host, int(port))

    async def stop() -> None:
        server.close()
        await server.wait_closed()

    return stop


async def serve(grpc_address: str, admin_port: int, transport: str = "grpc.aio") -> int:
    processor = NoopProcessor()
    start = _start_grpclib if transport == "grpclib" else _start_grpc_aio
    stop_server = await start(processor, grpc_address)
    admin = await asyncio.start_server(lambda r, w: _admin(processor, r, w), "127.0.0.1", admin_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"{READY_LINE} grpc={grpc_address} admin=127.0.0.1:{admin_port}", flush=True)
    await stop.wait()
    admin.close()
    await stop_server()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="An ext_proc processor that changes nothing (the bench's floor).")
    parser.add_argument("--grpc-address", required=True, help="host:port to serve ext_proc and gRPC health on")
    parser.add_argument("--admin-port", type=int, required=True, help="127.0.0.1 port serving the message counts")
    parser.add_argument("--transport", choices=TRANSPORTS, default=TRANSPORTS[0], help="the gRPC server library")
    args = parser.parse_args(argv)
    import uvloop

    return uvloop.run(serve(args.grpc_address, args.admin_port, args.transport))


if __name__ == "__main__":
    sys.exit(main())
