"""deploy/kafka-acls.sh: the Kafka ACLs of the sidecar's roles.

The script runs for real (bash) against a stand-in for ``kafka-acls.sh`` that records its
arguments; the recorded calls are turned back into the grants Kafka would store (every listed
principal x operation x resource of a call), and those are compared with the intended policy.
The same script is what the compose stack's setup job runs (tests/test_docker.py).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from kafka_acl_helpers import (
    AGGREGATOR,
    OPERATOR,
    OUTCOMES,
    SIDECAR,
    TRAFFIC,
    Grant,
    calls,
    expected_grants,
    grants_of,
    option_values,
    write_stub,
)

from sidecar.config import SidecarConfig, config_from_dict

ROOT = Path(__file__).resolve().parent.parent
ACLS_SCRIPT = ROOT / "deploy" / "kafka-acls.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run_acls(
    tmp_path: Path, env: dict[str, str] | None = None, check: bool = True
) -> tuple[subprocess.CompletedProcess[str], set[Grant]]:
    log = tmp_path / "calls.jsonl"
    stub = write_stub(tmp_path, "kafka-acls.sh", log)
    full_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "BOOTSTRAP_SERVERS": "kafka:9092",
        "KAFKA_ACLS": str(stub),
        **(env or {}),
    }
    done = subprocess.run(
        ["bash", str(ACLS_SCRIPT)], env=full_env, capture_output=True, text=True, timeout=60
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done, grants_of(calls(log, "kafka-acls.sh"))


def default_config(**sections: object) -> SidecarConfig:
    """A config with every Kafka-related setting at its default (models are required), plus
    ``sections``."""
    champion = {"name": "m", "version": "1.0.0", "target": "sidecar.examples.fraud:champion"}
    return config_from_dict(
        {"models": {"champion": {**champion, "features": [{"name": "a"}]}}, **sections}
    )


#: Two older API versions of the decisions, each on its own topic.
VERSIONED_OUTPUTS = {
    "api_version": "v3",
    "versions": [
        {"version": "v1", "topic": "inference.decisions.v1", "drop": ["metadata"]},
        {"version": "v2", "topic": "inference.decisions.v2"},
    ],
}


def holders(grants: set[Grant], operation: str, topic: str) -> set[str]:
    return {
        g.principal for g in grants if (g.operation, g.kind, g.name) == (operation, "topic", topic)
    }


def writers(grants: set[Grant], topic: str) -> set[str]:
    return holders(grants, "Write", topic)


def readers(grants: set[Grant], topic: str) -> set[str]:
    return holders(grants, "Read", topic)


def test_the_grants_are_exactly_the_policy(tmp_path: Path) -> None:
    _, grants = run_acls(tmp_path, {"PRODUCER_PRINCIPAL": TRAFFIC})
    assert grants == expected_grants(default_config(), TRAFFIC)


def test_only_the_right_principals_write_the_control_plane(tmp_path: Path) -> None:
    cfg = default_config()
    _, grants = run_acls(tmp_path, {"PRODUCER_PRINCIPAL": TRAFFIC})
    # Operators and guards (the aggregator, the outcomes stage); the sidecars too (start-up
    # barrier, signed `advance`: their key's role allows nothing else), never the producer of
    # requests.
    assert writers(grants, cfg.topics.control) == {OPERATOR, AGGREGATOR, SIDECAR, OUTCOMES}
    assert writers(grants, cfg.status_topic) == {SIDECAR}
    assert writers(grants, cfg.audit_topic) == {SIDECAR}
    assert readers(grants, cfg.topics.control) == {OPERATOR, SIDECAR}
    assert readers(grants, cfg.status_topic) == readers(grants, cfg.audit_topic) == {OPERATOR}
    # Decisions and comparisons come from the sidecars only; requests from the producer only.
    assert writers(grants, cfg.topics.decisions) == {SIDECAR}
    assert writers(grants, cfg.topics.comparisons) == {SIDECAR}
    assert writers(grants, cfg.topics.requests) == {TRAFFIC}
    assert writers(grants, cfg.aggregate.reports_topic) == {AGGREGATOR}
    assert writers(grants, cfg.outcomes.quality_topic) == {OUTCOMES}
    assert writers(grants, cfg.outcomes.verdicts_topic) == {OUTCOMES}
    assert readers(grants, cfg.outcomes.verdicts_topic) == {OPERATOR}
    # The sidecar refuses to start unless it can see the control topic is LogAppendTime.
    assert Grant(SIDECAR, "DescribeConfigs", "topic", cfg.topics.control) in grants


def test_nothing_broad_is_granted(tmp_path: Path) -> None:
    _, grants = run_acls(
        tmp_path,
        {
            "PRODUCER_PRINCIPAL": TRAFFIC,
            "OUTCOME_PRODUCER_PRINCIPAL": "User:chargebacks",
            "OUTPUT_VERSION_TOPICS": "inference.decisions.v1",
            "READER_GROUPS": "billing",
        },
    )
    assert grants
    allowed_ops = {"topic": {"Read", "Write", "DescribeConfigs"}, "group": {"Read", "Describe"}}
    for g in grants:
        assert g.kind in allowed_ops, g  # no cluster, transactional id or token ACLs
        # no All, Create, Delete, Alter*, ClusterAction
        assert g.operation in allowed_ops[g.kind], g
        assert "*" not in g.principal and "*" not in g.name, g
        assert g.principal != "User:admin", g  # the super user needs none


def test_defaults_are_the_sidecar_config_defaults(tmp_path: Path) -> None:
    """With no overrides the script names the topics and groups a default config uses."""
    cfg = default_config()
    _, grants = run_acls(tmp_path)
    topics = {g.name for g in grants if g.kind == "topic"}
    groups = {g.name for g in grants if g.kind == "group"}
    o = cfg.outcomes
    assert topics == set(cfg.all_topics()) | {
        cfg.aggregate.partials_topic,
        o.by_task_topic,
        o.changelog_topic,
        o.partials_topic_name,
    }
    assert groups == {
        cfg.kafka.group_id,
        cfg.aggregate.group_id,
        f"{cfg.aggregate.group_id}.merge",
        o.group_id,
        o.router_group,
        o.merge_group,
    }
    assert not writers(grants, cfg.topics.requests), "no producer grant unless asked for"
    assert not writers(grants, o.topic), "no outcome producer grant unless asked for"
    assert not {g for g in grants if g.operation == "Describe"}, "no reader groups by default"


def test_the_outcomes_stage_is_allowed_what_its_code_does_and_nothing_more(
    tmp_path: Path,
) -> None:
    cfg = default_config()
    o, t = cfg.outcomes, cfg.topics
    _, grants = run_acls(tmp_path)
    mine = {g for g in grants if g.principal == OUTCOMES}
    # Every topic and group the stage's code uses (names from its settings, as the code derives
    # them: sidecar/outcomes/service.py, router.py) ...
    reads = {t.comparisons, o.topic, o.by_task_topic, o.changelog_topic, o.partials_topic_name}
    writes = {
        o.by_task_topic,
        o.changelog_topic,
        o.partials_topic_name,
        o.quality_topic,
        o.verdicts_topic,
        t.dead_letter,
        t.control,
    }
    assert {g.name for g in mine if g.operation == "Read" and g.kind == "topic"} == reads
    assert {g.name for g in mine if g.operation == "Write"} == writes
    assert {g.name for g in mine if g.kind == "group"} == {
        o.group_id,
        o.router_group,
        o.merge_group,
    }
    # ... and nothing more: it creates no topic (they are pre-created), reads no topic config,
    # never writes requests, decisions, comparisons, status, audit or the aggregator's reports,
    # and does not read the control topic.
    assert {g.operation for g in mine} == {"Read", "Write"}
    for topic in (t.requests, t.decisions, t.comparisons, cfg.status_topic, cfg.audit_topic):
        assert OUTCOMES not in writers(grants, topic), topic
    assert OUTCOMES not in writers(grants, cfg.aggregate.reports_topic)
    assert OUTCOMES not in readers(grants, t.control)
    assert OUTCOMES not in readers(grants, t.requests)
    # The internal topics follow the group (outcomes.group_id), like the code's names.
    renamed = default_config(outcomes={"group_id": "fraud-outcomes"}).outcomes
    (tmp_path / "renamed").mkdir()
    _, grants = run_acls(tmp_path / "renamed", {"OUTCOMES_GROUP": "fraud-outcomes"})
    for topic in (renamed.by_task_topic, renamed.changelog_topic, renamed.partials_topic_name):
        assert writers(grants, topic) == readers(grants, topic) == {OUTCOMES}
    assert Grant(OUTCOMES, "Read", "group", renamed.router_group) in grants
    assert Grant(OUTCOMES, "Read", "group", renamed.merge_group) in grants
    assert not {g for g in grants if g.name.startswith(o.group_id)}


def test_versioned_output_topics_and_their_readers_when_listed(tmp_path: Path) -> None:
    cfg = default_config(outputs=VERSIONED_OUTPUTS)
    versions = cfg.outputs.topics()
    assert len(versions) == 2
    _, grants = run_acls(
        tmp_path,
        {
            "PRODUCER_PRINCIPAL": TRAFFIC,
            "OUTPUT_VERSION_TOPICS": ", ".join(versions),
            "READER_GROUPS": "billing legacy-risk",
        },
    )
    groups = ("billing", "legacy-risk")
    assert grants == expected_grants(cfg, TRAFFIC, reader_groups=groups)
    for topic in versions:
        # The sidecar produces each version (and reads its max.message.bytes); its reader watch
        # and `sidecar deprecations status` fetch the last record a group committed past.
        assert writers(grants, topic) == {SIDECAR}
        assert Grant(SIDECAR, "DescribeConfigs", "topic", topic) in grants
        assert readers(grants, topic) == {SIDECAR, OPERATOR}
    assert OPERATOR in readers(grants, cfg.topics.decisions)  # the current version too
    for group in groups:
        holders_ = {g.principal for g in grants if g.name == group}
        assert holders_ == {SIDECAR, OPERATOR}
        assert {g.operation for g in grants if g.name == group} == {"Describe"}
    # Not listed: none of it (the operator does not read decisions otherwise).
    (tmp_path / "plain").mkdir()
    _, plain = run_acls(tmp_path / "plain")
    assert not {g for g in plain if g.name in versions or g.operation == "Describe"}
    assert OPERATOR not in readers(plain, cfg.topics.decisions)


def test_an_outcome_producer_writes_only_the_outcomes_topic(tmp_path: Path) -> None:
    cfg = default_config()
    _, grants = run_acls(tmp_path, {"OUTCOME_PRODUCER_PRINCIPAL": "User:chargebacks"})
    assert grants == expected_grants(cfg, None, outcome_producer="User:chargebacks")
    assert {g for g in grants if g.principal == "User:chargebacks"} == {
        Grant("User:chargebacks", "Write", "topic", cfg.outcomes.topic)
    }


def test_names_and_principals_are_overridable(tmp_path: Path) -> None:
    _, grants = run_acls(
        tmp_path,
        {
            "CONTROL_TOPIC": "team.control",
            "SIDECAR_GROUP": "fraud-sidecar",
            "SIDECAR_PRINCIPAL": "User:svc-sidecar",
            "COMMAND_CONFIG": "/etc/kafka/admin.properties",
        },
    )
    assert writers(grants, "team.control") == {
        OPERATOR,
        AGGREGATOR,
        OUTCOMES,
        "User:svc-sidecar",
    }
    assert writers(grants, "team.control.status") == {"User:svc-sidecar"}
    assert Grant("User:svc-sidecar", "Read", "group", "fraud-sidecar") in grants
    assert not {g for g in grants if g.name.startswith("sidecar.control")}


def test_the_admin_config_is_passed_to_every_call(tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    run_acls(tmp_path, {"COMMAND_CONFIG": "/secret/admin.properties"})
    acl_calls = calls(log, "kafka-acls.sh")
    assert acl_calls
    for args in acl_calls:
        assert option_values(args, "--command-config") == ["/secret/admin.properties"]
        assert option_values(args, "--bootstrap-server") == ["kafka:9092"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OPERATOR_PRINCIPAL": "User:*"}, "OPERATOR_PRINCIPAL"),
        ({"SIDECAR_PRINCIPAL": "sidecar"}, "SIDECAR_PRINCIPAL"),
        ({"PRODUCER_PRINCIPAL": "User:a b"}, "PRODUCER_PRINCIPAL"),
        ({"CONTROL_TOPIC": "*"}, "CONTROL_TOPIC"),
        ({"SIDECAR_GROUP": "grp;rm"}, "SIDECAR_GROUP"),
        ({"OUTCOMES_PRINCIPAL": "User:*"}, "OUTCOMES_PRINCIPAL"),
        ({"OUTCOME_PRODUCER_PRINCIPAL": "truth"}, "OUTCOME_PRODUCER_PRINCIPAL"),
        ({"OUTCOMES_GROUP": "a b"}, "OUTCOMES_GROUP"),
        ({"VERDICTS_TOPIC": "*"}, "VERDICTS_TOPIC"),
        ({"OUTPUT_VERSION_TOPICS": "d.v1,*"}, "OUTPUT_VERSION_TOPICS"),
        ({"READER_GROUPS": "billing;rm -rf"}, "READER_GROUPS"),
        ({"BOOTSTRAP_SERVERS": ""}, "BOOTSTRAP_SERVERS"),
    ],
)
def test_refuses_wildcards_and_malformed_names(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    done, grants = run_acls(tmp_path, env, check=False)
    assert done.returncode != 0
    assert message in done.stderr
    assert not grants, "nothing is granted when an input is wrong"


def test_the_readme_shows_commands_the_script_runs(tmp_path: Path) -> None:
    """Every `kafka-acls.sh ... --add` line of the README's security section is one the script
    runs (same principal, operations and resources)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("* **Kafka ACLs as the first wall.**") :]
    section = section[: section.index("```mermaid")]
    shown = [
        shlex.split(cmd.replace("\\\n", " "))
        for cmd in re.findall(r"^ *kafka-acls\.sh \.\.\. (--add (?:.*\\\n)*.*)$", section, re.M)
    ]
    assert len(shown) >= 4
    log = tmp_path / "calls.jsonl"
    run_acls(tmp_path)
    ran = [grants_of([args]) for args in calls(log, "kafka-acls.sh")]
    for args in shown:
        assert grants_of([args]) in ran, args
