"""Kafka TLS/SASL settings map to aiokafka's arguments the same way for every client, and
control keys never show up in a repr or an error message."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from sidecar.config import KafkaConfig, config_from_dict
from sidecar.errors import ConfigError
from sidecar.kafka import client_kwargs as kafka_client_kwargs
from sidecar.kafka import new_consumer, new_producer

SECRET = "5e" * 32
PASSWORD = "hunter2-sasl-password"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A self-signed CA certificate and a client certificate/key pair (openssl)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("tls")
    key, cert = d / "client.key", d / "client.pem"
    args = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    args += ["-subj", "/CN=sidecar-test"]
    subprocess.run(
        ["openssl", *args, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return {"ssl_cafile": str(cert), "ssl_certfile": str(cert), "ssl_keyfile": str(key)}


def kafka(**kw: Any) -> KafkaConfig:
    return msgspec.convert({"bootstrap_servers": "b1:9093,b2:9093", **kw}, KafkaConfig)


async def accepted_by_aiokafka(kwargs: dict[str, Any]) -> None:
    """aiokafka validates security arguments in its constructors (no connection made)."""
    consumer = AIOKafkaConsumer(**kwargs, group_id="g")
    producer = AIOKafkaProducer(**kwargs)
    AIOKafkaAdminClient(**kwargs)
    await consumer.stop()
    await producer.stop()


async def test_plaintext() -> None:
    kw = kafka_client_kwargs(kafka())
    assert kw == {
        "bootstrap_servers": "b1:9093,b2:9093",
        "security_protocol": "PLAINTEXT",
        "request_timeout_ms": 30_000,
        "metadata_max_age_ms": 300_000,
    }
    await accepted_by_aiokafka(kw)


async def test_ssl_with_a_private_ca_and_a_client_certificate(tls_files: dict[str, str]) -> None:
    kw = kafka_client_kwargs(kafka(security_protocol="SSL", **tls_files))
    ctx = kw["ssl_context"]
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode is ssl.CERT_REQUIRED and ctx.check_hostname
    assert any(c["subject"] == ((("commonName", "sidecar-test"),),) for c in ctx.get_ca_certs())
    assert "sasl_mechanism" not in kw
    await accepted_by_aiokafka(kw)


async def test_ssl_without_a_cafile_verifies_against_the_system_cas() -> None:
    ctx = kafka_client_kwargs(kafka(security_protocol="SSL"))["ssl_context"]
    assert ctx.verify_mode is ssl.CERT_REQUIRED


@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "scram-sha-512"])
async def test_sasl(protocol: str, mechanism: str, tls_files: dict[str, str]) -> None:
    tls = {"ssl_cafile": tls_files["ssl_cafile"]} if protocol == "SASL_SSL" else {}
    cfg = kafka(
        security_protocol=protocol,
        sasl_mechanism=mechanism,
        sasl_plain_username="svc-sidecar",
        sasl_plain_password=PASSWORD,
        **tls,
    )
    kw = kafka_client_kwargs(cfg)
    assert kw["security_protocol"] == protocol
    assert kw["sasl_mechanism"] == mechanism.upper()
    assert (kw["sasl_plain_username"], kw["sasl_plain_password"]) == ("svc-sidecar", PASSWORD)
    assert ("ssl_context" in kw) == (protocol == "SASL_SSL")
    await accepted_by_aiokafka(kw)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"security_protocol": "SASL_SSL"}, "needs kafka.sasl_mechanism"),
        (
            {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "GSSAPI"},
            "needs kafka.sasl_mechanism",
        ),
        (
            {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN"},
            "needs kafka.sasl_plain_username and kafka.sasl_plain_password",
        ),
        (
            {"sasl_mechanism": "PLAIN", "sasl_plain_password": PASSWORD},
            "kafka.security_protocol=PLAINTEXT",
        ),
        ({"ssl_cafile": "/ca.pem"}, "kafka.ssl_cafile set but kafka.security_protocol"),
        (
            {"security_protocol": "SSL", "ssl_cafile": "/does/not/exist.pem"},
            "kafka TLS settings unusable",
        ),
        ({"security_protocol": "SSL", "ssl_keyfile": "/k.pem"}, "without kafka.ssl_certfile"),
    ],
)
def test_inconsistent_settings_are_config_errors_without_the_password(
    settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        kafka_client_kwargs(kafka(**settings))
    assert PASSWORD not in str(err.value)


def test_every_client_is_built_by_the_kafka_edge() -> None:
    # One mapping of the security settings holds for every client only if every client is
    # built in sidecar/kafka: no other module may construct an aiokafka client itself.
    root = Path(__file__).resolve().parent.parent / "sidecar"
    constructors = ("AIOKafkaConsumer(", "AIOKafkaProducer(", "AIOKafkaAdminClient(")
    offenders = [
        f"{path.relative_to(root)}: {name}"
        for path in root.rglob("*.py")
        if "kafka" not in path.relative_to(root).parts[:1]
        for name in constructors
        if name in path.read_text()
    ]
    assert offenders == []


async def test_role_clients_carry_the_security_settings(tls_files: dict[str, str]) -> None:
    cfg = config_from_dict(
        {
            "models": {
                "champion": {
                    "name": "m",
                    "version": "1.0.0",
                    "target": "sidecar.examples.fraud:champion",
                    "features": [{"name": "amount"}],
                }
            },
            "kafka": {
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_plain_username": "u",
                "sasl_plain_password": PASSWORD,
                **tls_files,
            },
        }
    )
    consumer = new_consumer(cfg, "ctl", group_id="g")
    producer = new_producer(cfg, "control", instance="i-1")
    for client in (consumer._client, producer.client):
        assert client._security_protocol == "SASL_SSL"
        assert client._sasl_mechanism == "SCRAM-SHA-512"
        assert client._ssl_context is not None
    assert consumer._client._client_id == "sidecar-ctl"
    assert producer.client._client_id == "sidecar-control-i-1"
