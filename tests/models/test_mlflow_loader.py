"""The ``mlflow`` loader (extra ``sidecar[mlflow]``): pure-python pyfunc models registered in a
sqlite-backed registry the test creates, resolved by alias, scored alone and end to end
through the broker; moving the alias and restarting picks up the new version."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
import pytest
from kafka_helpers import create_topics, decode_values, make_config, produce, read_topic, wait_until

from sidecar.config import FeatureSpec, ModelConfig
from sidecar.contracts import Decision
from sidecar.errors import ConfigError, ContractError, ModelLoadError
from sidecar.examples.fraud import CHAMPION_FEATURES, generate
from sidecar.manifest import Manifest, digest
from sidecar.models import load_model
from sidecar.models.contract import derived_manifest
from sidecar.models.mlflow_registry import RegistryRef, parse_target
from sidecar.runner import Sidecar
from sidecar.traffic import generated_items

REASON = "the mlflow extra is not installed: pip install -e '.[mlflow]' sqlalchemy alembic"
mlflow = pytest.importorskip("mlflow", reason=REASON)
pytest.importorskip("mlflow.pyfunc", reason=REASON)  # needs pandas
pytest.importorskip("sqlalchemy", reason="the sqlite test registry needs sqlalchemy")
pytest.importorskip("alembic", reason="the sqlite test registry needs alembic")

REGISTERED = "fraud-registry"


class AmountModel(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
    """Score = sigmoid(amount / scale - shift): reads its input by column name, so it also
    checks that the loader hands the features over as a named DataFrame."""

    def __init__(self, scale: float, shift: float) -> None:
        self.scale, self.shift = scale, shift

    # No type hints here: mlflow would try (and warn failing) to infer a signature from them.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        z = model_input["amount"].to_numpy() / self.scale - self.shift
        return 1.0 / (1.0 + np.exp(-z))


def expected(x: np.ndarray, scale: float, shift: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(x[:, 0] / scale - shift)))


VERSIONS = {"1": (200.0, 1.0), "2": (50.0, 2.0)}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A sqlite registry holding two versions of one model; alias ``champion`` -> 1."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    logging.getLogger("alembic").setLevel(logging.WARNING)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("sidecar-test", artifact_location=str(root / "art"))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for scale, shift in VERSIONS.values():
        with mlflow.start_run(experiment_id=experiment):
            mlflow.pyfunc.log_model(
                name="model",
                python_model=AmountModel(scale, shift),
                registered_model_name=REGISTERED,
            )
    client.set_registered_model_alias(REGISTERED, "champion", "1")
    return uri


def mlflow_model(uri: str, target: str, **kw: Any) -> ModelConfig:
    return ModelConfig(
        name="fraud-mlflow",
        version="3.1.0",
        loader="mlflow",
        target=target,
        mlflow_tracking_uri=uri,
        features=[FeatureSpec(name=f) for f in CHAMPION_FEATURES],
        **kw,
    )


def registry_digest(cfg: ModelConfig, version: str) -> str:
    manifest = derived_manifest(cfg)
    return digest(
        Manifest(
            **{
                **{f: getattr(manifest, f) for f in manifest.__struct_fields__},
                "registry_model": REGISTERED,
                "registry_version": version,
            }
        )
    )


def test_parse_target() -> None:
    assert parse_target("models:/fraud@champion") == RegistryRef("fraud", alias="champion")
    assert parse_target("models:/fraud/12") == RegistryRef("fraud", version="12")
    for bad in ("models:/fraud", "models:/fraud/Production", "runs:/abc/model", "models:/a/b/1"):
        with pytest.raises(ModelLoadError, match="models:/NAME@ALIAS"):
            parse_target(bad)


def test_config_rejects_a_target_that_is_not_a_registry_uri() -> None:
    with pytest.raises(ConfigError, match="loader mlflow"):
        make_config("localhost:9092", models={"champion": {"loader": "mlflow", "target": "x:y"}})


async def test_alias_and_version_resolve_and_score(registry: str) -> None:
    x = generate(1000, seed=5).features[:, : len(CHAMPION_FEATURES)]
    for target, version in (
        (f"models:/{REGISTERED}@champion", "1"),
        (f"models:/{REGISTERED}/2", "2"),
    ):
        cfg = mlflow_model(registry, target, max_batch=300)
        model = load_model(cfg)
        assert model.version == "3.1.0"  # the semantic version stays the config's
        assert model.manifest.registry_model == REGISTERED
        assert model.manifest.registry_version == version
        assert model.manifest_digest == registry_digest(cfg, version)
        out = await model.score(x)
        assert out.error is None and out.valid.all()
        np.testing.assert_allclose(out.scores, expected(x, *VERSIONS[version]), rtol=1e-12)
        model.close()


def test_unknown_alias_or_version_fails_the_load(registry: str) -> None:
    with pytest.raises(ModelLoadError, match="cannot resolve"):
        load_model(mlflow_model(registry, f"models:/{REGISTERED}@nope"))
    with pytest.raises(ModelLoadError, match="cannot resolve"):
        load_model(mlflow_model(registry, f"models:/{REGISTERED}/99"))


def test_a_manifest_pinning_another_version_refuses_the_load(registry: str) -> None:
    base = mlflow_model(registry, f"models:/{REGISTERED}@champion")
    pinned = Manifest(
        **{
            **{f: getattr(derived_manifest(base), f) for f in Manifest.__struct_fields__},
            "registry_model": REGISTERED,
            "registry_version": "2",
        }
    )
    with pytest.raises(ContractError, match="pins registry model fraud-registry version 2"):
        load_model(mlflow_model(registry, f"models:/{REGISTERED}@champion", manifest=pinned))


async def _run(cfg: Any, n: int, start_id: int, seed: int) -> None:
    await produce(cfg, generated_items(n, seed=seed, start_id=start_id))
    sidecar = Sidecar(cfg)
    task = asyncio.create_task(sidecar.run())
    await wait_until(lambda: sidecar.processed >= n, 60)
    sidecar.request_stop()
    await asyncio.wait_for(task, 60)
    sidecar.close_models()


@pytest.mark.broker
@pytest.mark.slow
async def test_mlflow_champion_end_to_end_and_alias_move(bootstrap: str, registry: str) -> None:
    """Decisions carry the semantic version and the digest of the resolved registry version;
    after the alias moves, a restarted sidecar serves the new version."""
    target = f"models:/{REGISTERED}@champion"
    cfg = make_config(
        bootstrap,
        rollout={"mode": "shadow"},
        models={
            "champion": {
                "loader": "mlflow",
                "target": target,
                "name": "fraud-mlflow",
                "version": "3.1.0",
                "mlflow_tracking_uri": registry,
            }
        },
    )
    await create_topics(cfg)
    n = 500
    await _run(cfg, n, start_id=0, seed=6)
    client = mlflow.MlflowClient(tracking_uri=registry, registry_uri=registry)
    client.set_registered_model_alias(REGISTERED, "champion", "2")
    try:
        await _run(cfg, n, start_id=n, seed=7)
    finally:
        client.set_registered_model_alias(REGISTERED, "champion", "1")
    decisions = decode_values(
        await read_topic(bootstrap, cfg.topics.decisions, expect=2 * n), Decision
    )
    assert len(decisions) == 2 * n
    by_id = {d.request_id: d for d in decisions}
    champion_cfg = cfg.models.champion
    for version, start, seed in (("1", 0, 6), ("2", n, 7)):
        x = generate(n, seed=seed).features[:, : len(CHAMPION_FEATURES)]
        batch = [by_id[f"req-{start + i}"] for i in range(n)]
        assert {d.model_version for d in batch} == {"3.1.0"}
        assert {d.manifest_digest for d in batch} == {registry_digest(champion_cfg, version)}
        np.testing.assert_allclose(
            [d.score for d in batch], expected(x, *VERSIONS[version]), rtol=1e-12
        )
