from __future__ import annotations

import time

import numpy as np
import pytest

from sidecar.config import FeatureSpec, ModelConfig
from sidecar.errors import ModelLoadError
from sidecar.models import load_model


def config(target: str, **kw: object) -> ModelConfig:
    return ModelConfig(
        name="m",
        version="1.0.0",
        target=target,
        features=[FeatureSpec(name=f"f{i}") for i in range(8)],
        **kw,
    )  # type: ignore[arg-type]


X = np.random.default_rng(0).random((50, 8))


async def test_scores_and_decisions_at_the_models_threshold() -> None:
    model = load_model(config("sidecar.examples.fraud:candidate", threshold=0.2))
    out = await model.score(X)
    assert out.error is None and out.valid.all()
    np.testing.assert_array_equal(out.decisions, out.scores >= 0.2)


@pytest.mark.parametrize(
    ("target", "options", "kind"),
    [
        ("sidecar.examples.faulty:raising", {}, "exception"),
        ("sidecar.examples.faulty:wrong_length", {}, "invalid_output"),
        ("sidecar.examples.faulty:slow", {"delay_s": 0.5}, "timeout"),
    ],
)
async def test_failures_are_data_not_exceptions(
    target: str, options: dict[str, object], kind: str
) -> None:
    model = load_model(config(target, options=options, timeout_ms=50))
    out = await model.score(X)
    assert out.error is not None and out.error.kind == kind
    assert not out.valid.any()
    model.close()


async def test_nan_scores_invalidate_only_their_records() -> None:
    model = load_model(config("sidecar.examples.faulty:nans", options={"fraction": 0.2}))
    out = await model.score(X)
    assert out.valid.sum() == 40 and out.record_error is not None
    assert not out.decisions[~out.valid].any()


def test_a_busy_model_spends_its_cpu_cost_per_record_and_scores_as_the_model_it_wraps() -> None:
    from sidecar.examples import faulty, fraud

    busy = faulty.busy(us_per_record=200.0, target="sidecar.examples.fraud:candidate")
    start = time.thread_time()
    scores = busy.predict(X)
    assert time.thread_time() - start >= 50 * 200e-6  # CPU time, not a sleep
    np.testing.assert_array_equal(scores, fraud.candidate().predict(X))


async def test_a_hung_model_does_not_queue_work_without_bound() -> None:
    model = load_model(
        config("sidecar.examples.faulty:slow", options={"delay_s": 0.6}, timeout_ms=100)
    )
    first = await model.score(X)
    second = await model.score(X)  # its only slot is still busy with the first call
    assert first.error and second.error and second.error.kind == "timeout"
    assert second.latency_ms < 300
    model.close()


@pytest.mark.parametrize(
    ("target", "words"),
    [
        ("no_such_module_xyz:factory", "cannot import"),
        ("sidecar.examples.fraud:nope", "no callable"),
        ("sidecar.examples.fraud:FEATURES", "no callable"),
        ("sidecar.examples.fraud:generate", "failed"),
    ],
)
def test_load_errors_say_what_is_wrong(target: str, words: str) -> None:
    with pytest.raises(ModelLoadError, match=words):
        load_model(config(target))
