"""Labelled comparison streams for the outcomes stage's broker tests and benchmarks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
from kafka_helpers import make_config, unique

from sidecar.config import SidecarConfig
from sidecar.contracts import Comparison, ModelResult
from sidecar.outcomes.contract import Outcome

ROLLOUT = "fraud-v2"


@dataclass
class Stream:
    """``n`` paired requests of one rollout with their truth, and the records that carry
    them: comparisons (keyed as the sidecar keys them) and outcomes (keyed by request id,
    as an outcome producer would: the router repartitions them)."""

    ids: list[str]
    ts: npt.NDArray[np.int64]
    y: npt.NDArray[np.bool_]
    champion: npt.NDArray[np.float64]
    candidate: npt.NDArray[np.float64]
    comparisons: list[tuple[bytes, bytes]] = field(default_factory=list)
    outcomes: list[tuple[bytes, bytes]] = field(default_factory=list)
    #: Requests with an outcome (positives, and some explicit negatives).
    labelled: set[str] = field(default_factory=set)


def stream(
    n: int,
    *,
    seed: int = 0,
    t0: int | None = None,
    span_ms: int = 10_000,
    delay_ms: tuple[int, int] = (100, 2500),
    key_by: str = "rollout",
    candidate_noise: float = 0.0,
    rollout: str = ROLLOUT,
    prefix: str = "r",
) -> Stream:
    """Requests spread over ``span_ms`` of event time from ``t0`` (default: 40 s ago);
    every positive gets an outcome ``delay_ms`` later, and a tenth of the negatives an
    explicit ``false`` one."""
    rng = np.random.default_rng(seed)
    t0 = t0 if t0 is not None else time.time_ns() // 1_000_000 - 40_000
    y = rng.random(n) < 0.08
    z = rng.normal(size=n) + 1.6 * y
    p1 = 1 / (1 + np.exp(-(z - 2.2)))
    p2 = 1 / (1 + np.exp(-(1.3 * z + candidate_noise * rng.normal(size=n) - 2.6)))
    ts = t0 + np.sort(rng.integers(0, span_ms, size=n)).astype(np.int64)
    ids = [f"{prefix}{i}" for i in range(n)]
    s = Stream(ids, ts, y, p1, p2)
    enc = msgspec.json.encode
    for i, rid in enumerate(ids):
        routing = f"card-{i % 97}"
        comp = Comparison(
            request_id=rid,
            routing_key=routing,
            rollout=rollout,
            ts=int(ts[i]),
            policy_epoch=0,
            policy_mode="shadow",
            served_by="champion",
            champion=ModelResult(
                model="fraud-lr", version="1.4.0", score=float(p1[i]), decision=bool(p1[i] >= 0.3)
            ),
            candidate=ModelResult(
                model="fraud-lr", version="2.1.0", score=float(p2[i]), decision=bool(p2[i] >= 0.3)
            ),
        )
        key = routing if key_by == "routing_key" else rollout
        s.comparisons.append((key.encode(), enc(comp)))
        if y[i] or rng.random() < 0.1:
            at = int(ts[i]) + int(rng.integers(*delay_ms))
            out = Outcome(request_id=rid, label=bool(y[i]), ts=at, routing_key=routing)
            s.outcomes.append((rid.encode(), enc(out)))
            s.labelled.add(rid)
    return s


def outcomes_config(bootstrap: str, state_dir: Path, **overrides: Any) -> SidecarConfig:
    """A config on fresh topics with a fast outcomes stage: 2 s windows, 3 s labels."""
    run = unique("o")
    settings: dict[str, Any] = {
        "topic": f"{run}.outcomes",
        "quality_topic": f"{run}.quality",
        "verdicts_topic": f"{run}.verdicts",
        "group_id": f"{run}-join",
        "state_dir": str(state_dir),
        "report_window_ms": 2000,
        "comparison_lateness_ms": 0,
        "outcome_grace_ms": 500,
        "idle_timeout_ms": 1000,
        "provisional_interval_ms": 500,
        "metrics_port": 0,
        "rules": [],
        # Nothing signed unless a test gives the stage a key (see the quality guard test).
        "control_verdicts": False,
        "quality": {
            "label_window_ms": 3000,
            "missing": "negative",
            "non_inferiority": {"metric": "auc", "margin": 0.02, "min_pairs": 1000},
        },
    }
    sections = dict(overrides)
    settings.update(sections.pop("outcomes", {}))
    return make_config(bootstrap, partitions=3, outcomes=settings, **sections)


def final_reports(reports: list[Any]) -> dict[tuple[Any, ...], Any]:
    """The final reports by (rollout, pair, window): a report published twice (at-least-once
    after a crash) counts once; the last one wins."""
    out = {}
    for r in reports:
        if r.status == "final":
            key = (r.rollout, r.champion.version, r.candidate.version, r.window_start_ms)
            out[key] = r
    return out
