"""Metadata requests never create topics.

aiokafka asks for metadata with ``allow_auto_topic_creation=True``, always. A broker with
``auto.create.topics.enable`` on (Apache Kafka's default; the embedded broker always) then
creates any topic a client merely names: a mistyped ``topics.decisions`` becomes a new topic
nobody reads, and a topic lost with its broker (the embedded one keeps data in memory) comes
back with the broker's default partition count instead of the configured one, with no word
said. Installed at ``sidecar.kafka`` import, every client here asks without creating; topics are
created only on purpose (``sidecar broker``, ``--create-topics``, the admin client).
"""

from __future__ import annotations

from typing import Any

import aiokafka.client
from aiokafka.protocol.metadata import MetadataRequest


class NoAutoCreateMetadataRequest(MetadataRequest):  # type: ignore[misc]
    """aiokafka's request with ``allow_auto_topic_creation`` False unless said otherwise."""

    def __init__(
        self, topics: list[str] | None = None, allow_auto_topic_creation: bool | None = None
    ) -> None:
        super().__init__(
            topics, False if allow_auto_topic_creation is None else allow_auto_topic_creation
        )


def install() -> None:
    """Make every aiokafka client of this process ask for metadata without creating topics."""
    module: Any = aiokafka.client
    module.MetadataRequest = NoAutoCreateMetadataRequest
