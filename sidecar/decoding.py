"""Decode and validate a batch of raw request records into model input matrices.

The fast path decodes each record straight into a msgspec Struct generated from the models'
declared features, so type checks happen in msgspec's C code and the feature values come out
in column order (``astuple``) for one ``numpy.array`` call per batch. A record that fails the
fast path is diagnosed on a slow path that names the exact problem (which feature is missing,
which has the wrong type) for the dead-letter topic. Bad records never stop good ones.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

import msgspec
import numpy as np
import numpy.typing as npt

from .config import FeatureSpec, InputConfig, ModelConfig
from .contracts import (
    MAX_CANDIDATES,
    MAX_EPOCH_MS,
    REQUEST_SCHEMA_MAJOR,
    DeadLetterKind,
    InferenceRequest,
    ItemId,
)
from .kafka.unreadable import unreadable_of
from .output_kinds import CandidateItems
from .tracecontext import trace_headers
from .untrusted import clip, error_text, header_text

FloatArray = npt.NDArray[np.float64]


class RawRecord(Protocol):
    """The parts of a Kafka consumer record the decoder needs (aiokafka's ConsumerRecord)."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]


@dataclass(slots=True)
class Rejected:
    """A record that goes to the dead-letter topic, and why."""

    record: RawRecord
    kind: DeadLetterKind
    reason: str
    request_id: str | None = None


@dataclass(slots=True)
class DecodedBatch:
    """The good records of a batch, column-wise, plus the rejected ones."""

    records: list[RawRecord] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    #: ``routing_key`` or, when absent, ``request_id``: the sticky entity and the output key.
    routing_keys: list[str] = field(default_factory=list)
    has_routing_key: list[bool] = field(default_factory=list)
    ts: list[int] = field(default_factory=list)
    metadata: list[dict[str, Any] | None] = field(default_factory=list)
    #: All declared features, one column each, in :attr:`RequestDecoder.columns` order.
    matrix: FloatArray = field(default_factory=lambda: np.zeros((0, 0)))
    rejected: list[Rejected] = field(default_factory=list)
    #: W3C trace-context headers to pass on, by record index (only records that carry them:
    #: empty in the common case; see :mod:`sidecar.tracecontext`).
    trace: dict[int, list[tuple[str, bytes]]] = field(default_factory=dict)
    #: The requests' ``candidates`` when a model re-ranks them (None otherwise).
    items: CandidateItems | None = None
    #: The pipeline's JSON texts of this batch's ids and scores, made once and shared by its
    #: two output stages (see ``sidecar.pipeline``).
    texts: Any = None

    def __len__(self) -> int:
        return len(self.request_ids)


_PY_TYPES: dict[str, Any] = {
    "number": float,
    # Bounded: an unbounded int may have thousands of digits, which no float holds.
    "integer": Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)],
    "bool": bool,
    "category": str,
}
_TYPE_WORDS = {
    "number": "a number",
    "integer": "an integer",
    "bool": "a boolean",
    "category": "a string",
}


def _major(version: str) -> int | None:
    """The major version of ``"1"``, ``"1.7"``...; None unless it is ASCII digits (Arabic-Indic
    or superscript digits pass ``str.isdigit`` but are no version of ours)."""
    head = version.split(".", 1)[0].strip()
    return int(head) if head.isascii() and head.isdigit() and len(head) < 10 else None


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


class RequestDecoder:
    """Decodes request records for a fixed set of models; build once, reuse for every batch."""

    def __init__(self, models: Sequence[ModelConfig], config: InputConfig) -> None:
        self._max_bytes = config.max_message_bytes
        specs: dict[str, FeatureSpec] = {}
        for model in models:
            for spec in model.features:
                specs.setdefault(spec.name, spec)
        self.specs = specs
        #: Column order of :attr:`DecodedBatch.matrix`.
        self.columns: list[str] = list(specs)
        fields = []
        for name, spec in specs.items():
            py_type = _PY_TYPES[spec.type]
            fields.append((name, py_type | None if spec.nullable else py_type))
        # gc=False: decoded JSON holds no reference cycles, and untracked objects make a
        # batch's allocations cheaper (no garbage-collector bookkeeping per request).
        features_type = msgspec.defstruct("Features", fields, kw_only=True, gc=False)
        #: A model re-ranks the requests' candidates: every request must carry them.
        self.needs_candidates = any(
            m.output_kind == "ranking" and m.items_from == "request" for m in models
        )
        candidates: list[Any] = (
            [("candidates", Annotated[list[ItemId], msgspec.Meta(max_length=MAX_CANDIDATES)])]
            if self.needs_candidates
            else []
        )
        typed_request = msgspec.defstruct(
            "TypedRequest",
            [
                *candidates,
                ("request_id", Annotated[str, msgspec.Meta(min_length=1, max_length=256)]),
                ("features", features_type),
                ("routing_key", Annotated[str, msgspec.Meta(max_length=1024)] | None, None),
                ("ts", Annotated[int, msgspec.Meta(ge=0, le=MAX_EPOCH_MS)] | None, None),
                ("metadata", dict[str, Any] | None, None),
                ("schema_version", str, "1"),
            ],
            kw_only=True,
            module=__name__,
            gc=False,
        )
        self._typed_request = typed_request
        if config.format == "msgpack":
            self._fast: Any = msgspec.msgpack.Decoder(typed_request)
            self._generic: Any = msgspec.msgpack.Decoder()
        else:
            self._fast = msgspec.json.Decoder(typed_request)
            self._generic = msgspec.json.Decoder()
        self._categorical = [
            (i, {c: float(code) for code, c in enumerate(spec.categories or [])})
            for i, spec in enumerate(specs.values())
            if spec.type == "category"
        ]

    def columns_of(self, model: ModelConfig) -> list[int]:
        """Indices into :attr:`DecodedBatch.matrix` of a model's features, in its order."""
        index = {name: i for i, name in enumerate(self.columns)}
        return [index[f.name] for f in model.features]

    def decode(self, records: Sequence[RawRecord]) -> DecodedBatch:
        """The batch's good records as columns; every other record is :class:`Rejected` with
        its reason. Never raises on a record's content (see :mod:`sidecar.untrusted`)."""
        out = DecodedBatch()
        requests = self._decode_plain(records)
        if requests is not None:  # the common case: every record a plain, valid request
            good_records: list[RawRecord] = list(records)
            headered = False
        else:
            good_records, requests, headered = self._decode_each(records, out)
        out.records = good_records
        out.request_ids = [r.request_id for r in requests]
        routing = [r.routing_key for r in requests]
        out.has_routing_key = [k is not None for k in routing]
        out.routing_keys = [
            k if k is not None else r.request_id for k, r in zip(routing, requests, strict=True)
        ]
        ts = [r.ts for r in requests]
        if None in ts:  # no event time in the request: the record's timestamp, and when the
            # record has none (-1: an old client or message format), the time it is read
            # (1970 would make its comparisons late for every window downstream)
            stamps = [rec.timestamp for rec in good_records]
            read_at = time.time_ns() // 1_000_000
            ts = [
                t if t is not None else (s if s > 0 else read_at)
                for t, s in zip(ts, stamps, strict=True)
            ]
        out.ts = ts
        out.metadata = [r.metadata for r in requests]
        if headered:  # some record had headers: pass its trace context on
            for i, record in enumerate(good_records):
                if record.headers:
                    found = trace_headers(record.headers)
                    if found:
                        out.trace[i] = found
        out.matrix = self._to_matrix([r.features for r in requests])
        if self.needs_candidates:
            out.items = CandidateItems.of([r.candidates for r in requests])
        return out

    def _decode_plain(self, records: Sequence[RawRecord]) -> list[Any] | None:
        """Every record decoded in one pass when none needs a closer look (each has a value
        within bounds, no headers, and is a valid request of a known version); else None,
        and :meth:`_decode_each` takes the batch record by record."""
        values = [r.value for r in records]
        if None in values or any([r.headers for r in records]):
            return None
        if max(map(len, values), default=0) > self._max_bytes:  # type: ignore[arg-type]
            return None
        fast = self._fast.decode
        try:
            requests = [fast(v) for v in values]
        except Exception:  # a bad record: each is diagnosed on its own
            return None
        for version in {r.schema_version for r in requests}:
            if version != "1" and _major(version) != REQUEST_SCHEMA_MAJOR:
                return None
        return requests

    def _decode_each(
        self, records: Sequence[RawRecord], out: DecodedBatch
    ) -> tuple[list[RawRecord], list[Any], bool]:
        """The good records and their requests, record by record; the others go to
        ``out.rejected`` with their reasons. Also says whether any record had headers."""
        good_records: list[RawRecord] = []
        requests: list[Any] = []
        fast = self._fast.decode
        max_bytes = self._max_bytes
        headered = False
        for record in records:
            value = record.value
            try:
                if value is None or len(value) > max_bytes or record.headers:
                    headered = True
                    rejected = self._precheck(record)
                    if rejected is not None:
                        out.rejected.append(rejected)
                        continue
                try:
                    req = fast(value)
                except Exception as exc:  # DecodeError, ValidationError, RecursionError...
                    out.rejected.append(self._diagnose(record, exc))
                    continue
                version = req.schema_version
                if version != "1" and _major(version) != REQUEST_SCHEMA_MAJOR:
                    out.rejected.append(self._bad_version(record, version, "field", req.request_id))
                    continue
            except Exception as exc:  # a shape nobody planned for: this record only
                out.rejected.append(
                    Rejected(record, "decode", f"could not decode the record: {error_text(exc)}")
                )
                continue
            good_records.append(record)
            requests.append(req)
        return good_records, requests, headered

    def _to_matrix(self, features: list[Any]) -> FloatArray:
        width = len(self.columns)
        if not features:
            return np.zeros((0, width))
        rows = map(msgspec.structs.astuple, features)
        if not self._categorical:
            # None (nullable features) becomes NaN; booleans become 0.0 / 1.0.
            flat = np.fromiter(
                itertools.chain.from_iterable(rows),
                dtype=np.float64,
                count=len(features) * width,
            )
            return flat.reshape(len(features), width)
        cells = np.array(list(rows), dtype=object)
        for col, codes in self._categorical:
            cells[:, col] = [codes.get(v, -1.0) if v is not None else None for v in cells[:, col]]
        cells[cells == None] = np.nan  # noqa: E711 - elementwise comparison with None
        return cells.astype(np.float64)

    def _precheck(self, record: RawRecord) -> Rejected | None:
        if record.value is None:
            skipped = unreadable_of(record)
            if skipped is not None:
                return Rejected(record, "unreadable", skipped.describe())
            return Rejected(record, "decode", "record has no value (tombstone); expected a request")
        if len(record.value) > self._max_bytes:
            return Rejected(
                record,
                "oversize",
                f"record is {len(record.value)} bytes; input.max_message_bytes is "
                f"{self._max_bytes}",
            )
        for key, raw in record.headers:
            if key == "schema_version":
                version = header_text(raw)
                if _major(version) != REQUEST_SCHEMA_MAJOR:
                    return self._bad_version(record, version, "header", None)
        return None

    def _bad_version(
        self, record: RawRecord, version: str, where: str, request_id: str | None
    ) -> Rejected:
        return Rejected(
            record,
            "schema_version",
            f"schema_version {clip(repr(version), 80)} ({where}) has an unknown major version; "
            f"this sidecar reads InferenceRequest v{REQUEST_SCHEMA_MAJOR}.x",
            request_id,
        )

    def _diagnose(self, record: RawRecord, fast_error: Exception) -> Rejected:
        """Slow path for a record the fast path refused: find and name the exact problem."""
        if not isinstance(fast_error, msgspec.DecodeError | msgspec.ValidationError):
            # RecursionError (nesting deeper than the decoder goes), ValueError (an integer
            # of thousands of digits)...: the generic decoder would fail the same way.
            return Rejected(
                record,
                "decode",
                f"not a decodable {self._format_name()} request: {error_text(fast_error)}",
            )
        try:
            return self._diagnose_decoded(record, str(fast_error))
        except Exception as exc:  # the slow path meets the same hostile shapes
            return Rejected(
                record,
                "decode",
                f"not a decodable {self._format_name()} request: {error_text(exc)}",
            )

    def _diagnose_decoded(self, record: RawRecord, fast_error: str) -> Rejected:
        try:
            doc = self._generic.decode(record.value)
        except msgspec.DecodeError as exc:
            return Rejected(record, "decode", f"not valid {self._format_name()}: {exc}")
        if not isinstance(doc, dict):
            return Rejected(
                record, "schema", f"expected an object (InferenceRequest), got {_json_type(doc)}"
            )
        request_id = doc.get("request_id")
        if not isinstance(request_id, str) or not 0 < len(request_id) <= 256:
            request_id = None
        version = doc.get("schema_version", "1")
        if isinstance(version, str) and _major(version) != REQUEST_SCHEMA_MAJOR:
            return self._bad_version(record, version, "field", request_id)
        try:
            request = msgspec.convert(doc, InferenceRequest)
        except msgspec.ValidationError as exc:
            return Rejected(record, "schema", f"not an InferenceRequest v1: {exc}", request_id)
        missing = [name for name in self.specs if name not in request.features]
        if self.needs_candidates and request.candidates is None:
            missing.append("candidates (the items a re-ranking model orders)")
        if missing:
            return Rejected(
                record,
                "feature_missing",
                f"missing feature(s) required by the models: {', '.join(missing)}",
                request_id,
            )
        for name, spec in self.specs.items():
            value = request.features[name]
            if value is None and spec.nullable:
                continue
            if not self._type_ok(spec, value):
                return Rejected(
                    record,
                    "feature_type",
                    f"feature {name!r} must be {_TYPE_WORDS[spec.type]}"
                    f"{' or null' if spec.nullable else ''}, got {_json_type(value)} "
                    f"{msgspec.json.encode(value).decode()[:80]}",
                    request_id,
                )
        return Rejected(record, "schema", f"not an InferenceRequest v1: {fast_error}", request_id)

    @staticmethod
    def _type_ok(spec: FeatureSpec, value: object) -> bool:
        if spec.type == "bool":
            return isinstance(value, bool)
        if spec.type == "category":
            return isinstance(value, str)
        if isinstance(value, bool) or value is None:
            return False
        if spec.type == "integer":
            return isinstance(value, int)
        return isinstance(value, int | float)

    def _format_name(self) -> str:
        return "MessagePack" if isinstance(self._generic, msgspec.msgpack.Decoder) else "JSON"
