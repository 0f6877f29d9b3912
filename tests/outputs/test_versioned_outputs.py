"""Versioned outputs without Kafka: every older version of a batch's decisions, through
declarative and callable adapters, on the template path and the general path, in one and two
stages; their headers; and each version's output validated against its JSON Schema."""

from __future__ import annotations

import copy
from typing import Any

import msgspec
import numpy as np
import pytest
from kafka_helpers import make_config
from records import Rec

from sidecar.config import SidecarConfig
from sidecar.errors import ConfigError
from sidecar.examples import fraud
from sidecar.examples.outputs import V1, LegacyDecision
from sidecar.models import load_model
from sidecar.outputs import OutputState, compile_adapter
from sidecar.outputs.lifecycle import deprecation_value, sunset_value
from sidecar.pipeline import BatchResult, Pipeline
from sidecar.routing import Mode, RoutingPolicy

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (a dev dependency) validates")

ENC = msgspec.json.Encoder()
V1_TOPIC, V0_TOPIC = "out.decisions.v1", "out.decisions.v0"
SUNSET_MS = 1_800_000_000_000


def versions(**v1: Any) -> dict[str, Any]:
    return {
        "api_version": "v2",
        "versions": [
            {"version": "v1", "topic": V1_TOPIC, **copy.deepcopy(V1), **v1},
            {
                "version": "v0",
                "topic": V0_TOPIC,
                "adapter": "sidecar.examples.outputs:legacy",
                "struct": "sidecar.examples.outputs:LegacyDecision",
            },
        ],
    }


def config(outputs: dict[str, Any] | None = None, **sections: Any) -> SidecarConfig:
    return make_config("unused:9092", outputs=outputs or versions(), **sections)


def pipeline(cfg: SidecarConfig | None = None) -> Pipeline:
    cfg = cfg or config()
    assert cfg.models.candidate is not None
    return Pipeline(cfg, load_model(cfg.models.champion), load_model(cfg.models.candidate))


def records(n: int, seed: int = 0, metadata_every: int = 0) -> list[Rec]:
    out = []
    for i, doc in enumerate(fraud.request_dicts(fraud.generate(n, seed=seed))):
        if metadata_every and i % metadata_every == 0:
            doc["metadata"] = {"channel": "web", "i": i}
        out.append(Rec(ENC.encode(doc), offset=i))
    return out


def policy(mode: Mode = Mode.CANARY, share: int = 3000) -> RoutingPolicy:
    return RoutingPolicy(rollout="fraud-v2", mode=mode, canary_share_bp=share, epoch=3)


def by_id(values: list[bytes]) -> dict[str, dict[str, Any]]:
    docs = [msgspec.json.decode(v) for v in values]
    key = "request_id" if "request_id" in docs[0] else "id"
    return {d[key]: d for d in docs}


def same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert list(a) == list(b)
    for k in a:
        if isinstance(a[k], float) or isinstance(b[k], float):
            assert a[k] == pytest.approx(b[k], rel=1e-12, abs=1e-9), k
        else:
            assert a[k] == b[k], k


def check_versions(p: Pipeline, result: BatchResult) -> None:
    """Each version holds exactly the current version's records, each equal to what its
    adapter makes of that record's Decision (the general path, record by record)."""
    current = by_id(result.decisions.values)
    v1_adapter = compile_adapter(p.config.outputs.versions[0])
    v0_adapter = compile_adapter(p.config.outputs.versions[1])
    v1 = by_id(result.versions[V1_TOPIC].values)
    v0 = by_id(result.versions[V0_TOPIC].values)
    assert set(v1) == set(v0) == set(current)
    for rid, decision in current.items():
        same(v1[rid], v1_adapter.adapt_dict(decision))
        same(v0[rid], msgspec.json.decode(v0_adapter.adapt_bytes(ENC.encode(decision))))
    assert result.versions[V1_TOPIC].keys == result.decisions.keys  # same keys, same order


async def test_every_version_carries_every_decision_adapted() -> None:
    p = pipeline()
    result = await p.process(records(2000, metadata_every=7), policy())
    assert len(result.decisions) == 2000
    check_versions(p, result)
    v1 = by_id(result.versions[V1_TOPIC].values)
    some = next(iter(v1.values()))
    assert set(some) >= {"flagged", "version", "score_pct", "currency", "fallback"}
    assert not {"decision", "bucket", "policy_epoch", "score"} & set(some)
    assert {d["arm"] for d in v1.values()} == {"A", "B"}
    current = by_id(result.decisions.values)
    for rid, d in v1.items():
        assert d["score_pct"] == round(current[rid]["score"] * 100, 2)
        assert d["flagged"] is current[rid]["decision"]
    v0 = [msgspec.json.decode(v, type=LegacyDecision) for v in result.versions[V0_TOPIC].values]
    assert {d.verdict for d in v0} == {"APPROVE", "DECLINE"}


async def test_both_stages_write_every_version() -> None:
    p = pipeline()
    staged = await p.start(records(1500, seed=2), policy())
    late = await staged.finish()
    assert late is not None
    assert staged.early.versions[V1_TOPIC].values  # champion decisions, before the candidate
    result = staged.early
    result.extend(late)
    assert len(result.decisions) == 1500
    check_versions(p, result)


async def test_fallbacks_and_defaults_take_the_general_path_and_still_adapt() -> None:
    p = pipeline()
    p.champion.score = _failing(p.champion.score)  # type: ignore[method-assign]
    result = await p.process(records(300), policy())
    fallbacks = [d for d in by_id(result.decisions.values).values() if d.get("fallback")]
    assert fallbacks  # every champion-routed record fell back (to the candidate or a default)
    check_versions(p, result)


def _failing(score: Any) -> Any:
    from sidecar.contracts import ModelError
    from sidecar.models.base import BatchScores

    async def fail(matrix: np.ndarray, *_: Any, **__: Any) -> BatchScores:
        return BatchScores.failed(len(matrix), ModelError(kind="exception", message="x"), 1.0)

    return fail


async def test_headers_api_version_deprecation_sunset_link() -> None:
    p = pipeline()
    p.set_output_states(
        [
            OutputState(
                version="v1",
                deprecation_ms=1_700_000_000_000,
                sunset_ms=SUNSET_MS,
                link=V1["link"],
            )
        ]
    )
    result = await p.process(records(50), policy())
    for headers in result.decisions.headers:
        assert ("api_version", b"v2") in headers
        assert not any(k in ("deprecation", "sunset") for k, _ in headers)
    for headers in result.versions[V1_TOPIC].headers:
        h = dict(headers)
        assert h["api_version"] == b"v1"
        assert h["deprecation"] == b"@1700000000" == deprecation_value(1_700_000_000_000)
        assert h["sunset"] == sunset_value(SUNSET_MS) == b"Fri, 15 Jan 2027 08:00:00 GMT"
        assert h["link"] == (
            b'<https://example.com/fraud/decisions/v1-to-v2>; rel="deprecation"; type="text/html"'
        )
        assert "request_id" not in h  # one shared header list per version: it is in the body
    assert all(dict(h)["api_version"] == b"v0" for h in result.versions[V0_TOPIC].headers)
    assert not any("deprecation" in dict(h) for h in result.versions[V0_TOPIC].headers)


async def test_a_sunset_version_gets_nothing_and_its_adapter_is_unloaded() -> None:
    p = pipeline()
    p.set_output_states([OutputState(version="v1", sunset_at_ms=1)])
    assert p.output_versions == ["v0"]
    result = await p.process(records(100), policy())
    assert V1_TOPIC not in result.versions and len(result.versions[V0_TOPIC]) == 100
    p.set_output_states([])  # a state without the sunset can never bring it back
    assert p.output_versions == ["v0"]


async def test_without_versions_nothing_changes() -> None:
    cfg = make_config("unused:9092")
    p = Pipeline(cfg, load_model(cfg.models.champion), load_model(cfg.models.candidate))  # type: ignore[arg-type]
    result = await p.process(records(100), policy())
    assert result.versions == {}
    assert all(len(h) == 3 and h[2][0] == "schema_version" for h in result.decisions.headers)


async def test_an_adapter_that_raises_dead_letters_that_record_on_every_version() -> None:
    p = pipeline()
    bad = "req-5"
    original = p._adapters["v0"].adapt_bytes

    def sometimes(encoded: bytes) -> bytes:
        if b'"req-5"' in encoded:
            raise ValueError("no legacy shape for this one")
        return original(encoded)

    p._adapters["v0"].adapt_bytes = sometimes  # type: ignore[method-assign]
    for staged in (False, True):
        if staged:
            s = await p.start(records(200), policy(Mode.SHADOW, 0))
            result = s.early
            late = await s.finish()
            assert late is not None
            result.extend(late)
        else:
            result = await p.process(records(200), policy())
        ids = set(by_id(result.decisions.values))
        assert bad not in ids and len(ids) == 199
        assert bad not in by_id(result.versions[V1_TOPIC].values)
        assert result.dead_letter_kinds == {"processing_error": 1}
        letter = msgspec.json.decode(result.dead_letters.values[0])
        assert letter["request_id"] == bad and "output version v0" in letter["reason"]
        assert sum(result.decided_by.values()) == 199
        compared = {msgspec.json.decode(c)["request_id"] for c in result.comparisons.values}
        assert bad not in compared and len(compared) == 199  # like any dead-lettered record


async def test_an_older_version_too_big_for_its_topic_is_refused_with_all_versions() -> None:
    # v1 gets a default of ~600 bytes: its records outgrow the topic's limit, the current
    # version's do not; neither is sent, the record is dead-lettered once.
    p = pipeline(config(versions(defaults={"pad": "x" * 700})))
    p.set_record_limits({V1_TOPIC: 1100})
    result = await p.process(records(20), policy())
    assert len(result.decisions) == len(result.versions[V1_TOPIC]) == 0
    assert result.dead_letter_kinds == {"output_oversize": 20}


@pytest.mark.parametrize("staged", [False, True])
async def test_each_version_validates_against_its_schema(staged: bool) -> None:
    from sidecar.outputs.schemas import version_schemas

    cfg = config(versions(defaults={"currency": "EUR", "n": 3, "fallback": "none"}))
    p = pipeline(cfg)
    schemas = version_schemas(cfg)
    assert set(schemas) == {"v2", "v1", "v0"}
    recs = records(800, seed=4, metadata_every=5)
    if staged:
        s = await p.start(recs, policy())
        result = s.early
        late = await s.finish()
        assert late is not None
        result.extend(late)
    else:
        result = await p.process(recs, policy())
    for version, values in (
        ("v2", result.decisions.values),
        ("v1", result.versions[V1_TOPIC].values),
        ("v0", result.versions[V0_TOPIC].values),
    ):
        validator = jsonschema.Draft202012Validator(schemas[version])
        assert values
        for value in values:
            validator.validate(msgspec.json.decode(value))


def test_the_schema_catches_a_wrong_shape() -> None:
    from sidecar.outputs.schemas import version_schemas

    schema = version_schemas(config())["v1"]
    validator = jsonschema.Draft202012Validator(schema)
    good = {
        "request_id": "r",
        "routing_key": None,
        "rollout": "x",
        "model": "m",
        "version": "1.0.0",
        "arm": "A",
        "score_pct": 12.5,
        "flagged": True,
        "threshold": 0.5,
        "ts": 1,
        "fallback": "none",
        "currency": "EUR",
    }
    validator.validate(good)
    for broken in (
        {k: v for k, v in good.items() if k != "flagged"},  # a renamed field missing
        {**good, "arm": "champion"},  # an unmapped value
        {**good, "flagged": "yes"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(broken)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rename": {"nope": "x"}}, "does not have"),
        ({"drop": ["score"], "map": {"score": {"scale": 2.0}}}, "both dropped"),
        ({"map": {"request_id": {"values": {"a": "b"}}}}, "not mapped"),
        ({"map": {"score": {"values": {"1": 2}}}}, "scale"),
        ({"map": {"decision": {"scale": 2.0}}}, "use values"),
        ({"map": {"arm": {}}}, "needs values"),
        ({"rename": {"score": "x", "decision": "x"}}, "several fields"),
        ({"sunset": "2020-01-01", "deprecation": "2021-01-01"}, "before deprecation"),
        ({"link": "javascript:<x>"}, "not a URL"),
        ({"sunset": "soon"}, "expected a date"),
    ],
)
def test_config_errors_name_the_problem(change: dict[str, Any], message: str) -> None:
    spec = {**{"version": "v1", "topic": V1_TOPIC}, **change}
    with pytest.raises(ConfigError, match=message):
        config({"api_version": "v2", "versions": [spec]})


def test_versions_need_a_current_name_distinct_names_and_their_own_topics() -> None:
    one = {"version": "v1", "topic": V1_TOPIC}
    with pytest.raises(ConfigError, match="api_version"):
        config({"versions": [one]})
    with pytest.raises(ConfigError, match="used twice"):
        config({"api_version": "v1", "versions": [one]})
    with pytest.raises(ConfigError, match="its own"):
        config(
            {
                "api_version": "v2",
                "versions": [{"version": "v1", "topic": "x"}, {"version": "v0", "topic": "x"}],
            }
        )
    with pytest.raises(ConfigError, match="its own"):
        config(
            {"api_version": "v2", "versions": [{"version": "v1", "topic": "same.decisions"}]},
            topics={"decisions": "same.decisions"},
        )
    # Topics listed after the versions' (the outcomes stage's) and its internal ones count too.
    base = config()
    for taken in (
        base.outcomes.verdicts_topic,
        base.outcomes.topic,
        base.outcomes.changelog_topic,
    ):
        with pytest.raises(ConfigError, match="its own"):
            config({"api_version": "v2", "versions": [{"version": "v1", "topic": taken}]})
    callable_only = {
        "version": "v0",
        "topic": V0_TOPIC,
        "adapter": "sidecar.examples.outputs:legacy",
    }
    cfg = config({"api_version": "v2", "versions": [callable_only]})  # imported at start-up
    with pytest.raises(ConfigError, match="needs struct"):
        pipeline(cfg)
    wrong = {**callable_only, "struct": "sidecar.examples.outputs:legacy"}
    with pytest.raises(ConfigError, match="not a msgspec Struct"):
        pipeline(config({"api_version": "v2", "versions": [wrong]}))


def test_a_config_with_versions_lists_their_topics() -> None:
    cfg = config()
    assert V1_TOPIC in cfg.all_topics() and V0_TOPIC in cfg.all_topics()


def test_declarative_map_rules() -> None:
    adapter = compile_adapter(
        msgspec.convert(
            {
                "version": "v1",
                "topic": "t",
                "map": {
                    "score": {"scale": 10.0, "offset": 1.0, "round": 0},
                    "policy_mode": {"values": {"canary": "C"}, "other": "?"},
                    "fallback": {"values": {"null": "none"}},
                },
            },
            type=__import__("sidecar.outputs", fromlist=["OutputVersion"]).OutputVersion,
        )
    )
    out = adapter.adapt_dict({"score": 0.46, "policy_mode": "shadow", "fallback": None})
    assert out == {"score": 6, "policy_mode": "?", "fallback": "none"}
    assert adapter.adapt_dict({"score": None, "policy_mode": "canary"}) == {
        "score": None,
        "policy_mode": "C",
    }
    texts = adapter.slot_texts("score", np.array([0.46, np.nan, 0.04]))  # type: ignore[union-attr]
    assert texts == ["6", "null", "1"]


def test_the_example_config_schemas_are_current() -> None:
    from pathlib import Path

    from sidecar.config import load_config
    from sidecar.outputs.schemas import stale

    root = Path(__file__).resolve().parent.parent.parent
    cfg = load_config(root / "examples" / "migrate.toml", env={})
    assert not stale(cfg, root / "examples" / "schemas"), (
        "run `sidecar schemas --config examples/migrate.toml --write`"
    )
