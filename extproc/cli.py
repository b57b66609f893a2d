"""Command line: `extproc serve | run | envoy-config | ratelimit-config | keys | check`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any
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
    store = config.tenancy.key_store if config.tenancy is not None else None
    if store is not None and store.file is not None:
        from extproc.keys.file_store import read_records

        records = read_records(Path(store.file))  # every record checked: KeyStoreError names the bad one
        if len({r.digest for r in records}) != len(records):
            raise ConfigError(f"{store.file}: a key is stored twice (the later record would win)")
        print(f"{store.file}: OK ({len(records)} key record(s))")
    return 0


def _key_editor(args: argparse.Namespace) -> Any:
    from extproc.keys.manage import FileKeyEditor
    from extproc.keys.redis_store import RedisKeyEditor

    if args.file is not None:
        return FileKeyEditor(Path(args.file))
    if args.redis is not None:
        return RedisKeyEditor(args.redis, args.prefix)
    tenancy = load_config(args.config, with_secrets=False).config.tenancy
    settings = tenancy.key_store if tenancy is not None else None
    if settings is None:
        raise ConfigError(f"{args.config}: no tenancy.key_store to manage")
    if settings.file is not None:
        return FileKeyEditor(Path(settings.file))
    assert settings.redis is not None
    return RedisKeyEditor(settings.redis.url, settings.redis.prefix)


def _expiry(args: argparse.Namespace, now: float) -> float | None:
    """--expires (ISO 8601 date/time, UTC unless it says otherwise) or --expires-in (30d, 12h, 90m)."""
    from datetime import UTC, datetime

    if args.expires_in:
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
        text = args.expires_in.strip()
        if len(text) < 2 or text[-1] not in units or not text[:-1].isdigit():
            raise ConfigError("--expires-in must be a number with s, m, h or d, e.g. 30d")
        return now + int(text[:-1]) * units[text[-1]]
    if args.expires:
        try:
            when = datetime.fromisoformat(args.expires)
        except ValueError:
            raise ConfigError("--expires must be an ISO 8601 date or date-time, e.g. 2027-01-31T00:00:00Z") from None
        return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    return None


def cmd_keys(args: argparse.Namespace) -> int:
    """Manage the key store: a new key is printed once (standard output), only its digest is kept."""
    import time

    from redis.exceptions import RedisError

    try:
        return _keys_action(args, _key_editor(args), time.time())
    except RedisError as exc:  # the message names the host, never the URL's password
        raise ConfigError(f"the Redis key store did not answer: {type(exc).__name__}: {exc}") from None


def _keys_action(args: argparse.Namespace, editor: Any, now: float) -> int:
    from extproc.keys import manage

    if args.action == "add":
        key = sys.stdin.readline() if args.stdin else None
        made = manage.add(editor, args.tenant, now, entry_id=args.id, key=key, expires_at=_expiry(args, now),
                          models=tuple(args.model) if args.model else None,
                          tools=tuple(args.tool) if args.tool else None)
        print(f"added key {made.record.id} for tenant {made.record.tenant}", file=sys.stderr)
        if not args.stdin:
            print(made.key)
    elif args.action == "rotate":
        made = manage.rotate(editor, args.id, now, args.grace)
        until = "now" if not args.grace else f"in {args.grace:g}s"
        print(f"rotated key {made.record.id}: the previous key stops working {until}", file=sys.stderr)
        print(made.key)
    elif args.action == "revoke":
        count = manage.revoke(editor, args.id, now)
        print(f"revoked {count} key(s) of {args.id}", file=sys.stderr)
    else:
        records = editor.records()
        if args.json:
            sys.stdout.buffer.write(manage.listing_json(records, now))
        else:
            _print_listing(manage.listing(records, now))
    return 0


def _print_listing(rows: list[dict[str, Any]]) -> None:
    from datetime import UTC, datetime

    def when(value: Any) -> str:
        return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else "-"

    print(f"{'ID':<24} {'TENANT':<20} {'STATE':<9} {'DIGEST':<13} {'EXPIRES':<21} REVOKED")
    for row in rows:
        print(f"{row['id']:<24} {row['tenant']:<20} {row['state']:<9} {row['digest']:<13} "
              f"{when(row['expires_at']):<21} {when(row['revoked_at'])}")


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

    keys = sub.add_parser("keys", help="manage client API keys in the key store (file or Redis)")
    actions = keys.add_subparsers(dest="action", required=True)
    store = argparse.ArgumentParser(add_help=False)
    where = store.add_mutually_exclusive_group(required=True)
    where.add_argument("--file", help="the JSON-lines key store file (tenancy.key_store.file)")
    where.add_argument("--redis", help="redis://host:port/db of the key store (tenancy.key_store.redis.url)")
    where.add_argument("--config", help="the gateway YAML whose tenancy.key_store to manage")
    store.add_argument("--prefix", default="extproc:keys:", help="Redis key prefix (default extproc:keys:)")
    add = actions.add_parser("add", parents=[store], help="make a key for a tenant; prints it once")
    add.add_argument("--tenant", required=True)
    add.add_argument("--id", help="entry id for list/revoke/rotate (default: generated)")
    add.add_argument("--stdin", action="store_true", help="store the key read from standard input instead")
    expiry = add.add_mutually_exclusive_group()
    expiry.add_argument("--expires", help="ISO 8601 date or date-time (UTC unless an offset is given)")
    expiry.add_argument("--expires-in", help="e.g. 30d, 12h, 90m")
    add.add_argument("--model", action="append", help="allowed model glob (repeat); default: the tenant's policy")
    add.add_argument("--tool", action="append", help="allowed MCP tool glob <server>__<tool> (repeat)")
    rotate = actions.add_parser("rotate", parents=[store], help="new key for an entry; prints it once")
    rotate.add_argument("id")
    rotate.add_argument("--grace", type=float, default=0.0, help="seconds the previous key keeps working (default 0)")
    revoke = actions.add_parser("revoke", parents=[store], help="refuse an entry's keys from now on")
    revoke.add_argument("id")
    listing = actions.add_parser("list", parents=[store], help="ids, tenants, states and expiry (never keys)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    keys.set_defaults(func=cmd_keys)

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
