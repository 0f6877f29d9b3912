"""``sidecar report --from ... --to ... --out report.html`` (or ``--input recorded.jsonl``)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import msgspec

from ..errors import ConfigError, SidecarError


def _bound(text: str | None, flag: str) -> int | None:
    if text is None:
        return None
    from ..aggregate.replay import parse_bound

    try:
        bound = parse_bound(text)
    except ValueError as exc:
        raise ConfigError(f"{flag} {exc}") from None
    if bound.kind != "time":
        raise ConfigError(f"{flag} {text!r}: the report selects by time (ISO-8601 or epoch ms)")
    return bound.value


def cmd_report(args: argparse.Namespace) -> int:
    from .model import read_jsonl, write_jsonl
    from .page import render_page

    start, end = _bound(args.from_, "--from"), _bound(args.to, "--to")
    if start is not None and end is not None and end <= start:
        raise ConfigError("--to must be after --from")
    if args.input:
        rec = read_jsonl(args.input).between(start, end)
        source = args.input
    else:
        if not args.config and not args.bootstrap:
            raise ConfigError(
                "nothing to read: pass --input recorded.jsonl, or --config (and/or --bootstrap) "
                "to read the reports and control topics from a broker"
            )
        from ..config import load_config
        from .source import read_recording

        cfg = load_config(args.config)
        if args.bootstrap:
            cfg = msgspec.structs.replace(
                cfg, kafka=msgspec.structs.replace(cfg.kafka, bootstrap_servers=args.bootstrap)
            )
        result = asyncio.run(read_recording(cfg, start, end, idle_s=args.idle))
        rec = result.recording
        source = (
            f"{cfg.kafka.bootstrap_servers} ({cfg.aggregate.reports_topic}, {cfg.topics.control})"
        )
        if result.skipped:
            print(f"skipped {result.skipped} undecodable records", file=sys.stderr)
        if args.record:
            write_jsonl(rec, args.record)
            print(f"recorded what was read to {args.record}")
    if args.rollout:
        rec = rec.only_rollouts(args.rollout)
    if not rec.reports and not rec.commands:
        raise SidecarError(f"no window reports and no control commands in {source} in that range")
    html = render_page(rec, title=args.title)
    out = Path(args.out)
    try:
        out.write_text(html, encoding="utf-8")
    except OSError as exc:
        raise SidecarError(f"cannot write {str(out)!r}: {exc.strerror}") from None
    print(
        f"wrote {out} ({len(html) // 1024} kB): {len(rec.reports)} window reports, "
        f"{len(rec.commands)} control commands from {source}"
    )
    return 0


def add_report_parser(sub: Any) -> None:
    """Add ``sidecar report`` to the top-level subparsers ``sub``."""
    p = sub.add_parser(
        "report",
        help="write one self-contained HTML page (plots) of a rollout for analysts",
        description="Read the aggregator's window reports and the control (and audit) topics "
        "from a broker between --from and --to, or a recorded JSONL file (--input, which "
        "`sidecar demo` writes), and write one HTML page that works offline: decision rates, "
        "their ratio against its guard, PSI/JS/KS, latency percentiles, disagreement, error "
        "rates, the routing share with every control command (who, why) on the time axis, "
        "and the evidence behind every rollback or pause the aggregator issued.",
    )
    p.add_argument("--input", metavar="JSONL", help="a recorded file instead of a broker")
    p.add_argument("--config", help="TOML config: topics, Kafka settings and guard rules")
    p.add_argument("--bootstrap", help="broker host:port (overrides the config's)")
    p.add_argument("--from", dest="from_", metavar="TIME", help="start: ISO-8601 or epoch ms")
    p.add_argument("--to", metavar="TIME", help="end, exclusive: ISO-8601 or epoch ms")
    p.add_argument("--out", default="report.html", help="HTML file to write (report.html)")
    p.add_argument(
        "--rollout", action="append", help="only this rollout (repeat for several; default all)"
    )
    p.add_argument("--title", help="page title")
    p.add_argument(
        "--record", metavar="JSONL", help="also save what was read from the broker, for later"
    )
    p.add_argument(
        "--idle",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="stop reading a topic once nothing arrived for this long (default 1)",
    )
    p.set_defaults(func=cmd_report)


__all__ = ["add_report_parser", "cmd_report"]
