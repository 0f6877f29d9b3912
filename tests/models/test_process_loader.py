"""The ``process`` loader: worker processes fed through shared memory, crash and hang drills."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kafka_helpers import create_topics, decode_values, make_config, produce, read_topic, wait_until

from sidecar.config import FeatureSpec, ModelConfig
from sidecar.contracts import Comparison, Decision
from sidecar.errors import ModelLoadError
from sidecar.examples.fraud import CANDIDATE_FEATURES, candidate, generate
from sidecar.models import load_model
from sidecar.runner import Sidecar
from sidecar.traffic import generated_items

X = generate(3000, seed=4).features


def process_model(target: str, **kw: Any) -> ModelConfig:
    return ModelConfig(
        name="m",
        version="1.0.0",
        loader="process",
        target=target,
        features=[FeatureSpec(name=f) for f in CANDIDATE_FEATURES],
        timeout_ms=kw.pop("timeout_ms", 5000),
        **kw,
    )


async def test_scores_equal_the_in_process_model_and_batches_are_split() -> None:
    model = load_model(
        process_model("sidecar.examples.fraud:candidate", concurrency=2, max_batch=700)
    )
    out = await model.score(X)
    assert out.error is None and out.valid.all()
    np.testing.assert_allclose(out.scores, candidate().predict(X))
    # Bigger batches than the buffers grow them; concurrent calls use both workers.
    both = await asyncio.gather(model.score(X[:100]), model.score(np.vstack([X, X])))
    np.testing.assert_allclose(both[1].scores[3000:], out.scores)
    model.close()


async def test_a_crashed_worker_is_restarted_and_its_batch_retried(tmp_path: Path) -> None:
    marker = tmp_path / "crashed"
    model = load_model(process_model("crashy:crash_once", options={"marker": str(marker)}))
    out = await model.score(X[:50])
    assert marker.exists()  # the first worker died on this batch...
    assert out.error is None and out.valid.all()  # ...and the retry on a fresh one scored it
    np.testing.assert_allclose(out.scores, candidate().predict(X[:50]))
    model.close()


async def test_a_batch_that_keeps_crashing_workers_fails_and_the_model_recovers(
    tmp_path: Path,
) -> None:
    cfg = process_model(
        "crashy:crash_once", options={"marker": str(tmp_path / "m"), "always": True}
    )
    model = load_model(cfg)
    out = await model.score(X[:10])
    assert out.error is not None and out.error.kind == "exception"
    assert "crashed on this batch 2 time(s)" in out.error.message
    model.close()


async def test_a_hung_call_times_out_and_its_worker_is_replaced() -> None:
    model = load_model(process_model("crashy:hang", timeout_ms=300))
    poison = X[:5].copy()
    poison[0, 0] = -1.0
    out = await model.score(poison)
    assert out.error is not None and out.error.kind == "timeout"
    await asyncio.sleep(3)  # the replacement starts at once (a spawn imports numpy: ~1 s)
    good = await model.score(X[:5])  # a fresh worker, not stuck behind the hung one
    assert good.error is None and good.valid.all()
    model.close()


def test_a_factory_that_fails_in_the_worker_fails_the_load() -> None:
    with pytest.raises(ModelLoadError, match="failed"):
        load_model(process_model("sidecar.examples.fraud:no_such_factory"))


@pytest.mark.broker
@pytest.mark.slow
async def test_process_candidate_end_to_end_with_a_crash(bootstrap: str, tmp_path: Path) -> None:
    cfg = make_config(
        bootstrap,
        models={
            "candidate": {
                "loader": "process",
                "target": "crashy:crash_once",
                "options": {"marker": str(tmp_path / "crashed")},
                "concurrency": 2,
                "timeout_ms": 10000,
            }
        },
    )
    await create_topics(cfg)
    n = 3000
    await produce(cfg, generated_items(n, seed=8))
    sidecar = Sidecar(cfg)
    task = asyncio.create_task(sidecar.run())
    await wait_until(lambda: sidecar.processed >= n, 90)
    sidecar.request_stop()
    await asyncio.wait_for(task, 60)
    sidecar.close_models()
    decisions = decode_values(await read_topic(bootstrap, cfg.topics.decisions, expect=n), Decision)
    comparisons = decode_values(
        await read_topic(bootstrap, cfg.topics.comparisons, expect=n), Comparison
    )
    assert {d.request_id for d in decisions} == {f"req-{i}" for i in range(n)}
    assert len(comparisons) == n
    assert all(c.candidate.error is None for c in comparisons)  # the crash was retried
    assert (tmp_path / "crashed").exists()
