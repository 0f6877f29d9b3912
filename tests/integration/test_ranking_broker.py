"""A recommender rollout on a real broker: the example config, every request re-ranked by both
models, decisions and comparisons carrying the top 10 in rank order."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest
from kafka_helpers import create_topics, decode_values, produce, read_topic, unique, wait_until

from sidecar.config import load_config
from sidecar.contracts import Comparison, DeadLetter, Decision
from sidecar.examples import recommend
from sidecar.runner import Sidecar

pytestmark = pytest.mark.broker
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "recommend.toml"


async def test_the_example_recommender_rollout_runs_end_to_end(bootstrap: str) -> None:
    run = unique("recs")
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "SIDECAR_KAFKA__GROUP_ID": f"{run}-group",
        "SIDECAR_METRICS__PORT": "0",
        "SIDECAR_CONTROL__ENABLED": "false",
        "SIDECAR_ROLLOUT__MODE": "canary",
        "SIDECAR_ROLLOUT__CANARY_SHARE_BP": "3000",
        "SIDECAR_TOPICS__PARTITIONS": "3",
        **{
            f"SIDECAR_TOPICS__{t.upper()}": f"{run}.{t}"
            for t in ("requests", "decisions", "comparisons", "dead_letter", "control")
        },
    }
    cfg = load_config(EXAMPLE, env)
    await create_topics(cfg)
    n = 1500
    docs = recommend.request_dicts(recommend.generate(n, seed=21))
    items = [(d["routing_key"].encode(), msgspec.json.encode(d)) for d in docs]
    bad = {"request_id": "no-candidates", "features": {"user": 1, "segment": 0}}
    await produce(cfg, [*items, (b"x", msgspec.json.encode(bad))])
    sidecar = Sidecar(cfg)
    task = asyncio.create_task(sidecar.run())
    await asyncio.wait_for(sidecar.ready.wait(), 30)
    await wait_until(lambda: sidecar.processed >= n + 1, 90)
    sidecar.request_stop()
    await asyncio.wait_for(task, 60)
    sidecar.close_models()
    t = cfg.topics
    decisions = decode_values(await read_topic(bootstrap, t.decisions, expect=n), Decision)
    comparisons = decode_values(await read_topic(bootstrap, t.comparisons, expect=n), Comparison)
    letters = decode_values(await read_topic(bootstrap, t.dead_letter, expect=1), DeadLetter)
    assert len(decisions) == len(comparisons) == n
    assert [(x.kind, x.request_id) for x in letters] == [("feature_missing", "no-candidates")]
    by_id = {d["request_id"]: set(d["candidates"]) for d in docs}
    for d in decisions:
        assert d.output_kind == "ranking" and d.items is not None and len(d.items) == 10
        assert set(d.items) <= by_id[d.request_id]
        assert d.item_scores == sorted(d.item_scores or [], reverse=True)
    assert {d.arm for d in decisions} == {"champion", "candidate"}
    for c in comparisons:
        assert len(c.champion.items or []) == len(c.candidate.items or []) == 10
