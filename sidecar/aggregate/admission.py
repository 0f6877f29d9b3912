"""Which rollout pairs an aggregator takes: a bound on the names it keeps state for.

Everything the aggregator keeps per rollout pair (``GroupKey``: rollout, champion and candidate
model and version) grows with the number of distinct pairs it has seen: window keys and
first-seen times, reference histograms per model version, guard state, and Prometheus series
per rollout (dozens each). The comparisons and partials topics are written by others too, so
made-up names in every record would grow them all without bound. An aggregator therefore takes
at most ``aggregate.max_rollouts`` distinct rollouts and ``max_rollout_pairs`` distinct pairs
over its life (the configured ``rollout.name`` always gets a rollout slot, and the pair the
config runs, its rollout between its champion and candidate versions, is always taken, even
after made-up versions of that rollout took every slot); records of any pair beyond them are
dead-lettered with the reason, and a restart starts the count afresh.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .batch import ComparisonBatch, GroupKey

#: Distinct rollouts an aggregator keeps state for (over its life), by default
#: (``aggregate.max_rollouts``).
MAX_ROLLOUTS = 64
#: Distinct rollout pairs (rollout, both models and versions) it keeps state for: a rollout
#: makes a new pair at every promotion or new candidate version (``aggregate.max_rollout_pairs``).
MAX_GROUPS = 1_024


class Admission:
    """The rollout pairs taken so far, and whether a new one may be."""

    def __init__(
        self,
        reserved_rollout: str | None = None,
        max_rollouts: int = MAX_ROLLOUTS,
        max_groups: int = MAX_GROUPS,
        configured: GroupKey | None = None,
    ) -> None:
        self.reserved = reserved_rollout
        #: The pair the config runs: taken whatever else was (one more than ``max_groups``).
        self.configured = configured
        self.max_rollouts = max_rollouts
        self.max_groups = max_groups
        self._groups: set[GroupKey] = set()
        self._rollouts: set[str] = set()
        #: Pairs taken of rollouts other than the configured one.
        self._others = 0
        #: Records refused since start (for logs and tests).
        self.refused = 0

    def admit(self, key: GroupKey) -> bool:
        """Whether records of ``key`` are taken (a new key is, while there is room; the
        configured rollout keeps a rollout slot and a quarter of the pairs for itself)."""
        if key in self._groups:
            return True
        if key == self.configured:
            self._groups.add(key)
            self._rollouts.add(key.rollout)
            return True
        mine = key.rollout == self.reserved
        if len(self._groups) >= self.max_groups or (
            not mine and self._others >= self.max_groups - self.max_groups // 4
        ):
            return False
        if key.rollout not in self._rollouts:
            room = self.max_rollouts
            if not mine and self.reserved is not None and self.reserved not in self._rollouts:
                room -= 1
            if len(self._rollouts) >= room:
                return False
            self._rollouts.add(key.rollout)
        self._groups.add(key)
        self._others += not mine
        return True

    def refused_rows(self, batch: ComparisonBatch) -> npt.NDArray[np.bool_] | None:
        """Per row of ``batch``, whether its pair is refused; None when none is (the usual
        batch: a handful of keys, all taken already)."""
        taken = [self.admit(k) for k in batch.keys]
        if all(taken):
            return None
        refused = ~np.asarray(taken, dtype=np.bool_)[batch.key_code]
        self.refused += int(refused.sum())
        return refused

    def reason(self, key: GroupKey) -> str:
        return (
            f"rollout pair beyond what an aggregator keeps state for ({self.max_rollouts} "
            f"rollouts, {self.max_groups} rollout/model/version pairs since it started: "
            "aggregate.max_rollouts, max_rollout_pairs; "
            f"{len(self._rollouts)} rollouts and {len(self._groups)} pairs taken): is something "
            "writing made-up rollout names or versions? Restart the aggregator to start afresh"
        )


__all__ = ["MAX_GROUPS", "MAX_ROLLOUTS", "Admission"]
