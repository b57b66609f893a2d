"""``python -m extproc.sim``: serve the simulator until SIGINT/SIGTERM.

The ready line on stdout lets scripts and tests wait for the bind (port 0 works).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from extproc.sim.server import SimServer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m extproc.sim", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1976, help="0 picks a free port")
    parser.add_argument("--chunks", type=int, default=8, help="content chunks per streamed reply")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="pause between content chunks")
    args = parser.parse_args(argv)
    if args.chunks < 1:
        parser.error("--chunks must be at least 1")
    if args.chunk_delay_ms < 0:
        parser.error("--chunk-delay-ms must not be negative")
    return args


async def serve(args: argparse.Namespace) -> None:
    """Run until a termination signal arrives, then stop cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = SimServer(args.host, args.port, chunks=args.chunks, chunk_delay_ms=args.chunk_delay_ms)
    await server.start()
    try:
        print(f"extproc.sim listening on http://{args.host}:{server.port}", flush=True)
        await stop.wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    asyncio.run(serve(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
