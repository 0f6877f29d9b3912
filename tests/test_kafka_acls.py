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


def default_config() -> SidecarConfig:
    """A config with every Kafka-related setting at its default (models are required)."""
    champion = {"name": "m", "version": "1.0.0", "target": "sidecar.examples.fraud:champion"}
    return config_from_dict({"models": {"champion": {**champion, "features": [{"name": "a"}]}}})


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
    # Operators and guards; the sidecars too (start-up barrier, signed `advance`: their key's
    # role allows nothing else), never the producer of requests.
    assert writers(grants, cfg.topics.control) == {OPERATOR, AGGREGATOR, SIDECAR}
    assert writers(grants, cfg.status_topic) == {SIDECAR}
    assert writers(grants, cfg.audit_topic) == {SIDECAR}
    assert readers(grants, cfg.topics.control) == {OPERATOR, SIDECAR}
    assert readers(grants, cfg.status_topic) == readers(grants, cfg.audit_topic) == {OPERATOR}
    # Decisions and comparisons come from the sidecars only; requests from the producer only.
    assert writers(grants, cfg.topics.decisions) == {SIDECAR}
    assert writers(grants, cfg.topics.comparisons) == {SIDECAR}
    assert writers(grants, cfg.topics.requests) == {TRAFFIC}
    assert writers(grants, cfg.aggregate.reports_topic) == {AGGREGATOR}
    # The sidecar refuses to start unless it can see the control topic is LogAppendTime.
    assert Grant(SIDECAR, "DescribeConfigs", "topic", cfg.topics.control) in grants


def test_nothing_broad_is_granted(tmp_path: Path) -> None:
    _, grants = run_acls(tmp_path, {"PRODUCER_PRINCIPAL": TRAFFIC})
    assert grants
    allowed_ops = {"Read", "Write", "DescribeConfigs"}
    for g in grants:
        assert g.operation in allowed_ops, g  # no All, Create, Delete, Alter*, ClusterAction
        assert g.kind in {"topic", "group"}, g  # no cluster, transactional id or token ACLs
        assert "*" not in g.principal and "*" not in g.name, g
        assert g.principal != "User:admin", g  # the super user needs none


def test_defaults_are_the_sidecar_config_defaults(tmp_path: Path) -> None:
    """With no overrides the script names the topics and groups a default config uses."""
    cfg = default_config()
    _, grants = run_acls(tmp_path)
    topics = {g.name for g in grants if g.kind == "topic"}
    groups = {g.name for g in grants if g.kind == "group"}
    assert topics == set(cfg.all_topics()) | {cfg.aggregate.partials_topic}
    assert groups == {cfg.kafka.group_id, cfg.aggregate.group_id, f"{cfg.aggregate.group_id}.merge"}
    assert not writers(grants, cfg.topics.requests), "no producer grant unless asked for"


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
    assert writers(grants, "team.control") == {OPERATOR, AGGREGATOR, "User:svc-sidecar"}
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
