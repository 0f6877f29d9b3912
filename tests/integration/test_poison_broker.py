"""A poison corpus through the real broker, written by an external client (confluent-kafka,
librdkafka): nothing on the requests or the control topic can crash an instance, stall a
partition or stop a rollback, and every poison record is accounted for.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
from control_helpers import audits, control_config, ctl, running, setup
from kafka_helpers import decode_values, read_topic, wait_until

from sidecar.contracts import DeadLetter, Decision
from sidecar.control.client import EXIT_OK
from sidecar.examples import fraud
from sidecar.routing import Mode

confluent_kafka = pytest.importorskip("confluent_kafka")

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

ENC = msgspec.json.Encoder()


def deep(depth: int, open_: bytes = b"[", close: bytes = b"]") -> bytes:
    return open_ * depth + b"1" + close * depth


def request(i: int, **extra: Any) -> dict[str, Any]:
    doc = fraud.request_dicts(fraud.generate(1, seed=i), start_id=i)[0]
    doc.update(extra)
    return doc


def request_with(i: int, field: str, raw: bytes) -> bytes:
    """A valid request whose ``field`` holds ``raw`` JSON verbatim."""
    return ENC.encode(request(i, **{field: "@@"})).replace(b'"@@"', raw)


def poison_requests() -> list[tuple[str, bytes | None, list[tuple[str, Any]] | None]]:
    good = ENC.encode(request(900))
    return [
        (
            "features nested 5000 deep",
            request_with(901, "features", deep(5000, b'{"a":', b"}")),
            None,
        ),
        ("metadata nested 5000 deep", request_with(902, "metadata", deep(5000)), None),
        ("unknown field nested 5000 deep", request_with(903, "zz", deep(5000)), None),
        ("request_id nested", request_with(904, "request_id", deep(3000)), None),
        ("Arabic-Indic digit version", ENC.encode(request(905, schema_version="\u0661")), None),
        ("superscript version", ENC.encode(request(906, schema_version="\u00b2.0")), None),
        ("Arabic-Indic digit header", good, [("schema_version", "\u0661".encode())]),
        ("null version header", good, [("schema_version", None)]),
        ("binary version header", good, [("schema_version", b"\xff\xfe\x00")]),
        ("random bytes", os.urandom(512), None),
        ("tombstone", None, None),
        ("integer of 5000 digits", request_with(907, "ts", b"9" * 5000), None),
        ("ts past year 9999", ENC.encode(request(908, ts=10**15)), None),
        ("duplicate keys", ENC.encode(request(909))[:-1] + b',"features":[1,2]}', None),
        ("routing key of 2000 chars", ENC.encode(request(910, routing_key="k" * 2000)), None),
        ("invalid UTF-8", ENC.encode(request(911))[:-2] + b'\xff"}', None),
        (
            "1.5 MB record",
            request_with(912, "metadata", b'{"b":"' + b"x" * 1_500_000 + b'"}'),
            None,
        ),
    ]


def valid_requests() -> list[tuple[bytes, list[tuple[str, Any]] | None]]:
    """Valid requests, some with unusual but harmless headers or sizes."""
    out: list[tuple[bytes, list[tuple[str, Any]] | None]] = [
        (ENC.encode(request(i)), None) for i in range(60)
    ]
    out.append((ENC.encode(request(60)), [("x", None), ("", b"\xff")]))
    out.append((ENC.encode(request(61, metadata={"blob": "y" * 900_000})), None))
    return out


def poison_commands() -> list[tuple[str, bytes | None, list[tuple[str, Any]] | None]]:
    return [
        ("2 kB of nesting, unsigned", b"[" * 2000, None),
        (
            "nested args",
            b'{"command_id":"x","rollout":"fraud-v2","args":' + deep(5000) + b"}",
            None,
        ),
        ("nested unknown field", b'{"zz":' + deep(5000, b'{"a":', b"}") + b"}", None),
        ("null value", None, None),
        ("random bytes", os.urandom(300), None),
        ("70 kB", b"{" + b" " * 70_000 + b"}", None),
        ("null header", b"{}", [("x", None)]),
        (
            "forged signature",
            ENC.encode(
                {
                    "command_id": "forged-1",
                    "rollout": "fraud-v2",
                    "action": "promote",
                    "issued_by": "attacker",
                    "reason": "x",
                    "issued_at_ms": 0,
                    "key_id": "k1",
                    "signature": "ab" * 32,
                }
            ),
            None,
        ),
    ]


def produce_external(
    bootstrap: str, topic: str, records: list[tuple[bytes | None, list[tuple[str, Any]] | None]]
) -> list[tuple[int, int]]:
    """Produce with librdkafka, in order; returns each record's (partition, offset)."""
    producer = confluent_kafka.Producer(
        {"bootstrap.servers": bootstrap, "message.max.bytes": 4_000_000, "linger.ms": 0}
    )
    where: list[tuple[int, int] | None] = [None] * len(records)

    def delivered(i: int) -> Any:
        def callback(err: Any, msg: Any) -> None:
            assert err is None, err
            where[i] = (msg.partition(), msg.offset())

        return callback

    for i, (value, headers) in enumerate(records):
        producer.produce(topic, value=value, headers=headers, on_delivery=delivered(i))
        producer.flush(10)  # one record per batch: offsets exact on every broker
    assert all(w is not None for w in where)
    return [w for w in where if w is not None]


@pytest.mark.slow
async def test_a_poison_corpus_neither_crashes_nor_stalls_nor_stops_rollback(
    bootstrap: str, tmp_path: Path
) -> None:
    cfg = control_config(bootstrap, tmp_path)
    await setup(cfg)
    poison = poison_requests()
    good = valid_requests()
    # Interleave: poison records sit between valid ones on every partition.
    records: list[tuple[bytes | None, list[tuple[str, Any]] | None]] = []
    is_poison: list[bool] = []
    for i, (value, headers) in enumerate(good):
        records.append((value, headers))
        is_poison.append(False)
        if i < len(poison):
            records.append(poison[i][1:])
            is_poison.append(True)
    loop = asyncio.get_running_loop()
    async with running(cfg, 2) as sidecars:
        coords = await loop.run_in_executor(
            None, produce_external, bootstrap, cfg.topics.requests, records
        )
        control_coords = await loop.run_in_executor(
            None,
            produce_external,
            bootstrap,
            cfg.topics.control,
            [c[1:] for c in poison_commands()],
        )
        await wait_until(lambda: sum(s.processed for s in sidecars) >= len(records), 60)
        # Rollback still works, on every instance, within a second.
        rollback = await ctl(cfg, "rollback", reason="after the poison")
        assert rollback.code == EXIT_OK, rollback.message
        assert set(rollback.confirmed) == {"inst-0", "inst-1"}
        assert rollback.wait_s < 1.0, rollback.wait_s
        for s in sidecars:
            assert s.policy.current.mode is Mode.ROLLED_BACK
            assert s.failure is None and not s.stopping
            assert s.control is not None and s.control.caught_up
        epoch = sidecars[0].policy.current.epoch

    # Every valid request was decided; every poison request is a dead letter, by coordinates.
    decisions = decode_values(
        await read_topic(bootstrap, cfg.topics.decisions, expect=len(good)), Decision
    )
    assert {d.request_id for d in decisions} >= {
        msgspec.json.decode(v)["request_id"] for v, _ in good
    }
    letters = decode_values(
        await read_topic(bootstrap, cfg.topics.dead_letter, expect=len(poison)), DeadLetter
    )
    poisoned = {c for c, bad in zip(coords, is_poison, strict=True) if bad}
    assert {(x.source_partition, x.source_offset) for x in letters} == poisoned
    assert len(letters) == len(poison)  # once each
    for letter in letters:
        assert letter.reason and letter.kind != "processing_error", letter
    # Every poison control record is audited as rejected by each instance, with its reason.
    rejected = [a for a in await audits(cfg) if a.outcome == "rejected"]
    for instance in ("inst-0", "inst-1"):
        mine = [a for a in rejected if a.instance_id == instance]
        assert len(mine) == len(control_coords), [(a.reason, a.detail) for a in mine]
        assert all(a.reason and a.detail for a in mine)

    # A restart replays the poisoned control topic cleanly and lands on the same epoch.
    async with running(cfg, 1) as (fresh,):
        assert fresh.policy.current.epoch == epoch
        assert fresh.policy.current.mode is Mode.ROLLED_BACK
        assert fresh.failure is None


def produce_raw(bootstrap: str, topic: str, values: list[bytes]) -> list[int]:
    """Write BEFORE, [A, BAD, C] (one batch; BAD's header key is not UTF-8), AFTER to
    partition 0 with a raw client; returns the five offsets."""
    script = Path(__file__).parent.parent / "tools" / "raw_producer.py"
    args = [sys.executable, str(script), bootstrap, topic, "0", *(v.decode() for v in values)]
    env = dict(os.environ, AIOKAFKA_NO_EXTENSIONS="1")
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, check=True)
    return [int(x) for x in out.stdout.split()]


async def test_records_the_client_cannot_parse_are_skipped_and_accounted(
    bootstrap: str, tmp_path: Path
) -> None:
    # A header key that is not UTF-8 makes aiokafka raise on every fetch of its partition;
    # the Kafka edge turns the unparseable rest of that batch into a marker instead.
    cfg = control_config(bootstrap, tmp_path)
    await setup(cfg)
    values = [ENC.encode(request(i)) for i in range(5)]
    loop = asyncio.get_running_loop()
    async with running(cfg, 1) as (sidecar,):
        offsets = await loop.run_in_executor(
            None, produce_raw, bootstrap, cfg.topics.requests, values
        )
        control = [b"{}", b"{}", b"{}", b"{}", b"{}"]
        await loop.run_in_executor(None, produce_raw, bootstrap, cfg.topics.control, control)
        await wait_until(lambda: sidecar.processed >= 3, 30)
        rollback = await ctl(cfg, "rollback", reason="after unreadable records")
        assert rollback.code == EXIT_OK, rollback.message
        assert sidecar.failure is None
    decisions = decode_values(await read_topic(bootstrap, cfg.topics.decisions, expect=3), Decision)
    # "before", "a" (read before the bad record of its batch) and "after" are decided.
    assert sorted(d.request_id for d in decisions) == ["req-0", "req-1", "req-4"]
    (letter,) = decode_values(
        await read_topic(bootstrap, cfg.topics.dead_letter, expect=1), DeadLetter
    )
    assert letter.kind == "unreadable" and "UnicodeDecodeError" in letter.reason
    assert (letter.source_offset, letter.source_offset_last) == (offsets[2], offsets[3])
    # On the control topic: one audited rejection, then the rollback applied.
    mine = [a for a in await audits(cfg) if a.instance_id == sidecar.instance_id]
    assert [a.reason for a in mine if a.outcome == "rejected"].count("unreadable") == 1
    assert any(a.outcome == "applied" and a.action == "rollback" for a in mine)
