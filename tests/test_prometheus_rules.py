"""deploy/prometheus/alerts.yml: checked and unit-tested with promtool (alerts.test.yml), and
every metric it uses cross-checked against what the code exports. promtool comes from Debian's
``prometheus`` package (.ci/run installs it); without it those two tests skip and say why."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sidecar.aggregate.metrics import AggregateMetrics
from sidecar.metrics import SidecarMetrics

yaml = pytest.importorskip("yaml", reason="pip install pyyaml (a dev extra)")

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian: apt-get install prometheus; .ci/run does)",
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=RULES, capture_output=True, text=True, timeout=120)


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    proc = promtool("check", "rules", "alerts.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_the_alerts_fire_as_their_unit_tests_say() -> None:
    proc = promtool("test", "rules", "alerts.test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def exported() -> set[str]:
    names: set[str] = set()
    for registry in (SidecarMetrics().registry, AggregateMetrics().registry):
        for family in registry.collect():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
            names |= {family.name + s for s in suffixes.get(family.type, [""])}
    return names


def test_every_alert_uses_metrics_the_code_exports() -> None:
    groups = yaml.safe_load((RULES / "alerts.yml").read_text())["groups"]
    rules = [r for g in groups for r in g["rules"]]
    names = exported()
    for rule in rules:
        used = set(re.findall(r"\bsidecar_[a-z0-9_]+", rule["expr"]))
        assert used, rule["alert"]
        assert used <= names, f"{rule['alert']}: {used - names} is not exported"
        assert rule["labels"]["severity"] in ("warning", "critical")
    alerts = {r["alert"] for r in rules}
    # The alerts the README describes.
    assert {
        "SidecarDeadLettersGrowing",
        "SidecarConsumerLagHigh",
        "SidecarChampionBreakerOpen",
        "SidecarGuardFired",
        "SidecarControlPlaneBehind",
        "SidecarStaleEpoch",
    } <= alerts
    tests = yaml.safe_load((RULES / "alerts.test.yml").read_text())["tests"]
    tested = {t["alertname"] for case in tests for t in case.get("alert_rule_test", [])}
    assert tested == alerts, f"alerts without a unit test: {alerts - tested}"
