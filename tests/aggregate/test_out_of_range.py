"""Out-of-range records as a data-quality signal: ``Comparison.out_of_range`` -> columns ->
``WindowAggregate`` counts -> ``out_of_range_rate`` in the report -> a guard rule on it."""

from __future__ import annotations

import msgspec
import numpy as np
from agg_support import ROLLOUT, batch_of, comparisons

from sidecar.aggregate import AggregatorConfig, GroupKey, WindowAggregate
from sidecar.aggregate.batch import ComparisonView, comparison_batch
from sidecar.aggregate.guards import GuardEngine, GuardRule
from sidecar.aggregate.report import FIGURES, WindowReport, figure_of
from sidecar.contracts import Comparison

KEY = GroupKey(ROLLOUT, "m", "1", "m", "2")
CONFIG = AggregatorConfig(window_ms=1_000, min_pairs=100)
PATTERN = [None, ["amount"], None, None, ["amount", "hour"], None, None, None, ["hour"], None]


def flagged(seed: int, n: int, t0: int = 0) -> list[Comparison]:
    """Comparisons where a repeating pattern of records names out-of-range features."""
    comps = comparisons(np.random.default_rng(seed), n, t0=t0)
    return [
        msgspec.structs.replace(c, out_of_range=PATTERN[i % len(PATTERN)])
        for i, c in enumerate(comps)
    ]


def test_columns_from_views_and_structs_agree() -> None:
    comps = flagged(1, 20)
    views = msgspec.json.Decoder(list[ComparisonView]).decode(msgspec.json.encode(comps))
    for batch in (batch_of(comps), comparison_batch(views, 0, np.arange(20))):
        sets = batch.out_of_range_sets
        assert sets[0] == ()
        rows = [sets[c] for c in batch.out_of_range_code.tolist()]
        assert rows == [tuple(PATTERN[i % 10] or ()) for i in range(20)]
        taken = batch.take(np.array([1, 2, 4]))
        assert [taken.out_of_range_sets[c] for c in taken.out_of_range_code.tolist()] == [
            ("amount",),
            (),
            ("amount", "hour"),
        ]
    clean = batch_of(comparisons(np.random.default_rng(2), 5))
    assert clean.out_of_range_sets == ((),) and not clean.out_of_range_code.any()


def test_window_counts_records_and_features_and_reports_a_rate() -> None:
    agg = WindowAggregate(KEY, 0, 1_000, CONFIG)
    agg.add(batch_of(flagged(3, 500)))
    agg.add(batch_of(flagged(3, 500)))  # redelivered: deduplicated, not counted twice
    report = agg.result()
    assert (report.counts.records, report.counts.out_of_range) == (500, 150)
    assert report.counts.out_of_range_features == {"amount": 100, "hour": 100}
    rate = figure_of(report, "out_of_range_rate")
    assert rate.ok and rate.value == 0.3 and rate.n == 500
    assert rate.lo is not None and rate.hi is not None and rate.lo < 0.3 < rate.hi
    assert "out_of_range_rate" in FIGURES

    # Merging per-partition aggregates adds the counts.
    a, b = WindowAggregate(KEY, 0, 1_000, CONFIG), WindowAggregate(KEY, 0, 1_000, CONFIG)
    comps = flagged(4, 400)
    a.add(batch_of(comps[:200]))
    b.add(batch_of(comps[200:], partition=1))
    merged = a.merge(b).result()
    assert merged.counts.out_of_range == 120
    assert merged.counts.out_of_range_features == {"amount": 80, "hour": 80}

    few = WindowAggregate(KEY, 0, 1_000, CONFIG)
    few.add(batch_of(flagged(5, 50)))
    assert few.result().out_of_range_rate.status == "insufficient_data"


def test_reports_without_the_figure_still_decode_and_a_guard_can_use_it() -> None:
    def window(w: int, pattern_share: bool) -> WindowReport:
        agg = WindowAggregate(KEY, w * 1_000, (w + 1) * 1_000, CONFIG)
        comps = flagged(w, 300, t0=w * 1_000)
        if not pattern_share:
            comps = [msgspec.structs.replace(c, out_of_range=None) for c in comps]
        agg.add(batch_of(comps))
        return agg.result()

    old = msgspec.json.decode(
        msgspec.json.encode(window(0, True)).replace(b'"out_of_range_rate"', b'"x"'),
        type=WindowReport,
    )
    assert old.out_of_range_rate.status == "insufficient_data"

    rule = GuardRule(name="bad_inputs", figure="out_of_range_rate", threshold=0.1, consecutive=2)
    engine = GuardEngine([rule])
    fired = [
        (w, e.kind)
        for w, share in enumerate([False, True, True, True])
        for e in engine.evaluate(window(w, share))
    ]
    assert fired == [(2, "fired")]
