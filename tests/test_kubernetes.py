"""deploy/kubernetes/: every manifest validated against the Kubernetes schemas
(``kubernetes-validate`` bundles them; no cluster needed), the CRDs the schemas do not know
(ServiceMonitor, PrometheusRule, and kustomize's Kustomization) checked structurally, and the
manifests cross-checked with the code: the ConfigMap's TOML loads with the real loader, probes
and ports match its settings, container args parse with the real CLI, selectors match."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.cli import build_parser
from sidecar.config import SidecarConfig, apply_env, config_from_dict

yaml = pytest.importorskip("yaml", reason="pip install pyyaml (a dev extra)")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="pip install kubernetes-validate (a dev extra)"
)

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
#: The Kubernetes version whose schemas the manifests must satisfy (strict: no unknown fields).
KUBERNETES_VERSION = "1.30.0"
#: Kinds outside the Kubernetes API, so outside its schemas: checked by the tests below instead.
CRDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
}


def documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in documents() if doc["kind"] == kind]


def one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in by_kind(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


@pytest.mark.parametrize(
    ("file", "doc"),
    [
        pytest.param(f, d, id=f"{f}:{d['kind']}/{d['metadata']['name']}")
        for f, d in documents()
        if (d["apiVersion"], d["kind"]) not in CRDS
    ],
)
def test_manifest_is_valid_against_the_kubernetes_schemas(file: str, doc: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{file}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {exc.path}")


def test_a_broken_manifest_fails_validation() -> None:
    # The validator is real: a typo in a field name or a wrong type is caught.
    deployment = one("Deployment", "sidecar")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["replica"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "9100"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_every_kind_the_issue_asks_for_is_there() -> None:
    kinds = {doc["kind"] for _, doc in documents()}
    assert {
        "Deployment",
        "ConfigMap",
        "Secret",
        "PodDisruptionBudget",
        "Service",
        "ServiceMonitor",
        "PrometheusRule",
    } <= kinds
    assert {d["metadata"]["name"] for d in by_kind("Deployment")} == {
        "sidecar",
        "sidecar-aggregator",
    }


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = by_kind("Kustomization")
    listed = set(kustomization["resources"])
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == files
    images = {i["name"] for i in kustomization["images"]}
    for deployment in by_kind("Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            assert container["image"] in images


def config() -> SidecarConfig:
    toml = one("ConfigMap", "sidecar-config")["data"]["sidecar.toml"]
    import tomllib

    return config_from_dict(tomllib.loads(toml), source="configmap.yaml")


def test_the_configmap_is_a_valid_config_listening_beyond_loopback() -> None:
    cfg = config()
    assert cfg.metrics.host == "0.0.0.0", "probes and Prometheus reach the pod IP"
    assert cfg.kafka.acks == "all" and cfg.topics.replication_factor >= 3
    assert cfg.control.trust_file == "/etc/sidecar/trust.toml"
    assert cfg.control.signing_key_file == cfg.aggregate.signing_key_file
    assert cfg.control.signing_key_file == "/etc/sidecar-keys/signing.key"
    assert not cfg.control.allow_create_time  # a real Kafka cluster keeps append times


def container(name: str) -> dict[str, Any]:
    spec = one("Deployment", name)["spec"]["template"]["spec"]
    containers: list[dict[str, Any]] = spec["containers"]
    assert len(containers) == 1
    return containers[0]


@pytest.mark.parametrize(
    ("deployment", "command", "port_of"),
    [
        ("sidecar", "run", lambda c: c.metrics.port),
        ("sidecar-aggregator", "aggregate", lambda c: c.aggregate.metrics_port),
    ],
)
def test_deployments_probe_the_health_endpoints_on_the_configured_port(
    deployment: str, command: str, port_of: Any
) -> None:
    cfg = config()
    dep = one("Deployment", deployment)
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    c = container(deployment)
    args = build_parser().parse_args(c["args"])
    assert args.command == command and args.config == "/etc/sidecar/sidecar.toml"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes[mounts["/etc/sidecar"]]["configMap"]["name"] == "sidecar-config"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": port_of(cfg)}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    # The pod's private key comes only from its own Secret, mounted where the config says;
    # every SIDECAR_*__* variable is a setting.
    env = {e["name"]: e for e in c["env"]}
    apply_env({}, {k: str(v.get("value", "x")) for k, v in env.items()})
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    key_file = cfg.control.signing_key_file if command == "run" else cfg.aggregate.signing_key_file
    assert key_file is not None and key_file.startswith(mounts["signing-key"] + "/")
    secret = volumes["signing-key"]["secret"]
    assert secret["secretName"] == {"run": "sidecar-signing-key"}.get(
        command, "aggregator-signing-key"
    )
    assert secret["defaultMode"] == 0o400
    assert cfg.control.trust_file is not None
    assert cfg.control.trust_file.startswith(mounts["config"] + "/")
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] != 0
    # SIGTERM drains for up to pipeline.drain_timeout_s before the kubelet kills the pod.
    if command == "run":
        assert pod["spec"]["terminationGracePeriodSeconds"] > cfg.pipeline.drain_timeout_s


def test_the_secrets_hold_placeholders_only_and_the_trust_file_parses() -> None:
    import re
    import tomllib

    for name, role in (("sidecar-signing-key", "sidecar"), ("aggregator-signing-key", "guard")):
        key_file = tomllib.loads(one("Secret", name)["stringData"]["signing.key"])
        assert key_file["role"] == role and "REPLACE_WITH" in key_file["private_key"]
    assert not re.search(r"[A-Za-z0-9+/]{40,}", (K8S / "secret.yaml").read_text())
    trust = tomllib.loads(one("ConfigMap", "sidecar-config")["data"]["trust.toml"])
    assert {k["role"] for k in trust["keys"]} == {"operator", "guard", "sidecar"}


def test_the_disruption_budget_covers_the_sidecar_pods() -> None:
    pdb = one("PodDisruptionBudget", "sidecar")
    labels = one("Deployment", "sidecar")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    assert one("Deployment", "sidecar")["spec"]["replicas"] > 1


def test_services_and_the_service_monitor_reach_every_metrics_port() -> None:
    monitor = one("ServiceMonitor", "sidecar")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    endpoint_ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    assert all(e.get("path", "/metrics") == "/metrics" for e in monitor["spec"]["endpoints"])
    selected = [
        s for s in by_kind("Service") if selector.items() <= s["metadata"]["labels"].items()
    ]
    for deployment in ("sidecar", "sidecar-aggregator"):
        labels = one("Deployment", deployment)["spec"]["template"]["metadata"]["labels"]
        services = [s for s in selected if s["spec"]["selector"].items() <= labels.items()]
        assert len(services) == 1, f"{deployment}: one monitored Service selects its pods"
        port_names = {p["name"] for p in container(deployment)["ports"]}
        for port in services[0]["spec"]["ports"]:
            assert port["targetPort"] in port_names
            assert port["name"] in endpoint_ports


def test_the_prometheus_rule_carries_the_alert_rules_file() -> None:
    rule = one("PrometheusRule", "sidecar")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    source = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == source["groups"], (
        "copy the groups of deploy/prometheus/alerts.yml into prometheusrule.yaml"
    )
