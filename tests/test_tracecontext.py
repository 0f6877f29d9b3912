"""W3C trace context passes through to every output of a request; dead letters keep all the
original headers, bounded."""

from __future__ import annotations

import copy

import msgspec
import pytest
from kafka_helpers import make_config
from records import Rec

from sidecar.contracts import DeadLetter
from sidecar.dead_letters import DeadLetterWriter
from sidecar.examples import fraud
from sidecar.examples.outputs import V1
from sidecar.models import load_model
from sidecar.pipeline import Pipeline
from sidecar.routing import Mode, RoutingPolicy
from sidecar.tracecontext import trace_headers, valid_traceparent

PARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
ENC = msgspec.json.Encoder()


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (PARENT, True),
        (b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future", True),
        (PARENT + b"-x", False),  # version 00 has exactly four fields
        (b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False),
        (b"00-00000000000000000000000000000000-00f067aa0ba902b7-01", False),
        (b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", False),
        (b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", False),
        (b"00-4bf92f35-00f067aa0ba902b7-01", False),
        (b"\x1b[31m" + PARENT, False),
        (b"0" * 10_000, False),
    ],
)
def test_traceparent_rules(value: bytes, ok: bool) -> None:
    assert valid_traceparent(value) is ok


def test_which_headers_pass() -> None:
    assert trace_headers([("traceparent", PARENT), ("tracestate", b"a=1")]) == [
        ("traceparent", PARENT),
        ("tracestate", b"a=1"),
    ]
    # several tracestate headers are joined; a bad or huge one is dropped, the parent kept
    assert trace_headers(
        [("tracestate", b"a=1"), ("Traceparent", PARENT), ("tracestate", b"b=2")]
    ) == [("traceparent", PARENT), ("tracestate", b"a=1,b=2")]
    assert trace_headers([("traceparent", PARENT), ("tracestate", b"x" * 600)]) == [
        ("traceparent", PARENT)
    ]
    assert trace_headers([("traceparent", PARENT), ("tracestate", b"a=\n1")]) == [
        ("traceparent", PARENT)
    ]
    assert trace_headers([("traceparent", PARENT), ("traceparent", PARENT)]) is None
    assert trace_headers([("tracestate", b"a=1")]) is None
    assert trace_headers([("traceparent", None), ("x", b"y")]) is None  # type: ignore[list-item]


def pipeline() -> Pipeline:
    cfg = make_config(
        "unused:9092",
        outputs={
            "api_version": "v2",
            "versions": [{"version": "v1", "topic": "t.v1", **copy.deepcopy(V1)}],
        },
    )
    assert cfg.models.candidate is not None
    return Pipeline(cfg, load_model(cfg.models.champion), load_model(cfg.models.candidate))


async def test_every_output_of_a_traced_request_carries_its_context() -> None:
    docs = fraud.request_dicts(fraud.generate(60, seed=3))
    recs = []
    for i, doc in enumerate(docs):
        headers: tuple[tuple[str, bytes], ...] = ()
        if i % 3 == 0:
            headers = (("traceparent", PARENT), ("tracestate", b"vendor=%d" % i), ("x", b"y"))
        elif i % 3 == 1:
            headers = (("traceparent", b"garbage"),)
        if i == 9:
            doc["features"] = {}  # a dead letter
        recs.append(Rec(ENC.encode(doc), offset=i, headers=headers))
    p = pipeline()
    staged = await p.start(recs, RoutingPolicy(rollout="r", mode=Mode.CANARY, canary_share_bp=5000))
    late = await staged.finish()
    result = staged.early
    assert late is not None
    result.extend(late)

    def rid(value: bytes) -> int:
        return int(msgspec.json.decode(value)["request_id"].split("-")[1])

    outputs = [
        result.decisions,
        result.comparisons,
        result.versions["t.v1"],
    ]
    for out in outputs:
        assert len(out) == 59
        for value, headers in zip(out.values, out.headers, strict=True):
            i = rid(value)
            h = dict(headers)
            if i % 3 == 0:
                assert h["traceparent"] == PARENT and h["tracestate"] == b"vendor=%d" % i
            else:
                assert "traceparent" not in h and "tracestate" not in h
            assert "x" not in h  # other headers are not passed on
    (letter_headers,) = result.dead_letters.headers
    assert dict(letter_headers)["traceparent"] == PARENT
    letter = msgspec.json.decode(result.dead_letters.values[0], type=DeadLetter)
    assert [(h.key, h.value) for h in letter.original_headers or []] == [
        ("traceparent", PARENT),
        ("tracestate", b"vendor=9"),
        ("x", b"y"),
    ]
    assert not letter.headers_truncated


def test_dead_letters_keep_headers_within_the_bound() -> None:
    writer = DeadLetterWriter(keep=1000, max_header_bytes=2000)
    many = tuple((f"h{i}", bytes([i % 256]) * 100) for i in range(200))
    rec = Rec(b"{}", headers=(*many, ("traceparent", PARENT)))  # type: ignore[arg-type]
    _key, value, headers = writer.encode(rec, "decode", "bad")
    letter = msgspec.json.decode(value, type=DeadLetter)
    kept = letter.original_headers or []
    assert letter.headers_truncated and letter.original_header_count == 201
    assert 0 < len(kept) < 200 and [h.key for h in kept] == [f"h{i}" for i in range(len(kept))]
    assert all(h.value == many[i][1] for i, h in enumerate(kept))  # byte for byte
    assert len(value) < 1000 * 2 + 2000 + 16_384
    assert dict(headers)["traceparent"] == PARENT  # the trace still goes on
    # null values and odd keys survive as they are
    _k, value, _h = writer.encode(Rec(b"{}", headers=(("\x1b", None),)), "decode", "bad")  # type: ignore[arg-type]
    letter = msgspec.json.decode(value, type=DeadLetter)
    assert [(h.key, h.value) for h in letter.original_headers or []] == [("\x1b", None)]
