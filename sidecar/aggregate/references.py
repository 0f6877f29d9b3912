"""Each model's reference score histogram (supplied, or its first full window), and the
reports that compare a window against them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .config import AggregatorConfig
from .histograms import (
    ScoreHistogram,
)
from .report import (
    ClosedBy,
    WindowReport,
)
from .window import Reference, WindowAggregate

ReferenceKey = tuple[str, str, str]  # (rollout, model, version)


class References:
    """Each model's reference score histogram, and the reports that compare against them.

    Kept per (rollout, model, version): either supplied with :meth:`set`, or taken from the
    first reported window of that key which started at or after the key's first seen event
    time (a window fully covered by data, not the partial one at start-up) and holds at least
    ``min_pairs`` scores.
    """

    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self._refs: dict[ReferenceKey, Reference] = {}

    def set(self, key: ReferenceKey, hist: ScoreHistogram) -> None:
        if not np.array_equal(hist.edges, self.config.edges()):
            raise ValueError("reference histogram must use the configured score edges")
        self._refs[key] = Reference(hist.copy(), None)

    def get(self, key: ReferenceKey) -> Reference | None:
        return self._refs.get(key)

    def report(
        self,
        agg: WindowAggregate,
        *,
        first_seen_ms: int | None,
        emitted_at_ms: int,
        closed_by: ClosedBy = "watermark",
        partitions_missing: Sequence[int] = (),
    ) -> WindowReport:
        """``agg``'s report against the references; may take ``agg`` as a new reference."""
        key = agg.key
        arms = (
            (agg.champion, (key.rollout, key.champion_model, key.champion_version)),
            (agg.candidate, (key.rollout, key.candidate_model, key.candidate_version)),
        )
        refs = [self._refs.get(rk) for _, rk in arms]
        report = agg.result(
            champion_reference=refs[0],
            candidate_reference=refs[1],
            emitted_at_ms=emitted_at_ms,
            closed_by=closed_by,
            partitions_missing=partitions_missing,
        )
        full = first_seen_ms is not None and agg.start_ms >= first_seen_ms
        for (arm, rk), ref in zip(arms, refs, strict=True):
            if ref is None and full and arm.hist.total >= self.config.min_pairs:
                self._refs[rk] = Reference(arm.hist.copy(), agg.start_ms)
        return report


__all__ = ["ReferenceKey", "References"]
