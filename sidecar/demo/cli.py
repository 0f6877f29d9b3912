"""``sidecar demo [--scenario flags|errors|latency|benign|recommend] [--duration S] [--rate R]``."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .scenarios import SCENARIO_HELP, SCENARIOS

MIGRATE_HELP = (
    "a MAJOR candidate is promoted while a v1 consumer keeps working through the adapter, "
    "gets its deprecation notice, migrates to v2, and v1 is sunset (refused while it still "
    "read v1)"
)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.scenario == "migrate":
        import sys

        from .migrate import run_migrate

        rate = args.rate if args.rate is not None else 300.0
        if not 50 <= rate <= 5_000:
            raise ConfigError("--rate must be between 50 and 5000 for the migrate scenario")
        outcome = asyncio.run(run_migrate(sys.stdout, rate, args.broker_port, Path(args.out_dir)))
        print(outcome.summary, flush=True)
        return 0 if outcome.ok else 1
    from .run import DemoOptions, run_demo

    duration = 35.0 if args.quick and args.duration is None else (args.duration or 90.0)
    rate = args.rate if args.rate is not None else (1500.0 if args.quick else 1000.0)
    if duration < 20:
        raise ConfigError("--duration must be at least 20 seconds")
    if not 200 <= rate <= 20_000:
        raise ConfigError("--rate must be between 200 and 20000 requests per second")
    if not 0.001 <= args.fraud_rate <= 0.5:
        raise ConfigError("--fraud-rate must be between 0.001 and 0.5")
    live = None if args.live == "auto" else args.live == "panel"
    opts = DemoOptions(
        scenario=args.scenario,
        duration_s=duration,
        rate=rate,
        fraud_rate=args.fraud_rate,
        flag_ratio=args.flag_ratio,
        flag_shift=args.flag_shift,
        seed=args.seed,
        out_dir=Path(args.out_dir),
        live=live,
        broker_port=args.broker_port,
    )
    result = asyncio.run(run_demo(opts))
    print(result.summary, flush=True)
    return 0 if result.ok else 1


def add_demo_parser(sub: Any) -> None:
    """Add ``sidecar demo`` to the top-level subparsers ``sub``."""
    scenarios = "; ".join(f"{name}: {SCENARIO_HELP[name]}" for name in SCENARIOS)
    scenarios += f"; migrate: {MIGRATE_HELP}"
    p = sub.add_parser(
        "demo",
        help="the rollout story end to end on the embedded broker, with a live view and a report",
        description="Start the embedded broker, two sidecar instances, the aggregator and a "
        "generator of card transactions (recommend: recommendation requests), all in this "
        "process, and tell one rollout story: "
        "which candidate is deployed, what the aggregator sees window by window, and what it "
        "does about it. Operator commands go through the same code as `sidecar ctl`, signed "
        "with a key generated for the run; guard actions are the aggregator's own. At the end "
        "a summary is printed and OUT_DIR gets report.html, recorded.jsonl (for `sidecar "
        f"report --input`) and demo.log. Scenarios: {scenarios}. Exit code 0 when the story "
        "went as told, 1 otherwise.",
    )
    p.add_argument(
        "--scenario", choices=(*SCENARIOS, "migrate"), default="flags", help="the story (flags)"
    )
    p.add_argument("--duration", type=float, help="target length in seconds (90; 35 with --quick)")
    p.add_argument(
        "--rate",
        type=float,
        help="requests (card transactions or recommendation requests) per second (1000; "
        "1500 with --quick)",
    )
    p.add_argument(
        "--quick", action="store_true", help="a short run (2 s windows, ~40 s): for tests and CI"
    )
    p.add_argument(
        "--fraud-rate", type=float, default=0.02, help="share of fraudulent transactions (0.02)"
    )
    p.add_argument(
        "--flag-ratio",
        type=float,
        default=2.0,
        help="flags scenario: how many times as often the bad candidate flags at the shared "
        "threshold (2.0; sets its score shift)",
    )
    p.add_argument(
        "--flag-shift",
        type=float,
        help="flags scenario: the bad candidate's score shift in logit units (overrides "
        "--flag-ratio)",
    )
    p.add_argument("--seed", type=int, default=0, help="traffic generator seed (0)")
    p.add_argument(
        "--out-dir", default="sidecar-demo", help="where the report, recording and logs go"
    )
    p.add_argument(
        "--live",
        choices=("auto", "panel", "lines"),
        default="auto",
        help="terminal view: a refreshing panel, a line per update, or auto (panel on a TTY)",
    )
    p.add_argument(
        "--broker-port", type=int, default=0, help="embedded broker port (0: any free port)"
    )
    p.set_defaults(func=cmd_demo)


__all__ = ["add_demo_parser", "cmd_demo"]
