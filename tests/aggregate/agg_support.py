"""Builders of synthetic comparisons for the aggregate tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from sidecar.aggregate import ComparisonBatch, comparison_batch
from sidecar.contracts import Comparison, ModelError, ModelResult

ROLLOUT = "fraud-v2"


def comparisons(
    rng: np.random.Generator,
    n: int,
    *,
    t0: int = 0,
    spacing_ms: int = 1,
    threshold: float = 0.9,
    candidate_threshold: float | None = None,
    noise: float = 0.0,
    error_rate: float = 0.0,
    nan_rate: float = 0.0,
    none_rate: float = 0.0,
    latency_scale: float = 1.0,
    rollout: str = ROLLOUT,
    id_prefix: str = "req",
    candidate_version: str = "2",
    policy_epoch: int = 1,
    policy_mode: str = "shadow",
    champion_error_rate: float = 0.0,
    batch: int = 1,
) -> list[Comparison]:
    """Champion scores U(0,1); candidate = champion + N(0, noise), clipped to [0, 1].

    Latencies are drawn per ``batch`` consecutive records (the sidecar's model calls). A
    failed champion record is served by the candidate (``fallback_candidate``); in canary
    mode every fifth record is the candidate's.
    """
    s1 = rng.random(n)
    s2 = np.clip(s1 + rng.normal(0.0, noise, n), 0.0, 1.0) if noise else s1.copy()
    calls = np.arange(n) // max(batch, 1)
    lat1 = rng.lognormal(1.0, 0.4, n)[calls]
    lat2 = (rng.lognormal(1.0, 0.4, n) * latency_scale)[calls]
    err = rng.random(n) < error_rate
    champ_err = rng.random(n) < champion_error_rate
    nan = rng.random(n) < nan_rate
    none = rng.random(n) < none_rate
    ct = threshold if candidate_threshold is None else candidate_threshold
    out = []
    for i in range(n):
        score2: float | None = float(s2[i])
        if nan[i]:
            score2 = float("nan")
        if none[i] or err[i]:
            score2 = None
        routed_candidate = policy_mode == "canary" and i % 5 == 0
        served: Literal["champion", "candidate"] = "champion"
        if champ_err[i] or routed_candidate:
            served = "candidate"
        champion = ModelResult(
            model="m",
            version="1",
            score=float(s1[i]),
            decision=bool(s1[i] > threshold),
            latency_ms=float(lat1[i]),
        )
        if champ_err[i]:
            champion = ModelResult(
                model="m",
                version="1",
                latency_ms=float(lat1[i]),
                error=ModelError(kind="exception", message="boom"),
            )
        out.append(
            Comparison(
                request_id=f"{id_prefix}-{t0}-{i}",
                routing_key=None,
                rollout=rollout,
                ts=t0 + i * spacing_ms,
                policy_epoch=policy_epoch,
                policy_mode=policy_mode,
                served_by=served,
                champion=champion,
                candidate=ModelResult(
                    model="m",
                    version=candidate_version,
                    score=score2,
                    decision=None if score2 is None else bool(score2 > ct),
                    latency_ms=float(lat2[i]),
                    error=ModelError(kind="timeout", message="deadline") if err[i] else None,
                ),
            )
        )
    return out


def batch_of(
    comps: Sequence[Comparison], partition: int = 0, first_offset: int = 0
) -> ComparisonBatch:
    return comparison_batch(
        list(comps), partition, np.arange(first_offset, first_offset + len(comps))
    )
