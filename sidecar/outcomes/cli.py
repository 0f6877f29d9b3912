"""``sidecar outcomes run`` (the join stage) and ``sidecar outcomes status`` (the latest quality
verdict of each rollout and what its gate says)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from typing import Any

import msgspec

from ..config import SidecarConfig, load_config
from ..runtime import limit_malloc_arenas, prepare_process

log = logging.getLogger("sidecar.outcomes")


def _config(args: argparse.Namespace) -> SidecarConfig:
    cfg = load_config(args.config)
    if getattr(args, "dry_run", False):
        cfg = msgspec.structs.replace(
            cfg, outcomes=msgspec.structs.replace(cfg.outcomes, dry_run=True)
        )
    return cfg


def cmd_outcomes_run(args: argparse.Namespace) -> int:
    from ..logs import setup_logging

    cfg = _config(args)
    setup_logging(cfg.logging.level, cfg.logging.format)
    limit_malloc_arenas()  # RocksDB's threads: keep the resident size flat
    prepare_process()
    asyncio.run(_run(cfg, args.create_topics))
    return 0


async def _run(cfg: SidecarConfig, create_topics: bool) -> None:
    from ..health import run_while_serving
    from ..kafka import ensure_config_topics
    from .service import OutcomesService

    if create_topics:
        created = await ensure_config_topics(cfg)
        if created:
            log.info("created topics: %s", ", ".join(created))
    service = OutcomesService(cfg)
    server = service.metrics.serve(
        cfg.outcomes.metrics_port, cfg.metrics.host, health=service.health
    )
    await run_while_serving(service.run(install_signal_handlers=True), server, service.request_stop)
    log.info("outcomes stage stopped")


def cmd_outcomes_status(args: argparse.Namespace) -> int:
    from .status import read_verdicts, render_status

    cfg = _config(args)
    verdicts, skipped = asyncio.run(read_verdicts(cfg, idle_s=args.idle))
    if args.rollout:
        verdicts = {k: v for k, v in verdicts.items() if k == args.rollout}
    print(render_status(verdicts, skipped, cfg, now_ms=time.time_ns() // 1_000_000))
    return 0 if verdicts else 3


def add_outcomes_parser(sub: Any) -> None:
    """Add ``sidecar outcomes run|status`` to ``sidecar``'s subparsers."""
    p = sub.add_parser(
        "outcomes",
        help="join delayed outcomes with the comparisons and judge whether the candidate is "
        "better (run), or show each rollout's quality verdict (status)",
        description="Ground truth for the rollouts: `run` joins the comparisons topic with "
        "the outcomes topic (outcomes.topic) by request id within each rollout's label window, "
        "keeps the join's state in RocksDB (outcomes.state_dir) with a compacted changelog, "
        "and publishes quality reports (outcomes.quality_topic), verdicts "
        "(outcomes.verdicts_topic) and, from quality guard rules, signed rollback/pause "
        "commands. `status` prints the latest verdict of each rollout and its gate.",
    )
    commands = p.add_subparsers(dest="outcomes_command", metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="run the join stage",
        description="Run the join stage until SIGTERM/SIGINT. Prometheus, /healthz and /readyz "
        "on outcomes.metrics_port.",
    )
    run.add_argument("--config", help="TOML config file (settings may also come from the env)")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="log reports, verdicts and commands instead of publishing them (the changelog "
        "is still written: it is the stage's state)",
    )
    run.add_argument(
        "--create-topics",
        action="store_true",
        help="create the topics the config names if missing (outcomes, quality, verdicts, ...)",
    )
    run.set_defaults(func=cmd_outcomes_run)
    status = commands.add_parser(
        "status",
        help="print each rollout's latest quality verdict and whether its gate is met",
        description="Read the verdicts topic (no consumer group) and print, per rollout, the "
        "latest verdict: judged pairs, label coverage, each metric's difference and standard "
        "error, and the non-inferiority gate's decision with its reason. Exit 0 when there "
        "is a verdict, 3 when there is none yet.",
    )
    status.add_argument("--config", help="TOML config file")
    status.add_argument("--rollout", help="only this rollout")
    status.add_argument(
        "--idle",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="stop reading once nothing arrived for this long (default 1)",
    )
    status.set_defaults(func=cmd_outcomes_status)

    def no_command(args: argparse.Namespace) -> int:
        p.print_help(sys.stderr)
        return 2

    p.set_defaults(func=no_command)


__all__ = ["add_outcomes_parser"]
