"""Waiting for a published command: which live instances have proved they applied it.

Only records signed by an instance key of the trust file count (see
:mod:`sidecar.control.records`): a forged heartbeat of a phantom instance cannot make ``ctl``
wait for it, and a forged "applied" audit record cannot confirm a command for a real one.
Unverified records are remembered only to say so when nothing verified answers.

Exit codes: 0 applied on every live instance (or no live instance to wait for), 1 refused
(the audit's reason is printed) or an error, 2 timed out (the instances that have not
reported are named).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .commands import ControlCommand
from .records import AuditRecord, InstanceStatus

#: An instance is live while its last heartbeat is younger than this many intervals.
STALE_HEARTBEATS = 3
EXIT_OK, EXIT_REJECTED, EXIT_TIMEOUT = 0, 1, 2


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
    #: Instances heard from only through records no instance key of the trust file signed.
    unverified: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    #: Seconds from just before the command was produced until the wait ended.
    wait_s: float = 0.0


class Progress:
    """Folds status and audit records into "which live instance has applied the command"."""

    def __init__(self, cmd: ControlCommand, published_ms: int, stale_ms: int) -> None:
        self.cmd = cmd
        self.published_ms = published_ms
        self.stale_ms = stale_ms
        self.statuses: dict[str, InstanceStatus] = {}
        self.unverified: set[str] = set()
        self.confirmed: dict[str, int] = {}
        self.target: int | None = None
        self.rejection: AuditRecord | None = None
        self.duplicate = False

    def status(self, s: InstanceStatus, verified: bool) -> None:
        if s.rollout != self.cmd.rollout:
            return
        if not verified:
            self.unverified.add(s.instance_id)
            return
        old = self.statuses.get(s.instance_id)
        if old is None or s.ts_ms >= old.ts_ms:
            self.statuses[s.instance_id] = s
        if s.last_command_id == self.cmd.command_id or (
            self.target is not None and s.epoch >= self.target
        ):
            self.confirmed[s.instance_id] = s.epoch

    def audit(self, a: AuditRecord, verified: bool) -> None:
        if a.command_id != self.cmd.command_id:
            return
        if not verified:
            self.unverified.add(a.instance_id)
            return
        if a.outcome == "applied" and a.to_epoch is not None:
            self.target = a.to_epoch
            self.confirmed[a.instance_id] = a.to_epoch
            for s in self.statuses.values():
                self.status(s, True)
        elif a.outcome in ("duplicate", "noted"):
            self.duplicate = a.outcome == "duplicate"
            self.confirmed.setdefault(a.instance_id, -1)
        elif self.rejection is None:
            self.rejection = a

    def live(self) -> list[str]:
        cutoff = self.published_ms - self.stale_ms
        return sorted(i for i, s in self.statuses.items() if s.ts_ms >= cutoff)

    def waiting(self) -> list[str]:
        return [i for i in self.live() if i not in self.confirmed]

    def timeout_message(self, timeout_s: float) -> str:
        waiting = self.waiting()
        epochs = ", ".join(f"{i}=epoch {self.statuses[i].epoch}" for i in waiting)
        message = (
            f"timed out after {timeout_s:g}s: {len(waiting)} live instance(s) have not "
            f"reported {self.cmd.command_id}: {epochs or 'none heard from'}. The command is "
            "on the control topic and applies when they read it; check their logs or "
            "`sidecar ctl status`."
        )
        unverified = sorted(self.unverified - set(self.statuses))
        if unverified and not self.statuses:
            message += (
                f" Heard only unverified records from {', '.join(unverified)}: give each "
                "instance a signing key (control.signing_key_file, role sidecar) listed in the "
                "trust file, or check for forged heartbeats."
            )
        return message

    def result(
        self, code: int, message: str, published: int, elapsed: float, publishing: float
    ) -> CtlResult:
        return CtlResult(
            code,
            message,
            self.cmd,
            published,
            epoch=self.target,
            confirmed=dict(self.confirmed),
            waiting_for=self.waiting(),
            unverified=sorted(self.unverified - set(self.statuses)),
            elapsed_s=elapsed,
            wait_s=time.monotonic() - publishing,
        )


def verdict(p: Progress, caught_up: bool, elapsed_s: float, hb_ms: int) -> tuple[int, str] | None:
    """The exit code and message once the wait is decided, else None."""
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
        if elapsed_s * 1000 < min(hb_ms, 2000) or p.unverified:
            return None  # give a just-started instance a chance; unverified ones: time out
        return EXIT_OK, (
            f"published {cmd.command_id}; no live instance (no signed heartbeat on the status "
            "topic in the last 3 intervals) to wait for: instances apply it when they start"
        )
    if p.waiting():
        return None
    if p.duplicate and p.target is None:
        return EXIT_OK, f"{cmd.command_id} was already applied (duplicate id): nothing changed"
    if cmd.action == "verdict":
        return EXIT_OK, f"verdict noted on {len(live)} live instance(s) ({', '.join(live)})"
    if cmd.action in ("deprecate", "sunset"):
        return EXIT_OK, (
            f"{cmd.action} of output version {cmd.args.output_version} applied on {len(live)} "
            f"live instance(s) ({', '.join(live)}) in {elapsed_s:.3f}s"
        )
    return EXIT_OK, (
        f"{cmd.action} applied: epoch {p.target} on {len(live)} live instance(s) "
        f"({', '.join(live)}) in {elapsed_s:.3f}s"
    )
