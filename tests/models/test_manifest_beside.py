"""A manifest shipped beside the model file is used when the config sets none:
``<stem>.manifest.toml``, then ``manifest.toml`` in the same folder; one naming another model
is skipped, a stale one for this model stops the start."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import FeatureSpec, ModelConfig
from sidecar.errors import ContractError
from sidecar.manifest import digest
from sidecar.models import load_model
from sidecar.models.contract import derived_manifest, model_file, model_manifest


def manifest_toml(name: str = "beside", version: str = "1.2.0", amount_max: float = 500) -> str:
    return f"""
name = "{name}"
version = "{version}"
owner = "risk-ml"

[[inputs]]
name = "amount"
min = 0
max = {amount_max}

[[inputs]]
name = "hour"
"""


def config(loader: str, target: str, **kw: object) -> ModelConfig:
    return ModelConfig(
        name="beside",
        version="1.2.0",
        loader=loader,  # type: ignore[arg-type]
        target=target,
        features=[FeatureSpec(name="amount"), FeatureSpec(name="hour")],
        **kw,  # type: ignore[arg-type]
    )


def test_onnx_lookup_order(tmp_path: Path) -> None:
    model = tmp_path / "fraud_lr.onnx"
    model.write_bytes(b"")
    cfg = config("onnx", str(model))
    assert model_file(cfg) == model
    assert model_manifest(cfg) == derived_manifest(cfg)  # nothing beside it yet

    (tmp_path / "manifest.toml").write_text(manifest_toml(amount_max=900))
    spec = model_manifest(cfg).input("amount")
    assert spec is not None and spec.max == 900

    (tmp_path / "fraud_lr.manifest.toml").write_text(manifest_toml(amount_max=500))
    spec = model_manifest(cfg).input("amount")
    assert spec is not None and spec.max == 500  # the model's own file comes first

    explicit = tmp_path / "elsewhere.toml"
    explicit.write_text(manifest_toml(amount_max=7))
    spec = model_manifest(config("onnx", str(model), manifest_file=str(explicit))).input("amount")
    assert spec is not None and spec.max == 7  # manifest_file wins over the lookup


def test_a_manifest_for_another_model_is_skipped_a_stale_one_stops_the_start(
    tmp_path: Path,
) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    cfg = config("onnx", str(model))
    (tmp_path / "m.manifest.toml").write_text(manifest_toml(name="other-model"))
    (tmp_path / "manifest.toml").write_text(manifest_toml(amount_max=42))
    spec = model_manifest(cfg).input("amount")
    assert spec is not None and spec.max == 42
    (tmp_path / "manifest.toml").write_text(manifest_toml(version="1.1.0"))
    with pytest.raises(ContractError, match=r"is for beside 1\.1\.0"):
        model_manifest(cfg)


def test_python_module_manifest_is_loaded_with_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "beside_model.py").write_text(
        "import numpy as np\n\n"
        "class Model:\n"
        "    def predict(self, batch):\n"
        "        return np.full(len(batch), 0.25)\n\n"
        "def build():\n"
        "    return Model()\n"
    )
    (tmp_path / "beside_model.manifest.toml").write_text(manifest_toml())
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = config("python", "beside_model:build")
    assert model_file(cfg) == tmp_path / "beside_model.py"
    model = load_model(cfg)
    assert model.manifest.owner == "risk-ml"
    assert model.manifest_digest == digest(model.manifest) != digest(derived_manifest(cfg))
    model.close()
    # Loaders without a model file (http, mlflow) and unknown modules look nowhere.
    assert model_file(config("python", "no_such_module_xyz:build")) is None
    assert model_file(config("http", "fraud", url="http://127.0.0.1:1")) is None
