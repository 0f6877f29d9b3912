"""The ``[outcomes]`` settings and where outcomes are routed."""

from __future__ import annotations

import msgspec
import pytest
from kafka_helpers import make_config

from sidecar.config import config_from_dict
from sidecar.errors import ConfigError
from sidecar.hashing import kafka_partition
from sidecar.outcomes.contract import Outcome
from sidecar.outcomes.router import Targets, rollout_names
from sidecar.outcomes.settings import OutcomesSettings


def test_rules_must_watch_quality_figures() -> None:
    rule = {"name": "r", "figure": "decision_rate_ratio", "threshold": 1.5}
    with pytest.raises(msgspec.ValidationError, match=r"not a quality figure.*aggregate.rules"):
        msgspec.convert({"rules": [rule]}, OutcomesSettings)
    cfg = make_config("unused:9092")
    tree = msgspec.to_builtins(cfg)
    tree["aggregate"]["rules"] = [
        {"name": "q", "figure": "auc_diff", "threshold": -0.02, "comparison": "<"}
    ]
    with pytest.raises(ConfigError, match=r"quality figure.*\[\[outcomes.rules\]\]"):
        config_from_dict(tree)


def test_each_rollout_keeps_its_own_rules_and_the_changelog_outlives_the_longest() -> None:
    s = msgspec.convert(
        {"rollouts": {"loans": {"label_window_ms": 90 * 86_400_000, "missing": "negative"}}},
        OutcomesSettings,
    )
    assert s.for_rollout("loans").missing == "negative"
    assert s.for_rollout("other") == s.quality
    assert s.changelog_retention_ms() >= 90 * 86_400_000 + s.report_window_ms
    assert s.by_task_topic == "sidecar-outcomes.by-task"
    assert s.changelog_topic == "sidecar-outcomes.changelog"


def test_outcomes_go_where_their_comparisons_are() -> None:
    cfg = make_config("unused:9092", outcomes={"rollouts": {"other": {}}})
    assert rollout_names(cfg) == ["fraud-v2", "other"]
    targets = Targets(cfg, 6)  # keyed by rollout: to every judged rollout's partition
    expected = sorted({kafka_partition(b"fraud-v2", 6), kafka_partition(b"other", 6)})
    outcome = Outcome(request_id="r1", label=True, ts=1, routing_key="card-7")
    assert targets.of([outcome]) == [expected]
    shared = Targets(make_config("unused:9092", topics={"comparisons_key": "routing_key"}), 6)
    bare = Outcome(request_id="r2", label=True, ts=1)  # a request without a routing key
    assert shared.of([outcome, bare]) == [
        [kafka_partition(b"card-7", 6)],
        [kafka_partition(b"r2", 6)],
    ]


def _settings() -> OutcomesSettings:
    cfg = make_config(
        "unused:9092",
        outcomes={"report_window_ms": 60_000, "quality": {"label_window_ms": 86_400_000}},
    )
    return cfg.outcomes


def test_a_changelog_made_as_the_stage_makes_it_has_no_problems() -> None:
    s = _settings()
    made = {"cleanup.policy": "compact,delete", "retention.ms": str(s.changelog_retention_ms())}
    assert s.changelog_problems(made) == []
    assert s.changelog_problems({"cleanup.policy": "compact", "retention.ms": "1000"}) == []
    assert s.changelog_problems({"retention.ms": "-1"}) == []
    assert s.changelog_problems({}) == []  # nothing reported (no DescribeConfigs): no claim


def test_a_changelog_deleting_pending_requests_early_is_named() -> None:
    s = _settings()
    week = {"cleanup.policy": "compact,delete", "retention.ms": "3600000"}  # an hour
    (problem,) = s.changelog_problems(week)
    assert "retention.ms is 3600000" in problem
    assert f"at least {s.changelog_retention_ms()}" in problem
    problems = s.changelog_problems({"cleanup.policy": "delete", "retention.ms": "3600000"})
    assert len(problems) == 2 and "compact,delete" in problems[0]
