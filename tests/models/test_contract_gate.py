"""Manifests in config, the start-up gate, per-record range validation, digests in outputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from kafka_helpers import (
    create_topics,
    decode_values,
    make_config,
    produce,
    read_topic,
    wait_until,
    write_toml,
)

from sidecar.cli import main
from sidecar.contracts import Comparison, DeadLetter, Decision
from sidecar.errors import ContractError
from sidecar.examples.fraud import CANDIDATE_FEATURES, CHAMPION_FEATURES
from sidecar.manifest import digest, gate_problems, manifest_from_dict
from sidecar.models import load_model
from sidecar.models.contract import derived_manifest, model_manifest
from sidecar.models.validation import RangeValidator
from sidecar.runner import Sidecar
from sidecar.traffic import generated_items

RANGES = {"amount": (0.0, 300.0), "hour": (0.0, 23.0)}


def manifest_tree(
    model: str, version: str, features: tuple[str, ...], threshold: float, **output: Any
) -> dict[str, Any]:
    inputs = []
    for f in features:
        spec: dict[str, Any] = {"name": f}
        if f in RANGES:
            spec["min"], spec["max"] = RANGES[f]
        inputs.append(spec)
    return {
        "name": model,
        "version": version,
        "owner": "risk-ml",
        "training_data": "sidecar.examples.fraud:generate(seed=1)",
        "inputs": inputs,
        "output": {"name": "fraud_probability", "threshold": threshold, **output},
    }


CHAMPION_MANIFEST = manifest_tree("fraud-lr", "1.4.0", CHAMPION_FEATURES, 0.3)
CANDIDATE_MANIFEST = manifest_tree("fraud-lr", "2.0.0", CANDIDATE_FEATURES, 0.5)


def gated_config(bootstrap: str = "unused:9092", **sections: dict[str, Any]) -> Any:
    models = sections.pop("models", {})
    base_models = {
        "champion": {"manifest": CHAMPION_MANIFEST},
        "candidate": {"manifest": CANDIDATE_MANIFEST},
    }
    for arm, values in models.items():
        base_models[arm].update(values)
    return make_config(bootstrap, models=base_models, **sections)


# -- pure logic ---------------------------------------------------------------------------


def test_gate_names_the_missing_features_and_output_mismatch() -> None:
    champ = manifest_from_dict(CHAMPION_MANIFEST)
    cand = manifest_from_dict(CANDIDATE_MANIFEST)
    assert gate_problems(champ, cand, list(CANDIDATE_FEATURES)) == []
    assert gate_problems(champ, cand, None) == []
    [problem] = gate_problems(champ, cand, list(CHAMPION_FEATURES))
    assert problem.arm == "candidate" and "distance_km, device_score" in problem.reason
    other = manifest_from_dict(
        manifest_tree("fraud-lr", "2.0.0", CANDIDATE_FEATURES, 0.5, score_max=100)
    )
    [problem] = gate_problems(champ, other, None)
    assert problem.arm == "candidate" and "consumers of decisions would break" in problem.reason
    # An optional input the request does not carry is fine.
    tree = manifest_tree("fraud-lr", "2.0.0", CANDIDATE_FEATURES, 0.5)
    for spec in tree["inputs"][6:]:
        spec["required"] = False
    assert gate_problems(champ, manifest_from_dict(tree), list(CHAMPION_FEATURES)) == []


def test_manifest_must_agree_with_the_model_config(tmp_path: Path) -> None:
    cfg = gated_config()
    assert model_manifest(cfg.models.champion) == manifest_from_dict(CHAMPION_MANIFEST)
    bad = msgspec.structs.replace(cfg.models.champion, threshold=0.4)
    with pytest.raises(ContractError, match=r"threshold 0\.3 differs"):
        model_manifest(bad)
    path = tmp_path / "m.json"
    path.write_bytes(msgspec.json.encode({**CHAMPION_MANIFEST, "version": "1.5.0"}))
    from_file = msgspec.structs.replace(cfg.models.champion, manifest=None, manifest_file=str(path))
    with pytest.raises(ContractError, match=r"is for fraud-lr 1\.5\.0"):
        model_manifest(from_file)
    # Without a manifest, the contract is derived from the config (and still has a digest).
    plain = make_config("unused:9092").models.champion
    assert [i.name for i in derived_manifest(plain).inputs] == list(CHAMPION_FEATURES)


def test_range_validator_counts_per_arm_and_feature() -> None:
    v = RangeValidator(
        list(CANDIDATE_FEATURES),
        [
            ("champion", manifest_from_dict(CHAMPION_MANIFEST)),
            ("candidate", manifest_from_dict(CANDIDATE_MANIFEST)),
        ],
        strict=False,
    )
    m = np.zeros((4, 8))
    m[:, 0] = [10.0, 5000.0, -1.0, np.nan]  # amount: 2 out of range, NaN is not
    m[:, 1] = [3, 25, 4, 5]
    masks = v.out_of_range(m)
    assert masks[("champion", "amount")].tolist() == [False, True, True, False]
    assert masks[("candidate", "hour")].tolist() == [False, True, False, False]


# -- the pipeline ---------------------------------------------------------------------------


async def test_strict_validation_dead_letters_and_digests_are_recorded() -> None:
    from sidecar.pipeline import Pipeline
    from sidecar.routing import Mode, RoutingPolicy

    cfg = gated_config(request_contract={"validation": "strict"})
    champion, candidate = load_model(cfg.models.champion), load_model(cfg.models.candidate)
    pipe = Pipeline(cfg, champion, candidate)
    items = generated_items(500, seed=3)
    amounts = [msgspec.json.decode(v)["features"]["amount"] for _, v in items]
    over = sum(a > 300 for a in amounts)
    assert over > 0

    class Rec:
        def __init__(self, i: int, value: bytes) -> None:
            self.topic, self.partition, self.offset = "r", 0, i
            self.timestamp, self.key, self.value, self.headers = 1, None, value, ()

    result = await pipe.process(
        [Rec(i, v) for i, (_, v) in enumerate(items)],
        RoutingPolicy(rollout="r", mode=Mode.CANARY, canary_share_bp=5000),
    )
    assert result.dead_letter_kinds == {"out_of_range": over}
    assert result.out_of_range[("champion", "amount")] == over
    assert result.out_of_range[("candidate", "amount")] == over
    assert len(result.decisions) == 500 - over
    for value in result.decisions.values:
        d = msgspec.json.decode(value, type=Decision)
        m = champion if d.arm == "champion" else candidate
        assert d.manifest_digest == m.manifest_digest == digest(m.manifest)
    for value in result.comparisons.values:
        c = msgspec.json.decode(value, type=Comparison)
        assert c.champion.manifest_digest == champion.manifest_digest
        assert c.candidate.manifest_digest == candidate.manifest_digest
    champion.close()
    candidate.close()


# -- the start-up gate ----------------------------------------------------------------------


def test_sidecar_refuses_a_candidate_needing_features_upstream_does_not_send() -> None:
    cfg = gated_config(request_contract={"features": list(CHAMPION_FEATURES)})
    with pytest.raises(ContractError, match=r"refusing to start: candidate .*distance_km"):
        Sidecar(cfg)
    ok = gated_config(request_contract={"features": list(CANDIDATE_FEATURES)})
    Sidecar(ok).close_models()


def test_shadow_only_lets_a_contract_breaking_candidate_run_in_shadow_only() -> None:
    narrow = {"features": list(CHAMPION_FEATURES)}
    cfg = gated_config(
        request_contract=narrow,
        rollout={"mode": "shadow", "canary_share_bp": 0},
        models={"candidate": {"shadow_only": True}},
    )
    sidecar = Sidecar(cfg)
    assert sidecar.contract_warnings and "distance_km" in sidecar.contract_warnings[0]
    sidecar.close_models()
    canary = gated_config(request_contract=narrow, models={"candidate": {"shadow_only": True}})
    with pytest.raises(ContractError, match="may only start in shadow mode"):
        Sidecar(canary)


def test_cli_run_exits_non_zero_with_a_clear_message(tmp_path: Path) -> None:
    cand = manifest_tree("fraud-lr", "2.0.0", CANDIDATE_FEATURES, 0.5, name="risk_score")
    cfg = gated_config(models={"candidate": {"manifest": cand}})
    path = write_toml(cfg, tmp_path / "sidecar.toml")
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "refusing to start" in proc.stderr and "risk_score" in proc.stderr
    assert main(["contract", "check", "--config", str(path)]) == 1


def test_cli_contract_check_passes_a_good_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = gated_config(request_contract={"features": list(CANDIDATE_FEATURES)})
    path = write_toml(cfg, tmp_path / "sidecar.toml")
    assert main(["contract", "check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert digest(manifest_from_dict(CANDIDATE_MANIFEST)) in out and "OK" in out


# -- end to end ------------------------------------------------------------------------------


@pytest.mark.broker
@pytest.mark.slow
async def test_digests_and_strict_validation_through_the_broker(bootstrap: str) -> None:
    cfg = gated_config(
        bootstrap,
        request_contract={"features": list(CANDIDATE_FEATURES), "validation": "strict"},
    )
    await create_topics(cfg)
    items = generated_items(1000, seed=9)
    over = {
        msgspec.json.decode(v)["request_id"]
        for _, v in items
        if msgspec.json.decode(v)["features"]["amount"] > 300
    }
    await produce(cfg, items)
    sidecar = Sidecar(cfg)
    task = __import__("asyncio").create_task(sidecar.run())
    await wait_until(lambda: sidecar.processed >= 1000, 60)
    sidecar.request_stop()
    await task
    sidecar.close_models()
    n = 1000 - len(over)
    decisions = decode_values(await read_topic(bootstrap, cfg.topics.decisions, expect=n), Decision)
    letters = decode_values(
        await read_topic(bootstrap, cfg.topics.dead_letter, expect=len(over)), DeadLetter
    )
    comparisons = decode_values(
        await read_topic(bootstrap, cfg.topics.comparisons, expect=n), Comparison
    )
    assert len(decisions) == len(comparisons) == n
    assert {x.request_id for x in letters} == over
    assert {x.kind for x in letters} == {"out_of_range"}
    digests = {"champion": sidecar.champion.manifest_digest}
    digests["candidate"] = sidecar.candidate.manifest_digest  # type: ignore[union-attr]
    assert all(d.manifest_digest == digests[d.arm] for d in decisions)
    assert all(c.candidate.manifest_digest == digests["candidate"] for c in comparisons)
    metric = sidecar.metrics.registry.get_sample_value(
        "sidecar_feature_out_of_range_total", {"arm": "champion", "feature": "amount"}
    )
    assert metric == len(over)
