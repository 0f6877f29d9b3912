"""The ``http`` loader against a real MLServer serving a scikit-learn model the test trained."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kafka_helpers import create_topics, decode_values, make_config, produce, read_topic, wait_until
from mlserver_support import MODEL_NAME, MLServer

from sidecar.config import FeatureSpec, ModelConfig
from sidecar.contracts import Comparison, Decision
from sidecar.examples.fraud import CHAMPION_FEATURES, generate
from sidecar.models import load_model
from sidecar.models.health import BreakerState
from sidecar.runner import Sidecar
from sidecar.traffic import generated_items


def http_model(url: str, **kw: Any) -> ModelConfig:
    return ModelConfig(
        name="fraud-sklearn",
        version="1.0.0",
        loader="http",
        url=url,
        target=MODEL_NAME,
        options={"output": "predict_proba", "model_version": "1.0.0"},
        features=[FeatureSpec(name=f) for f in CHAMPION_FEATURES],
        threshold=0.3,
        timeout_ms=kw.pop("timeout_ms", 2000),
        **kw,
    )


@pytest.mark.slow
async def test_scores_equal_the_trained_models_probabilities(
    mlserver: MLServer, mlserver_model: tuple[Path, np.ndarray]
) -> None:
    model = load_model(http_model(mlserver.url, max_batch=64, concurrency=2))
    probe = generate(200, seed=77).features[:, : len(CHAMPION_FEATURES)]
    out = await model.score(probe)
    assert out.error is None and out.valid.all()
    np.testing.assert_allclose(out.scores, mlserver_model[1], rtol=1e-9)
    np.testing.assert_array_equal(out.decisions, out.scores >= 0.3)
    await model.aclose()


@pytest.mark.slow
async def test_failures_are_data(mlserver: MLServer) -> None:
    probe = np.zeros((5, len(CHAMPION_FEATURES)))
    wrong = load_model(
        http_model(mlserver.url).__class__(
            **{**_fields(http_model(mlserver.url)), "target": "no-such-model"}
        )
    )
    out = await wrong.score(probe)
    assert out.error is not None and out.error.kind == "exception"
    assert "404" in out.error.message
    await wrong.aclose()
    down = load_model(http_model("http://127.0.0.1:9"))  # nothing listens on port 9
    out = await down.score(probe)
    assert out.error is not None and out.error.kind == "unavailable"
    await down.aclose()


def _fields(cfg: ModelConfig) -> dict[str, Any]:
    return {f: getattr(cfg, f) for f in cfg.__struct_fields__}


@pytest.mark.broker
@pytest.mark.slow
async def test_server_stopped_mid_stream(bootstrap: str, mlserver: MLServer) -> None:
    """Champion on MLServer: while it is down the champion failure policy decides (the
    candidate, with a fallback reason), nothing is lost, and the breaker opens, then closes
    once the server is back."""
    champion = _fields(http_model(mlserver.url, timeout_ms=1000))
    champion["features"] = [{"name": f} for f in CHAMPION_FEATURES]
    champion["breaker"] = {"enabled": True, "window": 6, "min_calls": 3, "open_s": 1.0}
    champion.pop("manifest")
    cfg = make_config(
        bootstrap,
        models={"champion": champion},
        rollout={"mode": "shadow", "champion_failure": "fallback_candidate"},
        pipeline={"max_batch": 200},
    )
    await create_topics(cfg)
    items = generated_items(4000, seed=21)
    sidecar = Sidecar(cfg)
    task = asyncio.create_task(sidecar.run())
    await asyncio.wait_for(sidecar.ready.wait(), 30)
    states: set[float] = set()
    gauge = ("sidecar_model_health", {"arm": "champion", "model": "fraud-sklearn"})

    async def watch() -> None:
        while True:
            value = sidecar.metrics.registry.get_sample_value(
                gauge[0], {**gauge[1], "version": "1.0.0"}
            )
            if value is not None:
                states.add(value)
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    sent = 0
    try:
        await produce(cfg, items[:1000])
        await wait_until(lambda: sidecar.processed >= 1000, 60)
        # Off the event loop: the sidecar's group membership must not stall meanwhile.
        await asyncio.to_thread(mlserver.stop)
        for i in range(1000, 2000, 100):  # small batches: several calls fail, breaker opens
            await produce(cfg, items[i : i + 100])
            await asyncio.sleep(0.1)
        await wait_until(lambda: sidecar.processed >= 2000, 60)
        assert sidecar.champion.breaker.opened >= 1
        await asyncio.to_thread(mlserver.start)
        # Traffic until the breaker has closed again (its calls are what close it; a cold
        # server may fail the first ones and open it once more).
        sent = 2000
        deadline = asyncio.get_running_loop().time() + 60
        while sidecar.champion.breaker.state is not BreakerState.CLOSED:
            assert asyncio.get_running_loop().time() < deadline, "breaker never closed"
            await produce(cfg, items[sent : sent + 50])
            sent += 50
            await wait_until(lambda n=sent: sidecar.processed >= n, 60)
            await asyncio.sleep(0.3)
        final = range(sent, sent + 100)  # decided by the champion again
        await produce(cfg, items[sent : sent + 100])
        sent += 100
        await wait_until(lambda: sidecar.processed >= sent, 60)
    finally:
        watcher.cancel()
        sidecar.request_stop()
        await asyncio.wait_for(task, 60)
        sidecar.close_models()

    decisions = decode_values(
        await read_topic(bootstrap, cfg.topics.decisions, expect=sent), Decision
    )
    comparisons = decode_values(
        await read_topic(bootstrap, cfg.topics.comparisons, expect=sent), Comparison
    )
    assert len(decisions) == len(comparisons) == sent  # nothing lost
    assert {d.request_id for d in decisions} == {f"req-{i}" for i in range(sent)}
    by_id = {d.request_id: d for d in decisions}
    first = [by_id[f"req-{i}"] for i in range(1000)]
    assert all(d.arm == "champion" and d.fallback is None for d in first)
    fallbacks = [d for d in decisions if d.fallback]
    assert fallbacks and all(d.arm == "candidate" for d in fallbacks)
    assert all(d.fallback.startswith("champion_failed: unavailable") for d in fallbacks)  # type: ignore[union-attr]
    skipped = [
        c for c in comparisons if c.champion.error and "circuit open" in c.champion.error.message
    ]
    assert skipped  # the breaker skipped calls while open
    last = [by_id[f"req-{i}"] for i in final]
    assert all(d.arm == "champion" and d.fallback is None for d in last)
    assert sidecar.champion.breaker.opened >= 1
    assert {float(BreakerState.OPEN), float(BreakerState.CLOSED)} <= states
