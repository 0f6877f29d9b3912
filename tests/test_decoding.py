from __future__ import annotations

import msgspec
import numpy as np
import pytest
from records import Rec

from sidecar.config import FeatureSpec, InputConfig, ModelConfig
from sidecar.decoding import RequestDecoder


def model(*features: FeatureSpec) -> ModelConfig:
    return ModelConfig(name="m", version="1.0.0", target="x:y", features=list(features))


NUMERIC = model(
    FeatureSpec(name="amount"),
    FeatureSpec(name="hour", type="integer"),
    FeatureSpec(name="vip", type="bool"),
    FeatureSpec(name="age", nullable=True),
)


def decoder(*models: ModelConfig, **input_cfg: object) -> RequestDecoder:
    return RequestDecoder(models or (NUMERIC,), InputConfig(**input_cfg))  # type: ignore[arg-type]


def req(**fields: object) -> bytes:
    base: dict[str, object] = {
        "request_id": "r1",
        "features": {"amount": 12.5, "hour": 3, "vip": True, "age": None},
    }
    base.update(fields)
    return msgspec.json.encode(base)


def test_good_records_become_one_matrix_in_column_order() -> None:
    d = decoder()
    batch = d.decode(
        [
            Rec(req()),
            Rec(
                req(
                    request_id="r2",
                    routing_key="card-9",
                    ts=5,
                    features={"hour": 1, "amount": 7, "vip": False, "age": 40.0, "extra": "x"},
                )
            ),
        ]
    )
    assert batch.request_ids == ["r1", "r2"]
    assert batch.routing_keys == ["r1", "card-9"] and batch.has_routing_key == [False, True]
    assert batch.ts == [1_700_000_000_000, 5]
    assert d.columns == ["amount", "hour", "vip", "age"]
    np.testing.assert_array_equal(batch.matrix, [[12.5, 3, 1, np.nan], [7, 1, 0, 40]])
    assert batch.rejected == []


@pytest.mark.parametrize(
    ("value", "kind", "words"),
    [
        (b"not json at all", "decode", "not valid JSON"),
        (b"[1, 2, 3]", "schema", "expected an object"),
        (b'"just a string"', "schema", "expected an object"),
        (msgspec.json.encode({"features": {"amount": 1}}), "schema", "request_id"),
        (msgspec.json.encode({"request_id": "", "features": {}}), "schema", "request_id"),
        (msgspec.json.encode({"request_id": 7, "features": {}}), "schema", "request_id"),
        (msgspec.json.encode({"request_id": "a"}), "schema", "features"),
        (
            msgspec.json.encode({"request_id": "a", "features": {"amount": {"x": 1}}}),
            "schema",
            "features",
        ),
        (req(features={"amount": 1, "vip": True, "age": 3}), "feature_missing", "hour"),
        (req(features={}), "feature_missing", "amount, hour, vip, age"),
        (
            req(features={"amount": "12", "hour": 3, "vip": True, "age": 1}),
            "feature_type",
            "'amount' must be a number, got string",
        ),
        (
            req(features={"amount": True, "hour": 3, "vip": True, "age": 1}),
            "feature_type",
            "'amount' must be a number, got boolean",
        ),
        (
            req(features={"amount": 1, "hour": 3.5, "vip": True, "age": 1}),
            "feature_type",
            "'hour' must be an integer",
        ),
        (
            req(features={"amount": 1, "hour": 3, "vip": 1, "age": 1}),
            "feature_type",
            "'vip' must be a boolean",
        ),
        (
            req(features={"amount": None, "hour": 3, "vip": True, "age": 1}),
            "feature_type",
            "got null",
        ),
        (req(schema_version="2.0"), "schema_version", "unknown major version"),
        (req(ts=-5), "schema", "ts"),
        (None, "decode", "tombstone"),
    ],
)
def test_every_bad_record_is_rejected_with_its_reason(
    value: bytes | None, kind: str, words: str
) -> None:
    batch = decoder().decode(
        [Rec(req(request_id="ok-1")), Rec(value, offset=7), Rec(req(request_id="ok-2"))]
    )
    assert batch.request_ids == ["ok-1", "ok-2"]
    [rejected] = batch.rejected
    assert rejected.kind == kind
    assert words in rejected.reason
    assert rejected.record.offset == 7


def test_oversize_records_are_rejected_before_decoding() -> None:
    big = req(metadata={"blob": "x" * 5000})
    [rejected] = decoder(max_message_bytes=1024).decode([Rec(big)]).rejected
    assert rejected.kind == "oversize" and "1024" in rejected.reason


def test_schema_version_header_with_unknown_major_is_rejected() -> None:
    batch = decoder().decode(
        [
            Rec(req(), headers=(("schema_version", b"3"),)),
            Rec(req(request_id="r2"), headers=(("schema_version", b"1.4"),)),
        ]
    )
    assert [r.kind for r in batch.rejected] == ["schema_version"]
    assert batch.request_ids == ["r2"]


def test_minor_versions_and_unknown_fields_are_tolerated() -> None:
    batch = decoder().decode([Rec(req(schema_version="1.9", brand_new_field={"a": 1}))])
    assert batch.request_ids == ["r1"] and not batch.rejected


def test_categories_are_encoded_as_their_index_and_unknown_as_minus_one() -> None:
    m = model(
        FeatureSpec(name="mcc", type="category", categories=["grocery", "travel"]),
        FeatureSpec(name="amount"),
    )
    d = decoder(m)
    values = [
        msgspec.json.encode({"request_id": str(i), "features": {"mcc": c, "amount": 1}})
        for i, c in enumerate(["travel", "grocery", "casino"])
    ]
    batch = d.decode([Rec(v) for v in values])
    np.testing.assert_array_equal(batch.matrix[:, 0], [1, 0, -1])


def test_msgpack_input() -> None:
    d = decoder(format="msgpack")
    value = msgspec.msgpack.encode(
        {"request_id": "m1", "features": {"amount": 1.0, "hour": 2, "vip": False, "age": 3}}
    )
    batch = d.decode([Rec(value), Rec(b"\xc1")])
    assert batch.request_ids == ["m1"]
    assert batch.rejected[0].kind == "decode" and "MessagePack" in batch.rejected[0].reason


def test_columns_of_picks_each_models_features_in_its_own_order() -> None:
    a = model(FeatureSpec(name="x"), FeatureSpec(name="y"))
    b = model(FeatureSpec(name="y"), FeatureSpec(name="z"))
    d = decoder(a, b)
    assert d.columns == ["x", "y", "z"]
    assert d.columns_of(b) == [1, 2]


def test_a_record_without_a_timestamp_is_dated_when_it_is_read() -> None:
    """A request without ``ts`` takes its record's timestamp; a record without one (-1: an
    old client or message format) was dated 1970, so every comparison of such a producer
    was late for the aggregator (its guards blind) and outside every quality window."""
    import time

    before = int(time.time() * 1000)
    batch = decoder().decode([Rec(req(), timestamp=-1), Rec(req(request_id="r2"), timestamp=0)])
    after = int(time.time() * 1000)
    assert all(before <= t <= after for t in batch.ts), batch.ts
    assert decoder().decode([Rec(req(ts=0))]).ts == [0]  # a request's own ts stays its own
