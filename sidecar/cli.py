"""The ``sidecar`` command line: broker, run, produce, schemas, config (and the commands the
subpackages add: ctl, aggregate, replay, outcomes, demo, report, contract)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec

from . import __version__
from .config import SidecarConfig, load_config
from .errors import ConfigError, SidecarError
from .reference import settings_text
from .runtime import prepare_process

log = logging.getLogger("sidecar")


def _config(args: argparse.Namespace) -> SidecarConfig:
    return load_config(args.config)


# -- broker -------------------------------------------------------------------------------


def cmd_broker(args: argparse.Namespace) -> int:
    from .broker import EmbeddedBroker

    cfg = load_config(args.config) if args.config else None
    with EmbeddedBroker(port=args.port, log_path=args.log, port_flag="--port") as broker:
        print(f"embedded broker (Tansu) on {broker.bootstrap_servers}", flush=True)
        if cfg is not None:
            from .kafka import ensure_config_topics

            kafka_cfg = msgspec.structs.replace(
                cfg.kafka, bootstrap_servers=broker.bootstrap_servers
            )
            created = asyncio.run(
                ensure_config_topics(msgspec.structs.replace(cfg, kafka=kafka_cfg))
            )
            print(f"topics created: {', '.join(created) or 'none (all existed)'}", flush=True)
        print(
            "note: this broker keeps producer-chosen record times, so configs that use it "
            "need control.allow_create_time = true (README: Control-plane security)",
            flush=True,
        )
        print("Ctrl-C stops it.", flush=True)
        _wait_for_signal(broker)
    return 0


def _wait_for_signal(broker: Any) -> None:
    stop = False

    def handler(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not stop:
        if broker.process is None or broker.process.poll() is not None:
            raise SidecarError("the embedded broker exited unexpectedly")
        time.sleep(0.2)
    print("stopping the broker", flush=True)


# -- run ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _maybe_embedded(args: argparse.Namespace, cfg: SidecarConfig) -> Iterator[SidecarConfig]:
    if not args.embedded_broker:
        yield cfg
        return
    from .broker import EmbeddedBroker

    with EmbeddedBroker(port=args.broker_port, port_flag="--broker-port") as broker:
        log.info(
            "started the embedded broker on %s (it keeps producer-chosen record times, so "
            "control.allow_create_time is on)",
            broker.bootstrap_servers,
        )
        yield msgspec.structs.replace(
            cfg,
            kafka=msgspec.structs.replace(cfg.kafka, bootstrap_servers=broker.bootstrap_servers),
            control=msgspec.structs.replace(cfg.control, allow_create_time=True),
        )


def cmd_run(args: argparse.Namespace) -> int:
    from .logs import setup_logging

    cfg = _config(args)
    setup_logging(cfg.logging.level, cfg.logging.format)
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    from .workers import default_workers

    workers = args.workers or default_workers()
    with _maybe_embedded(args, cfg) as cfg:
        if workers > 1:
            return _run_workers(cfg, args, workers)
        from .workers import die_with_parent

        die_with_parent()  # a worker of `--workers N`: stops with its supervisor
        prepare_process()
        asyncio.run(_run(cfg, args))
    return 0


def _run_workers(cfg: SidecarConfig, args: argparse.Namespace, count: int) -> int:
    """``count`` worker processes of one consumer group (see ``sidecar.workers``)."""
    import os

    from .models.contract import check_startup, model_manifest
    from .tracing import check_tracing
    from .workers import WorkerSupervisor, spawn_worker, worker_command, worker_env

    # What would stop every worker at start stops the command before any starts.
    check_tracing(cfg.tracing)
    cand = cfg.models.candidate
    check_startup(cfg, model_manifest(cfg.models.champion), model_manifest(cand) if cand else None)
    if args.create_topics or args.embedded_broker:
        from .kafka import ensure_config_topics

        created = asyncio.run(ensure_config_topics(cfg))
        if created:
            log.info("created topics: %s", ", ".join(created))
    bootstrap = cfg.kafka.bootstrap_servers if args.embedded_broker else None
    log.info(
        "starting %d workers in consumer group %s (metrics on %s)",
        count,
        cfg.kafka.group_id,
        f"ports {cfg.metrics.port}-{cfg.metrics.port + count - 1}"
        if cfg.metrics.port
        else "no port (metrics.port = 0)",
    )
    supervisor = WorkerSupervisor(
        count,
        lambda i: spawn_worker(
            worker_command(args.config, args.example_traffic, i),
            worker_env(dict(os.environ), cfg.metrics.port, i, bootstrap),
        ),
        stop_timeout_s=cfg.pipeline.drain_timeout_s + 15,
    )
    return supervisor.run()


async def _run(cfg: SidecarConfig, args: argparse.Namespace) -> None:
    from .runner import Sidecar

    if args.create_topics or args.embedded_broker:
        from .kafka import ensure_config_topics

        created = await ensure_config_topics(cfg)
        if created:
            log.info("created topics: %s", ", ".join(created))
    from .progress import progress_task

    sidecar = Sidecar(cfg)
    try:
        sidecar.http_server = sidecar.metrics.serve(
            cfg.metrics.port, cfg.metrics.host, health=sidecar.health
        )
    except SidecarError:
        sidecar.close_models()
        raise
    traffic = None
    if args.example_traffic:
        from .traffic import produce_forever

        traffic = asyncio.create_task(produce_forever(cfg, rate=args.example_traffic))
    try:
        async with progress_task(sidecar, cfg.logging.progress_interval_s):
            await sidecar.run(install_signal_handlers=True)
    finally:
        if traffic is not None:
            traffic.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await traffic
        sidecar.close_models()
    log.info("stopped after %d records", sidecar.processed)


# -- produce ------------------------------------------------------------------------------


def cmd_produce(args: argparse.Namespace) -> int:
    from .traffic import produce_count

    cfg = _config(args)
    sent = asyncio.run(produce_count(cfg, args.count, seed=args.seed, rate=args.rate))
    print(f"produced {sent} requests to {cfg.topics.requests}")
    return 0


# -- schemas ------------------------------------------------------------------------------


def cmd_schemas(args: argparse.Namespace) -> int:
    from . import schemas

    if args.config:
        return _version_schemas(args)
    directory = Path(args.dir) if args.dir else schemas.default_dir()
    if args.write:
        for path in schemas.write(directory):
            print(f"wrote {path}")
        return 0
    problems = schemas.stale(directory)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print("run `sidecar schemas --write` to regenerate them", file=sys.stderr)
        return 1
    print(f"schemas in {directory} are current")
    return 0


def _version_schemas(args: argparse.Namespace) -> int:
    """``sidecar schemas --config FILE``: the schema of each output version the config
    serves (``outputs.schema_dir``, or ``--dir``)."""
    from .outputs import schemas as outputs

    cfg = load_config(args.config)
    if cfg.outputs.api_version is None:
        print(f"{args.config} declares no output versions (outputs.api_version)", file=sys.stderr)
        return 1
    directory = Path(args.dir) if args.dir else None
    if args.write:
        for path in outputs.write(cfg, directory):
            print(f"wrote {path}")
        return 0
    problems = outputs.stale(cfg, directory)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(
            f"run `sidecar schemas --config {args.config} --write` to regenerate them",
            file=sys.stderr,
        )
        return 1
    print(f"output version schemas of {args.config} are current")
    return 0


# -- parser -------------------------------------------------------------------------------


# -- config -------------------------------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> int:
    if args.config:
        cfg = load_config(args.config)
        cand = cfg.models.candidate
        print(
            f"{args.config}: valid (with the SIDECAR_* environment applied): champion "
            f"{cfg.models.champion.name}@{cfg.models.champion.version}, candidate "
            + (f"{cand.name}@{cand.version}" if cand else "none")
            + f", rollout {cfg.rollout.name} in {cfg.rollout.mode.value}, brokers "
            f"{cfg.kafka.bootstrap_servers}"
        )
        return 0
    text = settings_text(args.word or "")
    if not text:
        print(f"no setting matches {args.word!r}", file=sys.stderr)
        return 1
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description="Kafka streaming sidecar for safe ML model rollouts (shadow, canary, "
        "ramp, promote, rollback).",
    )
    parser.add_argument("--version", action="version", version=f"sidecar {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "broker",
        help="start the embedded Kafka-compatible broker (Tansu) in the foreground",
        description="Start the embedded broker (Tansu, in-memory) on loopback, wait until it "
        "answers, create the topics a config names, and run until Ctrl-C.",
    )
    p.add_argument("--port", type=int, default=9092, help="port to listen on (default 9092)")
    p.add_argument("--config", help="create the topics this config names")
    p.add_argument("--log", type=Path, help="append the broker's own output to this file")
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser(
        "run",
        help="consume requests, score champion and candidate, produce decisions",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Consume the requests topic, score every request with the champion and "
        "the candidate, produce decisions, comparisons and dead letters; commit offsets only "
        "after every output is acknowledged. SIGTERM/SIGINT drain, commit and exit 0.",
        epilog="Settings come from the TOML file and SIDECAR_<SECTION>__<KEY> environment\n"
        "variables (the environment wins; KAFKA_BOOTSTRAP_SERVERS sets kafka.bootstrap_servers).\n"
        "Every setting with its variable and default: `sidecar config` (`sidecar config\n"
        "rollout` shows those containing 'rollout'), or the README's Configuration table.\n"
        "Check a config without starting anything: `sidecar config --config FILE`.",
    )
    p.add_argument(
        "--config",
        help="TOML config file, e.g. examples/sidecar.toml (settings may also come from the "
        "environment)",
    )
    p.add_argument(
        "--embedded-broker",
        action="store_true",
        help="start the embedded broker first and use it (creates the topics)",
    )
    p.add_argument(
        "--broker-port", type=int, default=9092, help="port of the embedded broker (default 9092)"
    )
    p.add_argument(
        "--create-topics", action="store_true", help="create missing topics before starting"
    )
    p.add_argument(
        "--example-traffic",
        type=float,
        metavar="PER_SECOND",
        default=0.0,
        help="also produce generated card transactions at this rate (for trying it out)",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        default=None,
        help="worker processes of the consumer group, under one supervisor that forwards "
        "SIGTERM and restarts a crashed worker (default: the number of cores); worker i "
        "serves metrics and health on metrics.port + i. Use 1 where an orchestrator runs "
        "one instance per container",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "produce",
        help="produce generated example requests (card transactions) to the requests topic",
        description="Produce seeded synthetic card-transaction requests to the requests topic.",
    )
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--count", type=int, default=10_000, help="requests to produce (10000)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (0)")
    p.add_argument(
        "--rate", type=float, default=0.0, help="requests per second (0: as fast as possible)"
    )
    p.set_defaults(func=cmd_produce)

    p = sub.add_parser(
        "schemas",
        help="check (default) or write the JSON Schema files of the wire contracts",
        description="Check that the JSON Schema files (schemas/*.json, shipped in the package) "
        "match the msgspec contracts, or regenerate them. With --config: the schema of each "
        "output version the config serves (decision.<version>.json in outputs.schema_dir).",
    )
    p.add_argument("--write", action="store_true", help="regenerate the files")
    p.add_argument(
        "--config", help="check (or write) the output versions' schemas of this config instead"
    )
    p.add_argument(
        "--dir",
        help="schema directory (default: the installed package's, which the repository's "
        "schemas/ links to)",
    )
    p.set_defaults(func=cmd_schemas)

    from .control.cli import add_ctl_parser

    add_ctl_parser(sub)
    p = sub.add_parser(
        "config",
        help="list every setting with its environment variable and default, or check a config",
        description="Without --config: list every setting (TOML key, environment variable, "
        "default; choices in parentheses), optionally only those containing WORD. With "
        "--config: load and validate the file with the SIDECAR_* environment applied, and "
        "exit 1 with the reason when it is invalid.",
    )
    p.add_argument("word", nargs="?", metavar="WORD", help="show only settings containing it")
    p.add_argument("--config", help="validate this TOML file (and the environment)")
    p.set_defaults(func=cmd_config)

    from .aggregate.cli import add_aggregate_parsers

    add_aggregate_parsers(sub)

    from .outcomes.cli import add_outcomes_parser

    add_outcomes_parser(sub)

    from .demo.cli import add_demo_parser
    from .report.cli import add_report_parser

    add_demo_parser(sub)
    add_report_parser(sub)

    from .contract_cli import add_contract_parser

    add_contract_parser(sub)

    from .outputs.cli import add_deprecations_parser

    add_deprecations_parser(sub)

    from .registry_cli import add_registry_parser

    add_registry_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code: int = args.func(args)
    except SidecarError as exc:
        print(f"sidecar {args.command}: error: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    exit_past_hung_model_calls(code)
    return code


def exit_past_hung_model_calls(code: int) -> None:
    """Exit now when a model call still runs (a hung model): Python joins the model's pool
    threads at exit, so a stopped sidecar would wait for the call to return -- for ever when
    it never does -- until the orchestrator's SIGKILL. Everything that matters is done by
    then (outputs acknowledged, offsets committed, clients closed)."""
    import os
    import threading

    stuck = [t.name for t in threading.enumerate() if t.name.startswith("model-") and t.is_alive()]
    if not stuck:
        return
    log.warning(
        "model call(s) still running in %s (a hung model?); exiting without waiting for them",
        ", ".join(stuck),
    )
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
