"""A stand-in for aiokafka's ConsumerRecord, for tests of the pipeline without a broker."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Rec:
    """The fields of a consumer record that ``sidecar.decoding.RawRecord`` reads."""

    value: bytes | None
    offset: int = 0
    headers: tuple[tuple[str, bytes], ...] = ()
    topic: str = "requests"
    partition: int = 0
    timestamp: int = 1_700_000_000_000
    key: bytes | None = None
