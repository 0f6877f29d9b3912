"""The ``[outcomes]`` config section: topics, windows, the store, and per-rollout quality rules.

Times are milliseconds. Everything that decides how a request counts (label window, missing
rule, costs) is per rollout: ``[outcomes.quality]`` holds the defaults and
``[outcomes.rollouts.<name>]`` a rollout's own (a whole table: unset keys take the defaults of
``RolloutQuality``, not of ``[outcomes.quality]``). A rollout pair keeps the settings it
started with for its whole life (they are recorded in the changelog with its first records),
so a config change never re-counts requests already counted under the old rules.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from ..aggregate.guards import GuardRule
from .figures import QUALITY_FIGURE_PATHS
from .quality import CostValue, Layout
from .report import Judging, MissingRule, QualityRequirement

Meta = msgspec.Meta

#: Longest label window accepted: a bit over a year (a loan's first repayments).
MAX_LABEL_WINDOW_MS = 400 * 86_400_000

CombineRule = Literal["last", "max"]


class RolloutQuality(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How one rollout's requests are judged once their outcomes are known."""

    #: An outcome counts when it happened at most this long after its request (event time).
    label_window_ms: Annotated[int, Meta(gt=0, le=MAX_LABEL_WINDOW_MS)] = 86_400_000
    #: A request whose label window closes without an outcome: ``unlabelled`` (left out of
    #: every figure) or ``negative`` (e.g. no chargeback within 90 days means legitimate).
    #: Provisional reports apply the rule as if the window closed now.
    missing: MissingRule = "unlabelled"
    #: Several outcomes for one request: ``last`` (the latest by ``ts``) or ``max`` (the
    #: largest label: any positive outcome wins). Ranking labels (item sets): ``last`` is the
    #: latest set, ``max`` the union of the sets (every item acted on counts).
    combine: CombineRule = "last"
    #: A numeric label is positive when at least this (``true`` is 1, ``false`` 0).
    positive_at_least: float = 0.5
    #: Cost of one false positive (flagging what was fine) and of one false negative
    #: (missing what was not), in any unit; the cost figure is the mean per judged request.
    fp_cost: Annotated[float, Meta(ge=0)] = 1.0
    fn_cost: Annotated[float, Meta(ge=0)] = 1.0
    #: Which errors are weighted by the outcome's ``value`` (the amount at stake) when present.
    cost_value: CostValue = "both"
    #: Ranking rollouts (both arms return item lists, an outcome's label is the item ids acted
    #: on): CTR@k, NDCG@k and reciprocal rank are judged over each arm's top ``ranking_k``.
    ranking_k: Annotated[int, Meta(ge=1, le=1000)] = 10
    #: The quality verdict's non-inferiority test for this rollout (see ``gates``).
    non_inferiority: QualityRequirement = msgspec.field(default_factory=QualityRequirement)


def default_quality_rules() -> list[GuardRule]:
    """Roll back a candidate that is significantly worse on cost in two final windows in a row
    (the lower 95% bound of candidate minus champion mean cost above zero)."""
    return [
        GuardRule(
            name="quality_cost",
            figure="cost_diff",
            comparison=">",
            threshold=0.0,
            min_pairs=1000,
            consecutive=2,
            cooldown_s=3600,
            action="rollback",
            bound="lo",
        )
    ]


class OutcomesSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``sidecar outcomes``: the join of comparisons with outcomes, and quality per window."""

    #: Where producers write ``Outcome`` records (any key: they are repartitioned).
    topic: str = "inference.outcomes"
    #: ``QualityReport`` per (rollout pair, window, status), keyed by rollout.
    quality_topic: str = "inference.quality"
    #: ``QualityVerdict`` per rollout pair, keyed by rollout (compacted: the latest counts).
    verdicts_topic: str = "inference.quality-verdicts"
    #: Consumer group of the join (the router uses ``<group_id>.router``); also names the
    #: internal topics ``<group_id>.by-task`` (outcomes repartitioned like the comparisons)
    #: and ``<group_id>.changelog`` (the store's compacted changelog).
    group_id: str = "sidecar-outcomes"
    #: Shared rollouts (``topics.comparisons_key = "routing_key"``) only: each task's
    #: ``QualityPartial`` per rollout pair and window, and the merge stage's
    #: ``MergedQualityWindow`` records, keyed by rollout (compacted; empty:
    #: ``<group_id>.partials``). The merge stage is its own consumer group,
    #: ``<group_id>.merge``, so each rollout is merged by one instance.
    partials_topic: str = ""
    #: Merge stage: a window whose tasks have not all sent their final partial this long
    #: after its first final partial is reported final without them (``tasks_missing``);
    #: one that comes later is merged in and the window reported final again.
    merge_timeout_ms: Annotated[int, Meta(gt=0)] = 60_000
    #: Directory of the RocksDB stores (one per comparison partition). Keep it on a persistent
    #: volume: a restart that finds it replays only the changelog's tail.
    state_dir: str = "sidecar-state/outcomes"
    #: Quality windows, by request event time.
    report_window_ms: Annotated[int, Meta(gt=0)] = 3_600_000
    #: A window matures (its provisional reports start) this long after it ends, when its
    #: comparisons have arrived.
    comparison_lateness_ms: Annotated[int, Meta(ge=0)] = 60_000
    #: Extra wait after a window's label windows close before it is final: outcomes that
    #: happened in time but are still on their way.
    outcome_grace_ms: Annotated[int, Meta(ge=0)] = 60_000
    #: Provisional reports of every mature window this often (wall clock).
    provisional_interval_ms: Annotated[int, Meta(gt=0)] = 60_000
    #: Stream time follows the wall clock once no input arrived for this long, so the last
    #: windows of a stream that stops still become final.
    idle_timeout_ms: Annotated[int, Meta(gt=0)] = 60_000
    #: Records dated further ahead of the wall clock are not used (outcomes: dead-lettered as
    #: ``event_time``; comparisons: skipped and counted): they would move stream time ahead and
    #: make every window final early.
    max_future_ms: Annotated[int, Meta(gt=0)] = 300_000
    #: Bins of each arm's score histograms (uniform in log-odds over probabilities
    #: 0.0003..0.9997): ROC AUC and average precision are exact on scores rounded to these.
    score_bins: Annotated[int, Meta(ge=64, le=8192)] = 1024
    #: Bins per arm of the joint histogram behind the paired tests (DeLong, the paired
    #: bootstrap): joint_bins^2 cells per class.
    joint_bins: Annotated[int, Meta(ge=8, le=128)] = 64
    #: Reliability diagram bins (uniform over [0, 1]) behind the calibration error.
    reliability_bins: Annotated[int, Meta(ge=2, le=50)] = 10
    #: Paired bootstrap resamples behind the average precision and F1 differences.
    bootstrap_resamples: Annotated[int, Meta(ge=20, le=5000)] = 200
    #: Fewest judged pairs (and positives) for the quality figures of a report.
    min_pairs: Annotated[int, Meta(ge=1)] = 100
    min_positives: Annotated[int, Meta(ge=1)] = 10
    #: Prometheus, ``/healthz`` and ``/readyz`` of ``sidecar outcomes`` (0: off).
    metrics_port: Annotated[int, Meta(ge=0, le=65535)] = 9102
    #: The stage's private key (role ``guard``, ``sidecar ctl keygen --role guard``): signs
    #: quality guard rollback/pause commands and quality verdicts. Needed unless ``dry_run``
    #: or nothing is signed (alert-only rules and ``control_verdicts = false``).
    signing_key_file: str | None = None
    #: Publish each rollout's quality gate as a signed ``verdict`` command (``quality_ok``)
    #: on the control topic, so ``control.promote_gate = "quality"`` holds promotion until
    #: the candidate's labelled quality passes (``non_inferiority``).
    control_verdicts: bool = True
    #: A quality verdict that says the same as the last one published for its rollout is
    #: published again at most this often (every instance audits every control record).
    control_verdict_interval_s: Annotated[float, Meta(gt=0)] = 900.0
    #: Log reports, verdicts and guard commands instead of publishing them.
    dry_run: bool = False
    #: The changelog keeps records this long past the longest label window plus a report
    #: window (``retention.ms``), as Kafka Streams does for windowed stores.
    changelog_extra_retention_ms: Annotated[int, Meta(ge=0)] = 86_400_000
    #: Most records taken per poll.
    max_batch: Annotated[int, Meta(ge=1)] = 10_000
    #: Helper processes that decode a poll's records into its changelog chunk while the stage
    #: applies the previous poll (0: decode in the loop). 1 moves ~1.5 us a comparison off
    #: the stage's core, for ~3 us on another: worth it only with an idle core.
    decode_processes: Annotated[int, Meta(ge=0, le=1)] = 0
    #: Most rollouts, and most rollout pairs (rollout, champion and candidate model and
    #: version: a new one at every candidate version), a task holds at once: a bound on state,
    #: reports and metric series when something writes made-up names to the comparisons
    #: topic. Comparisons of a pair beyond them are left out and counted
    #: (``sidecar_outcomes_skipped{reason="too_many_pairs"}``). Only live pairs count: a
    #: finished pair leaves after ``retire_after_ms`` (and a rollout with it, once it has no
    #: live pair).
    max_rollouts_per_task: Annotated[int, Meta(ge=1)] = 64
    max_pairs_per_task: Annotated[int, Meta(ge=1)] = 1_024
    #: A rollout pair is retired (its state, verdict basis and metric series dropped, logged
    #: once) when every window of it is final and no comparison of it arrived for this long
    #: (event time; never less than the pair's label window: a smaller value is raised to
    #: it). A week outlives a weekend's pause or a long incident, and leaves the caps above
    #: far from full with a new candidate version every few days. A comparison of a retired
    #: pair starts it afresh (a new verdict from its next final window); one dated in a window
    #: already final is late, as for any pair. 0: pairs are kept for the life of the store.
    retire_after_ms: Annotated[int, Meta(ge=0)] = 7 * 86_400_000
    fetch_timeout_ms: Annotated[int, Meta(ge=1)] = 200
    #: RocksDB block cache shared by the stores, and each store's memtable size (MiB): with
    #: the write buffers these bound the stage's memory, whatever the label window.
    cache_mb: Annotated[int, Meta(ge=1)] = 64
    write_buffer_mb: Annotated[int, Meta(ge=1)] = 16
    #: Judging rules of every rollout without its own table below.
    quality: RolloutQuality = msgspec.field(default_factory=RolloutQuality)
    #: Per-rollout judging rules (``[outcomes.rollouts.fraud-v2]``). With comparisons keyed by
    #: rollout, outcomes are routed to the partitions of these rollouts and ``rollout.name``.
    rollouts: dict[str, RolloutQuality] = {}
    #: Guard rules over final quality reports (figures: see ``sidecar.outcomes.figures``).
    rules: list[GuardRule] = msgspec.field(default_factory=default_quality_rules)

    def __post_init__(self) -> None:
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise ValueError("outcomes.rules: rule names must be unique")
        for rule in self.rules:
            for fig in (rule.figure, rule.only_if):
                if fig is not None and "." not in fig and fig not in QUALITY_FIGURE_PATHS:
                    raise ValueError(
                        f"outcomes.rules: rule {rule.name!r} watches {fig!r}, which is not a "
                        f"quality figure (one of {', '.join(sorted(QUALITY_FIGURE_PATHS))}); "
                        "rules on the aggregator's figures go under [[aggregate.rules]]"
                    )

    def layout(self) -> Layout:
        return Layout(self.joint_bins, self.reliability_bins, self.score_bins)

    def judging(self) -> Judging:
        return Judging(self.min_pairs, self.min_positives, self.bootstrap_resamples)

    def max_label_window_ms(self) -> int:
        return max(
            [self.quality.label_window_ms] + [q.label_window_ms for q in self.rollouts.values()]
        )

    def merge_retire_horizon_ms(self) -> int:
        """The merge stage forgets a pair once the tasks' stream time is this far past the
        end of its last merged window (0: never): the longest idle time, plus how long after
        its end a window may still be final (label window, lateness, grace). A partial of a
        window that far behind, not open, is too late to open it again."""
        if not self.retire_after_ms:
            return 0
        longest = self.max_label_window_ms()
        return (
            max(self.retire_after_ms, longest)
            + longest
            + self.comparison_lateness_ms
            + self.outcome_grace_ms
        )

    def for_rollout(self, rollout: str) -> RolloutQuality:
        return self.rollouts.get(rollout, self.quality)

    @property
    def by_task_topic(self) -> str:
        return f"{self.group_id}.by-task"

    @property
    def changelog_topic(self) -> str:
        return f"{self.group_id}.changelog"

    @property
    def partials_topic_name(self) -> str:
        return self.partials_topic or f"{self.group_id}.partials"

    @property
    def merge_group(self) -> str:
        return f"{self.group_id}.merge"

    @property
    def router_group(self) -> str:
        return f"{self.group_id}.router"

    def changelog_retention_ms(self) -> int:
        return self.changelog_needed_ms() + self.changelog_extra_retention_ms

    def changelog_needed_ms(self) -> int:
        """How long a changelog record must stay: a request stored now may wait this long
        for its window to become final (a rebuild replays it until then)."""
        return (
            self.max_label_window_ms()
            + self.report_window_ms
            + self.comparison_lateness_ms
            + self.outcome_grace_ms
        )

    def changelog_problems(self, configs: dict[str, str]) -> list[str]:
        """What is wrong with an existing changelog topic's configs (as the broker reports
        them) for this stage: a topic made by hand or by an older setup that deletes records
        before their window is final would lose pending requests on the next rebuild."""
        problems = []
        policy = [p.strip() for p in configs.get("cleanup.policy", "").split(",") if p.strip()]
        if policy and "compact" not in policy:
            problems.append(
                f"cleanup.policy is {','.join(policy)!r}: without compaction the changelog "
                "keeps every chunk until retention deletes it; set it to compact,delete"
            )
        raw = configs.get("retention.ms")
        if raw is not None and (not policy or "delete" in policy):
            try:
                retention = int(raw)
            except ValueError:
                retention = -1
            need = self.changelog_needed_ms()
            if 0 <= retention < need:
                problems.append(
                    f"retention.ms is {retention} but requests may wait {need} ms for their "
                    "window (the longest label window, a report window, the lateness and the "
                    "grace): a rebuild from the changelog would lose them; set retention.ms to "
                    f"at least {self.changelog_retention_ms()} (or -1)"
                )
        return problems


__all__ = [
    "MAX_LABEL_WINDOW_MS",
    "CombineRule",
    "CostValue",
    "MissingRule",
    "OutcomesSettings",
    "RolloutQuality",
    "default_quality_rules",
]
