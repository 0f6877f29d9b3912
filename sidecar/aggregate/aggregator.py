"""Windowed champion/candidate aggregation, in parts (this module keeps the names importable):

* ``config``: ``AggregatorConfig``, the knobs;
* ``window``: ``WindowAggregate`` (one window's mergeable state and its ``WindowReport``);
* ``references``: ``References``, each model's reference histogram;
* ``manager``: ``WindowManager``, routing batches to windows, watermarks, closing.
"""

from __future__ import annotations

from .config import AggregatorConfig
from .manager import ClosedPartial, ProcessResult, WindowManager
from .references import ReferenceKey, References
from .window import (
    CHAMPION_DECIDES,
    MAX_OUT_OF_RANGE_FEATURES,
    MAX_POLICY_MODES,
    OTHER_FEATURES,
    PolicySeen,
    Reference,
    WindowAggregate,
    _ArmState,
    _count_feature,
    _count_mode,
    merge_all,
)

__all__ = [
    "CHAMPION_DECIDES",
    "MAX_OUT_OF_RANGE_FEATURES",
    "MAX_POLICY_MODES",
    "OTHER_FEATURES",
    "AggregatorConfig",
    "ClosedPartial",
    "PolicySeen",
    "ProcessResult",
    "Reference",
    "ReferenceKey",
    "References",
    "WindowAggregate",
    "WindowManager",
    "_ArmState",
    "_count_feature",
    "_count_mode",
    "merge_all",
]
