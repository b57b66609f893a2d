"""Command line: `extproc serve | run | envoy-config | ratelimit-config | check`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from extproc import __version__, envoyconfig
from extproc.config import ConfigError, LoadedConfig, load_config, parse_config
from extproc.config_defaults import DEMO_PORT, config_from_environment, demo_config_data
from extproc.redact import install_secret_scrubber

LOG_LEVEL_ENV = "EXTPROC_LOG_LEVEL"  # default for --log-level; inherited by the processor `extproc run` starts


def _load(path: str | None, *, with_secrets: bool = True, demo_port: int = DEMO_PORT) -> LoadedConfig:
    if path is None:
        return config_from_environment(demo_port=demo_port)
    return load_config(path, with_secrets=with_secrets)


def _override_processor(loaded: LoadedConfig, args: argparse.Namespace) -> LoadedConfig:
    """Apply `serve` flags on top of the config's processor section."""
    updates = {}
    if args.grpc is not None:
        updates["grpc_address"] = args.grpc
    if args.admin_port is not None:
        updates["admin_port"] = args.admin_port
    if args.grace is not None:
        updates["grace_period_seconds"] = args.grace
    if args.workers is not None:
        updates["workers"] = args.workers
    if not updates:
        return loaded
    config = loaded.config
    processor = config.processor.model_copy(update=updates)
    return loaded.model_copy(update={"config": config.model_copy(update={"processor": processor})})


def affinity_path(grpc_address: str) -> Path:
    """One file per processor (all its workers share it), named after its gRPC address."""
    import hashlib
    import tempfile

    digest = hashlib.sha256(grpc_address.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"extproc-affinity-{os.getuid()}-{digest}.sqlite"


def cmd_serve(args: argparse.Namespace) -> int:
    from extproc.server import ListenError, ServeOptions, run_event_loop, serve
    from extproc.workers import WorkerPool, worker_addresses, worker_count

    loaded = _override_processor(_load(args.config), args)
    install_secret_scrubber(loaded)
    settings = loaded.config.processor
    count = worker_count(settings)
    addresses = worker_addresses(settings, count)
    pool = None
    if count > 1 and args.worker_index is None:
        # This process is worker 0 and starts the others with the same flags.
        forwarded = ["--log-level", args.log_level, "serve"]
        for flag, value in (("--config", args.config), ("--grpc", args.grpc), ("--admin-port", args.admin_port),
                            ("--grace", args.grace)):
            if value is not None:
                forwarded += [flag, str(value)]
        pool = WorkerPool(forwarded, [a.grpc_address for a in addresses])
    me = addresses[args.worker_index or 0]
    options = ServeOptions(
        grpc_address=me.grpc_address,
        admin_host=settings.admin_address,
        admin_port=me.admin_port,
        grace_period_seconds=settings.grace_period_seconds,
        worker_index=me.index,
        peer_admin_ports=[a.admin_port for a in addresses if a.index != me.index] if me.index == 0 else [],
        config_path=args.config,
        prepare_config=lambda reloaded: _override_processor(reloaded, args),
        affinity_path=str(affinity_path(settings.grpc_address)),
    )
    try:
        return run_event_loop(serve(loaded, options, pool))
    except ListenError as exc:
        print(f"extproc: {exc}", file=sys.stderr, flush=True)
        return 1


def _override_ports(loaded: LoadedConfig, args: argparse.Namespace) -> LoadedConfig:
    """Apply `run` port flags on top of the config (e.g. when 1975 is taken)."""
    config = loaded.config
    envoy = {k: v for k, v in (("listen_port", args.port), ("admin_port", args.envoy_admin_port)) if v is not None}
    processor: dict[str, object] = {}
    if args.processor_port is not None:
        processor["grpc_address"] = f"127.0.0.1:{args.processor_port}"
    if args.processor_admin_port is not None:
        processor["admin_port"] = args.processor_admin_port
    if args.workers is not None:
        processor["workers"] = args.workers
    if not envoy and not processor:
        return loaded
    config = config.model_copy(
        update={
            "envoy": config.envoy.model_copy(update=envoy),
            "processor": config.processor.model_copy(update=processor),
        }
    )
    return loaded.model_copy(update={"config": config})


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from extproc.supervisor import RunOptions, run_gateway

    overridden = any(
        v is not None
        for v in (args.port, args.envoy_admin_port, args.processor_port, args.processor_admin_port, args.workers)
    )
    loaded = _override_ports(_load(args.config, demo_port=args.demo_port), args)
    install_secret_scrubber(loaded)
    options = RunOptions(
        # With port flags the processor must see the overridden config, so it is written out.
        config_path=Path(args.config) if args.config and not overridden else None,
        envoy_log_level=args.envoy_log_level,
        demo_port=args.demo_port,
    )
    return asyncio.run(run_gateway(loaded, options))


def cmd_envoy_config(args: argparse.Namespace) -> int:
    if args.demo:
        config = parse_config(demo_config_data(), "<built-in demo>")
    else:
        config = _load(args.config, with_secrets=False).config
    if args.workers is not None:
        config = config.model_copy(update={"processor": config.processor.model_copy(update={"workers": args.workers})})
    if args.fragment:
        text = envoyconfig.to_yaml(envoyconfig.fragment(config, args.ca_file))
    else:
        header = envoyconfig.BUNDLED_HEADER if args.demo else ""
        text = envoyconfig.to_yaml(envoyconfig.render(config, args.ca_file), header)
    _write(text, args.output)
    return 0


def cmd_ratelimit_config(args: argparse.Namespace) -> int:
    """The budgets as an envoyproxy/ratelimit descriptor file (for an external service)."""
    import yaml

    from extproc.budgets import descriptor_config

    config = _load(args.config, with_secrets=False).config
    text = yaml.safe_dump(descriptor_config(config), sort_keys=False)
    _write(text, args.output)
    return 0


def _write(text: str, output: str | None) -> None:
    """To the --output file, else to standard output."""
    if output:
        Path(output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


def cmd_check(args: argparse.Namespace) -> int:
    loaded = load_config(args.file, with_secrets=not args.skip_secrets)
    config = loaded.config
    print(f"{args.file}: OK ({len(config.backends)} backend(s), {len(config.routes)} route(s))")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="extproc", description="AI gateway data plane for Envoy")
    parser.add_argument("--version", action="version", version=f"extproc {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get(LOG_LEVEL_ENV, "").strip() or "INFO",
        help=f"processor log level (default ${LOG_LEVEL_ENV}, else INFO)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the ext_proc gRPC processor (attach to your own Envoy)")
    serve.add_argument("--config", help="gateway YAML (default: built from OPENAI_* env vars, else the demo)")
    serve.add_argument("--grpc", help="listen address: host:port or unix:/path (default from config: 127.0.0.1:1063)")
    serve.add_argument("--admin-port", type=int, help="admin HTTP port for /healthz (default 1064)")
    serve.add_argument("--grace", type=float, help="seconds in-flight streams get to finish on SIGTERM")
    serve.add_argument("--workers", type=int, help="processor processes (default from config; 0 = one per core)")
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set by the worker supervisor
    serve.set_defaults(func=cmd_serve)

    run = sub.add_parser("run", help="run Envoy and the processor together")
    run.add_argument("--config", help="gateway YAML (default: built from OPENAI_* env vars, else the demo)")
    run.add_argument("--envoy-log-level", default="warn", help="Envoy's --log-level (default warn)")
    run.add_argument("--port", type=int, help="Envoy listener port (default from config: 1975)")
    run.add_argument("--envoy-admin-port", type=int, help="Envoy admin port (default 9901)")
    run.add_argument("--processor-port", type=int, help="processor gRPC port on 127.0.0.1 (default 1063)")
    run.add_argument("--processor-admin-port", type=int, help="processor admin HTTP port (default 1064)")
    run.add_argument("--workers", type=int, help="processor processes (default from config; 0 = one per core)")
    run.add_argument("--demo-port", type=int, default=DEMO_PORT, help="port of the built-in demo backend (default 1976)")
    run.set_defaults(func=cmd_run)

    render = sub.add_parser("envoy-config", help="print the Envoy config for a gateway config")
    source = render.add_mutually_exclusive_group()
    source.add_argument("--config", help="gateway YAML (default: built from the environment)")
    source.add_argument("--demo", action="store_true", help="render the built-in demo config (envoy/envoy.yaml)")
    render.add_argument("--fragment", action="store_true", help="only the filter, route and cluster pieces")
    render.add_argument("--ca-file", default=envoyconfig.DEFAULT_CA_FILE, help="CA bundle for https backends")
    render.add_argument("--workers", type=int, help="processor workers to spread streams over (default from config)")
    render.add_argument("-o", "--output", help="write to this file instead of stdout")
    render.set_defaults(func=cmd_envoy_config)

    limits = sub.add_parser("ratelimit-config", help="print the budgets as an envoyproxy/ratelimit config file")
    limits.add_argument("--config", help="gateway YAML (default: built from the environment)")
    limits.add_argument("-o", "--output", help="write to this file instead of stdout")
    limits.set_defaults(func=cmd_ratelimit_config)

    check = sub.add_parser("check", help="validate a gateway config file")
    check.add_argument("file")
    check.add_argument("--skip-secrets", action="store_true", help="do not resolve credential env vars/files")
    check.set_defaults(func=cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"extproc: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
