"""Hostile input, structure-aware: whatever a record holds, it ends as an accounted outcome
(a decision, a dead letter with its reason, an audited rejection, a skipped comparison) and
never as an exception in a loop.

Each strategy starts from a valid record and breaks one thing about it the way an attacker
with write access to a topic (or a buggy producer) would: random bytes, nesting at and past
the decoder's recursion limit anywhere in the document, every Unicode digit class in versions
and numbers, null / binary / oversized headers, duplicate keys, numbers out of range, wrong
types at every path, oversized strings. The same corpus goes through the request pipeline,
the control plane's record processing and the aggregator's ingest.
"""

from __future__ import annotations

import sys
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka_helpers import make_config
from records import Rec

from sidecar.aggregate.aggregator import WindowManager
from sidecar.aggregate.ingest import ingest
from sidecar.contracts import MAX_EPOCH_MS, DeadLetter, Decision
from sidecar.control import ControlCommand, ControlRecord, SigningKey, TrustStore, sign_command
from sidecar.control.client import HistoryEntry
from sidecar.control.format import history_line
from sidecar.control.records import audit_record
from sidecar.control.state_machine import Applied, initial_state, process_record, replay
from sidecar.examples import fraud
from sidecar.kafka import UNREADABLE_HEADER, Unreadable, unreadable_of
from sidecar.models import load_model
from sidecar.pipeline import Pipeline
from sidecar.routing import Mode, RoutingPolicy
from sidecar.untrusted import printable

ENC = msgspec.json.Encoder()
RECURSION = sys.getrecursionlimit()
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- building blocks

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
#: Every Unicode digit-like class: decimal digits of every script, superscripts, fractions,
#: Roman numerals... ``str.isdigit`` says yes to many; ``int`` to fewer.
unicode_digits = st.characters(categories=["Nd", "No", "Nl"])
versions = st.one_of(
    st.text(alphabet=st.one_of(unicode_digits, st.sampled_from(".-+ 1")), min_size=0, max_size=6),
    st.sampled_from(["1", "1.0", "2", "0", "", "\u0661", "²", "½", "Ⅻ", "1" * 5000, "-1", " 1"]),
)
#: Raw JSON numbers no typed field should accept, and some that are merely big.
raw_numbers = st.sampled_from(
    [
        b"1e400",
        b"-1e400",
        b"1e-400",
        b"9" * 5000,
        b"-" + b"9" * 5000,
        b"18446744073709551616",
        b"-9223372036854775809",
        b"1E+308",
        b"0.0000000000000000000001",
        b"-0",
        b"1.5e3",
    ]
)


def nested(depth: int, leaf: bytes = b"1") -> bytes:
    """``depth`` levels of arrays (or objects) around ``leaf``."""
    return b"[" * depth + leaf + b"]" * depth


def nested_objects(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


depths = st.sampled_from([RECURSION - 2, RECURSION, RECURSION + 1, 5 * RECURSION, 20_000])


def valid_request(i: int) -> dict[str, Any]:
    data = fraud.generate(1, seed=i)
    return fraud.request_dicts(data, start_id=i)[0]


def set_path(doc: Any, path: list[Any], value: Any) -> None:
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths(v, (*prefix, i))
    return out


@st.composite
def hostile_json(draw: st.DrawFn, base: dict[str, Any]) -> bytes:
    """``base`` (a valid document) broken in one way, as raw bytes."""
    doc = msgspec.json.decode(ENC.encode(base))
    kind = draw(
        st.sampled_from(
            [
                "bytes",
                "nest",
                "nest_objects",
                "version",
                "number",
                "type",
                "dup",
                "big_string",
                "truncate",
                "not_object",
                "utf8",
            ]
        )
    )
    all_paths = paths(doc)
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind in ("nest", "nest_objects"):
        depth = draw(depths)
        blob = nested(depth) if kind == "nest" else nested_objects(depth)
        path = draw(st.sampled_from([*all_paths, ("metadata",), ("unknown_field",)]))
        marker = "@@HOLE@@"
        if len(path) == 1 and path[0] not in doc:
            doc[path[0]] = marker
        else:
            set_path(doc, list(path), marker)
        return ENC.encode(doc).replace(b'"@@HOLE@@"', blob)
    if kind == "version":
        doc["schema_version"] = draw(versions)
        return ENC.encode(doc)
    if kind == "number":
        path = draw(st.sampled_from(all_paths))
        set_path(doc, list(path), "@@NUM@@")
        return ENC.encode(doc).replace(b'"@@NUM@@"', draw(raw_numbers))
    if kind == "type":
        path = draw(st.sampled_from(all_paths))
        set_path(doc, list(path), draw(json_values))
        return ENC.encode(doc)
    if kind == "dup":
        key = draw(st.sampled_from(sorted(doc)))
        raw = ENC.encode(doc)
        return raw[:-1] + b"," + ENC.encode(key) + b":" + ENC.encode(draw(json_values)) + b"}"
    if kind == "big_string":
        path = draw(st.sampled_from(all_paths))
        set_path(doc, list(path), "x" * draw(st.sampled_from([257, 1025, 100_000])))
        return ENC.encode(doc)
    if kind == "truncate":
        raw = ENC.encode(doc)
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if kind == "utf8":
        raw = ENC.encode(doc)
        cut = draw(st.integers(1, len(raw) - 2))
        return (
            raw[:cut]
            + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\\ud800"]))
            + raw[cut:]
        )
    return ENC.encode(draw(json_values))  # not_object


header_values = st.one_of(
    st.none(),
    st.binary(max_size=40),
    st.sampled_from([b"\xff\xfe", b"1" * 100_000, "\u0661".encode(), b"2", b""]),
    versions.map(lambda v: v.encode("utf-8", "surrogatepass")),
)
headers = st.lists(
    st.tuples(st.sampled_from(["schema_version", "request_id", "x", ""]), header_values),
    max_size=4,
).map(tuple)


# --------------------------------------------------------------------------- requests


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    cfg = make_config("unused:9092")
    return Pipeline(cfg, load_model(cfg.models.champion), load_model(cfg.models.candidate))


@pytest.fixture(scope="module")
def msgpack_pipe() -> Pipeline:
    cfg = make_config("unused:9092", input={"format": "msgpack"})
    return Pipeline(cfg, load_model(cfg.models.champion), load_model(cfg.models.candidate))


POLICY = RoutingPolicy(rollout="fraud-v2", mode=Mode.CANARY, canary_share_bp=5000, epoch=3)


@st.composite
def request_batches(draw: st.DrawFn) -> tuple[list[Rec], set[str]]:
    """Valid requests with hostile ones among them; returns the valid ids too."""
    n_good = draw(st.integers(1, 4))
    records: list[Rec] = []
    good: set[str] = set()
    for i in range(n_good):
        doc = valid_request(i)
        records.append(Rec(ENC.encode(doc), offset=len(records)))
        good.add(doc["request_id"])
    for _ in range(draw(st.integers(1, 4))):
        base = valid_request(100 + len(records))
        if draw(st.booleans()):
            value: bytes | None = draw(hostile_json(base))
            hdrs: tuple[tuple[str, Any], ...] = ()
        else:
            value = draw(st.one_of(st.none(), hostile_json(base), st.just(ENC.encode(base))))
            hdrs = draw(headers)
        key = draw(st.one_of(st.none(), st.binary(max_size=30), st.just(b"k" * 5000)))
        at = draw(st.integers(0, len(records)))
        records.insert(at, Rec(value, headers=hdrs, key=key))  # type: ignore[arg-type]
    for offset, rec in enumerate(records):
        rec.offset = offset
    return records, good


@FUZZ
@given(request_batches())
async def test_no_request_record_escapes_the_pipeline(
    pipe: Pipeline, batch: tuple[list[Rec], set[str]]
) -> None:
    records, good = batch
    result = await pipe.process(records, POLICY)  # must not raise
    decided = [msgspec.json.decode(v, type=Decision) for v in result.decisions.values]
    letters = [msgspec.json.decode(v, type=DeadLetter) for v in result.dead_letters.values]
    # Every record is accounted for exactly once (champion_failure is fallback_candidate).
    assert len(decided) + len(letters) == len(records)
    assert len(result.comparisons) == len(decided)
    assert good <= {d.request_id for d in decided}
    for letter in letters:
        assert letter.reason and letter.kind != "processing_error", letter
    for value in result.dead_letters.values:
        assert len(value) < 1_000_000
    for value in result.decisions.values + result.comparisons.values:
        msgspec.json.decode(value)  # valid JSON, whatever went in


@FUZZ
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=5), headers)
async def test_msgpack_requests_never_escape(
    msgpack_pipe: Pipeline, raw: list[bytes], hdrs: Any
) -> None:
    p = msgpack_pipe
    doc = valid_request(1)
    hostile = [
        msgspec.msgpack.encode(doc),
        msgspec.msgpack.encode({**doc, "metadata": {"x": msgspec.msgpack.Ext(1, b"zz")}}),
        msgspec.msgpack.encode({**doc, "metadata": {"x": b"\x00\xff"}}),
        *raw,
    ]
    records = [Rec(v, offset=i, headers=hdrs) for i, v in enumerate(hostile)]
    result = await p.process(records, POLICY)
    assert len(result.decisions) + len(result.dead_letters) == len(records)
    for value in result.decisions.values:
        msgspec.json.decode(value)


async def test_a_processing_error_is_isolated_to_its_record(pipe: Pipeline) -> None:
    # A record that breaks something after decoding (here: a routing key the output encoder
    # cannot take, forced through a decoder stand-in) costs that record, not its batch.
    records = [Rec(ENC.encode(valid_request(i)), offset=i) for i in range(9)]
    original = pipe.decoder.decode

    def decode(batch: list[Rec]) -> Any:
        out = original(batch)
        out.routing_keys = [
            "\udc80" if r.offset == 4 else k for r, k in zip(batch, out.routing_keys, strict=True)
        ]
        return out

    pipe.decoder.decode = decode  # type: ignore[method-assign]
    try:
        result = await pipe.process(records, POLICY)
    finally:
        pipe.decoder.decode = original  # type: ignore[method-assign]
    letters = [msgspec.json.decode(v, type=DeadLetter) for v in result.dead_letters.values]
    assert [(d.kind, d.source_offset) for d in letters] == [("processing_error", 4)]
    assert "UnicodeEncodeError" in letters[0].reason
    ids = [msgspec.json.decode(v, type=Decision).request_id for v in result.decisions.values]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(9) if i != 4)


async def test_dead_letters_of_huge_records_are_claim_checks() -> None:
    cfg = make_config("unused:9092", input={"max_message_bytes": 20_000_000})
    p = Pipeline(cfg, load_model(cfg.models.champion), load_model(cfg.models.candidate))
    big = b'{"request_id":"big","features":' + b"x" * 9_000_000 + b"}"
    key = b"k" * 600_000
    result = await p.process([Rec(big, offset=7, key=key)], POLICY)
    (value,) = result.dead_letters.values
    assert len(value) < 1_000_000
    letter = msgspec.json.decode(value, type=DeadLetter)
    assert letter.truncated and letter.original_size == len(big)
    assert letter.original_value == big[: len(letter.original_value or b"")]
    import hashlib

    assert letter.original_sha256 == hashlib.sha256(big).hexdigest()
    assert (letter.source_topic, letter.source_partition, letter.source_offset) == (
        "requests",
        0,
        7,
    )
    assert result.dead_letters.keys == [b"requests/0/7"]  # not the 600 kB key


async def test_an_output_too_large_for_its_topic_is_dead_lettered_not_sent() -> None:
    cfg = make_config("unused:9092")
    p = Pipeline(cfg, load_model(cfg.models.champion), load_model(cfg.models.candidate))
    p.set_record_limits({cfg.topics.decisions: 50_000})
    small, huge = valid_request(1), valid_request(2)
    huge["metadata"] = {"blob": "y" * 60_000}
    records = [Rec(ENC.encode(small), offset=0), Rec(ENC.encode(huge), offset=1)]
    result = await p.process(records, POLICY)
    assert [msgspec.json.decode(v, type=Decision).request_id for v in result.decisions.values] == [
        small["request_id"]
    ]
    assert len(result.comparisons) == 1
    (letter,) = [msgspec.json.decode(v, type=DeadLetter) for v in result.dead_letters.values]
    assert letter.kind == "output_oversize" and letter.request_id == huge["request_id"]
    assert sum(result.decided_by.values()) == 1


# --------------------------------------------------------------------------- control

KEY = SigningKey.generate("k1", "operator")
TRUST = TrustStore([KEY.trusted()])


def valid_command(i: int) -> dict[str, Any]:
    return {
        "command_id": f"c-{i}",
        "rollout": "fraud-v2",
        "action": "canary",
        "args": {"share_bp": 500 + i},
        "issued_by": "k1",
        "reason": "fuzz",
        "issued_at_ms": 1_700_000_000_000,
        "expected_epoch": 0,
        "key_id": "k1",
        "signature": "A" * 86,
    }


@FUZZ
@given(st.data())
def test_no_control_record_escapes_processing_or_replay(data: st.DataObject) -> None:
    state = initial_state("fraud-v2", mode=Mode.SHADOW)
    raws = [data.draw(hostile_json(valid_command(i))) for i in range(data.draw(st.integers(1, 5)))]
    records = [ControlRecord(raw, 1_700_000_000_500) for raw in raws]
    for record in records:
        outcome = process_record(state, record, trust=TRUST)
        assert not isinstance(outcome, Applied)  # none of them carries a valid signature
        audit = audit_record(outcome, instance_id="i-1", applied_at_ms=1)
        assert msgspec.json.decode(msgspec.json.encode(audit)) is not None
        command = getattr(outcome, "command", None)
        entry = HistoryEntry(1_700_000_000_000, 0, command, outcome)
        line = printable(history_line(entry))
        assert "\n" not in line and "\x1b" not in line
    final, replayed = replay(records, initial=state, trust=TRUST)
    assert final == state and len(replayed) == len(raws)


@FUZZ
@given(st.data())
def test_signed_hostile_commands_never_raise(data: st.DataObject) -> None:
    # A key holder (or a stolen key) can sign anything the wire format allows: the state
    # machine must still answer with an outcome.
    doc = valid_command(0)
    doc.pop("signature")
    path = data.draw(st.sampled_from(paths(doc)))
    set_path(doc, list(path), data.draw(json_values))
    try:
        cmd = msgspec.json.decode(ENC.encode(doc), type=ControlCommand)
    except msgspec.ValidationError:
        return
    signed = sign_command(cmd, KEY)
    state = initial_state("fraud-v2", mode=Mode.SHADOW)
    record = ControlRecord(msgspec.json.encode(signed), signed.issued_at_ms)
    outcome = process_record(state, record, trust=TRUST)
    audit_record(outcome, instance_id="i", applied_at_ms=0)


# --------------------------------------------------------------------------- aggregator


def valid_comparison(i: int) -> dict[str, Any]:
    return {
        "request_id": f"r-{i}",
        "routing_key": None,
        "rollout": "fraud-v2",
        "ts": 1_700_000_000_000 + i,
        "policy_epoch": 1,
        "policy_mode": "shadow",
        "served_by": "champion",
        "champion": {
            "model": "m",
            "version": "1.0.0",
            "score": 0.2,
            "decision": False,
            "latency_ms": 1.0,
        },
        "candidate": {
            "model": "m",
            "version": "2.0.0",
            "score": 0.7,
            "decision": True,
            "latency_ms": 2.0,
        },
    }


@FUZZ
@given(st.data())
def test_no_comparison_record_escapes_ingest_or_the_windows(data: st.DataObject) -> None:
    values: list[bytes | None] = [ENC.encode(valid_comparison(i)) for i in range(3)]
    for _ in range(data.draw(st.integers(1, 4))):
        hostile = data.draw(st.one_of(st.none(), hostile_json(valid_comparison(9))))
        values.insert(data.draw(st.integers(0, len(values))), hostile)
    records = [Rec(v, offset=i) for i, v in enumerate(values)]
    got = ingest(records)
    assert len(got.records) + len(got.rejected) == len(records)
    assert all(reason for _, _, reason in got.rejected)
    assert (got.batch.ts <= MAX_EPOCH_MS).all() and (got.batch.ts >= 0).all()
    manager = WindowManager()
    manager.process(got.batch, 1_700_000_100_000)
    manager.flush(1_700_000_100_000)


def test_a_comparison_id_of_a_megabyte_is_refused_not_hashed() -> None:
    doc = valid_comparison(1)
    doc["request_id"] = "x" * 1_000_000
    records = [Rec(ENC.encode(valid_comparison(i)), offset=i) for i in range(2000)]
    records.append(Rec(ENC.encode(doc), offset=2000))
    got = ingest(records)
    assert len(got.rejected) == 1 and "256" in got.rejected[0][2]
    assert got.batch.request_hash.dtype == np.uint64 and len(got.batch) == 2000


def marker(first: int, last: int) -> Rec:
    """A record the Kafka client could not parse, as ``sidecar.kafka.unreadable`` hands it on."""
    skipped = Unreadable(first, last, "UnicodeDecodeError: bad header key")
    return Rec(None, offset=last, headers=((UNREADABLE_HEADER, skipped),))  # type: ignore[arg-type]


async def test_unparseable_records_become_one_dead_letter_for_their_range(pipe: Pipeline) -> None:
    records = [Rec(ENC.encode(valid_request(0)), offset=0), marker(1, 3)]
    result = await pipe.process(records, POLICY)
    (letter,) = [msgspec.json.decode(v, type=DeadLetter) for v in result.dead_letters.values]
    assert letter.kind == "unreadable" and "UnicodeDecodeError" in letter.reason
    assert (letter.source_offset, letter.source_offset_last) == (1, 3)
    # A producer cannot forge a marker: a header value it writes is bytes, never Unreadable.
    forged = Rec(ENC.encode(valid_request(5)), offset=9, headers=((UNREADABLE_HEADER, b"1"),))
    assert unreadable_of(forged) is None
    assert len((await pipe.process([forged], POLICY)).decisions) == 1


def test_unparseable_comparisons_are_rejected_with_their_range() -> None:
    got = ingest([Rec(ENC.encode(valid_comparison(0)), offset=0), marker(1, 2)])
    ((_, kind, reason),) = got.rejected
    assert kind == "unreadable" and "offsets 1..2" in reason and len(got.batch) == 1
