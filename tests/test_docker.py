"""Structural checks of docker/: the compose stack and its Kafka security, Prometheus scraping,
the Grafana dashboard.

No Docker engine runs here (and in CI), so the stack itself is never started by the tests; these
checks catch the mistakes that would only show once it is: a broker missing from the quorum or
listening without SASL, a service logging in as another's user or with a password written into a
file, an ACL too many, a scrape target on the wrong port, a dashboard panel on a metric that does
not exist. The brokers' launcher and the setup job (docker/kafka/*.sh) run for real, against
stand-ins for the Kafka tools that record what they were asked to do (kafka_acl_helpers).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from kafka_acl_helpers import TRAFFIC, calls, expected_grants, grants_of, option_values, write_stub
from prometheus_client import CollectorRegistry

from sidecar.aggregate.metrics import AggregateMetrics
from sidecar.aggregate.report import FIGURES
from sidecar.cli import build_parser
from sidecar.config import SidecarConfig, load_config
from sidecar.kafka.clients import client_kwargs
from sidecar.metrics import SidecarMetrics
from sidecar.outcomes.metrics import OutcomesMetrics

yaml = pytest.importorskip("yaml", reason="pip install pyyaml (a dev extra)")

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
KAFKA_DIR = DOCKER / "kafka"
ACLS_SCRIPT = ROOT / "deploy" / "kafka-acls.sh"

#: The Kafka user each client service of the stack logs in as.
SERVICE_USERS = {
    "sidecar": "sidecar",
    "aggregator": "aggregator",
    "outcomes": "outcomes",
    "traffic": "traffic",
    "ctl": "operator",
}
#: Test passwords (never used anywhere real), by the variable compose reads them from.
TEST_SECRETS = {
    f"SASL_{user.upper()}_PASSWORD": f"test-{user}-Pw_0123456789"
    for user in ("admin", "operator", "sidecar", "aggregator", "traffic", "outcomes")
} | {"GRAFANA_ADMIN_PASSWORD": "test-grafana-Pw_0123456789"}
#: `${VAR:?message}`: the value must come from the environment; compose refuses to start without.
REQUIRED_VAR = re.compile(r"^\$\{([A-Z][A-Z0-9_]*):\?[^}]+\}$")
INTERPOLATION = re.compile(r"\$\{([A-Z][A-Z0-9_]*)(?::[?-][^}]*)?\}")

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def load_yaml(name: str) -> Any:
    return yaml.safe_load((DOCKER / name).read_text())


def interpolate(value: Any) -> str:
    """``value`` with every ``${VAR...}`` replaced by the test secret of VAR."""
    return INTERPOLATION.sub(lambda m: TEST_SECRETS[m.group(1)], str(value))


def resolved_env(service: dict[str, Any]) -> dict[str, str]:
    return {k: interpolate(v) for k, v in service.get("environment", {}).items()}


def properties(text: str) -> dict[str, str]:
    """A Java properties file of plain ``key=value`` lines (what docker/kafka/ uses); a key set
    twice is a mistake (the last one would silently win)."""
    props: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not key=value: {line!r}"
        assert key.strip() not in props, f"{key} is set twice"
        props[key.strip()] = value.strip()
    return props


def server_properties() -> dict[str, str]:
    return properties((KAFKA_DIR / "server.properties").read_text())


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Host path (as written) -> container path of a service's bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        parts = volume.split(":")
        if parts[0].startswith("."):
            out[parts[0]] = parts[1]
    return out


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = load_yaml("compose.yaml")
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    svcs: dict[str, Any] = compose["services"]
    return svcs


@pytest.fixture(scope="module")
def docker_config() -> SidecarConfig:
    return load_config(DOCKER / "sidecar.toml", env={})


def kafka_nodes(services: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in services.items()
        if str(svc.get("image", "")).startswith("apache/kafka")
        and "/opt/sidecar/kafka/start-node.sh" in svc.get("entrypoint", [])
    }


def stub_tools(directory: Path, log: Path, describe: str = "") -> Path:
    """A bin directory of stand-ins for the Kafka tools the scripts call."""
    directory.mkdir()
    for tool in ("kafka-acls.sh", "kafka-topics.sh", "kafka-storage.sh", "kafka-server-start.sh"):
        write_stub(directory, tool, log)
    write_stub(directory, "kafka-configs.sh", log, stdout=describe)
    return directory


def run_script(script: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
    return subprocess.run(
        ["bash", str(script)], env=full_env, capture_output=True, text=True, timeout=120
    )


# -- the brokers ------------------------------------------------------------------------------


def test_three_kraft_nodes_form_one_quorum(services: dict[str, Any]) -> None:
    nodes = kafka_nodes(services)
    assert len(nodes) == 3
    ids = {svc["environment"]["NODE_ID"]: name for name, svc in nodes.items()}
    assert sorted(ids) == ["1", "2", "3"]
    props = server_properties()
    # start-node.sh advertises kafka-$NODE_ID: each node's hostname must be that.
    for node_id, name in ids.items():
        assert services[name]["hostname"] == name == f"kafka-{node_id}"
    expected = {f"{node}@{name}:9093" for node, name in ids.items()}
    assert set(props["controller.quorum.voters"].split(",")) == expected
    assert props["process.roles"] == "broker,controller"
    assert len({svc["environment"]["CLUSTER_ID"] for svc in nodes.values()}) == 1
    assert props["default.replication.factor"] == "3"
    assert props["min.insync.replicas"] == "2"
    assert props["offsets.topic.replication.factor"] == "3"
    assert props["auto.create.topics.enable"] == "false"
    for name, svc in nodes.items():
        assert mounts(svc)["./kafka"] == "/opt/sidecar/kafka"
        assert "./kafka:/opt/sidecar/kafka:ro" in svc["volumes"]
        assert any(v.endswith(":/var/lib/kafka/data") for v in svc["volumes"]), name
        check = " ".join(svc["healthcheck"]["test"])
        assert "--command-config /tmp/kafka-node/admin.properties" in check, name


def test_every_listener_needs_sasl() -> None:
    props = server_properties()
    listeners = {
        entry.split("://")[0]: entry.split("://")[1] for entry in props["listeners"].split(",")
    }
    protocols = dict(
        entry.split(":") for entry in props["listener.security.protocol.map"].split(",")
    )
    assert set(listeners) == set(protocols)
    assert all(p.startswith("SASL_") for p in protocols.values()), protocols
    # Clients and brokers between themselves: SCRAM-SHA-512, nothing else on that listener.
    inter = props["inter.broker.listener.name"]
    assert inter in listeners and protocols[inter] == "SASL_PLAINTEXT"
    assert props["sasl.mechanism.inter.broker.protocol"] == "SCRAM-SHA-512"
    assert props["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert props[f"listener.name.{inter.lower()}.sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    # Controllers cannot use SCRAM among themselves (its credentials live in the metadata log
    # they serve): PLAIN with a static admin entry, on their own listener.
    [controller] = props["controller.listener.names"].split(",")
    assert controller in listeners and controller != inter
    assert props["sasl.mechanism.controller.protocol"] == "PLAIN"
    assert props[f"listener.name.{controller.lower()}.sasl.enabled.mechanisms"] == "PLAIN"
    # The client listener is the only one advertised (start-node.sh) and the one clients use.
    assert listeners[inter] == ":9092"
    # No login settings in the committed file: start-node.sh adds them from the environment.
    assert not [k for k, v in props.items() if k.endswith("jaas.config") or "password" in v]


def test_the_authorizer_denies_what_no_acl_allows() -> None:
    props = server_properties()
    assert props["authorizer.class.name"] == (
        "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
    )
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert props["super.users"] == "User:admin"


@needs_bash
def test_start_node_formats_with_the_admin_credential_and_starts_kafka(
    tmp_path: Path, services: dict[str, Any]
) -> None:
    log = tmp_path / "calls.jsonl"
    bin_dir = stub_tools(tmp_path / "bin", log)
    runtime = tmp_path / "runtime"
    env = resolved_env(services["kafka-2"])
    password = TEST_SECRETS["SASL_ADMIN_PASSWORD"]
    assert env["SASL_ADMIN_PASSWORD"] == password and env["NODE_ID"] == "2"
    done = run_script(
        KAFKA_DIR / "start-node.sh",
        {
            **env,
            "KAFKA_BIN": str(bin_dir),
            "BASE_CONFIG": str(KAFKA_DIR / "server.properties"),
            "RUNTIME_DIR": str(runtime),
        },
    )
    assert done.returncode == 0, done.stderr
    config = runtime / "server.properties"
    [fmt] = calls(log, "kafka-storage.sh")
    assert fmt[0] == "format" and "--ignore-formatted" in fmt
    assert option_values(fmt, "--cluster-id") == [env["CLUSTER_ID"]]
    assert option_values(fmt, "--config") == [str(config)]
    # KIP-900: the inter-broker user's SCRAM credential exists before the brokers start.
    assert option_values(fmt, "--add-scram") == [f"SCRAM-SHA-512=[name=admin,password={password}]"]
    assert calls(log, "kafka-server-start.sh") == [[str(config)]]

    props = properties(config.read_text())  # the base file plus this node's settings
    assert {k: v for k, v in props.items() if k in server_properties()} == server_properties()
    assert props["node.id"] == "2"
    assert props["advertised.listeners"] == "SASL_PLAINTEXT://kafka-2:9092"
    inter, controller = props["inter.broker.listener.name"], props["controller.listener.names"]
    scram = props[f"listener.name.{inter.lower()}.scram-sha-512.sasl.jaas.config"]
    assert scram.startswith("org.apache.kafka.common.security.scram.ScramLoginModule required ")
    assert f'username="admin" password="{password}";' in scram
    plain = props[f"listener.name.{controller.lower()}.plain.sasl.jaas.config"]
    assert plain.startswith("org.apache.kafka.common.security.plain.PlainLoginModule required ")
    assert f'username="admin" password="{password}" user_admin="{password}";' in plain
    # The files holding the password are readable by their owner only.
    for secret in (config, runtime / "admin.properties"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    admin = properties((runtime / "admin.properties").read_text())
    assert admin["security.protocol"] == "SASL_PLAINTEXT"
    assert admin["sasl.mechanism"] == "SCRAM-SHA-512"
    launcher = (KAFKA_DIR / "start-node.sh").read_text()
    assert 'RUNTIME_DIR="${RUNTIME_DIR:-/tmp/kafka-node}"' in launcher, "read by the healthcheck"


UNSAFE_PASSWORDS = ["", "REPLACE_ME", "short", 'has"quote-0123456789', "a,b]=c" * 4]


@needs_bash
@pytest.mark.parametrize("password", UNSAFE_PASSWORDS)
def test_start_node_refuses_a_missing_or_unsafe_password(tmp_path: Path, password: str) -> None:
    log = tmp_path / "calls.jsonl"
    bin_dir = stub_tools(tmp_path / "bin", log)
    done = run_script(
        KAFKA_DIR / "start-node.sh",
        {
            "NODE_ID": "1",
            "CLUSTER_ID": "x",
            "SASL_ADMIN_PASSWORD": password,
            "KAFKA_BIN": str(bin_dir),
            "RUNTIME_DIR": str(tmp_path / "runtime"),
        },
    )
    assert done.returncode != 0
    assert "SASL_ADMIN_PASSWORD" in done.stderr
    assert calls(log) == [] and not (tmp_path / "runtime").exists()


# -- the setup job: users, topics, ACLs -------------------------------------------------------


def run_setup(
    tmp_path: Path, services: dict[str, Any], describe: str, **overrides: str
) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    log = tmp_path / "calls.jsonl"
    bin_dir = stub_tools(tmp_path / "bin", log, describe=describe)
    runtime = tmp_path / "runtime"
    env = {
        **resolved_env(services["setup"]),
        "KAFKA_BIN": str(bin_dir),
        "ACLS_SCRIPT": str(ACLS_SCRIPT),
        "RUNTIME_DIR": str(runtime),
        **overrides,
    }
    return run_script(KAFKA_DIR / "setup.sh", env), log, runtime


LOG_APPEND = "message.timestamp.type=LogAppendTime sensitive=false synonyms={}"


def test_the_setup_job_runs_the_mounted_scripts_as_admin(services: dict[str, Any]) -> None:
    setup = services["setup"]
    assert str(setup["image"]).startswith("apache/kafka")
    assert setup["entrypoint"] == ["/bin/bash", "/opt/sidecar/kafka/setup.sh"]
    assert mounts(setup) == {
        "./kafka": "/opt/sidecar/kafka",
        "../deploy/kafka-acls.sh": "/opt/sidecar/kafka-acls.sh",
    }
    text = (KAFKA_DIR / "setup.sh").read_text()
    assert 'ACLS_SCRIPT="${ACLS_SCRIPT:-/opt/sidecar/kafka-acls.sh}"' in text
    assert setup["restart"] == "no"
    for name in kafka_nodes(services):
        assert setup["depends_on"][name]["condition"] == "service_healthy"


@needs_bash
def test_the_setup_job_creates_the_users_topics_and_acls(
    tmp_path: Path, services: dict[str, Any], docker_config: SidecarConfig
) -> None:
    cfg = docker_config
    done, log, runtime = run_setup(tmp_path, services, LOG_APPEND)
    assert done.returncode == 0, done.stderr
    admin_config = str(runtime / "admin.properties")
    assert stat.S_IMODE((runtime / "admin.properties").stat().st_mode) == 0o600
    admin = properties((runtime / "admin.properties").read_text())
    assert f'password="{TEST_SECRETS["SASL_ADMIN_PASSWORD"]}"' in admin["sasl.jaas.config"]
    every = calls(log)
    assert every
    for args in every:  # every tool call goes to the stack's brokers as admin
        assert option_values(args, "--bootstrap-server") == [cfg.kafka.bootstrap_servers], args
        assert option_values(args, "--command-config") == [admin_config], args

    # SCRAM users: one per client service, each with its own password.
    configs = calls(log, "kafka-configs.sh")
    users = {
        option_values(a, "--entity-name")[0]: option_values(a, "--add-config")[0]
        for a in configs
        if option_values(a, "--entity-type") == ["users"]
    }
    assert set(users) == set(SERVICE_USERS.values())
    for user, spec in users.items():
        password = TEST_SECRETS[f"SASL_{user.upper()}_PASSWORD"]
        assert spec == f"SCRAM-SHA-512=[iterations=8192,password={password}]"

    # Topics: every topic the config names, replicated; the control topic as the control plane
    # needs it (one partition, kept forever, the broker's append time on every record).
    o = cfg.outcomes
    created = {option_values(a, "--topic")[0]: a for a in calls(log, "kafka-topics.sh")}
    # The outcomes stage's, after its group.
    internal = {o.by_task_topic, o.changelog_topic, o.partials_topic_name}
    assert set(cfg.all_topics()) | internal <= set(created)
    assert set(created) <= set(cfg.all_topics()) | {cfg.aggregate.partials_topic} | internal
    for topic, args in created.items():
        assert "--create" in args and "--if-not-exists" in args
        assert option_values(args, "--replication-factor") == [str(cfg.topics.replication_factor)]
        topic_configs = option_values(args, "--config")
        assert "min.insync.replicas=2" in topic_configs
        if topic == cfg.topics.control:
            assert option_values(args, "--partitions") == ["1"]
            assert {
                "message.timestamp.type=LogAppendTime",
                "retention.ms=-1",
                "retention.bytes=-1",
            } <= set(topic_configs)
        else:
            # by-task and the changelog: as many partitions as the comparisons topic (the stage
            # refuses to start otherwise).
            assert option_values(args, "--partitions") == [str(cfg.topics.partitions)]
            assert not any(c.startswith("message.timestamp.type") for c in topic_configs)
        # The outcomes stage creates neither (its user may not) nor checks their configs:
        # compaction and retention are set here or nowhere.
        if topic == o.changelog_topic:
            assert {
                "cleanup.policy=compact,delete",
                f"retention.ms={o.changelog_retention_ms()}",
            } <= set(topic_configs)
        elif topic in (o.verdicts_topic, o.partials_topic_name):
            assert "cleanup.policy=compact" in topic_configs
        elif topic != cfg.topics.control:
            assert not any(c.startswith(("cleanup.policy", "retention.")) for c in topic_configs)
    # ... and set again on topics that existed before (a longer label window, a topic created
    # by hand), as the control topic's below.
    altered = {
        option_values(a, "--entity-name")[0]: option_values(a, "--add-config")[0]
        for a in calls(log, "kafka-configs.sh")
        if option_values(a, "--entity-type") == ["topics"] and "--alter" in a
    }
    assert altered[o.changelog_topic] == (
        f"cleanup.policy=[compact,delete],retention.ms={o.changelog_retention_ms()}"
    )
    assert altered[o.verdicts_topic] == "cleanup.policy=compact"
    # ... and set again on a control topic that existed before, then checked.
    [alter] = [
        a
        for a in configs
        if option_values(a, "--entity-name") == [cfg.topics.control] and "--alter" in a
    ]
    assert "message.timestamp.type=LogAppendTime" in option_values(alter, "--add-config")[0]

    # ACLs: exactly the policy, for the users the services log in as, with this config's names.
    grants = grants_of(calls(log, "kafka-acls.sh"))
    assert grants == expected_grants(cfg, TRAFFIC)
    assert {g.principal for g in grants} == {f"User:{u}" for u in SERVICE_USERS.values()}
    assert services["setup"]["environment"]["SIDECAR_GROUP"] == cfg.kafka.group_id
    # The outcomes principal: what kafka-acls.sh gives it, for docker/sidecar.toml's names.
    outcomes = {g for g in grants if g.principal == "User:outcomes"}
    assert {g.name for g in outcomes if g.kind == "group"} == {
        o.group_id,
        o.router_group,
        o.merge_group,
    }
    assert {g.name for g in outcomes if g.operation == "Write"} >= internal | {
        o.quality_topic,
        o.verdicts_topic,
        cfg.topics.control,
    }
    assert not {g for g in outcomes if g.name == cfg.topics.requests}


@needs_bash
def test_the_setup_job_needs_the_outcomes_changelog_retention(
    tmp_path: Path, services: dict[str, Any], docker_config: SidecarConfig
) -> None:
    """compose.yaml passes docker/sidecar.toml's changelog retention; without it setup stops."""
    value = services["setup"]["environment"]["OUTCOMES_CHANGELOG_RETENTION_MS"]
    assert value == str(docker_config.outcomes.changelog_retention_ms())
    # Longer than the longest label window: a store rebuilt from the changelog still has every
    # request waiting for its outcome.
    assert int(value) > docker_config.outcomes.max_label_window_ms()
    for i, bad in enumerate(("", "90d", "-1", "0")):
        (tmp_path / str(i)).mkdir()
        done, log, _ = run_setup(
            tmp_path / str(i), services, LOG_APPEND, OUTCOMES_CHANGELOG_RETENTION_MS=bad
        )
        assert done.returncode != 0
        assert "OUTCOMES_CHANGELOG_RETENTION_MS" in done.stderr
        assert calls(log) == [], "nothing is sent to Kafka"


@needs_bash
def test_the_setup_job_fails_unless_the_control_topic_is_log_append_time(
    tmp_path: Path, services: dict[str, Any]
) -> None:
    done, log, _ = run_setup(tmp_path, services, "message.timestamp.type=CreateTime")
    assert done.returncode != 0
    assert "LogAppendTime" in done.stderr
    assert calls(log, "kafka-acls.sh") == []


@needs_bash
@pytest.mark.parametrize("user", ["admin", "operator", "traffic", "outcomes"])
def test_the_setup_job_refuses_placeholder_passwords(
    tmp_path: Path, services: dict[str, Any], user: str
) -> None:
    var = f"SASL_{user.upper()}_PASSWORD"
    done, log, _ = run_setup(tmp_path, services, LOG_APPEND, **{var: "REPLACE_ME"})
    assert done.returncode != 0
    assert var in done.stderr
    assert calls(log) == [], "nothing is sent to Kafka"


# -- the clients ------------------------------------------------------------------------------


def test_every_client_logs_in_as_its_own_user(services: dict[str, Any]) -> None:
    clients = {name for name, svc in services.items() if svc.get("image") == "sidecar:local"}
    assert clients == set(SERVICE_USERS)
    for name, user in SERVICE_USERS.items():
        env = services[name]["environment"]
        assert env["SIDECAR_KAFKA__SECURITY_PROTOCOL"] == "SASL_PLAINTEXT", name
        assert env["SIDECAR_KAFKA__SASL_MECHANISM"] == "SCRAM-SHA-512", name
        assert env["SIDECAR_KAFKA__SASL_PLAIN_USERNAME"] == user, name
        # The password comes from the environment (docker/.env), never a literal.
        match = REQUIRED_VAR.match(str(env["SIDECAR_KAFKA__SASL_PLAIN_PASSWORD"]))
        assert match and match.group(1) == f"SASL_{user.upper()}_PASSWORD", name
        # The real config loader and client factory accept what the service gets.
        cfg = load_config(DOCKER / "sidecar.toml", env=resolved_env(services[name]))
        kwargs = client_kwargs(cfg.kafka)
        assert kwargs["security_protocol"] == "SASL_PLAINTEXT"
        assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
        assert kwargs["sasl_plain_username"] == user
        assert kwargs["sasl_plain_password"] == TEST_SECRETS[f"SASL_{user.upper()}_PASSWORD"]
    assert len(set(SERVICE_USERS.values())) == len(SERVICE_USERS)


def test_no_password_is_written_into_compose(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        for key, value in svc.get("environment", {}).items():
            if "PASSWORD" in key:
                assert REQUIRED_VAR.match(str(value)), f"{name}: {key} must be ${{VAR:?...}}"
    text = (DOCKER / "compose.yaml").read_text()
    assert not re.search(r"password=(?!\$)", text, re.I)


def test_the_sidecar_config_matches_the_cluster(
    services: dict[str, Any], docker_config: SidecarConfig
) -> None:
    cfg = docker_config
    assert set(cfg.kafka.bootstrap_servers.split(",")) == {
        f"{name}:9092" for name in kafka_nodes(services)
    }
    assert cfg.topics.replication_factor == 3
    assert cfg.kafka.acks == "all"
    # Security comes from compose, per service: the file itself names no user or password.
    assert cfg.kafka.sasl_plain_username is None and cfg.kafka.sasl_plain_password is None


def test_sidecar_and_aggregator_services(
    services: dict[str, Any], docker_config: SidecarConfig
) -> None:
    cfg = docker_config
    sidecar, aggregator = services["sidecar"], services["aggregator"]
    outcomes = services["outcomes"]
    assert sidecar["deploy"]["replicas"] >= 2
    assert sidecar["command"][0] == "run" and aggregator["command"][0] == "aggregate"
    assert outcomes["command"][:2] == ["outcomes", "run"]
    own_keys = {
        "sidecar": ("./keys/sidecar.key", cfg.control.signing_key_file),
        "aggregator": ("./keys/guard.key", cfg.aggregate.signing_key_file),
        "outcomes": ("./keys/outcomes.key", cfg.outcomes.signing_key_file),
    }
    for name, svc, port in (
        ("sidecar", sidecar, cfg.metrics.port),
        ("aggregator", aggregator, cfg.aggregate.metrics_port),
        ("outcomes", outcomes, cfg.outcomes.metrics_port),
    ):
        assert "/healthz" in " ".join(svc["healthcheck"]["test"])
        assert f":{port}/" in " ".join(svc["healthcheck"]["test"])
        assert str(port) in svc["expose"]
        assert svc["depends_on"]["setup"]["condition"] == "service_completed_successfully"
        # Public keys for both; each service mounts only its own private key (git-ignored).
        own_mounts = mounts(svc)
        assert own_mounts["./keys/trust.toml"] == cfg.control.trust_file
        own, where = own_keys[name]
        assert where is not None and own_mounts[own] == where
        assert sum(src.endswith(".key") for src in own_mounts) == 1
        assert "container_name" not in svc
    assert aggregator["environment"]["SIDECAR_HEALTH_PORT"] == str(cfg.aggregate.metrics_port)
    assert services["traffic"]["depends_on"]["setup"]["condition"] == (
        "service_completed_successfully"
    )
    # The demo producer and ctl hold no service key (operators bring their own to ctl).
    for name in ("traffic", "ctl"):
        assert not any(src.endswith(".key") for src in mounts(services[name])), name
    assert outcomes["environment"]["SIDECAR_HEALTH_PORT"] == str(cfg.outcomes.metrics_port)
    # The stores live on a volume at the configured state directory.
    volumes = dict(v.split(":")[:2] for v in outcomes["volumes"])
    assert any(cfg.outcomes.state_dir.startswith(dst) for dst in volumes.values())
    for name in ("prometheus", "grafana"):
        assert "healthcheck" in services[name]


def test_ctl_runs_as_the_operator_with_the_trust_file(
    services: dict[str, Any], docker_config: SidecarConfig
) -> None:
    ctl = services["ctl"]
    assert ctl["entrypoint"] == ["sidecar", "ctl"]
    assert ctl["profiles"] == ["ops"]
    assert "depends_on" not in ctl
    assert mounts(ctl)["./keys/trust.toml"] == docker_config.control.trust_file
    parser = build_parser()
    assert parser.parse_args(["ctl", *ctl["command"]]).ctl_command == "status"
    # The documented invocation (compose.yaml, README) parses with the real CLI.
    args = parser.parse_args(["ctl", "rollback", "--key", "/keys/ops.key", "--reason", "x"])
    assert args.ctl_command == "rollback" and args.key == "/keys/ops.key"
    assert ctl["environment"]["SIDECAR_CONFIG"] == "/etc/sidecar/sidecar.toml"


# -- secrets and compose itself ---------------------------------------------------------------


def committed_text() -> dict[Path, str]:
    files = [
        DOCKER / "compose.yaml",
        DOCKER / ".env.example",
        DOCKER / "sidecar.toml",
        ACLS_SCRIPT,
        *sorted(KAFKA_DIR.iterdir()),
    ]
    return {f: f.read_text() for f in files}


def test_no_secret_is_committed(compose: dict[str, Any]) -> None:
    for path, text in committed_text().items():
        assert not re.search(r"[0-9a-fA-F]{32,}", text), f"a hex secret in {path}"
        # A password is only ever a variable reference.
        for value in re.findall(r'password="([^"]*)"', text):
            assert value.startswith("$"), f"a literal password in {path}"
    assert {".env", "keys/"} <= set((DOCKER / ".gitignore").read_text().split())
    # .env.example: placeholders only, for every variable compose requires.
    example = properties((DOCKER / ".env.example").read_text())
    assert set(example.values()) == {"REPLACE_ME"}
    required = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):\?", (DOCKER / "compose.yaml").read_text()))
    assert required == set(example), "docker/.env.example lists every variable compose needs"
    git = shutil.which("git")
    if git and (ROOT / ".git").exists():
        tracked = subprocess.run(
            [git, "ls-files", "docker"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
        assert not [f for f in tracked if f == "docker/.env" or f.startswith("docker/keys/")]


def compose_command() -> list[str] | None:
    """`docker compose` (v2) or `docker-compose` (v1); neither needs an engine for `config`."""
    docker = shutil.which("docker")
    if docker:
        v2 = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
        if v2.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_validates_and_refuses_to_start_without_passwords(tmp_path: Path) -> None:
    command = compose_command()
    if command is None:
        pytest.skip(
            "neither `docker compose` nor `docker-compose` is installed (Debian: apt-get "
            "install docker-compose); compose.yaml is still checked structurally above"
        )
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    secrets_file = tmp_path / "test.env"
    secrets_file.write_text("".join(f"{k}={v}\n" for k, v in TEST_SECRETS.items()))
    empty = tmp_path / "empty.env"
    empty.write_text("")
    base = [*command, "--env-file", str(secrets_file), "-f", str(DOCKER / "compose.yaml")]
    for profiles in ([], ["--profile", "demo", "--profile", "ops"]):
        done = subprocess.run(
            [*base, *profiles, "config", "-q"], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
    missing = subprocess.run(
        [*command, "--env-file", str(empty), "-f", str(DOCKER / "compose.yaml"), "config", "-q"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0
    assert "docker/.env" in missing.stderr


def test_dockerfile() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.M)
    assert stages and all(s.startswith("python:3.11-slim") for s in stages) and len(stages) >= 2
    assert re.search(r"^USER (?!0\b|root)\S+", text, re.M), "the image must not run as root"
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", text, re.M)
    assert 'ENTRYPOINT ["sidecar"]' in text
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    for copied in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        assert f"!{copied.rstrip('/')}" in ignore or f"!{copied}/" in ignore, copied


def test_prometheus_scrapes_every_service_on_its_metrics_port(services: dict[str, Any]) -> None:
    prom = load_yaml("prometheus.yml")
    cfg = load_config(DOCKER / "sidecar.toml", env={})
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    want = {
        "sidecar": cfg.metrics.port,
        "aggregator": cfg.aggregate.metrics_port,
        "outcomes": cfg.outcomes.metrics_port,
    }
    for service, port in want.items():
        sd = jobs[service]["dns_sd_configs"][0]
        assert sd["names"] == [service] and sd["port"] == port and sd["type"] == "A"
        assert service in services
    prom_svc = services["prometheus"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom_svc["volumes"]


def test_prometheus_loads_the_alert_rules(services: dict[str, Any]) -> None:
    prom = load_yaml("prometheus.yml")
    mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    for rule_file in prom["rule_files"]:
        source = next(src for src, dst in mounts.items() if dst == rule_file)
        assert (DOCKER / source).resolve() == (DOCKER.parent / "deploy/prometheus/alerts.yml")
        assert yaml.safe_load((DOCKER / source).read_text())["groups"]


def _series_names() -> set[str]:
    """Every series name our code exports: counters as ``_total``, histograms as ``_bucket``,
    ``_sum``, ``_count`` (read from the real registries, not from a list kept by hand)."""
    names: set[str] = set()
    for registry in (
        SidecarMetrics().registry,
        AggregateMetrics().registry,
        OutcomesMetrics().registry,
    ):
        assert isinstance(registry, CollectorRegistry)
        for family in registry.collect():
            suffixes = {
                "counter": ["_total"],
                "histogram": ["_bucket", "_sum", "_count"],
                "gauge": [""],
            }[family.type]
            names |= {family.name + s for s in suffixes}
    return names


def test_grafana_is_provisioned_with_a_dashboard_of_real_metrics() -> None:
    ds = load_yaml("grafana/provisioning/datasources/prometheus.yaml")["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    provider = load_yaml("grafana/provisioning/dashboards/dashboards.yaml")["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"

    dashboard = json.loads((DOCKER / "grafana/dashboards/sidecar.json").read_text())
    exported = _series_names()
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    used: set[str] = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == ds["uid"]
            metrics = set(re.findall(r"\bsidecar_[a-z0-9_]+", target["expr"]))
            assert metrics, f"{panel['title']}: no sidecar metric in {target['expr']}"
            missing = metrics - exported
            assert not missing, f"{panel['title']}: {missing} is not exported by the code"
            used |= metrics
            for figure in re.findall(r'figure="([^"]+)"', target["expr"]):
                assert figure in FIGURES, figure
    # The key metrics of the issue each have a panel.
    for name in (
        "sidecar_records_consumed_total",
        "sidecar_decisions_total",
        "sidecar_dead_letters_total",
        "sidecar_model_batch_latency_seconds_bucket",
        "sidecar_policy_epoch",
        "sidecar_policy_mode",
        "sidecar_candidate_share_bp",
        "sidecar_in_flight_records",
        "sidecar_aggregate_figure",
        "sidecar_aggregate_guard_active",
        "sidecar_outcomes_quality",
        "sidecar_outcomes_quality_diff",
        "sidecar_outcomes_label_coverage",
        "sidecar_outcomes_reliability",
        "sidecar_outcomes_gate_met",
    ):
        assert name in used, f"no panel shows {name}"
    shown = set()
    for panel in panels:
        for target in panel["targets"]:
            shown |= set(re.findall(r'figure="([^"]+)"', target["expr"]))
    assert {
        "decision_rate_ratio",
        "psi_candidate_vs_champion",
        "candidate_error_rate",
        "candidate_excess_error_rate",
        "candidate_excess_timeout_rate",
        "latency_slower_share",
        "latency_tail_excess",
        "champion_nan_rate",
        "champion_fallback_rate",
    } <= shown
    # Panels do not overlap on Grafana's 24-column grid.
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24
        area = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not area & cells, panel["title"]
        cells |= area
