"""Synthetic comparison traffic shaped like the sidecar's, and a loop that plays the rest.

What the guards are judged on (``tests/aggregate/test_guard_scenarios.py``,
``bench/bench_guards.py``). The traffic has the sidecar's structure, because that structure is
what fools naive guards:

* **Batches.** The sidecar scores a poll's records in one call per model, so every record of a
  batch carries the same two latencies, and a timeout or an exception fails the whole batch.
* **Latency** per arm and batch: a lognormal compute time, independent scheduling jitter per
  arm (a thread waiting for the GIL), and **host stalls** (heavy-tailed, Pareto) that delay
  both arms of a batch (now and then only one: the stall began after the other finished).
  A call that reaches ``timeout_ms`` is a ``timeout``.
* **Scores**: champion ``sigmoid(a + b z)``, candidate the same with a correlated ``z``
  (``rho``) and an optional logit shift, one threshold (about 5% flagged).
* **Routing** by the policy in force (epoch, mode, canary share): who serves each record,
  with the sidecar's fallbacks (a failed candidate falls back to the champion, a failed
  champion to the candidate: ``rollout.champion_failure = "fallback_candidate"``).

``Simulation`` feeds it through the real ``WindowManager`` and ``GuardEngine`` (as
``sidecar aggregate`` does, minus Kafka) and plays the control plane: a guard's rollback or
pause applies shortly after it is issued, and scheduled operator commands apply at their time.
Everything is seeded and runs in event time: the same seed gives the same windows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from .actions import commanding
from .batch import (
    ERROR_KINDS,
    SERVED_CANDIDATE,
    SERVED_CHAMPION,
    SERVED_NONE,
    ArmColumns,
    ComparisonBatch,
    GroupKey,
)
from .config import AggregatorConfig
from .guards import GuardEngine, GuardEvent, GuardRule
from .manager import WindowManager
from .report import WindowReport

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

_EXCEPTION = ERROR_KINDS.index("exception") + 1
_TIMEOUT = ERROR_KINDS.index("timeout") + 1
_INVALID = ERROR_KINDS.index("invalid_output") + 1

ROLLOUT = "synthetic"
CHAMPION = ("fraud-lr", "1.4.0")
CANDIDATE = ("fraud-lr", "2.0.0")


@dataclass(frozen=True)
class Arm:
    """How one model behaves (per batch and per record)."""

    #: Median compute time of a call, and its lognormal spread.
    median_ms: float = 1.6
    sigma: float = 0.25
    #: Logit shift of the score (the candidate flags more or less often at the threshold).
    flag_shift: float = 0.0
    #: Its own decision threshold (None: ``Traffic.THRESHOLD``, the champion's): the same
    #: scores, flagged more or less often.
    threshold: float | None = None
    #: Share of batches on which the call takes ``tail_ms`` longer (e.g. its GC pauses).
    tail_rate: float = 0.0
    tail_ms: float = 0.0
    #: Share of batches the model raises on (the whole batch fails).
    exception_rate: float = 0.0
    #: Share of batches the model hangs on until the timeout.
    hang_rate: float = 0.0
    #: Share of records it returns NaN for (``invalid_output`` on that record).
    nan_rate: float = 0.0


@dataclass(frozen=True)
class Host:
    """The machine both models run on."""

    #: Per arm and batch: chance of waiting for the other thread, and the mean wait.
    jitter_rate: float = 0.05
    jitter_mean_ms: float = 2.0
    #: Per batch: chance of a host stall; stall length Pareto(alpha) from ``stall_min_ms``.
    stall_rate: float = 0.02
    stall_min_ms: float = 3.0
    stall_alpha: float = 1.3
    #: Share of stalls that hit only one arm (it started after the other had finished).
    one_arm_share: float = 0.15
    #: A stall of ``L`` ms stretches a call's compute time by ``1 + L / stall_unit_ms``: a
    #: starved host slows the heavier model more (a 1.6 ms call is ``L`` ms later).
    stall_unit_ms: float = 1.6
    #: Both models' call timeout (``models.*.timeout_ms``).
    timeout_ms: float = 200.0


@dataclass(frozen=True)
class Policy:
    """The routing policy in force, as the comparisons show it (share: canary only)."""

    epoch: int = 0
    mode: str = "shadow"
    share: float = 0.0


@dataclass(frozen=True)
class Change:
    """From ``at_ms`` on (event time), the arms and the host behave like this."""

    at_ms: int
    candidate: Arm | None = None
    champion: Arm | None = None
    host: Host | None = None


@dataclass(frozen=True)
class Operator:
    """An operator's command at ``at_ms``: ``canary`` (with ``share``), ``shadow`` or
    ``rollback``; applied at once (a new epoch)."""

    at_ms: int
    action: str
    share: float = 0.0


@dataclass(frozen=True)
class Applied:
    """A control command the simulated control plane applied (or refused)."""

    at_ms: int
    action: str
    issued_by: str
    epoch: int
    mode: str
    rule: str | None = None
    window_end_ms: int | None = None
    refused: str | None = None


class Traffic:
    """Seeded comparison batches: ``batch(t_ms, n, ...)`` -> ``ComparisonBatch``."""

    #: Champion score logit ``a + b z``: at ``THRESHOLD`` about 5.3% of records are flagged,
    #: at ``DOUBLE`` about twice as many, at ``HALF`` half as many.
    A, B, THRESHOLD = -3.0, 1.0, 0.2
    DOUBLE, HALF = 0.1478, 0.2564

    def __init__(self, seed: int, *, rho: float = 0.9, candidate_version: str = CANDIDATE[1]):
        self.rng = np.random.default_rng(seed)
        self.rho = rho
        self.key = GroupKey(ROLLOUT, *CHAMPION, CANDIDATE[0], candidate_version)
        self._offset = 0

    def _latency(self, arm: Arm, stall: float, host: Host) -> tuple[float, bool]:
        rng = self.rng
        ms = arm.median_ms * math.exp(arm.sigma * rng.standard_normal())
        ms *= 1.0 + stall / host.stall_unit_ms
        if rng.random() < host.jitter_rate:
            ms += rng.exponential(host.jitter_mean_ms)
        if arm.tail_rate and rng.random() < arm.tail_rate:
            ms += arm.tail_ms
        if rng.random() < arm.hang_rate:
            ms = host.timeout_ms
        if ms >= host.timeout_ms:
            return round(host.timeout_ms + rng.exponential(0.3), 3), True
        return round(ms, 3), False

    def batch(
        self,
        t_ms: int,
        n: int,
        span_ms: int,
        policy: Policy,
        champion: Arm,
        candidate: Arm,
        host: Host,
    ) -> ComparisonBatch:
        """``n`` records over ``[t_ms, t_ms + span_ms)`` scored in one call per model."""
        rng = self.rng
        stall = [0.0, 0.0]
        if rng.random() < host.stall_rate:
            length = host.stall_min_ms * (1.0 - rng.random()) ** (-1.0 / host.stall_alpha)
            if rng.random() < host.one_arm_share:
                stall[int(rng.integers(2))] = length
            else:
                stall = [length, length]
        lat_c, to_c = self._latency(champion, stall[0], host)
        lat_k, to_k = self._latency(candidate, stall[1], host)
        z1 = rng.standard_normal(n)
        z2 = self.rho * z1 + math.sqrt(1.0 - self.rho**2) * rng.standard_normal(n)
        cols = []
        for arm, z, lat, timed_out in (
            (champion, z1, lat_c, to_c),
            (candidate, z2, lat_k, to_k),
        ):
            score = 1.0 / (1.0 + np.exp(-(self.A + self.B * z + arm.flag_shift)))
            error = np.zeros(n, dtype=np.int8)
            if timed_out:
                error[:] = _TIMEOUT
            elif rng.random() < arm.exception_rate:
                error[:] = _EXCEPTION
            elif arm.nan_rate:
                error[rng.random(n) < arm.nan_rate] = _INVALID
            failed = error != 0
            score[failed] = np.nan
            threshold = self.THRESHOLD if arm.threshold is None else arm.threshold
            decision = np.where(failed, -1, score > threshold).astype(np.int8)
            cols.append(
                ArmColumns(score, failed, decision, np.full(n, lat, dtype=np.float64), error)
            )
        champ, cand = cols
        served = self._served(n, policy, champ.error == 0, cand.error == 0)
        ts = t_ms + np.sort(rng.integers(0, max(span_ms, 1), n))
        offsets = np.arange(self._offset, self._offset + n, dtype=np.int64)
        self._offset += n
        return ComparisonBatch(
            keys=(self.key,),
            key_code=np.zeros(n, dtype=np.int32),
            ts=ts.astype(np.int64),
            partition=np.zeros(n, dtype=np.int32),
            offset=offsets,
            request_hash=rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64),
            served_by=served,
            champion=champ,
            candidate=cand,
            out_of_range_code=np.zeros(n, dtype=np.int32),
            policy_epoch=np.full(n, policy.epoch, dtype=np.int64),
            policy_mode_code=np.zeros(n, dtype=np.int8),
            policy_modes=(policy.mode,),
        )

    def _served(
        self, n: int, policy: Policy, champ_ok: BoolArray, cand_ok: BoolArray
    ) -> npt.NDArray[np.int8]:
        if policy.mode == "canary":
            routed_candidate = self.rng.random(n) < policy.share
        elif policy.mode == "promoted":
            routed_candidate = np.ones(n, dtype=np.bool_)
        else:  # shadow, rolled_back
            routed_candidate = np.zeros(n, dtype=np.bool_)
        first = np.where(routed_candidate, cand_ok, champ_ok)  # the routed arm served it
        other = np.where(routed_candidate, champ_ok, cand_ok)  # else the other arm did
        served = np.full(n, SERVED_NONE, dtype=np.int8)
        served[other] = np.where(routed_candidate, SERVED_CHAMPION, SERVED_CANDIDATE)[other]
        served[first] = np.where(routed_candidate, SERVED_CANDIDATE, SERVED_CHAMPION)[first]
        return served


def concat(batches: Sequence[ComparisonBatch]) -> ComparisonBatch:
    """One batch of several with the same group keys (a poll of several sidecar batches)."""
    if len(batches) == 1:
        return batches[0]
    modes: dict[str, int] = {}
    mode_codes = []
    for b in batches:
        table = np.array([modes.setdefault(m, len(modes)) for m in b.policy_modes], np.int8)
        mode_codes.append(table[b.policy_mode_code])

    def arm(get: str) -> ArmColumns:
        parts = [getattr(b, get) for b in batches]
        return ArmColumns(
            *(np.concatenate([getattr(a, f) for a in parts]) for f in ArmColumns.__slots__)
        )

    def cat(name: str) -> Any:  # each column keeps its dtype
        return np.concatenate([getattr(b, name) for b in batches])

    return ComparisonBatch(
        keys=batches[0].keys,
        key_code=cat("key_code"),
        ts=cat("ts"),
        partition=cat("partition"),
        offset=cat("offset"),
        request_hash=cat("request_hash"),
        served_by=cat("served_by"),
        champion=arm("champion"),
        candidate=arm("candidate"),
        out_of_range_code=cat("out_of_range_code"),
        policy_epoch=cat("policy_epoch"),
        policy_mode_code=np.concatenate(mode_codes),
        policy_modes=tuple(modes),
    )


@dataclass
class Outcome:
    reports: list[WindowReport] = field(default_factory=list)
    events: list[GuardEvent] = field(default_factory=list)
    #: Commands applied by the simulated control plane (guards' and operators'), in order.
    applied: list[Applied] = field(default_factory=list)

    def fired(self, rule: str | None = None) -> list[GuardEvent]:
        return [e for e in self.events if e.kind == "fired" and rule in (None, e.rule.name)]

    def commands(self, issued_by: str = "aggregator") -> list[Applied]:
        return [a for a in self.applied if a.issued_by == issued_by and a.refused is None]


class Simulation:
    """Traffic -> ``WindowManager`` -> ``GuardEngine`` -> (simulated) control plane.

    ``rate`` records/s arrive in sidecar batches every ``batch_ms``; the aggregator takes
    them in polls of ``poll_ms`` (event time doubles as its clock). A guard's command applies
    ``apply_delay_ms`` after the poll that fired it (``act=False``: commands are counted, not
    applied, as a benchmark of false alarms wants).
    """

    def __init__(
        self,
        seed: int,
        *,
        config: AggregatorConfig,
        rules: Sequence[GuardRule] | None = None,
        rate: float = 1_500.0,
        batch_ms: int = 100,
        poll_ms: int = 200,
        start_ms: int = 1_700_000_000_000,
        policy: Policy = Policy(),
        champion: Arm = Arm(),
        candidate: Arm = Arm(),
        host: Host = Host(),
        changes: Sequence[Change] = (),
        operators: Sequence[Operator] = (),
        act: bool = True,
        apply_delay_ms: int = 100,
        rho: float = 0.9,
    ) -> None:
        self.traffic = Traffic(seed, rho=rho)
        self.manager = WindowManager(config)
        self.guards = GuardEngine(rules)
        self.rate = rate
        self.batch_ms = batch_ms
        self.poll_ms = poll_ms
        self.start_ms = start_ms
        self.policy = policy
        self.arms = (champion, candidate)
        self.host = host
        self.changes = sorted(changes, key=lambda c: c.at_ms)
        self.operators = sorted(operators, key=lambda o: o.at_ms)
        self.act = act
        self.apply_delay_ms = apply_delay_ms
        self._pending: list[tuple[int, GuardEvent]] = []
        self.outcome = Outcome()
        self._rng = np.random.default_rng([seed, 1])

    def _apply_changes(self, t: int) -> None:
        while self.changes and self.changes[0].at_ms <= t:
            c = self.changes.pop(0)
            champion, candidate = self.arms
            self.arms = (c.champion or champion, c.candidate or candidate)
            self.host = c.host or self.host
        while self.operators and self.operators[0].at_ms <= t:
            op = self.operators.pop(0)
            mode = {"canary": "canary", "shadow": "shadow", "rollback": "rolled_back"}[op.action]
            self._set(Policy(self.policy.epoch + 1, mode, op.share if mode == "canary" else 0.0))
            self.outcome.applied.append(
                Applied(op.at_ms, op.action, "operator", self.policy.epoch, self.policy.mode)
            )
        while self._pending and self._pending[0][0] <= t:
            at, event = self._pending.pop(0)
            self._apply_guard(at, event)

    def _set(self, policy: Policy) -> None:
        self.policy = policy

    def _apply_guard(self, at: int, event: GuardEvent) -> None:
        action = event.rule.action
        p = self.policy
        refused = None
        if action == "rollback":
            self._set(Policy(p.epoch + 1, "rolled_back", 0.0))
        elif action == "pause":
            if event.policy_epoch is not None and event.policy_epoch != p.epoch:
                refused = f"epoch_conflict: expected {event.policy_epoch}, at {p.epoch}"
            else:  # a hold: nothing about routing changes
                self._set(replace(p, epoch=p.epoch + 1))
                self.guards.published_pause(event)
        self.outcome.applied.append(
            Applied(
                at,
                action,
                "aggregator",
                self.policy.epoch,
                self.policy.mode,
                event.rule.name,
                event.window_end_ms,
                refused,
            )
        )

    def run(self, duration_ms: int) -> Outcome:
        """Simulate ``duration_ms`` of traffic, then close the windows the watermark passed."""
        t = self.start_ms
        end = self.start_ms + duration_ms
        poll: list[ComparisonBatch] = []
        next_poll = t + self.poll_ms
        while t < end:
            self._apply_changes(t)
            n = int(self._rng.poisson(self.rate * self.batch_ms / 1000.0))
            if n:
                champion, candidate = self.arms
                poll.append(
                    self.traffic.batch(
                        t, n, self.batch_ms, self.policy, champion, candidate, self.host
                    )
                )
            t += self.batch_ms
            if t >= next_poll:
                self._process(poll, t)
                poll = []
                next_poll = t + self.poll_ms
        self._process(poll, t)
        return self.outcome

    def _process(self, batches: list[ComparisonBatch], now: int) -> None:
        if batches:
            reports = self.manager.process(concat(batches), now).reports
        else:
            reports = self.manager.advance(now)
        for report in reports:
            self._evaluate(report, now)

    def _evaluate(self, report: WindowReport, now: int) -> None:
        self.outcome.reports.append(report)
        events = self.guards.evaluate(report)
        self.outcome.events += events
        if self.act:
            for event in commanding(events):
                self._pending.append((now + self.apply_delay_ms, event))


__all__ = [
    "CANDIDATE",
    "CHAMPION",
    "ROLLOUT",
    "Applied",
    "Arm",
    "Change",
    "Host",
    "Operator",
    "Outcome",
    "Policy",
    "Simulation",
    "Traffic",
]
