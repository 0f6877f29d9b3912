"""`sidecar contract diff`: every semantic-versioning rule on a table of cases."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from sidecar.cli import main
from sidecar.contract_cli import EXIT_BUMP_TOO_SMALL
from sidecar.errors import ContractError
from sidecar.manifest import (
    Bump,
    Manifest,
    declared_bump,
    diff_manifests,
    digest,
    manifest_from_dict,
    parse_manifest,
)

BASE: dict[str, Any] = {
    "name": "fraud-lr",
    "version": "1.4.0",
    "owner": "risk-ml@example.com",
    "training_data": "s3://datasets/fraud/2024-05",
    "inputs": [
        {"name": "amount", "type": "number", "min": 0, "max": 50000},
        {"name": "hour", "type": "integer", "min": 0, "max": 23},
        {"name": "channel", "type": "category", "categories": ["web", "pos", "app"]},
        {"name": "device_score", "type": "number", "required": False, "nullable": True},
    ],
    "output": {"name": "fraud_probability", "score_min": 0, "score_max": 1, "threshold": 0.3},
}

Edit = Callable[[dict[str, Any]], None]


def _input(tree: dict[str, Any], name: str) -> dict[str, Any]:
    return next(i for i in tree["inputs"] if i["name"] == name)


def _set(name: str, key: str, value: Any) -> Edit:
    def edit(tree: dict[str, Any]) -> None:
        spec = _input(tree, name)
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value

    return edit


def _remove(name: str) -> Edit:
    return lambda t: t.__setitem__("inputs", [i for i in t["inputs"] if i["name"] != name])


def _add(spec: dict[str, Any]) -> Edit:
    return lambda t: t["inputs"].append(spec)


def _output(key: str, value: Any) -> Edit:
    return lambda t: t["output"].__setitem__(key, value)


def _top(key: str, value: Any) -> Edit:
    return lambda t: t.__setitem__(key, value)


CASES: list[tuple[str, Edit, Bump, str]] = [
    ("removed feature", _remove("hour"), Bump.MAJOR, "input hour: removed"),
    ("removed optional feature", _remove("device_score"), Bump.MAJOR, "device_score: removed"),
    ("type change", _set("hour", "type", "number"), Bump.MAJOR, "type changed integer -> number"),
    ("new required feature", _add({"name": "distance_km"}), Bump.MAJOR, "added as required"),
    (
        "new optional feature",
        _add({"name": "distance_km", "required": False}),
        Bump.MINOR,
        "distance_km: added as optional",
    ),
    ("optional made required", _set("device_score", "required", True), Bump.MAJOR, "-> required"),
    ("required made optional", _set("amount", "required", False), Bump.MINOR, "-> optional"),
    ("null refused", _set("device_score", "nullable", False), Bump.MAJOR, "null no longer"),
    ("null accepted", _set("amount", "nullable", True), Bump.MINOR, "null now accepted"),
    ("range narrowed", _set("amount", "max", 10000), Bump.MAJOR, "range narrowed"),
    ("range declared", _set("device_score", "min", 0), Bump.MAJOR, "range narrowed"),
    ("range widened", _set("amount", "max", 100000), Bump.MINOR, "range widened"),
    ("range dropped", _set("hour", "min", None), Bump.MINOR, "range widened"),
    (
        "category removed",
        _set("channel", "categories", ["web", "pos"]),
        Bump.MAJOR,
        "categories removed ['app']",
    ),
    (
        "category added",
        _set("channel", "categories", ["web", "pos", "app", "atm"]),
        Bump.MINOR,
        "categories added ['atm']",
    ),
    (
        "category order",
        _set("channel", "categories", ["pos", "web", "app"]),
        Bump.MAJOR,
        "category order",
    ),
    (
        "inputs reordered",
        lambda t: t.__setitem__("inputs", t["inputs"][::-1]),
        Bump.MAJOR,
        "reordered",
    ),
    ("output renamed", _output("name", "risk"), Bump.MAJOR, "output renamed"),
    ("score range", _output("score_max", 100), Bump.MAJOR, "score range changed"),
    ("threshold change", _output("threshold", 0.5), Bump.MINOR, "threshold changed 0.3 -> 0.5"),
    ("retrained", _top("training_data", "s3://datasets/fraud/2024-06"), Bump.MINOR, "training"),
    ("owner", _top("owner", "fraud-team@example.com"), Bump.PATCH, "owner changed"),
    ("description", _set("amount", "description", "EUR"), Bump.PATCH, "description changed"),
    ("model renamed", _top("name", "fraud-gbm"), Bump.MAJOR, "model renamed"),
    ("nothing", lambda t: None, Bump.NONE, ""),
]


def _manifest(tree: dict[str, Any]) -> Manifest:
    return manifest_from_dict(tree)


def _edited(edit: Edit, version: str) -> dict[str, Any]:
    tree = json.loads(json.dumps(BASE))
    edit(tree)
    tree["version"] = version
    return tree


@pytest.mark.parametrize(("case", "edit", "bump", "reason"), CASES, ids=[c[0] for c in CASES])
def test_each_change_requires_its_semver_bump(
    case: str, edit: Edit, bump: Bump, reason: str
) -> None:
    diff = diff_manifests(_manifest(BASE), _manifest(_edited(edit, "1.4.0")))
    assert diff.required is bump, [str(c) for c in diff.changes]
    assert all(reason in str(c) for c in diff.changes if c.bump is bump)
    assert any(reason in c.what for c in diff.changes) or bump is Bump.NONE
    # The declared bump decides: enough passes, one level less fails.
    enough = {Bump.NONE: "1.4.0", Bump.PATCH: "1.4.1", Bump.MINOR: "1.5.0", Bump.MAJOR: "2.0.0"}
    assert diff_manifests(_manifest(BASE), _manifest(_edited(edit, enough[bump]))).ok
    if bump > Bump.NONE:
        less = enough[Bump(bump - 1)]
        assert not diff_manifests(_manifest(BASE), _manifest(_edited(edit, less))).ok


def test_every_reason_is_listed_and_the_largest_wins() -> None:
    def many(tree: dict[str, Any]) -> None:
        _remove("hour")(tree)
        _output("threshold", 0.4)(tree)
        _top("owner", "someone")(tree)

    diff = diff_manifests(_manifest(BASE), _manifest(_edited(many, "1.5.0")))
    assert [c.bump for c in diff.changes] == [Bump.MAJOR, Bump.MINOR, Bump.PATCH]
    assert diff.required is Bump.MAJOR and diff.declared is Bump.MINOR and not diff.ok


def test_declared_bump_and_backwards_versions() -> None:
    assert declared_bump("1.4.0", "2.0.0") == (Bump.MAJOR, False)
    assert declared_bump("1.4.0", "1.5.3") == (Bump.MINOR, False)
    assert declared_bump("1.4.0", "1.4.1") == (Bump.PATCH, False)
    assert declared_bump("1.4.0", "1.4.0-rc1") == (Bump.NONE, False)
    assert declared_bump("1.4.0", "1.3.9") == (Bump.NONE, True)
    diff = diff_manifests(_manifest(BASE), _manifest(_edited(lambda t: None, "1.3.0")))
    assert diff.backwards and not diff.ok


def test_invalid_manifests_say_what_is_wrong() -> None:
    with pytest.raises(ContractError, match=r"min 5\.0 > max 1\.0"):
        manifest_from_dict({**BASE, "inputs": [{"name": "a", "min": 5, "max": 1}]})
    with pytest.raises(ContractError, match="declared twice"):
        manifest_from_dict({**BASE, "inputs": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ContractError, match="not a valid model manifest"):
        manifest_from_dict({**BASE, "version": "one"})
    with pytest.raises(ContractError, match="not valid TOML or JSON"):
        parse_manifest("name = ")


def test_digest_is_stable_and_sensitive() -> None:
    a, b = _manifest(BASE), _manifest(json.loads(json.dumps(BASE)))
    assert digest(a) == digest(b) and digest(a).startswith("sha256:")
    assert digest(a) != digest(_manifest(_edited(_output("threshold", 0.31), "1.4.0")))


def _toml(tree: dict[str, Any]) -> str:
    """Manifests are usually TOML files beside the model."""
    lines = [f"{k} = {json.dumps(v)}" for k, v in tree.items() if k not in ("inputs", "output")]
    lines.append("[output]")
    lines += [f"{k} = {json.dumps(v)}" for k, v in tree["output"].items()]
    for spec in tree["inputs"]:
        lines.append("[[inputs]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in spec.items()]
    return "\n".join(lines) + "\n"


def test_cli_exit_status_and_reasons(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "old.toml"
    old.write_text(_toml(BASE))
    assert parse_manifest(old.read_text()) == _manifest(BASE)
    too_small = tmp_path / "new.json"
    too_small.write_text(json.dumps(_edited(_remove("hour"), "1.5.0")))
    assert main(["contract", "diff", str(old), str(too_small)]) == EXIT_BUMP_TOO_SMALL
    out = capsys.readouterr().out
    assert "MAJOR  input hour: removed" in out and "FAIL" in out

    enough = tmp_path / "enough.toml"
    enough.write_text(_toml(_edited(_add({"name": "x", "required": False}), "1.5.0")))
    assert main(["contract", "diff", str(old), str(enough), "--json"]) == 0
    report = msgspec.json.decode(capsys.readouterr().out)
    assert report["required"] == "MINOR" and report["ok"] is True
    assert report["changes"] == [{"bump": "MINOR", "what": "input x: added as optional"}]

    assert main(["contract", "diff", str(old), str(tmp_path / "missing.toml")]) == 1
    assert "cannot read manifest" in capsys.readouterr().err
