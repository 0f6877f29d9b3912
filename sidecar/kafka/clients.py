"""Every aiokafka client the sidecar creates is built here, from the config, per role.

A *role* names what the client is for (``sidecar``, ``control``, ``ctl``, ``aggregator``,
``merge``, ``replay``, ``report``, ``demo``, ``traffic``); it becomes part of the client id,
so broker logs and quotas can tell them apart. Connection and security settings
(:func:`client_kwargs`) are the same for all of them; group members also get the config's
session settings. A role's own defaults (fetch sizes, linger) are keyword overrides.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from ..config import KafkaConfig, SidecarConfig
from ..errors import ConfigError

log = logging.getLogger(__name__)

#: How often a client's stop that has not ended yet is logged.
STOP_WARN_EVERY_S = 5.0

#: SASL mechanisms passed through (all take ``sasl_plain_username``/``sasl_plain_password``).
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def client_kwargs(cfg: KafkaConfig) -> dict[str, Any]:
    """Connection and security settings shared by every client.

    Inconsistent settings are a ConfigError naming the setting (never showing the password):
    a half-configured TLS/SASL setup would otherwise fail later as an opaque connection error.
    """
    protocol = cfg.security_protocol
    sasl = protocol in ("SASL_PLAINTEXT", "SASL_SSL")
    tls = protocol in ("SSL", "SASL_SSL")
    kwargs: dict[str, Any] = {
        "bootstrap_servers": cfg.bootstrap_servers,
        "security_protocol": protocol,
        "request_timeout_ms": cfg.request_timeout_ms,
        "metadata_max_age_ms": cfg.metadata_max_age_ms,
    }
    if sasl:
        mechanism = (cfg.sasl_mechanism or "").upper()
        if mechanism not in SASL_MECHANISMS:
            raise ConfigError(
                f"kafka.security_protocol={protocol} needs kafka.sasl_mechanism set to one of "
                f"{', '.join(SASL_MECHANISMS)} (got {cfg.sasl_mechanism!r})"
            )
        if not cfg.sasl_plain_username or cfg.sasl_plain_password is None:
            raise ConfigError(
                f"kafka.sasl_mechanism={mechanism} needs kafka.sasl_plain_username and "
                "kafka.sasl_plain_password (e.g. $SIDECAR_KAFKA__SASL_PLAIN_PASSWORD)"
            )
        kwargs["sasl_mechanism"] = mechanism
        kwargs["sasl_plain_username"] = cfg.sasl_plain_username
        kwargs["sasl_plain_password"] = cfg.sasl_plain_password
    elif cfg.sasl_mechanism:
        raise ConfigError(
            f"kafka.sasl_mechanism is set but kafka.security_protocol={protocol}; use "
            "SASL_SSL (or SASL_PLAINTEXT)"
        )
    ssl_files = {
        "ssl_cafile": cfg.ssl_cafile,
        "ssl_certfile": cfg.ssl_certfile,
        "ssl_keyfile": cfg.ssl_keyfile,
    }
    if tls:
        from aiokafka.helpers import create_ssl_context

        if cfg.ssl_keyfile and not cfg.ssl_certfile:
            raise ConfigError("kafka.ssl_keyfile is set without kafka.ssl_certfile")
        try:
            # No cafile: the system's CA bundle verifies the brokers (never verification off).
            kwargs["ssl_context"] = create_ssl_context(
                cafile=cfg.ssl_cafile, certfile=cfg.ssl_certfile, keyfile=cfg.ssl_keyfile
            )
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(
                "kafka TLS settings unusable (ssl_cafile/ssl_certfile/ssl_keyfile): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    elif any(ssl_files.values()):
        set_names = ", ".join(f"kafka.{k}" for k, v in ssl_files.items() if v)
        raise ConfigError(
            f"{set_names} set but kafka.security_protocol={protocol}; use SSL or SASL_SSL"
        )
    return kwargs


def client_id(cfg: SidecarConfig, role: str, instance: str | None = None) -> str:
    return "-".join(p for p in (cfg.kafka.client_id, role, instance) if p)


def fetch_bytes(max_message_bytes: int) -> int:
    """What one fetch of a partition may bring: a record of the largest size expected.

    Fetched bytes are a consumer's biggest buffers, and glibc keeps buffers of a few MiB in
    its main heap, where their churn fragments it: with 4 MiB fetches the sidecar's heap grew
    by ~40 MiB over a run on a busy machine, with 1 MiB it stayed level, for up to ~5% of
    the rate (``bench/bench_throughput.py``). A bigger record is still fetched: brokers
    return the first batch of a fetch whatever its size."""
    return max(1 << 20, max_message_bytes + (64 << 10))


def new_consumer(
    cfg: SidecarConfig,
    role: str,
    *,
    group_id: str | None = None,
    instance: str | None = None,
    **settings: Any,
) -> AIOKafkaConsumer:
    """A consumer for ``role``: a group member when ``group_id`` is given (never
    auto-committing: every member commits after its outputs are acknowledged), else a plain
    reader of assigned partitions. ``settings`` override aiokafka defaults."""
    kwargs = client_kwargs(cfg.kafka)
    kwargs.update(
        client_id=client_id(cfg, role, instance), group_id=group_id, enable_auto_commit=False
    )
    if group_id is not None:
        kwargs.update(
            session_timeout_ms=cfg.kafka.session_timeout_ms,
            heartbeat_interval_ms=cfg.kafka.heartbeat_interval_ms,
            max_poll_interval_ms=cfg.kafka.max_poll_interval_ms,
        )
    kwargs.update(settings)
    return AIOKafkaConsumer(**kwargs)


def new_admin(cfg: SidecarConfig, role: str, **settings: Any) -> Any:
    """An admin client for ``role`` (consumer groups, topic configs)."""
    from aiokafka.admin import AIOKafkaAdminClient

    kwargs = client_kwargs(cfg.kafka)
    kwargs.update(client_id=client_id(cfg, role, None))
    kwargs.update(settings)
    return AIOKafkaAdminClient(**kwargs)


def new_producer(
    cfg: SidecarConfig, role: str, *, instance: str | None = None, **settings: Any
) -> AIOKafkaProducer:
    """A producer for ``role``: acks=all and no linger unless ``settings`` say otherwise; no
    single ``send()`` larger than ``kafka.max_record_bytes`` (the batch API is checked by
    :mod:`sidecar.kafka.produce`)."""
    kwargs = client_kwargs(cfg.kafka)
    kwargs.update(
        client_id=client_id(cfg, role, instance),
        acks="all",
        linger_ms=0,
        max_request_size=cfg.kafka.max_record_bytes,
    )
    kwargs.update(settings)
    return AIOKafkaProducer(**kwargs)


async def stop_quietly(client: Any, *, warn_every_s: float = STOP_WARN_EVERY_S) -> None:
    """Stop an aiokafka client, never letting its shutdown take ours down.

    After a broker outage aiokafka's ``stop()`` can raise the ``CancelledError`` of one of its
    own background fetch tasks. That error is not a request to cancel *us*: it is swallowed
    unless the calling task itself is being cancelled, in which case it propagates.

    A stop that takes long (a group join or a broker request in flight, each bounded by
    ``kafka.request_timeout_ms``) is logged every ``warn_every_s``, so that an instance slow
    to terminate says what it waits for.
    """
    if client is None:
        return
    name = type(client).__name__
    stopping = asyncio.ensure_future(client.stop())
    try:
        waited = 0.0
        while True:
            done, _ = await asyncio.wait({stopping}, timeout=warn_every_s)
            if done:
                break
            waited += warn_every_s
            log.warning(
                "stopping %s %s has taken %.0fs, waiting for %s",
                name,
                _client_id_of(client),
                waited,
                _waiting_for(client),
            )
        stopping.result()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            stopping.cancel()
            raise
        log.debug("ignored a CancelledError from stopping %s", name)
    except Exception as exc:  # a client that failed to start may fail to stop; we are done
        log.debug("error stopping %s: %s", name, exc)


def _client_id_of(client: Any) -> str:
    """The client id an aiokafka client connects with (the producer and the consumer keep
    their connection client under different names)."""
    inner = getattr(client, "_client", None) or getattr(client, "client", None)
    return str(getattr(inner, "_client_id", "?"))


def _waiting_for(client: Any) -> str:
    """What a client's stop waits for, in words an operator can act on."""
    if isinstance(client, AIOKafkaProducer):
        return "records still on their way to the broker (each ends within request_timeout_ms)"
    group = getattr(client, "_group_id", None)
    if isinstance(client, AIOKafkaConsumer) and group:
        return (
            f"the group join or commit of group {group} in flight (ends within request_timeout_ms)"
        )
    return "broker requests in flight (each ends within request_timeout_ms)"
