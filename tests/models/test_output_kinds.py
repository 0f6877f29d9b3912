"""Output kinds in manifests, configs, ``sidecar contract diff`` and the start-up gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kafka_helpers import make_config

from sidecar.cli import main
from sidecar.errors import ConfigError, ContractError
from sidecar.manifest import Bump, diff_manifests, gate_problems, manifest_from_dict
from sidecar.models.contract import check_startup, derived_manifest, model_manifest


def manifest(version: str = "1.0.0", **output: Any) -> dict[str, Any]:
    return {
        "name": "recs",
        "version": version,
        "inputs": [{"name": "user"}],
        "output": output,
    }


def bumps(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[Bump, str]]:
    diff = diff_manifests(manifest_from_dict(old), manifest_from_dict(new))
    return [(c.bump, c.what) for c in diff.changes]


MULTI = {"kind": "multiclass", "labels": ["low", "mid", "high"]}
RANK = {"kind": "ranking", "k": 10}


@pytest.mark.parametrize(
    ("output", "words"),
    [
        ({"kind": "multiclass"}, "needs labels"),
        ({"kind": "multiclass", "labels": ["a"]}, "at least two"),
        ({"kind": "multiclass", "labels": ["a", "a"]}, "distinct"),
        ({"kind": "ranking"}, "needs k"),
        ({"kind": "ranking", "k": 0}, "needs k"),
        ({"kind": "binary", "k": 3}, "k only applies"),
        ({"kind": "binary", "labels": ["a", "b"]}, "labels only apply"),
        ({"kind": "regression", "bands": [2.0, 1.0]}, "strictly ascending"),
        ({"kind": "regression", "bands": [1.0], "labels": ["a"]}, "names 2 bands"),
        ({"kind": "regression", "labels": ["a", "b"]}, "need bands"),
        ({"kind": "multiclass", "labels": ["a", "b"], "bands": [1.0]}, "bands only apply"),
        ({"kind": "binary", "items_from": "request"}, "items_from only applies"),
    ],
)
def test_inconsistent_outputs_are_refused(output: dict[str, Any], words: str) -> None:
    with pytest.raises(ContractError, match=words):
        manifest_from_dict(manifest(**output))


def test_kind_change_is_major() -> None:
    [(bump, what)] = bumps(manifest(), manifest("2.0.0", **RANK))
    assert bump is Bump.MAJOR and "binary -> ranking" in what


def test_label_rules() -> None:
    added = {"kind": "multiclass", "labels": ["low", "mid", "high", "extreme"]}
    assert bumps(manifest(**MULTI), manifest("1.1.0", **added)) == [
        (Bump.MINOR, "output labels added ['extreme']")
    ]
    removed = {"kind": "multiclass", "labels": ["low", "high"]}
    assert bumps(manifest(**MULTI), manifest("2.0.0", **removed)) == [
        (Bump.MAJOR, "output labels removed ['mid']")
    ]
    reordered = {"kind": "multiclass", "labels": ["high", "mid", "low"]}
    [(bump, what)] = bumps(manifest(**MULTI), manifest("2.0.0", **reordered))
    assert bump is Bump.MAJOR and "reordered" in what


def test_k_items_and_band_rules() -> None:
    assert bumps(manifest(**RANK), manifest("1.1.0", kind="ranking", k=20))[0][0] is Bump.MINOR
    assert bumps(manifest(**RANK), manifest("2.0.0", kind="ranking", k=5))[0][0] is Bump.MAJOR
    to_request = manifest("2.0.0", kind="ranking", k=10, items_from="request")
    assert bumps(manifest(**RANK), to_request)[0][0] is Bump.MAJOR
    assert bumps(to_request, manifest("2.1.0", **RANK))[0][0] is Bump.MINOR
    banded = {"kind": "regression", "bands": [10.0, 100.0]}
    moved = bumps(manifest(**banded), manifest("1.1.0", kind="regression", bands=[10.0, 50.0]))
    assert moved == [(Bump.MINOR, "output band cut points moved [10.0, 100.0] -> [10.0, 50.0]")]
    more = bumps(manifest(**banded), manifest("2.0.0", kind="regression", bands=[1.0, 2.0, 3.0]))
    assert more[0][0] is Bump.MAJOR


def test_the_threshold_of_a_non_binary_model_is_no_change() -> None:
    assert bumps(manifest(**RANK), manifest("1.0.0", threshold=0.9, **RANK)) == []


def test_contract_diff_cli_covers_output_kinds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(manifest(**MULTI)))
    new.write_text(json.dumps(manifest("1.1.0", kind="multiclass", labels=["low", "high"])))
    assert main(["contract", "diff", str(old), str(new), "--json"]) == 3
    out = json.loads(capsys.readouterr().out)
    assert out["required"] == "MAJOR" and out["changes"][0]["what"].startswith("output labels")


def test_gate_refuses_another_kind_unless_shadow_only() -> None:
    champ = manifest_from_dict(manifest(**RANK))
    same = manifest_from_dict(manifest("1.1.0", **RANK))
    other = manifest_from_dict(manifest("2.0.0", **MULTI))
    assert gate_problems(champ, same, None) == []
    [problem] = gate_problems(champ, other, None)
    assert "multiclass output but the champion returns ranking" in problem.reason
    fewer = manifest_from_dict(manifest("2.0.0", kind="ranking", k=5))
    [problem] = gate_problems(champ, fewer, None)
    assert "k 5 (champion 10)" in problem.reason
    labels = manifest_from_dict(manifest("2.0.0", kind="multiclass", labels=["a", "b"]))
    [problem] = gate_problems(manifest_from_dict(manifest(**MULTI)), labels, None)
    assert "labels ['a', 'b']" in problem.reason


def test_gate_checks_candidates_against_the_request_contract() -> None:
    reranker = manifest_from_dict(manifest(kind="ranking", k=10, items_from="request"))
    assert gate_problems(reranker, None, None, None) == []
    assert gate_problems(reranker, None, None, True) == []
    [problem] = gate_problems(reranker, None, None, False)
    assert problem.arm == "champion" and "request_contract.candidates" in problem.reason


def model(name: str, version: str, **kw: Any) -> dict[str, Any]:
    return {
        "name": name,
        "version": version,
        "target": "sidecar.examples.recommend:popularity",
        "features": [{"name": "user"}],
        "threshold": 0.5,
        **kw,
    }


def test_startup_gate_on_configs() -> None:
    cfg = make_config(
        "unused:9092",
        models={
            "champion": model("recs", "1.0.0", output_kind="ranking", k=10),
            "candidate": model("recs", "2.0.0", output_kind="multiclass", labels=["a", "b"]),
        },
    )
    champ, cand = (model_manifest(m) for m in (cfg.models.champion, cfg.models.candidate))
    with pytest.raises(ContractError, match="multiclass output but the champion"):
        check_startup(cfg, champ, cand)
    shadow = make_config(
        "unused:9092",
        models={
            "champion": model("recs", "1.0.0", output_kind="ranking", k=10),
            "candidate": model(
                "recs", "2.0.0", output_kind="multiclass", labels=["a", "b"], shadow_only=True
            ),
        },
        rollout={"mode": "shadow"},
    )
    assert shadow.models.candidate is not None
    warnings = check_startup(
        shadow, model_manifest(shadow.models.champion), model_manifest(shadow.models.candidate)
    )
    assert len(warnings) == 1 and "multiclass" in warnings[0]


def test_config_refuses_bad_output_declarations() -> None:
    with pytest.raises(ConfigError, match="needs k"):
        make_config("unused:9092", models={"champion": model("r", "1.0.0", output_kind="ranking")})
    with pytest.raises(ConfigError, match="needs loader python"):
        make_config(
            "unused:9092",
            models={"champion": model("r", "1.0.0", output_kind="ranking", k=3, loader="process")},
        )


def test_manifest_and_config_must_agree_on_the_output() -> None:
    cfg = make_config(
        "unused:9092",
        models={
            "champion": model(
                "recs", "1.0.0", output_kind="ranking", k=10, manifest=manifest(**RANK)
            )
        },
    )
    assert model_manifest(cfg.models.champion).output.k == 10
    bad = make_config(
        "unused:9092",
        models={
            "champion": model(
                "recs", "1.0.0", output_kind="ranking", k=5, manifest=manifest(**RANK)
            )
        },
    )
    with pytest.raises(ContractError, match=r"output .* differs from the configured"):
        model_manifest(bad.models.champion)
    derived = derived_manifest(bad.models.champion)
    assert (derived.output.kind, derived.output.k) == ("ranking", 5)
