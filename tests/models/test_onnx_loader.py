"""The ``onnx`` loader (extra ``sidecar[onnx]``): a logistic regression the test fits and
exports to ONNX, scored by onnxruntime, alone and end to end through the broker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from kafka_helpers import create_topics, decode_values, make_config, produce, read_topic, wait_until

from sidecar.config import FeatureSpec, ModelConfig
from sidecar.contracts import Comparison
from sidecar.errors import ModelLoadError
from sidecar.examples.fraud import CANDIDATE_FEATURES, generate
from sidecar.models import load_model
from sidecar.runner import Sidecar
from sidecar.traffic import generated_items

onnx = pytest.importorskip(
    "onnx", reason="the onnx extra is not installed: pip install -e '.[onnx]'"
)
pytest.importorskip(
    "onnxruntime", reason="the onnx extra is not installed: pip install -e '.[onnx]'"
)
from onnx import TensorProto, helper  # noqa: E402


def fit(seed: int = 3) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """A logistic regression on standardised raw features (gradient descent, numpy only)."""
    data = generate(20_000, seed=seed, fraud_rate=0.05)
    x = data.features
    mean, std = x.mean(axis=0), x.std(axis=0)
    z = (x - mean) / std
    w, b, y = np.zeros(z.shape[1]), 0.0, data.is_fraud.astype(float)
    for _ in range(300):
        p = 1 / (1 + np.exp(-(z @ w + b)))
        w -= 0.5 * z.T @ (p - y) / len(y)
        b -= 0.5 * float((p - y).mean())
    return w / std, b - float((w * mean / std).sum()), mean, std


def export(path: Path, coef: np.ndarray, intercept: float) -> None:
    """``probabilities = [1 - p, p]`` with ``p = sigmoid(x @ coef + intercept)``, float32."""
    d = len(coef)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["p"]),
        helper.make_node("Sub", ["one", "p"], ["q"]),
        helper.make_node("Concat", ["q", "p"], ["probabilities"], axis=1),
    ]
    init = [
        helper.make_tensor("w", TensorProto.FLOAT, [d, 1], coef.astype(np.float32).tolist()),
        helper.make_tensor("b", TensorProto.FLOAT, [1], [float(intercept)]),
        helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]),
    ]
    graph = helper.make_graph(
        nodes,
        "fraud_lr",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, d])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, float]:
    coef, intercept, _, _ = fit()
    path = tmp_path_factory.mktemp("onnx") / "fraud_lr.onnx"
    export(path, coef, intercept)
    return path, coef, intercept


def expected(x: np.ndarray, coef: np.ndarray, intercept: float) -> np.ndarray:
    return 1 / (1 + np.exp(-(x @ coef + intercept)))


def onnx_model(path: Path, **kw: object) -> ModelConfig:
    return ModelConfig(
        name="fraud-onnx",
        version="1.0.0",
        loader="onnx",
        target=str(path),
        features=[FeatureSpec(name=f) for f in CANDIDATE_FEATURES],
        **kw,  # type: ignore[arg-type]
    )


async def test_scores_match_the_exported_model(exported: tuple[Path, np.ndarray, float]) -> None:
    path, coef, intercept = exported
    model = load_model(onnx_model(path, concurrency=2, max_batch=500))
    x = generate(2000, seed=5).features
    out = await model.score(x)
    assert out.error is None and out.valid.all()
    np.testing.assert_allclose(out.scores, expected(x, coef, intercept), rtol=1e-4, atol=1e-6)
    model.close()


def test_wrong_width_or_missing_file_fails_the_load(
    exported: tuple[Path, np.ndarray, float], tmp_path: Path
) -> None:
    cfg = onnx_model(exported[0])
    narrow = ModelConfig(
        **{
            **{f: getattr(cfg, f) for f in cfg.__struct_fields__},
            "features": [FeatureSpec(name="a")],
        }
    )
    with pytest.raises(ModelLoadError, match="takes 8 features"):
        load_model(narrow)
    with pytest.raises(ModelLoadError, match="cannot load ONNX model"):
        load_model(onnx_model(tmp_path / "missing.onnx"))


@pytest.mark.broker
async def test_onnx_candidate_end_to_end(
    bootstrap: str, exported: tuple[Path, np.ndarray, float]
) -> None:
    path, coef, intercept = exported
    cfg = make_config(
        bootstrap,
        models={"candidate": {"loader": "onnx", "target": str(path), "name": "fraud-onnx"}},
    )
    await create_topics(cfg)
    n = 2000
    await produce(cfg, generated_items(n, seed=6))
    sidecar = Sidecar(cfg)
    task = asyncio.create_task(sidecar.run())
    await wait_until(lambda: sidecar.processed >= n, 60)
    sidecar.request_stop()
    await asyncio.wait_for(task, 60)
    sidecar.close_models()
    comparisons = decode_values(
        await read_topic(bootstrap, cfg.topics.comparisons, expect=n), Comparison
    )
    assert len(comparisons) == n
    x = generate(n, seed=6).features
    want = expected(x, coef, intercept)
    got = {c.request_id: c.candidate.score for c in comparisons}
    np.testing.assert_allclose([got[f"req-{i}"] for i in range(n)], want, rtol=1e-4, atol=1e-6)
