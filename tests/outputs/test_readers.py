"""Who reads a version: a group whose offsets cannot be read is unknown, never "no reader"."""

from __future__ import annotations

from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import GroupAuthorizationFailedError
from aiokafka.structs import OffsetAndMetadata
from kafka_helpers import make_config

from sidecar.outputs.readers import GroupInspector

TOPIC = "inference.decisions.v1"


class Admin:
    """aiokafka's admin client as a cluster where this principal may not Describe one group."""

    def __init__(self, *groups: str) -> None:
        self.groups = groups

    async def list_consumer_groups(self) -> list[tuple[str, str]]:
        return [(g, "consumer") for g in self.groups]

    async def list_consumer_group_offsets(
        self, group: str, partitions: list[TopicPartition]
    ) -> dict[TopicPartition, Any]:
        if group == "secret-team":
            raise GroupAuthorizationFailedError()
        return {tp: OffsetAndMetadata(7, "") for tp in partitions}


async def test_a_group_whose_offsets_cannot_be_read_is_reported() -> None:
    inspector = GroupInspector(make_config("unused:9092"))
    admin = inspector._admin = Admin("migrated", "secret-team")

    async def partitions(topic: str) -> list[TopicPartition]:
        return [TopicPartition(topic, 0)]

    inspector._partitions = partitions  # type: ignore[method-assign]
    found, _ = await inspector.committed([TOPIC])
    assert found[TOPIC] == {"migrated": {0: 7}}
    assert inspector.unreadable == {"secret-team"}
    # The next look starts afresh.
    admin.groups = ("migrated",)
    await inspector.committed([TOPIC])
    assert inspector.unreadable == set()
