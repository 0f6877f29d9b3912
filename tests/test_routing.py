from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.routing import Mode, PolicyHolder, RoutingPolicy

KEYS = [f"card-{i}".encode() for i in range(5000)]


@given(st.integers(0, 10_000), st.integers(0, 10_000))
def test_raising_the_share_only_moves_entities_to_the_candidate(a: int, b: int) -> None:
    low, high = sorted((a, b))
    _, at_low = RoutingPolicy(rollout="r", mode=Mode.CANARY, canary_share_bp=low).route(KEYS)
    _, at_high = RoutingPolicy(rollout="r", mode=Mode.CANARY, canary_share_bp=high).route(KEYS)
    # Everyone on the candidate at the lower share stays there at the higher share.
    assert not (at_low & ~at_high).any()


@pytest.mark.parametrize("share", [100, 1000, 5000])
def test_canary_share_is_respected_within_sampling_error(share: int) -> None:
    keys = [f"user-{i}".encode() for i in range(40_000)]
    _, flags = RoutingPolicy(rollout="x", mode=Mode.CANARY, canary_share_bp=share).route(keys)
    p = share / 10_000
    sigma = (p * (1 - p) / len(keys)) ** 0.5
    assert abs(flags.mean() - p) < 5 * sigma


def test_routing_is_sticky_per_key() -> None:
    policy = RoutingPolicy(rollout="x", mode=Mode.CANARY, canary_share_bp=3000)
    keys = [b"a", b"b", b"a", b"c", b"a"]
    buckets, flags = policy.route(keys)
    assert buckets[0] == buckets[2] == buckets[4]
    assert flags[0] == flags[2] == flags[4]


@pytest.mark.parametrize(
    ("mode", "share", "expected"),
    [
        (Mode.SHADOW, 5000, 0.0),
        (Mode.ROLLED_BACK, 5000, 0.0),
        (Mode.PROMOTED, 0, 1.0),
        (Mode.CANARY, 0, 0.0),
        (Mode.CANARY, 10_000, 1.0),
    ],
)
def test_modes(mode: Mode, share: int, expected: float) -> None:
    _, flags = RoutingPolicy(rollout="x", mode=mode, canary_share_bp=share).route(KEYS)
    assert flags.mean() == expected


def test_share_outside_basis_points_is_refused() -> None:
    with pytest.raises(ValueError, match=r"0\.\.10000"):
        RoutingPolicy(rollout="x", canary_share_bp=10_001)


def test_scoring_both_arms_is_the_default_and_can_be_turned_off() -> None:
    both = RoutingPolicy(rollout="x", mode=Mode.SHADOW)
    assert both.scores_champion and both.scores_candidate
    lean = RoutingPolicy(rollout="x", mode=Mode.SHADOW, score_shadow_arm=False)
    assert lean.scores_champion and not lean.scores_candidate
    promoted = RoutingPolicy(rollout="x", mode=Mode.PROMOTED, score_shadow_arm=False)
    assert promoted.scores_candidate and not promoted.scores_champion


def test_holder_swaps_atomically_and_never_goes_back_in_epochs() -> None:
    holder = PolicyHolder(RoutingPolicy(rollout="x", epoch=3))
    seen = []
    holder.on_swap(lambda old, new: seen.append((old.epoch, new.epoch)))
    holder.swap(RoutingPolicy(rollout="x", epoch=4, mode=Mode.ROLLED_BACK))
    assert holder.current.mode is Mode.ROLLED_BACK and seen == [(3, 4)]
    with pytest.raises(ValueError, match="backwards"):
        holder.swap(RoutingPolicy(rollout="x", epoch=2))
    assert np.array_equal(holder.current.route([b"k"])[1], [False])
