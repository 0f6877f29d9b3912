"""``sidecar aggregate`` and ``sidecar replay`` (registered by ``sidecar.cli.build_parser``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

import msgspec

from ..config import SidecarConfig, load_config
from ..runtime import prepare_process

log = logging.getLogger("sidecar.aggregate")


def _config(args: argparse.Namespace) -> SidecarConfig:
    cfg = load_config(args.config)
    if getattr(args, "dry_run", False):
        cfg = msgspec.structs.replace(
            cfg, aggregate=msgspec.structs.replace(cfg.aggregate, dry_run=True)
        )
    return cfg


def cmd_aggregate(args: argparse.Namespace) -> int:
    from ..logs import setup_logging

    cfg = _config(args)
    setup_logging(cfg.logging.level, cfg.logging.format)
    prepare_process()
    asyncio.run(_aggregate(cfg, args.create_topics))
    return 0


async def _aggregate(cfg: SidecarConfig, create_topics: bool) -> None:
    from ..health import run_while_serving
    from ..kafka import ensure_config_topics
    from .service import AggregatorService

    if create_topics:
        created = await ensure_config_topics(cfg)
        if created:
            log.info("created topics: %s", ", ".join(created))
    service = AggregatorService(cfg)
    server = service.metrics.serve(
        cfg.aggregate.metrics_port, cfg.metrics.host, health=service.health
    )
    await run_while_serving(service.run(install_signal_handlers=True), server, service.request_stop)
    log.info("aggregator stopped after %d comparisons", service.consumed)


def cmd_replay(args: argparse.Namespace) -> int:
    from .replay import check_range, format_result, parse_bound, run_replay

    try:
        start = parse_bound(args.from_) if args.from_ is not None else None
        end = parse_bound(args.to) if args.to is not None else None
        check_range(start, end)
    except ValueError as exc:
        print(f"sidecar replay: error: {exc}", file=sys.stderr)
        return 2
    cfg = _config(args)
    result = run_replay(cfg, start, end, idle_s=args.idle)
    print(format_result(result))
    return 0


def add_aggregate_parsers(sub: Any) -> None:
    """Add the ``aggregate`` and ``replay`` subcommands to ``sidecar``'s subparsers."""
    p = sub.add_parser(
        "aggregate",
        help="window the comparisons, publish reports, and roll a bad candidate back",
        description="Consume the comparisons topic in a consumer group (aggregate.group_id), "
        "close event-time windows into reports on aggregate.reports_topic, evaluate the guard "
        "rules, and publish rollback/pause commands to the control topic, signed with the key "
        "of role guard in aggregate.signing_key_file. Prometheus on aggregate.metrics_port.",
    )
    p.add_argument("--config", help="TOML config file (settings may also come from the env)")
    p.add_argument(
        "--dry-run", action="store_true", help="log reports and commands, publish nothing"
    )
    p.add_argument(
        "--create-topics",
        action="store_true",
        help="create the topics the config names if missing (reports, partials, late, ...)",
    )
    p.set_defaults(func=cmd_aggregate)

    p = sub.add_parser(
        "replay",
        help="replay a range of the comparisons topic through windows and guards (no writes)",
        description="Read a range of the comparisons topic (no consumer group), run the "
        "windows and guard rules of the config, and print when each guard would have fired "
        "and every window's key figures. Publishes nothing. Bounds: 'offset:N' (same offset "
        "on every partition), epoch milliseconds, or ISO-8601 (UTC if no zone); times select "
        "by Kafka record timestamp. The range is [from, to).",
    )
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--from", dest="from_", metavar="BOUND", help="start (default: the beginning)")
    p.add_argument("--to", metavar="BOUND", help="end, exclusive (default: until idle)")
    p.add_argument(
        "--idle",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="stop once no record arrived for this long (default 2)",
    )
    p.set_defaults(func=cmd_replay)


__all__ = ["add_aggregate_parsers", "cmd_aggregate", "cmd_replay"]
