"""False alarms and time to act of the default guard rules, against the previous defaults.

Sidecar-shaped synthetic traffic (``sidecar.aggregate.synthetic``: per-batch latencies with
heavy-tailed host stalls that hit both arms, scheduling jitter, timeouts, routing with
fallbacks) goes through the real ``WindowManager``; every window report is judged by two
``GuardEngine``s in the same run: the current default rules and the previous ones (decision-
rate ratio above 1.5 only, unpaired candidate error rate, p99 latency ratio with a 20 ms floor).

* **Benign**: ``--seeds`` candidates that are as good as the champion, each with its own
  traffic (rate, score correlation, a candidate 20% faster to 25% slower, host jitter and
  stall rates, canary or shadow) and load episodes (stalls in a third of the batches for a few
  windows). Printed: actions per 1,000 windows per rule. Target: no rollback or pause.
* **Harmful**: ``--harmful-seeds`` runs per kind of harm, beginning at a random point of a
  window. Printed: how many were acted on, windows from the onset's window to the one that
  fired, seconds from onset to the command (event time: the window closes once the watermark
  passes its end plus ``allowed_lateness_ms``), and the share of those seconds that is allowed
  lateness. Plus a re-entry run: rolled back, put back into canary by an operator, rolled
  back again.

    python bench/bench_guards.py [--seeds 100] [--windows 60] [--harmful-seeds 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from sidecar.aggregate import AggregatorConfig, GuardEngine, GuardRule, default_rules
from sidecar.aggregate.guards import GuardEvent
from sidecar.aggregate.synthetic import (
    Arm,
    Change,
    Host,
    Operator,
    Outcome,
    Policy,
    Simulation,
    Traffic,
)

WINDOW_MS = 5_000
LATENESS_MS = 5_000
START = 1_700_000_000_000
CONFIG = AggregatorConfig(window_ms=WINDOW_MS, allowed_lateness_ms=LATENESS_MS)


def previous_rules() -> list[GuardRule]:
    """The default rules before issue 12 (one-sided ratio, unpaired errors, p99 with a floor)."""
    return [
        GuardRule(
            name="decision_rate_ratio",
            figure="decision_rate_ratio",
            threshold=1.5,
            clear_threshold=1.2,
            min_pairs=500,
            consecutive=2,
            cooldown_s=600,
            action="rollback",
        ),
        GuardRule(
            name="score_psi",
            figure="psi_candidate_vs_champion",
            threshold=0.25,
            clear_threshold=0.1,
            min_pairs=500,
            consecutive=2,
            cooldown_s=600,
            action="pause",
        ),
        GuardRule(
            name="candidate_error_rate",
            figure="candidate_error_rate",
            threshold=0.01,
            clear_threshold=0.005,
            min_pairs=500,
            consecutive=1,
            cooldown_s=600,
            action="rollback",
        ),
        GuardRule(
            name="latency_p99_ratio",
            figure="latency_p99_ratio",
            threshold=2.0,
            clear_threshold=1.5,
            min_pairs=200,
            consecutive=2,
            cooldown_s=600,
            action="pause",
            only_if="candidate_latency_p99",
            only_if_above=20.0,
        ),
    ]


class Judged(Simulation):
    """A simulation whose reports a second engine (the previous rules) judges too."""

    def __init__(self, seed: int, **kw: object) -> None:
        super().__init__(seed, **kw)  # type: ignore[arg-type]
        self.previous = GuardEngine(previous_rules())
        self.previous_events: list[GuardEvent] = []

    def _evaluate(self, report, now):  # type: ignore[no-untyped-def]
        super()._evaluate(report, now)
        self.previous_events += self.previous.evaluate(report)


def fired(events: list[GuardEvent]) -> list[GuardEvent]:
    return [e for e in events if e.kind == "fired"]


# --------------------------------------------------------------------------- benign


def benign_run(seed: int, windows: int) -> tuple[int, Counter[str], Counter[str]]:
    """One benign candidate with its own traffic; (windows, fired now, fired previously)."""
    rng = np.random.default_rng([seed, 12])
    champion_ms = float(rng.uniform(1.0, 2.5))
    sigma = float(rng.uniform(0.2, 0.35))
    champion = Arm(median_ms=champion_ms, sigma=sigma)
    candidate = Arm(median_ms=champion_ms * float(rng.uniform(0.8, 1.25)), sigma=sigma)
    host = Host(
        jitter_rate=float(rng.uniform(0.02, 0.15)),
        jitter_mean_ms=float(rng.uniform(1.0, 4.0)),
        stall_rate=float(rng.uniform(0.005, 0.05)),
        stall_unit_ms=champion_ms,
    )
    loaded = Host(
        jitter_rate=min(0.5, host.jitter_rate * 3),
        jitter_mean_ms=host.jitter_mean_ms,
        stall_rate=0.3,
        stall_min_ms=10.0,
        stall_unit_ms=champion_ms,
    )
    duration = windows * WINDOW_MS
    changes = []
    for _ in range(max(1, windows // 30)):  # load episodes of 2-4 windows
        at = START + int(rng.integers(0, duration - 4 * WINDOW_MS))
        changes += [
            Change(at, host=loaded),
            Change(at + int(rng.integers(2, 5)) * WINDOW_MS, host=host),
        ]
    mode = "canary" if rng.random() < 0.5 else "shadow"
    sim = Judged(
        seed,
        config=CONFIG,
        start_ms=START,
        rate=float(rng.uniform(500, 3_000)),
        rho=float(rng.uniform(0.8, 0.95)),
        policy=Policy(1, mode, float(rng.uniform(0.05, 0.5)) if mode == "canary" else 0.0),
        champion=champion,
        candidate=candidate,
        host=host,
        changes=changes,
        act=False,
    )
    out = sim.run(duration)
    now = Counter(e.rule.name for e in fired(out.events))
    before = Counter(e.rule.name for e in fired(sim.previous_events))
    return len(out.reports), now, before


def print_benign(seeds: int, windows: int) -> None:
    started = time.perf_counter()
    total = 0
    now: Counter[str] = Counter()
    before: Counter[str] = Counter()
    for seed in range(seeds):
        w, n, b = benign_run(seed, windows)
        total += w
        now += n
        before += b
    took = time.perf_counter() - started
    print(
        f"benign: {seeds} seeds x ~{windows} windows = {total:,} windows of {WINDOW_MS // 1000} s "
        f"({took:.0f} s to simulate); fired events per 1,000 windows:"
    )

    def table(rules: list[GuardRule], counts: Counter[str], title: str) -> None:
        print(f"  {title}")
        acts = 0
        for rule in rules:
            k = counts.get(rule.name, 0)
            if rule.action != "alert":
                acts += k
            print(f"    {rule.name:24} {rule.action:8} {k:5d}  {1000 * k / total:7.3f} / 1,000")
        print(f"    {'rollbacks + pauses':33} {acts:5d}  {1000 * acts / total:7.3f} / 1,000")

    table(default_rules(), now, "current default rules:")
    table(previous_rules(), before, "previous default rules (same windows):")


# --------------------------------------------------------------------------- harmful


SHADOW = Policy(1, "shadow")


@dataclass(frozen=True)
class Harm:
    name: str
    change: Change
    policy: Policy = SHADOW


def harms(onset: int) -> list[Harm]:
    def candidate(**kw: float) -> Change:
        return Change(onset, candidate=Arm(**kw))

    return [
        Harm("flags 2x, shifted scores", candidate(flag_shift=0.74)),
        Harm("flags 2x, canary 10%", candidate(flag_shift=0.74), Policy(1, "canary", 0.1)),
        Harm("flags 2x, own threshold", candidate(threshold=Traffic.DOUBLE)),
        Harm("flags half as often, threshold", candidate(threshold=Traffic.HALF)),
        Harm("median latency 1.6 -> 6 ms", candidate(median_ms=6.0)),
        Harm("+25 ms on 30% of batches", candidate(tail_rate=0.3, tail_ms=25.0)),
        Harm("exceptions on 10% of batches", candidate(exception_rate=0.1)),
        Harm("NaN scores on 5% of records", candidate(nan_rate=0.05)),
        Harm("hangs on 10% of batches", candidate(hang_rate=0.1)),
    ]


@dataclass
class Timing:
    """When the first rollback or pause came after the onset, per run."""

    windows: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    by: Counter[str] = field(default_factory=Counter)

    def add(self, event: GuardEvent | None, onset: int) -> None:
        if event is None:
            return
        self.windows.append(
            (event.window_start_ms - START) // WINDOW_MS - (onset - START) // WINDOW_MS
        )
        self.seconds.append((event.at_ms - onset) / 1000)
        self.by[event.rule.name] += 1


def first_action(events: list[GuardEvent], onset: int) -> GuardEvent | None:
    acting = [e for e in fired(events) if e.rule.action != "alert" and e.window_end_ms > onset]
    return acting[0] if acting else None


def print_harmful(seeds: int) -> None:
    print(
        f"\nharmful: {seeds} runs per kind, onset at a random point of a window, "
        f"{WINDOW_MS // 1000} s windows, {LATENESS_MS // 1000} s allowed lateness; the first "
        "rollback or pause after the onset"
    )
    print(
        f"  {'harm':32} {'acted':>6}  {'windows after':>13}  {'s onset->command':>17}  "
        f"{'lateness':>8}  {'by':28} | previous rules: acted, median s, by"
    )
    now: dict[str, Timing] = {}
    before: dict[str, Timing] = {}
    for seed in range(seeds):
        rng = np.random.default_rng([seed, 99])
        onset = START + 40_000 + int(rng.integers(0, WINDOW_MS))
        for harm in harms(onset):
            sim = Judged(
                seed,
                config=CONFIG,
                start_ms=START,
                policy=harm.policy,
                changes=[harm.change],
                act=False,
            )
            out = sim.run(90_000)
            now.setdefault(harm.name, Timing()).add(first_action(out.events, onset), onset)
            before.setdefault(harm.name, Timing()).add(
                first_action(sim.previous_events, onset), onset
            )
    for harm in harms(0):
        t, p = now[harm.name], before[harm.name]
        w, s = t.windows, t.seconds
        windows = f"{min(w)}-{max(w)} (med {statistics.median(w):g})" if w else "-"
        secs = f"{statistics.median(s):.1f} (max {max(s):.1f})" if s else "-"
        share = f"{LATENESS_MS / 1000 / statistics.median(s):.0%}" if s else "-"
        prev = f"{len(p.seconds)}/{seeds}"
        if p.seconds:
            prev += f", {statistics.median(p.seconds):.1f} s, {_names(p.by)}"
        print(
            f"  {harm.name:32} {len(s):>3}/{seeds:<2}  {windows:>13}  {secs:>17}  {share:>8}  "
            f"{_names(t.by):28} | {prev}"
        )


def _names(counts: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.most_common()) or "-"


def print_reentry(seeds: int) -> None:
    print("\nre-entry: flags 2x in canary 10%, rolled back; the operator puts it back at 10%")
    gaps = []
    second = 0
    for seed in range(seeds):
        rng = np.random.default_rng([seed, 7])
        onset = START + 40_000 + int(rng.integers(0, WINDOW_MS))
        reentry = START + 80_000 + int(rng.integers(0, WINDOW_MS))
        out: Outcome = Simulation(
            seed,
            config=CONFIG,
            start_ms=START,
            policy=Policy(1, "canary", 0.1),
            changes=[Change(onset, candidate=Arm(flag_shift=0.74))],
            operators=[Operator(reentry, "canary", 0.1)],
        ).run(130_000)
        after = [a for a in out.commands() if a.at_ms > reentry and a.action == "rollback"]
        if after:
            second += 1
            gaps.append((after[0].at_ms - reentry) / 1000)
    print(
        f"  rolled back again after re-entry: {second}/{seeds}; seconds from re-entry to the "
        f"second rollback applied: median {statistics.median(gaps):.1f}, max {max(gaps):.1f}"
        if gaps
        else f"  rolled back again after re-entry: 0/{seeds}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=100, help="benign candidates")
    parser.add_argument("--windows", type=int, default=60, help="windows per benign candidate")
    parser.add_argument("--harmful-seeds", type=int, default=20, help="runs per kind of harm")
    args = parser.parse_args()
    print_benign(args.seeds, args.windows)
    print_harmful(args.harmful_seeds)
    print_reentry(args.harmful_seeds)


if __name__ == "__main__":
    main()
