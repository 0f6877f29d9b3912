"""The registry side of the lifecycle: promote and retire written back to an MLflow registry
(a local sqlite one) by the running sidecars; prune by policy within the compliance horizon;
release notes of a contract diff stored on a registry version."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from control_helpers import control_config, ctl, running, setup, traffic
from kafka_helpers import wait_until

from sidecar.cli import main
from sidecar.control.client import EXIT_OK
from sidecar.examples.fraud import CANDIDATE_FEATURES, CHAMPION_FEATURES
from sidecar.manifest import InputSpec, Manifest, OutputSpec, release_notes, rollback_problems
from sidecar.registry import (
    ARCHIVED_AT,
    DAY_MS,
    DIGEST_TAG,
    RETIRED_AT,
    Policy,
    VersionInfo,
    iso,
    parse_policy,
    plan_prune,
)

NOW = 1_800_000_000_000


def version(
    v: str, archived_days: float | None = None, retired_days: float | None = None, **kw: Any
) -> VersionInfo:
    tags = dict(kw.pop("tags", {}))
    if archived_days is not None:
        tags[ARCHIVED_AT] = iso(int(NOW - archived_days * DAY_MS))
    if retired_days is not None:
        tags[RETIRED_AT] = iso(int(NOW - retired_days * DAY_MS))
    return VersionInfo(v, tuple(kw.pop("aliases", ())), tuple(sorted(tags.items())))


VERSIONS = [
    version("1", 400, 399, tags={DIGEST_TAG: "sha256:one"}),
    version("2", 200, 100),
    version("3", 100, 2),  # retired two days ago
    version("4", 50),  # archived, not retired: still warm
    version("5", aliases=("champion",)),
    version("6"),  # never archived by the lifecycle
]


def plan(
    policy: str, horizon: float = 30, digests: frozenset[str] = frozenset()
) -> dict[str, bool]:
    verdicts = plan_prune(
        VERSIONS, parse_policy(policy), now_ms=NOW, horizon_days=horizon, decided_digests=digests
    )
    return {v.version: v.delete for v in verdicts}


def test_policies() -> None:
    assert parse_policy("time:90d") == Policy("time", days=90)
    assert parse_policy("count:20") == Policy("count", count=20)
    for bad in ("time:90", "count:-1", "forever", "time:d"):
        with pytest.raises(Exception, match="retention policy"):
            parse_policy(bad)
    assert not any(plan("keep-forever").values())
    assert plan("time:150d") == dict.fromkeys("123456", False) | {"1": True, "2": True}
    assert plan("time:300d") == dict.fromkeys("123456", False) | {"1": True}
    # count keeps the newest archived: 4 and 3; 3 is in the horizon anyway, 4 still warm
    assert plan("count:2") == dict.fromkeys("123456", False) | {"1": True, "2": True}
    assert plan("count:0") == dict.fromkeys("123456", False) | {"1": True, "2": True}


def test_the_compliance_horizon_and_the_decisions_topic_veto() -> None:
    assert plan("time:0d", horizon=150) == dict.fromkeys("123456", False) | {"1": True}
    assert plan("time:0d", horizon=1) == dict.fromkeys("123456", False) | {
        "1": True,
        "2": True,
        "3": True,
    }
    # version 1's decisions are still on the decisions topic: kept
    assert plan("time:0d", horizon=1, digests=frozenset({"sha256:one"}))["1"] is False


def manifest(version: str, inputs: list[str], *, required: bool = True, **out: Any) -> Manifest:
    return Manifest(
        name="fraud-lr",
        version=version,
        inputs=[InputSpec(name=n, required=required) for n in inputs],
        output=OutputSpec(**out),
    )


def test_release_notes_say_bump_changes_guide_and_rollback_safety() -> None:
    old = manifest("1.4.0", ["amount", "hour"])
    new = manifest("2.0.0", ["amount", "hour", "device"])
    note = release_notes(old, new, "https://example.com/guide")
    assert "**MAJOR**" in note and "input device: added as required" in note
    assert "https://example.com/guide" in note and "is safe" in note
    assert not rollback_problems(old, new)
    dropped = manifest("2.0.0", ["amount"], score_max=100.0)
    problems = rollback_problems(old, dropped)
    assert any("hour is required by 1.4.0" in p for p in problems)
    assert any("output contract differs" in p for p in problems)
    assert "**not safe**" in release_notes(old, dropped)


# --------------------------------------------------------------------------- with MLflow

REASON = "the mlflow extra is not installed: pip install -e '.[mlflow]' sqlalchemy alembic"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> str:
    mlflow = pytest.importorskip("mlflow", reason=REASON)
    pytest.importorskip("mlflow.pyfunc", reason=REASON)
    pytest.importorskip("sqlalchemy", reason=REASON)
    pytest.importorskip("alembic", reason=REASON)
    from sidecar.examples import fraud

    class Wrapped(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
        def __init__(self, which: str) -> None:
            self.which = which

        def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
            model = fraud.champion() if self.which == "champion" else fraud.candidate()
            return model.predict(np.asarray(model_input, dtype=np.float64))

    root = tmp_path_factory.mktemp("mlflow-lifecycle")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    logging.getLogger("alembic").setLevel(logging.WARNING)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("lifecycle", artifact_location=str(root / "art"))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for which in ("champion", "candidate"):
        with mlflow.start_run(experiment_id=experiment):
            mlflow.pyfunc.log_model(
                name="model", python_model=Wrapped(which), registered_model_name="fraud-reg"
            )
    client.set_registered_model_alias("fraud-reg", "champion", "1")
    return uri


def tags(uri: str, v: str) -> dict[str, str]:
    import mlflow

    return dict(
        mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        .get_model_version("fraud-reg", v)
        .tags
    )


def alias(uri: str) -> str:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    return str(client.get_model_version_by_alias("fraud-reg", "champion").version)


@pytest.mark.broker
async def test_promote_and_retire_write_back_and_prune_respects_the_horizon(
    bootstrap: str, registry: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def model(which: str, v: str, features: list[str]) -> dict[str, Any]:
        return {
            "name": "fraud-lr",
            "version": "1.4.0" if which == "champion" else "2.0.0",
            "loader": "mlflow",
            "target": f"models:/fraud-reg/{v}",
            "mlflow_tracking_uri": registry,
            "features": [{"name": f} for f in features],
        }

    cfg = control_config(
        bootstrap,
        tmp_path,
        rollout={"mode": "shadow"},
        models={
            "champion": model("champion", "1", list(CHAMPION_FEATURES)),
            "candidate": model("candidate", "2", list(CANDIDATE_FEATURES)),
        },
        control={"min_promoted_age_s": 0},
    )
    await setup(cfg)
    async with traffic(cfg, rate=300), running(cfg, 2) as sidecars:
        await wait_until(lambda: sum(s.processed for s in sidecars) > 300, 30)
        promoted = await ctl(cfg, "promote", reason="2 beats 1")
        assert promoted.code == EXIT_OK, promoted.message
        await wait_until(lambda: alias(registry) == "2" and ARCHIVED_AT in tags(registry, "1"), 20)
        assert tags(registry, "2")["promoted_by"] and tags(registry, "2")["rollout"] == "fraud-v2"
        assert tags(registry, "1")[DIGEST_TAG] == sidecars[0].champion.manifest_digest
        assert RETIRED_AT not in tags(registry, "1")  # kept warm: still scored
        retired = await ctl(cfg, "retire", reason="2 has held for long enough")
        assert retired.code == EXIT_OK, retired.message
        await wait_until(lambda: RETIRED_AT in tags(registry, "1"), 20)

    import msgspec
    from kafka_helpers import write_toml

    async def prune(horizon_days: float, *args: str) -> str:
        settings = msgspec.structs.replace(cfg.registry, compliance_horizon_days=horizon_days)
        path = write_toml(msgspec.structs.replace(cfg, registry=settings), tmp_path / "s.toml")
        argv = ["registry", "prune", "--config", str(path), "--policy", "time:0d", *args]
        assert await asyncio.to_thread(main, argv) == 0  # the CLI runs its own event loop
        return capsys.readouterr().out

    # Version 1 decided a moment ago: within any horizon, never deleted.
    out = await prune(365, "--apply")
    assert "fraud-reg/1: keep" in out and "compliance horizon" in out, out
    assert "fraud-reg/2: keep" in out and "alias champion" in out
    assert tags(registry, "1")  # still there
    # The decisions topic names what decided (the second line of defence, for versions
    # whose tags were lost): version 1's digest is on it.
    from sidecar.registry_cli import decided_digests

    assert tags(registry, "1")[DIGEST_TAG] in await decided_digests(cfg, 0)
    # Without the decisions topic, nothing vetoes it; a dry run first deletes nothing.
    assert "fraud-reg/1: DELETE" in await prune(0, "--no-scan") and tags(registry, "1")
    assert "deleted 1 version(s): 1" in await prune(0, "--no-scan", "--apply")
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=registry, registry_uri=registry)
    assert [str(v.version) for v in client.search_model_versions("name='fraud-reg'")] == ["2"]


def test_release_notes_stored_on_the_registry_version(registry: str, tmp_path: Path) -> None:
    old, new = tmp_path / "old.toml", tmp_path / "new.toml"
    old.write_text('name = "fraud-lr"\nversion = "1.4.0"\ninputs = [{ name = "amount" }]\n')
    new.write_text(
        'name = "fraud-lr"\nversion = "2.0.0"\ninputs = [{ name = "amount" }, { name = "hour" }]\n'
    )
    note = tmp_path / "notes.md"
    code = main(
        [
            "contract",
            "diff",
            str(old),
            str(new),
            "--release-notes",
            str(note),
            "--guide",
            "https://example.com/g",
            "--store",
            "models:/fraud-reg/2",
            "--registry-uri",
            registry,
        ]
    )
    assert code == 0
    text = note.read_text()
    assert text.startswith("# fraud-lr 2.0.0") and "input hour: added as required" in text
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=registry, registry_uri=registry)
    stored = client.get_model_version("fraud-reg", "2")
    assert stored.description == text and stored.tags["rollback_safe"] == "true"
