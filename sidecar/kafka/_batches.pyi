"""Kafka v2 record batches built and checked in C (sidecar/kafka/_batches.c)."""

from typing import Any

_Bytes = bytes | bytearray | memoryview

def build(
    keys: list[bytes],
    values: list[bytes],
    headers: list[list[tuple[str, bytes]]],
    indices: list[int] | None,
    start: int,
    timestamp_ms: int,
    max_bytes: int,
    /,
) -> tuple[bytes, int]: ...
def set_producer(
    batch: _Bytes, producer_id: int, producer_epoch: int, base_sequence: int, /
) -> bytes: ...
def crc32c(data: _Bytes, crc: int = 0, /) -> int: ...
def hardware_crc() -> bool: ...

RECORDS: int
CONTROL: int
DELEGATE: int
END: int
CORRUPT: int

def read(
    data: _Bytes,
    pos: int,
    first: int,
    topic: str,
    partition: int,
    record_type: type,
    check_crc: bool,
    /,
) -> tuple[int, list[Any], int, int, str | None]: ...
