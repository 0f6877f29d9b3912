"""The circuit breaker state machine, on a fake clock, and inside a ScoringModel."""

from __future__ import annotations

import numpy as np

from sidecar.config import BreakerConfig, FeatureSpec, ModelConfig
from sidecar.models import ScoringModel
from sidecar.models.health import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


ON = BreakerConfig(enabled=True, failure_rate=0.5, window=10, min_calls=4, open_s=5.0)


def test_opens_at_the_failure_rate_and_probes_after_the_cooldown() -> None:
    clock = Clock()
    b = CircuitBreaker(ON, clock)
    seen: list[BreakerState] = []
    b.on_change = seen.append
    for ok in (True, False, True):
        assert b.allow()
        b.record(ok)
    assert b.state is BreakerState.CLOSED  # 3 calls < min_calls
    assert b.allow()
    b.record(False)  # 2 of 4 failed = 0.5
    assert b.state is BreakerState.OPEN and not b.allow()
    clock.t += 4.9
    assert not b.allow()
    clock.t += 0.2
    assert b.allow() and b.state is BreakerState.HALF_OPEN
    assert not b.allow()  # one probe at a time
    b.record(False)
    assert b.state is BreakerState.OPEN and not b.allow()
    clock.t += 5.1
    assert b.allow()
    b.record(True)
    assert b.state is BreakerState.CLOSED and b.allow()
    assert seen == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]
    assert b.opened == 2


def test_below_the_rate_it_stays_closed_and_disabled_never_opens() -> None:
    b = CircuitBreaker(ON, Clock())
    for i in range(50):
        b.record(i % 3 != 2)  # a third fail
    assert b.state is BreakerState.CLOSED
    off = CircuitBreaker(BreakerConfig(enabled=False), Clock())
    for _ in range(50):
        off.record(False)
    assert off.state is BreakerState.CLOSED and off.allow()


class Flaky:
    def __init__(self) -> None:
        self.fail = True
        self.calls = 0

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.fail:
            raise RuntimeError("down")
        return np.full(batch.shape[0], 0.25)


async def test_an_open_breaker_skips_the_model_as_unavailable() -> None:
    cfg = ModelConfig(
        name="m",
        version="1.0.0",
        target="x:y",
        features=[FeatureSpec(name="a")],
        breaker=BreakerConfig(enabled=True, window=4, min_calls=2, open_s=0.2),
    )
    flaky = Flaky()
    model = ScoringModel(cfg, flaky)
    x = np.zeros((3, 1))
    assert (await model.score(x)).error.kind == "exception"  # type: ignore[union-attr]
    assert (await model.score(x)).error.kind == "exception"  # type: ignore[union-attr]
    skipped = await model.score(x)
    assert skipped.error is not None and skipped.error.kind == "unavailable"
    assert flaky.calls == 2 and model.breaker.state is BreakerState.OPEN
    flaky.fail = False
    import asyncio

    await asyncio.sleep(0.25)
    probe = await model.score(x)
    assert probe.error is None and model.breaker.state is BreakerState.CLOSED
    model.close()


async def test_max_batch_splits_calls() -> None:
    cfg = ModelConfig(
        name="m",
        version="1.0.0",
        target="x:y",
        features=[FeatureSpec(name="a")],
        max_batch=4,
        concurrency=2,
    )
    flaky = Flaky()
    flaky.fail = False
    model = ScoringModel(cfg, flaky)
    out = await model.score(np.zeros((10, 1)))
    assert flaky.calls == 3 and out.valid.all() and out.scores.shape == (10,)
    model.close()
