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


@dataclass
class RankingStream:
    """``n`` ranking requests of one rollout (both arms return item lists), the items each
    user clicked (outcomes for those with a click; none for the rest), and their records."""

    ids: list[str]
    champion: list[list[str]]
    candidate: list[list[str]]
    clicked: list[set[str]]
    comparisons: list[tuple[bytes, bytes]] = field(default_factory=list)
    outcomes: list[tuple[bytes, bytes]] = field(default_factory=list)


def ranking_stream(
    n: int,
    *,
    seed: int = 0,
    rollout: str = "recs-v2",
    span_ms: int = 6_000,
    items: int = 40,
    delay_ms: tuple[int, int] = (100, 2500),
) -> RankingStream:
    """A popularity champion (the same top list for everyone) against a candidate that knows
    each user's taste (a third of its list are items the user likes); users click a liked
    item they were shown by either arm, sometimes twice (a repeated outcome)."""
    rng = np.random.default_rng(seed)
    t0 = time.time_ns() // 1_000_000 - 40_000
    pool = [f"sku-{i}" for i in range(items)]
    popular = pool[:10]
    ts = t0 + np.sort(rng.integers(0, span_ms, size=n)).astype(np.int64)
    s = RankingStream([f"q{i}" for i in range(n)], [], [], [])
    enc = msgspec.json.encode
    for i, rid in enumerate(s.ids):
        liked = {str(x) for x in rng.choice(pool, size=6, replace=False)}
        mine = sorted(liked)[:3] + [x for x in popular if x not in liked]
        champion, candidate = popular, mine[:10]
        shown = [x for x in {*champion[:5], *candidate[:5]} if x in liked]
        clicked = {str(x) for x in shown if rng.random() < 0.7}
        s.champion.append(champion)
        s.candidate.append(candidate)
        s.clicked.append(clicked)

        def arm(version: str, ranked: list[str]) -> ModelResult:
            scores = [1.0 - j / 20 for j in range(len(ranked))]
            return ModelResult(
                model="recs",
                version=version,
                output_kind="ranking",
                items=ranked,
                item_scores=scores,
            )

        comp = Comparison(
            request_id=rid,
            routing_key=f"user-{i % 50}",
            rollout=rollout,
            ts=int(ts[i]),
            policy_epoch=0,
            policy_mode="shadow",
            served_by="champion",
            champion=arm("1.0.0", champion),
            candidate=arm("2.0.0", candidate),
        )
        s.comparisons.append((rollout.encode(), enc(comp)))
        if clicked:
            at = int(ts[i]) + int(rng.integers(*delay_ms))
            out = Outcome(request_id=rid, label=sorted(clicked), ts=at)
            s.outcomes.append((rid.encode(), enc(out)))
            if rng.random() < 0.1:
                s.outcomes.append((rid.encode(), enc(out)))
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
