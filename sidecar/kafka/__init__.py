"""The Kafka edge: every client, topic, read loop, produce path and background task of the
sidecar goes through here, so that each fix to how we talk to Kafka is made once.

* :mod:`.clients`: clients built from the config, per role (connection, security, groups);
* :mod:`.topics`: creating a config's topics, and the record limits the topics impose;
* :mod:`.reading`: partitions, seeking by time, reading a topic until idle;
* :mod:`.produce`: batch sends, and which produce errors retrying cannot fix;
* :mod:`._batches` (C, optional): record batches built and read in one pass each;
* :mod:`.retry`, :mod:`.rebalance`, :mod:`.supervise`: backoff, the one rebalance listener,
  and background tasks whose death stops the process instead of leaving it half alive.
"""

from __future__ import annotations

from . import codecs as _codecs
from . import metadata as _metadata
from . import records as _records
from . import unreadable as _unreadable
from .clients import (
    SASL_MECHANISMS,
    client_id,
    client_kwargs,
    fetch_bytes,
    new_admin,
    new_consumer,
    new_producer,
    stop_quietly,
)
from .produce import BatchSender, Delivery, ProduceRefused, is_permanent, refusal
from .reading import read_until_idle, seek_since, topic_partitions
from .rebalance import RebalanceListener, format_partitions
from .retry import Backoff
from .supervise import BackgroundTaskFailed, Supervisor, TaskFailure
from .topics import (
    MissingTopics,
    ensure_config_topics,
    ensure_control_topics,
    ensure_topics,
    record_limits,
    require_topics,
    topic_configs,
)
from .unreadable import UNREADABLE_HEADER, Unreadable, unreadable_of

_metadata.install()  # naming a topic never creates it (see .metadata)
_codecs.install()  # compressed batches inflate within a bound (no decompression bombs)
_unreadable.install()  # records the client cannot parse become markers, not a stalled loop
_records.install()  # fetched records read a batch at a time (after the line above)


def record_batch_path() -> str | None:
    """How record batches are built and read here, for the start-up log; None when the C
    extension (``sidecar/kafka/_batches.c``) was not compiled at install."""
    try:
        from . import _batches
    except ImportError:
        return None
    crc = "the CPU's CRC-32C instruction" if _batches.hardware_crc() else "a software CRC-32C"
    return f"record batches built and read in C, with {crc}"


__all__ = [
    "SASL_MECHANISMS",
    "UNREADABLE_HEADER",
    "BackgroundTaskFailed",
    "Backoff",
    "BatchSender",
    "Delivery",
    "MissingTopics",
    "ProduceRefused",
    "RebalanceListener",
    "Supervisor",
    "TaskFailure",
    "Unreadable",
    "client_id",
    "client_kwargs",
    "ensure_config_topics",
    "ensure_control_topics",
    "ensure_topics",
    "fetch_bytes",
    "format_partitions",
    "is_permanent",
    "new_admin",
    "new_consumer",
    "new_producer",
    "read_until_idle",
    "record_batch_path",
    "record_limits",
    "refusal",
    "require_topics",
    "seek_since",
    "stop_quietly",
    "topic_configs",
    "topic_partitions",
    "unreadable_of",
]
