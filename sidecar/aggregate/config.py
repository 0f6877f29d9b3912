"""``AggregatorConfig``: the windowing, statistics and memory knobs of the aggregation."""

from __future__ import annotations

import msgspec
import numpy as np
import numpy.typing as npt

from .histograms import (
    LATENCY_GAMMA,
    LATENCY_MAX_MS,
    LATENCY_MIN_MS,
    uniform_edges,
)
from .kinds import RBO_P
from .paired import (
    BATCH_SAMPLE,
    HOST_SHARE,
    LATENCY_MARGIN,
    LATENCY_MIN_DIFF_MS,
    MIN_LATENCY_BATCHES,
)
from .stats import (
    MCNEMAR_EXACT_BELOW,
    PSI_EPSILON,
    Z95,
)
from .windows import (
    DEDUPE_BLOOM_BITS,
    DEDUPE_BLOOM_HASHES,
    DEDUPE_EXACT_CAP,
    WindowSpec,
)


class AggregatorConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Windowing, statistics and memory knobs (all times in milliseconds)."""

    window_ms: int = 60_000
    #: Hop of hopping windows; None for tumbling windows.
    hop_ms: int | None = None
    origin_ms: int = 0
    #: A window is emitted once the watermark passes ``end + grace_ms``.
    grace_ms: int = 0
    #: Watermark = max event time per partition minus this.
    allowed_lateness_ms: int = 5_000
    #: Wall-clock time after which a silent partition stops holding the watermark back.
    idle_timeout_ms: int = 30_000
    #: Score histogram edges; None = 20 uniform bins over [0, 1].
    score_edges: tuple[float, ...] | None = None
    #: Minimum compared pairs for paired, rate and drift figures to be reported.
    min_pairs: int = 200
    #: Minimum latency samples for latency quantiles.
    min_latency_count: int = 50
    z: float = Z95
    psi_eps: float = PSI_EPSILON
    mcnemar_exact_below: int = MCNEMAR_EXACT_BELOW
    dedupe_exact_cap: int = DEDUPE_EXACT_CAP
    dedupe_bloom_bits: int = DEDUPE_BLOOM_BITS
    dedupe_bloom_hashes: int = DEDUPE_BLOOM_HASHES
    latency_min_ms: float = LATENCY_MIN_MS
    latency_max_ms: float = LATENCY_MAX_MS
    latency_gamma: float = LATENCY_GAMMA
    #: Most windows open at once (all rollouts). Past it the oldest are closed early with
    #: ``closed_by="capacity"`` and later records of theirs count as late: a skewed producer
    #: clock holding the watermark back cannot grow memory without bound.
    max_open_windows: int = 1_000
    #: Paired latency (see ``paired``): a batch is "candidate slower" past this ratio ...
    latency_margin: float = LATENCY_MARGIN
    #: ... and this many milliseconds.
    latency_min_diff_ms: float = LATENCY_MIN_DIFF_MS
    #: Fewest distinct batches for the paired latency figures.
    min_latency_batches: int = MIN_LATENCY_BATCHES
    #: Distinct batches kept per window for them (a bottom-k sample).
    latency_batch_sample: int = BATCH_SAMPLE
    #: A one-arm timeout is the host's when the other arm took this share of its time.
    timeout_host_share: float = HOST_SHARE
    #: Rank-biased overlap persistence (ranking outputs).
    rbo_p: float = RBO_P
    #: Regression outputs: a pair differs when ``|candidate - champion|`` exceeds
    #: ``regression_tolerance_abs + regression_tolerance_rel * |champion|``.
    regression_tolerance_abs: float = 0.0
    regression_tolerance_rel: float = 0.1

    def window_spec(self) -> WindowSpec:
        return WindowSpec(
            self.window_ms, self.hop_ms, origin_ms=self.origin_ms, grace_ms=self.grace_ms
        )

    def edges(self) -> npt.NDArray[np.float64]:
        if self.score_edges is None:
            return uniform_edges()
        return np.asarray(self.score_edges, dtype=np.float64)


__all__ = ["AggregatorConfig"]
