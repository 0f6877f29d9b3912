"""Kafka ACLs in tests: stand-ins for the Kafka command-line tools, for running the shell
scripts that call them (deploy/kafka-acls.sh, docker/kafka/*.sh) without a broker; the ACLs Kafka
would store for the recorded ``kafka-acls.sh`` calls; and the intended policy, written out."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import NamedTuple

from sidecar.config import SidecarConfig


class Grant(NamedTuple):
    principal: str
    operation: str
    kind: str  # topic | group | cluster | ...
    name: str


#: kafka-acls.sh options naming a resource, and the kind of resource each names.
RESOURCE_OPTIONS = {
    "--topic": "topic",
    "--group": "group",
    "--cluster": "cluster",
    "--transactional-id": "transactional-id",
    "--delegation-token": "delegation-token",
    "--user-principal": "user",
}


def write_stub(directory: Path, name: str, log: Path, stdout: str = "") -> Path:
    """An executable ``directory/name`` that appends ``[name, *args]`` as one JSON line to
    ``log`` and prints ``stdout``."""
    stub = directory / name
    record = f"import json, sys; open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + chr(10))"
    lines = ["#!/usr/bin/env bash", f'{shlex.quote(sys.executable)} -c "{record}" {name} "$@"']
    if stdout:
        lines.append(f"printf '%s\\n' {shlex.quote(stdout)}")
    stub.write_text("\n".join(lines) + "\n")
    stub.chmod(0o755)
    return stub


def calls(log: Path, tool: str | None = None) -> list[list[str]]:
    if not log.exists():
        return []
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return [row[1:] for row in rows if tool is None or row[0] == tool]


def option_values(args: list[str], option: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == option]


def grants_of(acl_calls: list[list[str]]) -> set[Grant]:
    """The ACLs Kafka would store for these ``kafka-acls.sh --add`` calls (each call: every
    allowed principal x every operation x every resource named)."""
    grants: set[Grant] = set()
    for args in acl_calls:
        if "--list" in args:
            continue
        assert "--add" in args, args
        assert "--remove" not in args and "--deny-principal" not in args, args
        assert option_values(args, "--resource-pattern-type") == ["literal"], args
        assert not option_values(args, "--allow-host"), "ACLs are per principal, from any host"
        principals = option_values(args, "--allow-principal")
        operations = option_values(args, "--operation")
        resources = [
            (kind, "kafka-cluster" if option == "--cluster" else args[i + 1])
            for i, option in enumerate(args)
            for opt, kind in RESOURCE_OPTIONS.items()
            if option == opt
        ]
        assert principals and operations and resources, args
        grants |= {
            Grant(p, op, kind, name)
            for p in principals
            for op in operations
            for kind, name in resources
        }
    return grants


OPERATOR, SIDECAR, AGGREGATOR, OUTCOMES, TRAFFIC = (
    "User:operator",
    "User:sidecar",
    "User:aggregator",
    "User:outcomes",
    "User:traffic",
)


def expected_grants(
    cfg: SidecarConfig,
    producer: str | None,
    *,
    outcome_producer: str | None = None,
    reader_groups: tuple[str, ...] = (),
) -> set[Grant]:
    """The policy, written out: what each role's code does (README "Control-plane security").
    The topics of ``cfg.outputs.versions`` are granted as listed in OUTPUT_VERSION_TOPICS."""
    t, control = cfg.topics, cfg.topics.control
    group, agg_group = cfg.kafka.group_id, cfg.aggregate.group_id
    partials, reports = cfg.aggregate.partials_topic, cfg.aggregate.reports_topic
    o = cfg.outcomes

    def topic(principal: str, ops: str, *names: str) -> set[Grant]:
        return {Grant(principal, op, "topic", n) for op in ops.split(",") for n in names}

    want = (
        # operator: ctl (control, status, audit), report (reports, control, audit), replay
        topic(OPERATOR, "Read,Write", control)
        | topic(OPERATOR, "Read", cfg.status_topic, cfg.audit_topic, reports, t.comparisons)
        # ... report and outcomes status (quality reports, verdicts)
        | topic(OPERATOR, "Read", o.quality_topic, o.verdicts_topic)
        # sidecar
        | topic(SIDECAR, "Read", t.requests)
        | {Grant(SIDECAR, "Read", "group", group)}
        | topic(SIDECAR, "Write,DescribeConfigs", t.decisions, t.comparisons, t.dead_letter)
        | topic(SIDECAR, "Read,Write,DescribeConfigs", control)
        | topic(SIDECAR, "Write", cfg.status_topic, cfg.audit_topic)
        # aggregator
        | topic(AGGREGATOR, "Read", t.comparisons)
        | {Grant(AGGREGATOR, "Read", "group", g) for g in (agg_group, f"{agg_group}.merge")}
        | topic(AGGREGATOR, "Read,Write", partials)
        | topic(AGGREGATOR, "Write", reports, t.dead_letter, control)
        # outcomes: the join (comparisons + by-task in its group), the router (outcomes in
        # <group>.router -> by-task, dead letters), the store's changelog (written, replayed
        # without a group), reports, verdicts and signed commands; keyed by routing key, the
        # quality partials (written by the tasks, read back in <group>.merge); no
        # DescribeConfigs, no Create
        | topic(OUTCOMES, "Read", t.comparisons, o.topic)
        | {Grant(OUTCOMES, "Read", "group", g) for g in (o.group_id, o.router_group, o.merge_group)}
        | topic(OUTCOMES, "Read,Write", o.by_task_topic, o.changelog_topic, o.partials_topic_name)
        | topic(OUTCOMES, "Write", o.quality_topic, o.verdicts_topic, t.dead_letter, control)
    )
    versions = cfg.outputs.topics()
    if versions:
        want |= topic(SIDECAR, "Read,Write,DescribeConfigs", *versions)
        want |= topic(OPERATOR, "Read", t.decisions, *versions)
    want |= {Grant(p, "Describe", "group", g) for p in (SIDECAR, OPERATOR) for g in reader_groups}
    if producer:
        want |= topic(producer, "Write", t.requests)
    if outcome_producer:
        want |= topic(outcome_producer, "Write", o.topic)
    return want
