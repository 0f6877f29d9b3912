"""The data path without Kafka: routing, scoring, fallbacks and the exact output bytes."""

from __future__ import annotations

import asyncio
from typing import Any

import model_doubles
import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka_helpers import make_config
from records import Rec

from sidecar.contracts import Comparison, DeadLetter, Decision
from sidecar.examples import fraud
from sidecar.hashing import bucket_of
from sidecar.models import load_model
from sidecar.pipeline import Pipeline
from sidecar.routing import Mode, RoutingPolicy

ENC = msgspec.json.Encoder()


def pipeline(candidate: dict[str, Any] | None = None, **rollout: Any) -> Pipeline:
    cfg = make_config(
        "unused:9092", rollout=rollout, models={"candidate": candidate} if candidate else {}
    )
    cand = load_model(cfg.models.candidate) if cfg.models.candidate else None
    return Pipeline(cfg, load_model(cfg.models.champion), cand)


def records(n: int, seed: int = 0) -> list[Rec]:
    data = fraud.generate(n, seed=seed)
    return [Rec(ENC.encode(r), offset=i) for i, r in enumerate(fraud.request_dicts(data))]


def policy(mode: Mode = Mode.CANARY, share: int = 2000, epoch: int = 7) -> RoutingPolicy:
    return RoutingPolicy(rollout="fraud-v2", mode=mode, canary_share_bp=share, epoch=epoch)


def decisions(result: Any) -> list[Decision]:
    return [msgspec.json.decode(v, type=Decision) for v in result.decisions.values]


def comparisons(result: Any) -> list[Comparison]:
    return [msgspec.json.decode(v, type=Comparison) for v in result.comparisons.values]


async def test_every_request_gets_one_decision_and_one_comparison_with_correct_arms() -> None:
    p = pipeline()
    recs = records(3000)
    result = await p.process(recs, policy())
    ds, cs = decisions(result), comparisons(result)
    assert len(ds) == len(cs) == 3000
    assert {d.request_id for d in ds} == {f"req-{i}" for i in range(3000)}
    data = fraud.generate(3000, seed=0)
    champ = fraud.champion().predict(data.features[:, :6])
    cand = fraud.candidate().predict(data.features)
    for i, (d, c) in enumerate(zip(ds, cs, strict=True)):
        expect_candidate = bucket_of(d.routing_key or d.request_id, "fraud-v2") < 2000
        assert d.arm == d.routed_arm == ("candidate" if expect_candidate else "champion")
        assert d.policy_epoch == c.policy_epoch == 7 and d.policy_mode == "canary"
        assert d.model_version == ("2.0.0" if expect_candidate else "1.4.0")
        assert c.champion.score == pytest.approx(champ[i]) and c.candidate.score == pytest.approx(
            cand[i]
        )
        assert d.score == (c.candidate.score if expect_candidate else c.champion.score)
        assert d.decision == (d.score >= d.threshold)
        assert d.threshold == (0.5 if expect_candidate else 0.3)
        assert c.served_by == d.arm and d.fallback is None
    share = np.mean([d.arm == "candidate" for d in ds])
    assert 0.17 < share < 0.23  # 20% of card ids; cards repeat, so a little wider than binomial


@pytest.mark.parametrize("key", ["rollout", "routing_key"])
async def test_comparisons_are_keyed_as_configured(key: str) -> None:
    cfg = make_config("unused:9092", topics={"comparisons_key": key})
    p = Pipeline(cfg, load_model(cfg.models.champion), load_model(cfg.models.candidate))
    result = await p.process(records(500), policy())
    if key == "rollout":
        assert set(result.comparisons.keys) == {b"fraud-v2"}
    else:  # like decisions: the entity, so its duplicates meet on one partition
        assert result.comparisons.keys == result.decisions.keys
        assert len(set(result.comparisons.keys)) > 100


async def test_templated_outputs_are_what_msgspec_encodes_for_the_struct() -> None:
    """Same fields, same order, same values; floats may be spelled differently (``2e-05`` vs
    ``0.00002``), which every JSON reader decodes to the same number."""
    p = pipeline()
    result = await p.process(records(500), policy())
    for value, type_ in [(v, Decision) for v in result.decisions.values] + [
        (v, Comparison) for v in result.comparisons.values
    ]:
        struct = msgspec.json.decode(value, type=type_)
        assert list(msgspec.json.decode(value).items()) == list(
            msgspec.json.decode(ENC.encode(struct)).items()
        )


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=20, unique=True),
    st.lists(st.one_of(st.none(), st.text(max_size=20)), min_size=20, max_size=20),
)
@pytest.mark.slow
async def test_arbitrary_ids_and_keys_survive_encoding(
    ids: list[str], keys: list[str | None]
) -> None:
    p = pipeline()
    feats = dict(zip(fraud.FEATURES, [10.0, 3, 0.2, 1, 4, 300.0, 12.0, 0.4], strict=True))
    recs = []
    for rid, key in zip(ids, keys, strict=False):
        doc: dict[str, Any] = {"request_id": rid, "features": feats}
        if key is not None:
            doc["routing_key"] = key
        recs.append(Rec(ENC.encode(doc)))
    result = await p.process(recs, policy(share=5000))
    got = decisions(result)
    assert [d.request_id for d in got] == ids[: len(recs)]
    assert [d.routing_key for d in got] == keys[: len(recs)]
    compared = [msgspec.json.decode(v, type=Comparison) for v in result.comparisons.values]
    assert [c.request_id for c in compared] == ids[: len(recs)]
    assert [c.routing_key for c in compared] == keys[: len(recs)]
    # Keyed and unkeyed records, both arms deciding some: each as msgspec encodes its Struct.
    for value, type_ in [(v, Decision) for v in result.decisions.values] + [
        (v, Comparison) for v in result.comparisons.values
    ]:
        struct = msgspec.json.decode(value, type=type_)
        assert msgspec.json.decode(value) == msgspec.json.decode(ENC.encode(struct))


@pytest.mark.parametrize(
    "faulty",
    [
        {"target": "sidecar.examples.faulty:raising"},
        {"target": "sidecar.examples.faulty:nans", "options": {"fraction": 1.0}},
        {"target": "sidecar.examples.faulty:wrong_length"},
        {"target": "sidecar.examples.faulty:slow", "options": {"delay_s": 1.0}, "timeout_ms": 50},
    ],
)
async def test_a_failing_candidate_never_changes_a_champion_decision(
    faulty: dict[str, Any],
) -> None:
    healthy = pipeline(mode="shadow")
    broken = pipeline(candidate=faulty, mode="canary", canary_share_bp=3000)
    recs = records(1000)
    good = {d.request_id: d for d in decisions(await healthy.process(recs, policy(Mode.SHADOW)))}
    result = await broken.process(recs, policy(Mode.CANARY, 3000))
    got = decisions(result)
    assert len(got) == 1000
    for d in got:
        # The champion decides everything, with exactly the score it has when healthy...
        assert d.arm == "champion"
        assert (d.score, d.decision) == (good[d.request_id].score, good[d.request_id].decision)
        # ...and the records routed to the candidate say why they fell back.
        if d.routed_arm == "candidate":
            assert d.fallback and d.fallback.startswith("candidate_failed")
    errors = {c.candidate.error.kind for c in comparisons(result) if c.candidate.error}
    assert errors and errors <= {"exception", "invalid_output", "timeout"}
    assert all(c.champion.error is None for c in comparisons(result))


async def test_a_slow_candidate_delays_the_batch_by_its_timeout_at_most() -> None:
    slow = {
        "target": "sidecar.examples.faulty:slow",
        "options": {"delay_s": 2.0},
        "timeout_ms": 100,
    }
    p = pipeline(candidate=slow)
    import time

    start = time.perf_counter()
    result = await p.process(records(200), policy(Mode.SHADOW))
    assert time.perf_counter() - start < 1.0
    assert {c.candidate.error.kind for c in comparisons(result)} == {"timeout"}


@pytest.mark.parametrize(
    ("failure_policy", "expect"),
    [
        ("fallback_candidate", "candidate"),
        ("default_decision", "default"),
        ("dead_letter", "dead_letter"),
    ],
)
async def test_champion_failure_follows_the_configured_policy(
    failure_policy: str, expect: str
) -> None:
    cfg = make_config(
        "unused:9092",
        rollout={
            "champion_failure": failure_policy,
            "default_decision": True,
            "default_score": 0.99,
        },
        models={
            "champion": {
                "target": "sidecar.examples.faulty:raising",
                "options": {"target": "sidecar.examples.fraud:champion"},
            }
        },
    )
    p = Pipeline(cfg, load_model(cfg.models.champion), load_model(cfg.models.candidate))
    result = await p.process(records(300), policy(Mode.SHADOW))
    ds = decisions(result)
    assert len(result.comparisons) == 300  # the failure is always recorded
    if expect == "candidate":
        assert len(ds) == 300 and {d.arm for d in ds} == {"candidate"}
        assert all(d.fallback and d.fallback.startswith("champion_failed") for d in ds)
    elif expect == "default":
        assert len(ds) == 300 and all(d.score == 0.99 and d.decision for d in ds)
        assert all(d.fallback and d.fallback.startswith("default_decision") for d in ds)
    else:
        assert ds == []
        letters = [msgspec.json.decode(v, type=DeadLetter) for v in result.dead_letters.values]
        assert len(letters) == 300 and {x.kind for x in letters} == {"model_failure"}
        assert all(x.original_value for x in letters)


async def test_not_scoring_the_shadow_arm_when_asked() -> None:
    p = pipeline()
    pol = RoutingPolicy(rollout="fraud-v2", mode=Mode.SHADOW, score_shadow_arm=False)
    result = await p.process(records(100), pol)
    assert {c.candidate.error.kind for c in comparisons(result)} == {"skipped"}
    assert len(decisions(result)) == 100


async def test_metadata_is_passed_through() -> None:
    p = pipeline()
    doc = fraud.request_dicts(fraud.generate(1, seed=1))[0] | {"metadata": {"trace": "abc"}}
    result = await p.process([Rec(ENC.encode(doc))], policy())
    assert decisions(result)[0].metadata == {"trace": "abc"}


async def test_bad_records_become_dead_letters_next_to_good_ones() -> None:
    p = pipeline()
    recs = records(10)
    recs.insert(3, Rec(b"{broken", offset=99, key=b"k"))
    result = await p.process(recs, policy())
    assert len(result.decisions) == 10
    [letter] = [msgspec.json.decode(v, type=DeadLetter) for v in result.dead_letters.values]
    assert letter.kind == "decode" and letter.original_value == b"{broken"
    assert letter.source_offset == 99 and letter.original_key == b"k"


def _manifest(name: str, version: str, features: tuple[str, ...], **ranges: float) -> Any:
    return {
        "name": name,
        "version": version,
        "inputs": [{"name": f, **({"max": ranges[f]} if f in ranges else {})} for f in features],
        "output": {"threshold": 0.3 if version == "1.4.0" else 0.5},
    }


@pytest.mark.parametrize("validation", ["count", "strict"])
async def test_comparisons_name_the_features_out_of_range(validation: str) -> None:
    """Each comparison lists the features outside either arm's manifest ranges (omitted when
    none); strict mode dead-letters the champion's, so only the candidate's remain."""
    cfg = make_config(
        "unused:9092",
        request_contract={"validation": validation},
        models={
            "champion": {
                "manifest": _manifest("fraud-lr", "1.4.0", fraud.CHAMPION_FEATURES, amount=300)
            },
            "candidate": {
                "manifest": _manifest(
                    "fraud-lr", "2.0.0", fraud.CANDIDATE_FEATURES, amount=200, device_score=0.6
                )
            },
        },
    )
    assert cfg.models.candidate is not None
    p = Pipeline(cfg, load_model(cfg.models.champion), load_model(cfg.models.candidate))
    n = 2000
    result = await p.process(records(n), policy())
    x = fraud.generate(n, seed=0).features
    amount, device = x[:, 0], x[:, 7]
    strict = validation == "strict"
    served = np.flatnonzero(amount <= 300) if strict else np.arange(n)
    assert len(result.dead_letters) == n - len(served)
    cs = {c.request_id: c for c in comparisons(result)}
    assert len(cs) == len(served)
    for i in served.tolist():
        want = [
            f for f, out in (("amount", amount[i] > 200), ("device_score", device[i] > 0.6)) if out
        ]
        assert cs[f"req-{i}"].out_of_range == (want or None)
    flagged = [c for c in cs.values() if c.out_of_range]
    assert 0 < len(flagged) < len(cs)
    for value in result.comparisons.values:  # exactly what msgspec encodes for the Struct
        struct = msgspec.json.decode(value, type=Comparison)
        assert list(msgspec.json.decode(value).items()) == list(
            msgspec.json.decode(ENC.encode(struct)).items()
        )


# -- two stages: the champion's decisions never wait for the candidate -------------------------


def _row(d: Decision) -> tuple[Any, ...]:
    return (d.request_id, d.arm, d.routed_arm, d.score, d.decision, d.fallback, d.policy_epoch)


async def test_champion_decisions_leave_before_the_candidate_answers() -> None:
    """Stage one returns while the candidate is still blocked, with a decision for every
    record routed to the champion; stage two (once the candidate answers) has the rest and
    every comparison. Together they are exactly what the one-stage path writes."""
    gate = model_doubles.new_gate()
    gated = {"target": "model_doubles:gated", "options": {"gate": gate}, "timeout_ms": 20_000}
    p = pipeline(candidate=gated, mode="canary", canary_share_bp=3000)
    recs, pol = records(1000), policy(Mode.CANARY, 3000)
    staged = await asyncio.wait_for(p.start(recs, pol), 10)
    assert model_doubles.calls(gate) == 1  # asked, not answered
    early = decisions(staged.early)
    assert 500 < len(early) < 1000
    assert all(d.arm == d.routed_arm == "champion" and d.fallback is None for d in early)
    assert len(staged.early.comparisons) == 0 and staged.pending is not None
    model_doubles.release(gate)
    late = await asyncio.wait_for(staged.finish(), 10)
    assert late is not None
    assert len(late.comparisons) == 1000
    assert {d.arm for d in decisions(late)} == {"candidate"}
    assert late.decided_by == {"candidate": 1000 - len(early)}
    assert staged.early.decided_by == {"champion": len(early)}

    one_stage = await pipeline(candidate=gated, mode="canary", canary_share_bp=3000).process(
        recs, pol
    )
    staged_rows = sorted(_row(d) for d in early + decisions(late))
    assert staged_rows == sorted(_row(d) for d in decisions(one_stage))
    assert sorted(c.request_id for c in comparisons(late)) == sorted(
        c.request_id for c in comparisons(one_stage)
    )


async def test_a_shed_batch_does_not_ask_the_candidate_and_says_so() -> None:
    gate = model_doubles.new_gate()
    gated = {"target": "model_doubles:gated", "options": {"gate": gate}}
    p = pipeline(candidate=gated, mode="canary", canary_share_bp=3000)
    staged = await asyncio.wait_for(
        p.start(records(500), policy(Mode.CANARY, 3000), shed_candidate=True), 10
    )
    late = await asyncio.wait_for(staged.finish(), 10)  # known at once: nothing to wait for
    assert late is not None and model_doubles.calls(gate) == 0
    cs = comparisons(late)
    assert len(cs) == 500 and {c.candidate.error.kind for c in cs if c.candidate.error} == {"shed"}
    assert all(c.champion.error is None for c in cs)
    ds = decisions(staged.early) + decisions(late)
    assert len(ds) == 500 and {d.arm for d in ds} == {"champion"}
    fallbacks = [d for d in ds if d.routed_arm == "candidate"]
    assert fallbacks and all(
        d.fallback and d.fallback.startswith("candidate_failed: shed") for d in fallbacks
    )


async def test_a_champion_stall_is_retried_once_before_any_default_decision() -> None:
    cfg = make_config(
        "unused:9092",
        rollout={"champion_failure": "default_decision"},
        models={
            "champion": {
                "target": "model_doubles:champion_stalling_once",
                "options": {"delay_s": 0.35},
                "timeout_ms": 200,
            }
        },
    )
    p = Pipeline(cfg, load_model(cfg.models.champion), load_model(cfg.models.candidate))
    result = await p.process(records(300), policy(Mode.SHADOW))
    ds = decisions(result)
    assert p.champion_retries == 1
    assert len(ds) == 300 and all(d.arm == "champion" and d.fallback is None for d in ds)
    assert all(c.champion.error is None for c in comparisons(result))


@pytest.mark.parametrize(
    "message", ["model exploded", 'odd "quotes" %s %d @@score@@ @@fallback@@ \\ \u2028 end']
)
async def test_fallbacks_take_the_templated_path_and_encode_like_the_struct(message: str) -> None:
    """A failing candidate's records fall back to the champion without the per-record Struct
    path, whatever its error message holds; the bytes decode to what msgspec writes."""
    faulty = {"target": "model_doubles:raising_with", "options": {"message": message}}
    p = pipeline(candidate=faulty, mode="canary", canary_share_bp=3000)
    for keyed in (False, True):
        recs = records(400)
        if keyed:
            recs = [
                Rec(ENC.encode(msgspec.json.decode(r.value) | {"routing_key": f"k{i}"}), offset=i)
                for i, r in enumerate(recs)
            ]
        result = await p.process(recs, policy(Mode.CANARY, 3000))
        assert result.slow_path == 0
        ds = decisions(result)
        fallbacks = [d for d in ds if d.routed_arm == "candidate"]
        assert len(ds) == 400 and fallbacks
        assert all(
            d.fallback == f"candidate_failed: exception: RuntimeError: {message}" for d in fallbacks
        )
        for value in result.decisions.values:
            struct = msgspec.json.decode(value, type=Decision)
            assert list(msgspec.json.decode(value).items()) == list(
                msgspec.json.decode(ENC.encode(struct)).items()
            )


async def test_a_partly_invalid_candidate_falls_back_on_the_template_path() -> None:
    """NaN candidate scores for some records of a batch: the records routed to the candidate
    among them fall back to the champion, the rest are decided by their routed arm, keyed and
    unkeyed, with and without metadata, in one batch; every decision and comparison says so
    and encodes like the Struct, and only the records with metadata take the per-record path."""
    nans = {"target": "sidecar.examples.faulty:nans", "options": {"fraction": 0.5}}
    p = pipeline(candidate=nans, mode="canary", canary_share_bp=5000)
    docs = fraud.request_dicts(fraud.generate(600, seed=3))
    for i, doc in enumerate(docs):
        if i % 3 == 0:
            doc.pop("routing_key", None)
        if i % 7 == 0:
            doc["metadata"] = {"n": i}
    recs = [Rec(ENC.encode(doc), offset=i) for i, doc in enumerate(docs)]
    result = await p.process(recs, policy(Mode.CANARY, 5000))
    assert result.slow_path == sum(1 for d in docs if "metadata" in d)
    ds = {d.request_id: d for d in decisions(result)}
    cs = {c.request_id: c for c in comparisons(result)}
    assert len(ds) == len(cs) == 600
    invalid = {rid for rid, c in cs.items() if c.candidate.error is not None}
    assert 0 < len(invalid) < 600
    fell_back = 0
    for doc in docs:
        d, c = ds[doc["request_id"]], cs[doc["request_id"]]
        assert d.routing_key == doc.get("routing_key") == c.routing_key
        assert d.metadata == doc.get("metadata")
        routing_key = doc.get("routing_key") or doc["request_id"]
        canary = bucket_of(routing_key, "fraud-v2") < 5000
        assert d.routed_arm == ("candidate" if canary else "champion")
        if canary and d.request_id in invalid:
            fell_back += 1
            assert d.arm == "champion" == c.served_by
            assert d.fallback == "candidate_failed: invalid_output: score is NaN or infinite"
        else:
            assert d.arm == d.routed_arm == c.served_by and d.fallback is None
        arm = c.champion if d.arm == "champion" else c.candidate
        assert (d.score, d.decision) == (arm.score, arm.decision)
        if d.request_id in invalid:
            assert c.candidate.score is None and c.candidate.error is not None
            assert c.candidate.error.kind == "invalid_output"
        else:
            assert c.candidate.score is not None and c.candidate.error is None
    assert fell_back > 0
    for value in (*result.decisions.values, *result.comparisons.values):
        doc = msgspec.json.decode(value)
        struct = msgspec.json.decode(value, type=Decision if "arm" in doc else Comparison)
        assert list(doc.items()) == list(msgspec.json.decode(ENC.encode(struct)).items())
