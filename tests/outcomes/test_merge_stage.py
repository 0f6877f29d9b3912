"""The merge stage's handling of what it reads from the partials topic (no broker: records as
the consumer hands them over)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from kafka_helpers import make_config

from sidecar.kafka.records import Record
from sidecar.outcomes.merge_stage import QualityMergeStage


def record(offset: int, value: bytes | None, key: bytes | None = b"partial/x") -> Record:
    return Record("p", 0, offset, 0, 0, key, value, ())


async def test_junk_on_the_partials_topic_is_skipped_and_logged_once_not_per_record(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def publish(*_: Any) -> None:
        raise AssertionError("nothing to publish")

    stage = QualityMergeStage(make_config("unused:9092"), None, publish, lambda: 0)  # type: ignore[arg-type]
    junk = [b"", b"not json", b"[]", b'{"kind":"partial"}', b'{"kind":"other"}'] * 40
    with caplog.at_level(logging.WARNING, logger="sidecar.outcomes.merge_stage"):
        await stage.process([record(i, v) for i, v in enumerate(junk)])
        await stage.process([record(len(junk), None), record(len(junk) + 1, b"{}", None)])
    assert stage.undecodable == len(junk) + 1 and stage.partials == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 1 unusable partials record" in warnings[0].message
    assert stage.merger.open_windows == 0
