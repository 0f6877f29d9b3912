"""Creating the topics a config names, each with the partition count its job needs."""

from __future__ import annotations

from .broker import ensure_topics
from .config import SidecarConfig
from .runner import kafka_client_kwargs


async def ensure_config_topics(cfg: SidecarConfig) -> list[str]:
    """Create the missing topics of ``cfg``; return the names created.

    The control topic gets exactly one partition: every instance must apply commands in the
    same order. Every other topic gets ``topics.partitions``.
    """
    kafka = kafka_client_kwargs(cfg.kafka)
    created = await ensure_topics(
        topics=[cfg.topics.control],
        partitions=1,
        replication_factor=cfg.topics.replication_factor,
        **kafka,
    )
    created += await ensure_topics(
        topics=[t for t in cfg.all_topics() if t != cfg.topics.control],
        partitions=cfg.topics.partitions,
        replication_factor=cfg.topics.replication_factor,
        **kafka,
    )
    return created
