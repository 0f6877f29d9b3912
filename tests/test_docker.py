"""Structural checks of docker/: the compose stack, Prometheus scraping, the Grafana dashboard.

No Docker engine runs here (and in CI), so the stack itself is never started by the tests; these
checks catch the mistakes that would only show once it is: a broker missing from the quorum,
a scrape target on the wrong port, a dashboard panel on a metric that does not exist.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from sidecar.aggregate.metrics import AggregateMetrics
from sidecar.aggregate.report import FIGURES
from sidecar.config import load_config
from sidecar.metrics import SidecarMetrics
from sidecar.outcomes.metrics import OutcomesMetrics

yaml = pytest.importorskip("yaml", reason="pip install pyyaml (a dev extra)")

DOCKER = Path(__file__).resolve().parent.parent / "docker"


def load_yaml(name: str) -> Any:
    return yaml.safe_load((DOCKER / name).read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = load_yaml("compose.yaml")
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    svcs: dict[str, Any] = compose["services"]
    return svcs


def brokers(services: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {
        name: svc["environment"]
        for name, svc in services.items()
        if str(svc.get("image", "")).startswith("apache/kafka")
        and "KAFKA_NODE_ID" in svc.get("environment", {})
    }


def test_three_kraft_brokers_form_one_quorum(services: dict[str, Any]) -> None:
    kafka = brokers(services)
    assert len(kafka) == 3
    ids = {env["KAFKA_NODE_ID"]: name for name, env in kafka.items()}
    assert sorted(ids) == ["1", "2", "3"]
    voters = {env["KAFKA_CONTROLLER_QUORUM_VOTERS"] for env in kafka.values()}
    assert len(voters) == 1, "every broker must list the same voters"
    expected = {f"{node}@{name}:9093" for node, name in ids.items()}
    assert set(voters.pop().split(",")) == expected
    assert len({env["CLUSTER_ID"] for env in kafka.values()}) == 1
    for name, env in kafka.items():
        assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
        assert "CONTROLLER://:9093" in env["KAFKA_LISTENERS"]
        assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
        assert env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{name}:9092"
        assert env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
        assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3"
        assert "healthcheck" in services[name]


def test_the_sidecar_config_matches_the_cluster(services: dict[str, Any]) -> None:
    cfg = load_config(DOCKER / "sidecar.toml", env={})
    assert set(cfg.kafka.bootstrap_servers.split(",")) == {
        f"{name}:9092" for name in brokers(services)
    }
    assert cfg.topics.replication_factor == 3
    assert cfg.kafka.acks == "all"
    script = "\n".join(services["topics"]["command"])
    for topic in cfg.all_topics():
        assert topic in script, f"topic {topic} is not created by the topics job"
    assert "create sidecar.control 1 --config retention.ms=-1" in script


def test_sidecar_and_aggregator_services(services: dict[str, Any]) -> None:
    sidecar, aggregator = services["sidecar"], services["aggregator"]
    outcomes = services["outcomes"]
    assert sidecar["deploy"]["replicas"] >= 2
    assert sidecar["command"][0] == "run" and aggregator["command"][0] == "aggregate"
    assert outcomes["command"][:2] == ["outcomes", "run"]
    cfg = load_config(DOCKER / "sidecar.toml", env={})
    for svc, port in (
        (sidecar, cfg.metrics.port),
        (aggregator, cfg.aggregate.metrics_port),
        (outcomes, cfg.outcomes.metrics_port),
    ):
        assert "/healthz" in " ".join(svc["healthcheck"]["test"])
        assert f":{port}/" in " ".join(svc["healthcheck"]["test"])
        assert str(port) in svc["expose"]
        assert svc["depends_on"]["topics"]["condition"] == "service_completed_successfully"
        keys = svc["environment"]["SIDECAR_CONTROL_KEYS"]
        assert keys.startswith("${SIDECAR_CONTROL_KEYS:?"), "keys only from the environment"
        assert "container_name" not in svc
    assert aggregator["environment"]["SIDECAR_HEALTH_PORT"] == str(cfg.aggregate.metrics_port)
    assert outcomes["environment"]["SIDECAR_HEALTH_PORT"] == str(cfg.outcomes.metrics_port)
    # The stores live on a volume at the configured state directory.
    mounts = dict(v.split(":")[:2] for v in outcomes["volumes"])
    assert any(cfg.outcomes.state_dir.startswith(dst) for dst in mounts.values())
    assert cfg.outcomes.key_id and cfg.outcomes.key_id in (DOCKER / ".env.example").read_text()
    for name in ("prometheus", "grafana"):
        assert "healthcheck" in services[name]


def test_no_secret_is_committed() -> None:
    text = (DOCKER / "compose.yaml").read_text() + (DOCKER / ".env.example").read_text()
    assert not re.search(r"[0-9a-fA-F]{32,}", text), "a hex secret in docker/"
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


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
        "latency_p99_ratio",
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
