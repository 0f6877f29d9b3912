"""Routing: which arm decides each request, under which policy.

A :class:`RoutingPolicy` is immutable. The data loop reads :attr:`PolicyHolder.current` once per
batch, so every record of a batch is routed by one policy and records its epoch; the control
plane swaps in a new policy with :meth:`PolicyHolder.swap` (a single reference assignment on the
event loop thread, so it is atomic with respect to the loop).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence

import msgspec
import numpy as np
import numpy.typing as npt

from .hashing import BUCKETS, buckets_of


class Mode(enum.StrEnum):
    """Routing modes of a rollout."""

    SHADOW = "shadow"  # champion decides; candidate scored and compared
    CANARY = "canary"  # candidate decides for ``canary_share_bp`` of the buckets
    PROMOTED = "promoted"  # candidate decides everything; old champion still scored
    ROLLED_BACK = "rolled_back"  # champion decides everything


class RoutingPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """The routing policy in force: one immutable value, identified by its epoch."""

    rollout: str
    mode: Mode = Mode.SHADOW
    canary_share_bp: int = 0
    epoch: int = 0
    #: Score the arm that does not decide. Off only when a user asks: comparisons then carry
    #: ``skipped`` for that arm.
    score_shadow_arm: bool = True
    #: The control command that produced this policy (``None`` for the configured start policy).
    command_id: str | None = None
    since_ms: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.canary_share_bp <= BUCKETS:
            raise ValueError(
                f"canary_share_bp must be within 0..{BUCKETS} basis points, "
                f"got {self.canary_share_bp}"
            )

    @property
    def candidate_share_bp(self) -> int:
        """Share of buckets (basis points) the candidate decides under this policy."""
        if self.mode is Mode.PROMOTED:
            return BUCKETS
        if self.mode is Mode.CANARY:
            return self.canary_share_bp
        return 0

    def candidate_decides(self, buckets: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Per record: does the candidate decide? Monotone in the share: raising the share
        only moves buckets from champion to candidate, never back."""
        return buckets < self.candidate_share_bp

    def route(self, keys: Sequence[bytes]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
        """Buckets and candidate-decides flags for a batch of UTF-8 routing keys."""
        buckets = buckets_of(keys, self.rollout)
        return buckets, self.candidate_decides(buckets)

    @property
    def scores_champion(self) -> bool:
        return self.score_shadow_arm or self.candidate_share_bp < BUCKETS

    @property
    def scores_candidate(self) -> bool:
        return self.score_shadow_arm or self.candidate_share_bp > 0


class PolicyHolder:
    """Holds the current policy; swapped atomically while the data loop runs."""

    def __init__(self, policy: RoutingPolicy) -> None:
        self._policy = policy
        self._listeners: list[Callable[[RoutingPolicy, RoutingPolicy], None]] = []

    @property
    def current(self) -> RoutingPolicy:
        return self._policy

    def swap(self, policy: RoutingPolicy) -> RoutingPolicy:
        """Install ``policy`` and return the previous one. Epochs never go backwards."""
        old = self._policy
        if policy.epoch < old.epoch:
            raise ValueError(f"policy epoch would go backwards: {old.epoch} -> {policy.epoch}")
        self._policy = policy
        for listener in self._listeners:
            listener(old, policy)
        return old

    def on_swap(self, listener: Callable[[RoutingPolicy, RoutingPolicy], None]) -> None:
        self._listeners.append(listener)


def now_ms() -> int:
    return time.time_ns() // 1_000_000
