"""Per-record validation of request features against the models' manifest ranges.

Vectorised over the decoded batch matrix: one comparison per ranged column. Out-of-range
values (and unknown categories) are counted per model arm and feature, a data-quality signal
exported as ``sidecar_feature_out_of_range_total``. With ``request_contract.validation =
"strict"`` records outside the *champion's* ranges are dead-lettered (kind ``out_of_range``);
the candidate's ranges are only counted, so a candidate's contract never costs champion
traffic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..decoding import DecodedBatch, Rejected
from ..manifest import Manifest

BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class _Check:
    arm: str
    feature: str
    column: int
    lo: float
    hi: float
    #: Category columns: the decoder encodes unknown values as -1.
    category: bool


class RangeValidator:
    def __init__(
        self, columns: list[str], manifests: list[tuple[str, Manifest]], strict: bool
    ) -> None:
        index = {name: i for i, name in enumerate(columns)}
        checks = []
        for arm, manifest in manifests:
            for spec in manifest.inputs:
                if spec.name not in index:
                    continue
                if spec.type == "category":
                    checks.append(_Check(arm, spec.name, index[spec.name], 0, np.inf, True))
                elif spec.min is not None or spec.max is not None:
                    lo = -np.inf if spec.min is None else spec.min
                    hi = np.inf if spec.max is None else spec.max
                    checks.append(_Check(arm, spec.name, index[spec.name], lo, hi, False))
        self._checks = checks
        self._strict = strict

    @property
    def active(self) -> bool:
        return bool(self._checks)

    def out_of_range(self, matrix: npt.NDArray[np.float64]) -> dict[tuple[str, str], BoolArray]:
        """Per (arm, feature): the mask of records outside its range (NaN = null is not)."""
        masks: dict[tuple[str, str], BoolArray] = {}
        for c in self._checks:
            col = matrix[:, c.column]
            masks[(c.arm, c.feature)] = (col < c.lo) | (col > c.hi)
        return masks

    def apply(
        self, batch: DecodedBatch, counts: dict[tuple[str, str], int]
    ) -> tuple[DecodedBatch, list[Rejected], dict[int, list[str]]]:
        """Count out-of-range values into ``counts``; in strict mode return the batch without
        the records outside the champion's ranges, and those records as rejections. Also
        returns, per index of the returned batch, the names of the features out of range for
        either arm (only records that have some: empty in the common case)."""
        if not self._checks or not len(batch):
            return batch, [], {}
        masks = self.out_of_range(batch.matrix)
        reject = np.zeros(len(batch), dtype=bool)
        flagged: list[tuple[str, BoolArray]] = []
        for key, mask in masks.items():
            n = int(mask.sum())
            if n:
                counts[key] = counts.get(key, 0) + n
                flagged.append((key[1], mask))
                if self._strict and key[0] == "champion":
                    reject |= mask
        if not flagged:
            return batch, [], {}
        kept = np.flatnonzero(~reject)
        any_out = np.zeros(len(kept), dtype=bool)
        for _, mask in flagged:
            any_out |= mask[kept]
        features = {
            j: list(dict.fromkeys(f for f, mask in flagged if mask[i]))
            for j, i in zip(np.flatnonzero(any_out).tolist(), kept[any_out].tolist(), strict=True)
        }
        if not reject.any():
            return batch, [], features
        rejected = []
        for i in np.flatnonzero(reject).tolist():
            bad = [f for (arm, f), m in masks.items() if arm == "champion" and m[i]]
            rejected.append(
                Rejected(
                    batch.records[i],
                    "out_of_range",
                    f"feature(s) {', '.join(bad)} outside the champion manifest's allowed "
                    "range or categories (request_contract.validation = strict)",
                    batch.request_ids[i],
                )
            )
        return keep(batch, ~reject), rejected, features


def keep(batch: DecodedBatch, mask: BoolArray) -> DecodedBatch:
    """The records of ``batch`` where ``mask`` is true."""
    idx = np.flatnonzero(mask).tolist()
    return DecodedBatch(
        records=[batch.records[i] for i in idx],
        request_ids=[batch.request_ids[i] for i in idx],
        routing_keys=[batch.routing_keys[i] for i in idx],
        has_routing_key=[batch.has_routing_key[i] for i in idx],
        ts=[batch.ts[i] for i in idx],
        metadata=[batch.metadata[i] for i in idx],
        matrix=batch.matrix[mask],
        rejected=batch.rejected,
        trace={new: batch.trace[old] for new, old in enumerate(idx) if old in batch.trace}
        if batch.trace
        else {},
        items=None if batch.items is None else batch.items.take(np.flatnonzero(mask)),
    )
