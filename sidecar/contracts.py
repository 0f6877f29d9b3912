"""Wire contracts: the single source of truth for every message the sidecar reads or writes.

Each message type is a msgspec Struct. ``schemas/*.json`` are generated from these types
(``sidecar schemas --write``) and a test fails when they are stale. Unknown extra fields are
tolerated on input (msgspec ignores them); unknown *major* schema versions are rejected.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

#: Major version of the request contract this build understands. Minor versions only add
#: optional fields, so ``"1"``, ``"1.0"`` and ``"1.7"`` are all accepted.
REQUEST_SCHEMA_MAJOR = 1
#: Version stamped on everything the sidecar produces (header ``schema_version`` and field).
OUTPUT_SCHEMA_VERSION = "1.0"

Arm = Literal["champion", "candidate"]
FeatureValue = float | int | str | bool | None
#: What a model returns (``sidecar.manifest.OutputKind``).
OutputKind = Literal["binary", "multiclass", "regression", "ranking"]
#: An item id (a product, an article): what a ranking orders.
ItemId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
#: Most candidate items one request may carry.
MAX_CANDIDATES = 10_000

#: Latest accepted time: 9999-12-31T23:59:59.999Z. Bounded so that every timestamp fits the
#: int64 columns downstream (a larger one would overflow them).
MAX_EPOCH_MS = 253_402_300_799_999
EpochMillis = Annotated[
    int, msgspec.Meta(ge=0, le=MAX_EPOCH_MS, description="Unix epoch, milliseconds")
]


#: Event times below this (March 1973 in milliseconds) are taken for seconds: every event
#: time on the wire is epoch *milliseconds*. Downstream stages refuse such records with a
#: hint instead of counting them late for every window.
MIN_PLAUSIBLE_MS = 100_000_000_000


class InferenceRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One inference request, as produced by the upstream pipeline (InferenceRequest v1)."""

    request_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    features: dict[str, FeatureValue]
    #: The sticky entity (a card, a user): routes the request and keys its decision.
    routing_key: Annotated[str, msgspec.Meta(max_length=1024)] | None = None
    ts: EpochMillis | None = None
    metadata: dict[str, Any] | None = None
    schema_version: str = "1"
    #: The items a re-ranker orders (a ranking model with ``items_from = "request"``);
    #: ignored by every other model.
    candidates: Annotated[list[ItemId], msgspec.Meta(max_length=MAX_CANDIDATES)] | None = None


class ModelError(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Why a model produced no usable score for a record."""

    #: ``shed``: not asked, because the candidate was too far behind (its lane was full).
    kind: Literal["exception", "timeout", "invalid_output", "unavailable", "skipped", "shed"]
    message: str


class Decision(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The decision downstream systems act on; keyed by routing_key (request_id when absent).

    ``arm`` is the arm whose score decided. ``routed_arm`` is the arm the routing policy chose;
    they differ only on a fallback, and ``fallback`` then says why.

    A binary model's decision is ``score >= threshold``; the fields after ``schema_version``
    are absent. Other output kinds (``output_kind``) leave ``decision`` and ``threshold``
    null and carry their output in those fields: ``label`` and ``probabilities``
    (multiclass; ``score`` is the label's probability), ``value`` and the band's ``label``
    (regression), ``items`` and ``item_scores`` in rank order (ranking).
    """

    request_id: str
    routing_key: str | None
    rollout: str
    model: str
    model_version: str
    arm: Arm
    routed_arm: Arm
    score: float | None
    decision: bool | None
    threshold: float | None
    policy_epoch: int
    policy_mode: str
    bucket: int
    ts: EpochMillis
    decided_at: EpochMillis
    latency_ms: float
    fallback: str | None = None
    #: The request's ``metadata``, passed through untouched.
    metadata: dict[str, Any] | None = None
    #: Digest of the deciding model's manifest (``sidecar.manifest.digest``).
    manifest_digest: str | None = None
    schema_version: str = OUTPUT_SCHEMA_VERSION
    #: Absent (``binary``) unless the model returns another kind of output; the fields
    #: below carry it. Declared last: the pipeline appends them to templated bytes.
    output_kind: OutputKind = "binary"
    #: multiclass: the label decided; regression with bands: the band's name.
    label: str | None = None
    #: multiclass: a probability per label, in the model's label order.
    probabilities: list[float] | None = None
    #: regression: the number the model returned.
    value: float | None = None
    #: ranking: item ids, best first (at most k), and their scores.
    items: list[str] | None = None
    item_scores: list[float] | None = None


class ModelResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One arm's result for one request inside a Comparison."""

    model: str
    version: str
    score: float | None = None
    decision: bool | None = None
    latency_ms: float | None = None
    error: ModelError | None = None
    #: Digest of the model's manifest (``sidecar.manifest.digest``).
    manifest_digest: str | None = None
    #: Absent (``binary``) unless the model returns another kind of output; the fields
    #: below carry it. Declared last: the pipeline appends them to templated bytes.
    output_kind: OutputKind = "binary"
    #: multiclass: the label decided; regression with bands: the band's name.
    label: str | None = None
    #: multiclass: a probability per label, in the model's label order.
    probabilities: list[float] | None = None
    #: regression: the number the model returned.
    value: float | None = None
    #: ranking: item ids, best first (at most k), and their scores.
    items: list[str] | None = None
    item_scores: list[float] | None = None


class Comparison(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The paired champion/candidate result for one request; keyed by rollout name."""

    request_id: str
    routing_key: str | None
    rollout: str
    ts: EpochMillis
    policy_epoch: int
    policy_mode: str
    served_by: Arm | None
    champion: ModelResult
    candidate: ModelResult
    schema_version: str = OUTPUT_SCHEMA_VERSION
    #: Features of this request outside either model's manifest range or categories (each
    #: once, champion's order first); omitted when none, i.e. almost always. Last on purpose:
    #: the pipeline appends it to templated bytes.
    out_of_range: list[str] | None = None


DeadLetterKind = Literal[
    "decode",
    "schema",
    "schema_version",
    "feature_missing",
    "feature_type",
    "oversize",
    "model_failure",
    "out_of_range",
    #: An output of the record (its decision) is larger than the output topic accepts.
    "output_oversize",
    #: The aggregator's: a comparison dated too far ahead of its clock (see
    #: ``aggregate.max_future_ms``).
    "event_time",
    #: Processing the record raised an unexpected error (a bug: the reason names it); the
    #: rest of its batch was served.
    "processing_error",
    #: The Kafka client could not parse the record (e.g. a header key that is not UTF-8):
    #: ``source_offset``..``source_offset_last`` were skipped; the originals stay in the topic.
    "unreadable",
]


class RecordHeader(msgspec.Struct, kw_only=True):
    """One Kafka header of an original record (its value base64 in JSON; null stays null)."""

    key: str
    value: bytes | None


class DeadLetter(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A record the sidecar could not serve, with why and where it came from.

    The original key and value are kept byte for byte up to ``dead_letter.max_value_bytes``.
    A larger original is kept as a prefix with ``truncated`` set, its full size and sha256:
    a claim check, since the original stays readable at ``source_topic`` /
    ``source_partition`` / ``source_offset`` (for as long as that topic's retention keeps it).
    """

    kind: DeadLetterKind
    reason: str
    source_topic: str
    source_partition: int
    source_offset: int
    ts: EpochMillis
    original_value: bytes | None
    original_key: bytes | None = None
    request_id: str | None = None
    schema_version: str = OUTPUT_SCHEMA_VERSION
    #: ``original_value`` (and/or ``original_key``) is a prefix of the original.
    truncated: bool = False
    #: Size in bytes of the original value and its sha256 (hex), when ``truncated``.
    original_size: int | None = None
    original_sha256: str | None = None
    #: Kind ``unreadable``: the last offset of the skipped range that starts at
    #: ``source_offset``.
    source_offset_last: int | None = None
    #: The original record's headers, in order, up to ``dead_letter.max_header_bytes``
    #: (names, and values as base64); omitted when it had none.
    original_headers: list[RecordHeader] | None = None
    #: Some original headers did not fit ``dead_letter.max_header_bytes`` and were left out
    #: (``original_header_count`` says how many there were).
    headers_truncated: bool = False
    original_header_count: int | None = None
