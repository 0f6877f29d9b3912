"""``sidecar ctl``: the operator's CLI for the control topic.

Every mutating subcommand signs a command with the operator's key, produces it to partition 0
of the control topic, and then waits until every *live* instance (one whose heartbeat on the
status topic is younger than 3 heartbeat intervals) has applied it -- shown by its audit
record or its heartbeat -- or one instance has rejected it.

Exit codes: 0 applied everywhere (or no live instance to wait for), 1 rejected (the audit's
reason is printed) or a configuration/broker error, 2 timed out (the instances that have not
reported are named).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from ..config import SidecarConfig, load_config
from ..errors import ConfigError, SidecarError
from ..kafka import (
    ensure_control_topics,
    new_consumer,
    new_producer,
    read_until_idle,
    seek_since,
    stop_quietly,
    topic_partitions,
)
from ..timefmt import humanise
from ..untrusted import decoded_or_none, printable
from .commands import (
    Action,
    CommandArgs,
    ControlCommand,
    Duplicate,
    Keyring,
    decode_command,
    encode_command,
    format_ramp_plan,
    parse_ramp_plan,
    parse_share,
)
from .plane import (
    CONTROL_PARTITION,
    configured_state,
    control_config,
    is_barrier,
    load_keyring,
    now_ms,
)
from .state_machine import (
    Applied,
    AuditRecord,
    InstanceStatus,
    ModelHealth,
    Outcome,
    RolloutState,
    replay,
)

#: An instance is live while its last heartbeat is younger than this many intervals.
STALE_HEARTBEATS = 3
EXIT_OK, EXIT_REJECTED, EXIT_TIMEOUT = 0, 1, 2


def default_issuer() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no user name in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def build_command(
    action: Action,
    rollout: str,
    *,
    issued_by: str,
    reason: str | None = None,
    share_bp: int | None = None,
    plan: str | None = None,
    expected_epoch: int | None = None,
) -> ControlCommand:
    """An unsigned command with a fresh unique id, issued now."""
    args = CommandArgs(share_bp=share_bp, plan=parse_ramp_plan(plan) if plan else None)
    return ControlCommand(
        command_id=f"ctl:{action}:{uuid.uuid4().hex[:16]}",
        rollout=rollout,
        action=action,
        args=args,
        issued_by=issued_by,
        reason=reason or f"{action} via sidecar ctl",
        issued_at_ms=now_ms(),
        expected_epoch=expected_epoch,
    )


# --------------------------------------------------------------------------- reading


def _consumer(cfg: SidecarConfig) -> AIOKafkaConsumer:
    return new_consumer(cfg, "ctl", instance=str(os.getpid()), fetch_max_wait_ms=20)


def _decode(records: Iterable[Any], type_: type[Any]) -> list[Any]:
    """The records that decode as ``type_``; the rest (anything at all) are skipped."""
    decoder = msgspec.json.Decoder(type_)
    return [d for d in (decoded_or_none(decoder.decode, r.value) for r in records) if d is not None]


# --------------------------------------------------------------------------- issue & wait


@dataclass
class CtlResult:
    """What happened to an issued command."""

    code: int
    message: str
    command: ControlCommand
    published_at_ms: int
    #: Epoch the command moved the rollout to (when applied).
    epoch: int | None = None
    #: Instance id -> epoch it reported, for the instances that confirmed.
    confirmed: dict[str, int] = field(default_factory=dict)
    waiting_for: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    #: Seconds from just before the command was produced until the wait ended.
    wait_s: float = 0.0


class _Progress:
    """Folds status and audit records into "which live instance has applied the command"."""

    def __init__(self, cmd: ControlCommand, published_ms: int, stale_ms: int) -> None:
        self.cmd = cmd
        self.published_ms = published_ms
        self.stale_ms = stale_ms
        self.statuses: dict[str, InstanceStatus] = {}
        self.confirmed: dict[str, int] = {}
        self.target: int | None = None
        self.rejection: AuditRecord | None = None
        self.duplicate = False

    def status(self, s: InstanceStatus) -> None:
        if s.rollout != self.cmd.rollout:
            return
        old = self.statuses.get(s.instance_id)
        if old is None or s.ts_ms >= old.ts_ms:
            self.statuses[s.instance_id] = s
        if s.last_command_id == self.cmd.command_id or (
            self.target is not None and s.epoch >= self.target
        ):
            self.confirmed[s.instance_id] = s.epoch

    def audit(self, a: AuditRecord) -> None:
        if a.command_id != self.cmd.command_id:
            return
        if a.outcome == "applied" and a.to_epoch is not None:
            self.target = a.to_epoch
            self.confirmed[a.instance_id] = a.to_epoch
            for s in self.statuses.values():
                self.status(s)
        elif a.outcome == "duplicate":
            self.duplicate = True
            self.confirmed.setdefault(a.instance_id, -1)
        elif self.rejection is None:
            self.rejection = a

    def live(self) -> list[str]:
        cutoff = self.published_ms - self.stale_ms
        return sorted(i for i, s in self.statuses.items() if s.ts_ms >= cutoff)

    def waiting(self) -> list[str]:
        return [i for i in self.live() if i not in self.confirmed]


def _producer(cfg: SidecarConfig) -> AIOKafkaProducer:
    return new_producer(cfg, "ctl", instance=str(os.getpid()))


async def publish(
    cfg: SidecarConfig, command: ControlCommand, producer: AIOKafkaProducer | None = None
) -> int:
    """Produce a signed command to the control topic; returns its record timestamp (ms)."""
    own = producer is None
    if producer is None:
        producer = _producer(cfg)
        await producer.start()
    try:
        md = await producer.send_and_wait(
            cfg.topics.control,
            encode_command(command),
            key=command.rollout.encode(),
            partition=CONTROL_PARTITION,
        )
        return int(md.timestamp) if md.timestamp and md.timestamp > 0 else now_ms()
    finally:
        if own:
            await stop_quietly(producer)


async def issue(
    cfg: SidecarConfig,
    command: ControlCommand,
    *,
    keyring: Keyring,
    key_id: str,
    timeout_s: float = 10.0,
    wait: bool = True,
) -> CtlResult:
    """Sign, publish and (unless ``wait`` is False) wait for every live instance."""
    signed = keyring.sign(command, key_id)
    hb_ms = int(cfg.control.heartbeat_interval_s * 1000)
    stale_ms = STALE_HEARTBEATS * hb_ms
    start = time.monotonic()
    if not wait:
        published = await publish(cfg, signed)
        return CtlResult(EXIT_OK, f"published {signed.command_id}", signed, published)
    consumer = _consumer(cfg)
    producer = _producer(cfg)
    await consumer.start()
    try:
        await producer.start()
        await producer.partitions_for(cfg.topics.control)  # metadata now, not after publishing
        status_tps = await topic_partitions(consumer, cfg.status_topic)
        audit_tps = await topic_partitions(consumer, cfg.audit_topic)
        consumer.assign([*status_tps, *audit_tps])
        t0 = now_ms()
        await seek_since(consumer, status_tps, t0 - stale_ms - 1000)
        await seek_since(consumer, audit_tps, t0 - 5000)
        publishing = time.monotonic()
        published = await publish(cfg, signed, producer)
        progress = _Progress(signed, max(published, t0), stale_ms)
        deadline = start + timeout_s
        status_caught_up = False
        while True:
            batch = await consumer.getmany(timeout_ms=50)
            saw_status = False
            for tp, recs in batch.items():
                if tp.topic == cfg.status_topic:
                    saw_status = True
                    for s in _decode(recs, InstanceStatus):
                        progress.status(s)
                else:
                    for a in _decode(recs, AuditRecord):
                        progress.audit(a)
            status_caught_up = status_caught_up or not saw_status
            elapsed = time.monotonic() - start
            result = _verdict(progress, status_caught_up, elapsed, hb_ms)
            if result is not None:
                code, message = result
                return _result(code, message, progress, published, elapsed, publishing)
            if time.monotonic() >= deadline:
                waiting = progress.waiting()
                epochs = ", ".join(f"{i}=epoch {progress.statuses[i].epoch}" for i in waiting)
                message = (
                    f"timed out after {timeout_s:g}s: {len(waiting)} live instance(s) have not "
                    f"reported {signed.command_id}: {epochs or 'none heard from'}. The command "
                    "is on the control topic and applies when they read it; check their logs "
                    "or `sidecar ctl status`."
                )
                return _result(EXIT_TIMEOUT, message, progress, published, elapsed, publishing)
    finally:
        await stop_quietly(consumer)
        await stop_quietly(producer)


def _verdict(p: _Progress, caught_up: bool, elapsed_s: float, hb_ms: int) -> tuple[int, str] | None:
    cmd = p.cmd
    if p.rejection is not None:
        r = p.rejection
        return EXIT_REJECTED, (
            f"{cmd.action} {cmd.command_id} rejected by {r.instance_id}: {r.reason}: {r.detail}"
        )
    if not caught_up:
        return None
    live = p.live()
    if not live:
        if elapsed_s * 1000 < min(hb_ms, 2000):
            return None  # give a just-started instance a chance to report
        return EXIT_OK, (
            f"published {cmd.command_id}; no live instance (no heartbeat on the status topic "
            "in the last 3 intervals) to wait for: instances apply it when they start"
        )
    if p.waiting():
        return None
    if p.duplicate and p.target is None:
        return EXIT_OK, f"{cmd.command_id} was already applied (duplicate id): nothing changed"
    return EXIT_OK, (
        f"{cmd.action} applied: epoch {p.target} on {len(live)} live instance(s) "
        f"({', '.join(live)}) in {elapsed_s:.3f}s"
    )


def _result(
    code: int, message: str, p: _Progress, published: int, elapsed: float, publishing: float
) -> CtlResult:
    return CtlResult(
        code,
        message,
        p.cmd,
        published,
        epoch=p.target,
        confirmed=dict(p.confirmed),
        waiting_for=p.waiting(),
        elapsed_s=elapsed,
        wait_s=time.monotonic() - publishing,
    )


# --------------------------------------------------------------------------- status & history


@dataclass
class ControlView:
    """The control topic replayed, plus recent heartbeats: what ``status`` prints."""

    states: dict[str, RolloutState]
    history: list[tuple[int, ControlCommand | None, Outcome]]
    instances: list[InstanceStatus]
    now_ms: int
    stale_ms: int


async def load_view(cfg: SidecarConfig, keyring: Keyring) -> ControlView:
    """Replay the control topic with ``keyring`` (the same verdicts the instances reach)."""
    hb_ms = int(cfg.control.heartbeat_interval_s * 1000)
    now = now_ms()
    control = [
        r
        for r in await read_until_idle(
            cfg, cfg.topics.control, role="ctl", only_partition=CONTROL_PARTITION
        )
        if not is_barrier(r.headers)
    ]
    rules = control_config(cfg.control)
    by_rollout: dict[str, list[tuple[bytes, int]]] = {}
    for rec in control:
        decoded = decode_command(rec.value or b"")
        name = decoded.rollout if isinstance(decoded, ControlCommand) else cfg.rollout.name
        by_rollout.setdefault(name, []).append((rec.value or b"", rec.timestamp))
    states: dict[str, RolloutState] = {}
    history: list[tuple[int, ControlCommand | None, Outcome]] = []
    for name, records in by_rollout.items():
        initial = configured_state(cfg)
        if name != cfg.rollout.name:
            initial = msgspec.structs.replace(initial, rollout=name)
        states[name], outcomes = replay(records, initial=initial, keyring=keyring, config=rules)
        for (_, ts), outcome in zip(records, outcomes, strict=True):
            history.append((ts, outcome.command, outcome))
    states.setdefault(cfg.rollout.name, configured_state(cfg))
    history.sort(key=lambda h: h[0])
    since = now - max(10 * 60_000, 20 * hb_ms)
    heartbeats = _decode(
        await read_until_idle(cfg, cfg.status_topic, role="ctl", since_ms=since), InstanceStatus
    )
    latest: dict[str, InstanceStatus] = {}
    for s in heartbeats:
        if s.instance_id not in latest or s.ts_ms >= latest[s.instance_id].ts_ms:
            latest[s.instance_id] = s
    return ControlView(
        states,
        history,
        sorted(latest.values(), key=lambda s: s.instance_id),
        now,
        STALE_HEARTBEATS * hb_ms,
    )


def _when(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _ago(now: int, ms: int) -> str:
    s = max(0.0, (now - ms) / 1000)
    if s < 120:
        return f"{s:.1f}s ago"
    return f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.0f}h ago"


def _describe(state: RolloutState) -> str:
    text = f"{state.mode.value}"
    if state.share_bp and state.mode.value == "canary":
        text += f" {state.share_bp / 100:g}% ({state.share_bp} bp)"
    if state.ramp is not None:
        step = state.ramp.current
        text += (
            f", ramp step {state.ramp.step + 1}/{len(state.ramp.plan)} "
            f"({format_ramp_plan([step])})" + (" PAUSED" if state.paused else "")
        )
    if state.retired:
        text += ", RETIRED"
    return text


def _outcome_text(outcome: Outcome) -> str:
    if isinstance(outcome, Applied):
        return f"applied -> epoch {outcome.to_epoch}"
    if isinstance(outcome, Duplicate):
        return "duplicate (ignored)"
    return f"REJECTED {outcome.reason.value}: {outcome.detail}"


def _history_line(ts: int, cmd: ControlCommand | None, outcome: Outcome) -> str:
    if cmd is None:
        return f"  {_when(ts)}  (undecodable record)  {_outcome_text(outcome)}"
    args = " ".join(
        f"{k}={format_ramp_plan(v) if k == 'plan' else v}"
        for k, v in msgspec.structs.asdict(cmd.args).items()
        if v is not None
    )
    return (
        f"  {_when(ts)}  {cmd.action:8} {args + ' ' if args else ''}[{cmd.command_id}] by "
        f"{cmd.issued_by} ({cmd.key_id or 'unsigned'}): {humanise(cmd.reason)!r}  "
        f"{_outcome_text(outcome)}"
    )


def _model_line(m: ModelHealth) -> str:
    breaker = m.breaker.upper() if m.breaker in ("open", "half_open") else m.breaker
    opened = f", opened {m.breaker_opened}x" if m.breaker_opened else ""
    registry = f" (registry version {m.registry_version})" if m.registry_version else ""
    return (
        f"    {m.arm:9} {m.model} {m.version}{registry}  {m.manifest_digest or '-'}  "
        f"breaker {breaker}{opened}"
    )


def format_status(view: ControlView, rollout: str | None, last: int) -> str:
    lines = []
    for name, state in sorted(view.states.items()):
        if rollout is not None and name != rollout:
            continue
        since = (
            "start (configured)"
            if state.epoch == 0
            else (f"{_when(state.since_ms)} ({_ago(view.now_ms, state.since_ms)})")
        )
        lines.append(f"rollout {name}: {_describe(state)}, epoch {state.epoch}, since {since}")
        if state.last_command_id:
            lines.append(f"  last command: {state.last_command_id}")
    lines.append(
        f"instances (stale = no heartbeat for {view.stale_ms / 1000:g}s, "
        f"{STALE_HEARTBEATS} intervals):"
    )
    shown = [s for s in view.instances if rollout is None or s.rollout == rollout]
    if not shown:
        lines.append("  none heard from recently")
    for s in shown:
        stale = view.now_ms - s.ts_ms > view.stale_ms
        expected = view.states.get(s.rollout)
        lag = (
            ""
            if expected is None or s.epoch == expected.epoch
            else (f" (behind: rollout is at epoch {expected.epoch})")
        )
        lines.append(
            f"  {s.instance_id:32} {'STALE' if stale else 'live ':5}  epoch {s.epoch:<4} "
            f"{s.mode:11} {s.share_bp:>5} bp  partitions {s.assigned_partitions}  "
            f"seen {_ago(view.now_ms, s.ts_ms)}{lag}"
        )
        lines.extend(_model_line(m) for m in s.models or [])
    history = [h for h in view.history if rollout is None or (h[1] and h[1].rollout == rollout)]
    lines.append(f"last {min(last, len(history))} of {len(history)} commands:")
    lines.extend(_history_line(*h) for h in history[-last:])
    return "\n".join(printable(line) for line in lines)


# --------------------------------------------------------------------------- CLI

_MUTATING: dict[str, tuple[str, str]] = {
    "shadow": ("champion decides; the candidate is scored and compared", "share 0"),
    "canary": ("the candidate decides a share of the traffic", "PCT like 5%, 0.5% or 500bp"),
    "ramp": ("canary through a plan of steps, advanced by the sidecars", "PLAN"),
    "promote": ("the candidate decides everything", ""),
    "rollback": ("the champion decides everything, at once (needs --reason)", ""),
    "pause": ("freeze a running ramp where it stands", ""),
    "resume": ("unfreeze a paused ramp (the step's floors restart)", ""),
    "retire": ("stop scoring the old champion of a promoted rollout", ""),
}


def _where(parser: argparse.ArgumentParser, default: Any) -> None:
    """``--config`` and ``--rollout``. Both are accepted before the action (``sidecar ctl
    --config X status``) and after it: the action's parser has ``default`` SUPPRESS so that,
    when they are not repeated there, the values given before the action are kept."""
    parser.add_argument(
        "--config",
        default=os.environ.get("SIDECAR_CONFIG") if default is None else default,
        help="the sidecars' TOML config (default $SIDECAR_CONFIG); settings may also come "
        "from SIDECAR_* environment variables",
    )
    parser.add_argument(
        "--rollout", default=default, help="rollout name (default: rollout.name of the config)"
    )


def _common(parser: argparse.ArgumentParser, mutating: bool) -> None:
    _where(parser, argparse.SUPPRESS)
    if not mutating:
        return
    parser.add_argument(
        "--key-id", help="signing key id (default: control.key_id, or the only key)"
    )
    parser.add_argument("--reason", help="why (audited); required for rollback")
    parser.add_argument("--issued-by", default=None, help="who (default: $USER@host)")
    parser.add_argument(
        "--expect-epoch",
        type=int,
        metavar="N",
        help="apply only if the rollout is still at epoch N (compare-and-set)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds to wait for every live instance (default 10)",
    )
    parser.add_argument("--no-wait", action="store_true", help="publish and return at once")


def add_ctl_parser(sub: Any) -> None:
    """Add ``sidecar ctl ...`` to the top-level subparsers ``sub``."""
    ctl = sub.add_parser(
        "ctl",
        help="steer every sidecar instance: status, canary, ramp, promote, rollback, ...",
        usage="sidecar ctl [--config FILE] ACTION [options]",
        description="Operator commands on the control topic. Each command is signed with your "
        "key (control.keys_file or $SIDECAR_CONTROL_KEYS), published, and applied by every "
        "instance; ctl waits until every live instance reports it. Exit codes: 0 applied, "
        "1 rejected or error, 2 timed out.",
    )
    _where(ctl, None)
    ctl.set_defaults(func=cmd_ctl, ctl_command=None)
    actions = ctl.add_subparsers(dest="ctl_command", metavar="ACTION")
    p = actions.add_parser(
        "status",
        help="rollout state, live instances and their epochs, recent commands",
        description="Replay the control topic and read recent heartbeats: the state of each "
        "rollout and since when, the epoch every instance reports (stale after 3 missed "
        "heartbeats), and the last commands with their outcome.",
    )
    _common(p, mutating=False)
    p.add_argument("--last", type=int, default=10, help="commands to show (default 10)")
    p = actions.add_parser(
        "history",
        help="every command on the control topic and its outcome",
        description="Every control record, in order, with the verdict the instances reach.",
    )
    _common(p, mutating=False)
    for action, (text, _) in _MUTATING.items():
        p = actions.add_parser(action, help=text, description=text[:1].upper() + text[1:] + ".")
        if action == "canary":
            p.add_argument("share", metavar="PCT", help="candidate share: 5%%, 0.5%% or 500bp")
        if action == "ramp":
            p.add_argument(
                "plan",
                metavar="PLAN",
                help="steps share:hold:min_samples, e.g. 1%%:5m:1000,5%%:10m:5k,100%%:30m:20k",
            )
        _common(p, mutating=True)


def _load(args: argparse.Namespace) -> SidecarConfig:
    if not args.config:
        raise ConfigError(
            "no config: pass --config with the sidecars' TOML file or set $SIDECAR_CONFIG"
        )
    return load_config(args.config)


def _key_id(args: argparse.Namespace, cfg: SidecarConfig, keyring: Keyring) -> str:
    key_id: str | None = args.key_id or cfg.control.key_id
    if key_id is None:
        if len(keyring.key_ids) != 1:
            raise ConfigError(
                f"several control keys {list(keyring.key_ids)}: choose one with --key-id"
            )
        key_id = keyring.key_ids[0]
    if key_id not in keyring:
        raise ConfigError(f"key id {key_id!r} is not in the keyring {list(keyring.key_ids)}")
    return key_id


def cmd_ctl(args: argparse.Namespace) -> int:
    if args.ctl_command is None:
        print("usage: sidecar ctl ACTION [options]; see `sidecar ctl --help`", file=sys.stderr)
        return 2
    return asyncio.run(run_ctl(args))


async def run_ctl(args: argparse.Namespace) -> int:
    """One ``sidecar ctl`` invocation; returns the exit code."""
    cfg = _load(args)
    rollout = args.rollout or cfg.rollout.name
    action = args.ctl_command
    if action in ("status", "history"):
        keyring = load_keyring(cfg.control, required=False)
        view = await load_view(cfg, keyring)
        if action == "status":
            print(format_status(view, rollout, max(0, args.last)))
        else:
            for h in view.history:
                if h[1] is None or h[1].rollout == rollout:
                    print(printable(_history_line(*h)))
        return EXIT_OK
    if action == "rollback" and not args.reason:
        raise ConfigError("rollback needs --reason 'why' (it is audited)")
    keyring = load_keyring(cfg.control, required=True)
    key_id = _key_id(args, cfg, keyring)
    try:
        share = parse_share(args.share) if action == "canary" else None
        command = build_command(
            action,
            rollout,
            issued_by=args.issued_by or default_issuer(),
            reason=args.reason,
            share_bp=share,
            plan=args.plan if action == "ramp" else None,
            expected_epoch=args.expect_epoch,
        )
    except ValueError as exc:
        raise SidecarError(str(exc)) from None
    await ensure_control_topics(cfg)
    result = await issue(
        cfg,
        command,
        keyring=keyring,
        key_id=key_id,
        timeout_s=args.timeout,
        wait=not args.no_wait,
    )
    print(printable(result.message), file=sys.stdout if result.code == EXIT_OK else sys.stderr)
    return result.code


__all__ = [
    "EXIT_OK",
    "EXIT_REJECTED",
    "EXIT_TIMEOUT",
    "ControlView",
    "CtlResult",
    "add_ctl_parser",
    "build_command",
    "format_status",
    "issue",
    "load_view",
    "publish",
    "run_ctl",
]
