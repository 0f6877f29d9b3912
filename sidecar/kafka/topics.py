"""Topics: creating the ones a config names, and reading the settings that bound our records."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from ..config import SidecarConfig
from ..errors import BrokerError
from .clients import client_kwargs

log = logging.getLogger(__name__)

#: Kafka's TOPIC_ALREADY_EXISTS error code (someone else created it meanwhile: fine).
_TOPIC_ALREADY_EXISTS = 36
#: TOPIC_AUTHORIZATION_FAILED, CLUSTER_AUTHORIZATION_FAILED.
_NOT_AUTHORISED = (29, 31)
#: Bytes a one-record batch adds around the record (batch header 61, record framing ~21,
#: rounded up). A topic's ``max.message.bytes`` bounds the whole batch.
BATCH_OVERHEAD_BYTES = 128


async def ensure_topics(
    bootstrap_servers: str,
    topics: Iterable[str],
    partitions: int,
    replication_factor: int = 1,
    configs: dict[str, str] | None = None,
    **kafka: Any,
) -> list[str]:
    """Create the topics that do not exist yet (with ``configs``); return the names created."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, **kafka)
    try:
        await admin.start()
    except Exception as exc:
        raise BrokerError(f"cannot reach broker {bootstrap_servers}: {exc}") from exc
    try:
        existing = set(await admin.list_topics())
        wanted = [t for t in dict.fromkeys(topics) if t not in existing]
        if not wanted:
            return []
        response = await admin.create_topics(
            [
                NewTopic(
                    t,
                    num_partitions=partitions,
                    replication_factor=replication_factor,
                    topic_configs=dict(configs or {}),
                )
                for t in wanted
            ]
        )
        created = []
        for topic, code, message in response.topic_errors:
            if code == 0:
                created.append(topic)
            elif code in _NOT_AUTHORISED:
                raise BrokerError(
                    f"could not create topic {topic}: this principal may not create topics "
                    f"(error {code}). Create it beforehand (docker/kafka/setup.sh shows the "
                    "partitions and configs each topic needs) or allow Create on it"
                )
            elif code != _TOPIC_ALREADY_EXISTS:
                raise BrokerError(f"could not create topic {topic}: error {code}: {message}")
        return created
    finally:
        await admin.close()


#: The control topic's records carry the broker's append time, which no producer chooses:
#: command freshness and key validity are judged by it (see ``sidecar.control``).
CONTROL_TOPIC_CONFIGS = {"message.timestamp.type": "LogAppendTime"}


async def ensure_config_topics(cfg: SidecarConfig) -> list[str]:
    """Create every missing topic ``cfg`` names; return the names created.

    The control topic gets exactly one partition: every instance must apply commands in the
    same order. Every other topic (requests, outputs, status, audit, reports, the late and
    partials topics when configured) gets ``topics.partitions``.
    """
    kafka = client_kwargs(cfg.kafka)
    created = await ensure_topics(
        topics=[cfg.topics.control],
        partitions=1,
        replication_factor=cfg.topics.replication_factor,
        configs=CONTROL_TOPIC_CONFIGS,
        **kafka,
    )
    created += await ensure_topics(
        topics=[t for t in cfg.all_topics() if t != cfg.topics.control],
        partitions=cfg.topics.partitions,
        replication_factor=cfg.topics.replication_factor,
        **kafka,
    )
    return created


async def ensure_control_topics(cfg: SidecarConfig) -> list[str]:
    """Create the control topic (1 partition) and the status and audit topics if missing:
    every instance does this at start-up, whether or not it may create the data topics."""
    kafka = client_kwargs(cfg.kafka)
    created = await ensure_topics(
        topics=[cfg.topics.control],
        partitions=1,
        replication_factor=cfg.topics.replication_factor,
        configs=CONTROL_TOPIC_CONFIGS,
        **kafka,
    )
    created += await ensure_topics(
        topics=[cfg.status_topic, cfg.audit_topic],
        partitions=cfg.topics.partitions,
        replication_factor=cfg.topics.replication_factor,
        **kafka,
    )
    return created


async def topic_configs(cfg: SidecarConfig, topics: Iterable[str]) -> dict[str, dict[str, str]]:
    """The configs the broker reports per topic (``{}`` for a topic it says nothing about).

    Best effort: a broker that refuses DescribeConfigs (ACLs, an old version) gives ``{}``
    for every topic, logged; callers fall back to their configured values.
    """
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    names = list(dict.fromkeys(topics))
    found: dict[str, dict[str, str]] = {t: {} for t in names}
    admin = AIOKafkaAdminClient(**client_kwargs(cfg.kafka))
    try:
        await admin.start()
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, t) for t in names]
        )
        for response in responses:
            for resource in response.resources:
                code, _msg, _type, name, entries = resource[:5]
                if code == 0 and name in found:
                    found[name] = {e[0]: e[1] for e in entries if e[1] is not None}
    except Exception as exc:  # the answer only narrows limits we already have
        log.info("could not read topic configs of %s (%s); using configured limits", names, exc)
    finally:
        try:
            await admin.close()
        except Exception as exc:  # closing a client that never started
            log.debug("closing the admin client: %s", exc)
    return found


async def record_limits(cfg: SidecarConfig, topics: Iterable[str]) -> dict[str, int]:
    """Largest record (key + value + headers) each topic takes: ``kafka.max_record_bytes``,
    lowered to a topic's ``max.message.bytes`` (less the batch framing) where the broker
    reports a smaller one."""
    limits = {}
    for topic, configs in (await topic_configs(cfg, topics)).items():
        limit = cfg.kafka.max_record_bytes
        raw = configs.get("max.message.bytes")
        if raw is not None and raw.isascii() and raw.isdigit():
            limit = min(limit, int(raw) - BATCH_OVERHEAD_BYTES)
        limits[topic] = max(limit, 1024)
    return limits


class MissingTopics(BrokerError):
    """Topics the process needs are not on the broker (it waits for them, or stops)."""


async def require_topics(client: Any, named: dict[str, str]) -> dict[str, int]:
    """The partition count of each topic of ``named`` (topic -> the setting naming it), from
    one metadata request of ``client`` (an aiokafka client). Raises :class:`MissingTopics`
    naming each missing topic and its setting: no client here creates a topic by naming it
    (:mod:`.metadata`), so a typo or a topic lost with its broker is said, not papered over."""
    cluster = await client.fetch_all_metadata()
    found: dict[str, int] = {}
    missing = []
    for topic, setting in named.items():
        parts = cluster.partitions_for_topic(topic)
        if parts:
            found[topic] = len(parts)
        else:
            missing.append(f"{topic} ({setting})")
    if missing:
        raise MissingTopics(
            f"topic(s) {', '.join(missing)} do not exist on the broker; create them "
            "(`sidecar broker --config FILE` or `sidecar run --create-topics`, or your "
            "cluster's tooling) or fix the setting"
        )
    return found
