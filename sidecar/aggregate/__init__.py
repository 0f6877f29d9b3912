"""Pure windowed aggregation of champion/candidate comparisons, statistics and guard rules.

No Kafka and no I/O here: the data path decodes comparisons, builds a ``ComparisonBatch`` with
``comparison_batch``, feeds ``WindowManager.process``, produces the returned ``WindowReport``s
and runs them through a ``GuardEngine`` whose fired events become control commands.
"""

from __future__ import annotations

from .batch import ERROR_KINDS, ArmColumns, ComparisonBatch, GroupKey, comparison_batch
from .config import AggregatorConfig
from .guards import GuardEngine, GuardEvent, GuardRule, default_rules
from .histograms import LatencySketch, ScoreHistogram, quantile_edges, uniform_edges
from .manager import ProcessResult, WindowManager
from .report import (
    FIGURES,
    ArmReport,
    DriftReport,
    LatencyReport,
    OffsetRange,
    PairedReport,
    ReportCounts,
    WindowReport,
    figure_of,
)
from .stats import (
    Figure,
    PairedTable,
    insufficient,
    js_distance,
    ks_binned,
    mcnemar,
    paired_difference,
    paired_ratio,
    psi,
    psi_band,
    wilson,
)
from .window import Reference, WindowAggregate
from .windows import RequestDeduper, Watermark, WindowSpec

__all__ = [
    "ERROR_KINDS",
    "FIGURES",
    "AggregatorConfig",
    "ArmColumns",
    "ArmReport",
    "ComparisonBatch",
    "DriftReport",
    "Figure",
    "GroupKey",
    "GuardEngine",
    "GuardEvent",
    "GuardRule",
    "LatencyReport",
    "LatencySketch",
    "OffsetRange",
    "PairedReport",
    "PairedTable",
    "ProcessResult",
    "Reference",
    "ReportCounts",
    "RequestDeduper",
    "ScoreHistogram",
    "Watermark",
    "WindowAggregate",
    "WindowManager",
    "WindowReport",
    "WindowSpec",
    "comparison_batch",
    "default_rules",
    "figure_of",
    "insufficient",
    "js_distance",
    "ks_binned",
    "mcnemar",
    "paired_difference",
    "paired_ratio",
    "psi",
    "psi_band",
    "quantile_edges",
    "uniform_edges",
    "wilson",
]
