"""The data path, top to bottom, for one batch of request records (no Kafka in here).

    raw records -> decode + validate -> route (one policy per batch) -> score both models
    concurrently, off the event loop -> choose the deciding arm per record (with fallbacks)
    -> encode decisions, comparisons and dead letters

The Kafka loop (:mod:`sidecar.runner`) feeds it consumer records and produces what it returns.
Everything per batch is vectorised with numpy; the one per-record loop only formats outputs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import operator
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import numpy as np

from .config import SidecarConfig
from .contracts import (
    OUTPUT_SCHEMA_VERSION,
    Comparison,
    Decision,
    ModelError,
    ModelResult,
)
from .dead_letters import DeadLetterWriter, keep_bytes, where
from .decoding import DecodedBatch, RawRecord, Rejected, RequestDecoder
from .encoding import (
    JSON_BOOL_BYTES,
    escape,
    json_number_bytes,
    json_numbers,
    needs_escape,
    raw_json,
    template,
)
from .models.base import BatchScores, BoolArray, ScoringModel
from .models.validation import RangeValidator
from .outputs.adapters import Adapter, DeclarativeAdapter, compile_adapter
from .outputs.lifecycle import OutputState, configured_outputs, version_headers
from .routing import RoutingPolicy
from .untrusted import error_text

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]
K = TypeVar("K")
#: Bytes the record framing and our headers add to an output record's key and value.
_RECORD_OVERHEAD_BYTES = 512
_SCHEMA_HEADER = ("schema_version", OUTPUT_SCHEMA_VERSION.encode())
_COMPARISON_HEADERS: Headers = [_SCHEMA_HEADER]
_SKIPPED = ModelError(kind="skipped", message="not scored: policy scores only the deciding arm")
_NO_CANDIDATE = ModelError(kind="unavailable", message="no candidate model configured")
_SHED = ModelError(
    kind="shed",
    message="not scored: the candidate lane was full (pipeline.candidate_backlog batches "
    "waiting for the candidate); the champion decided",
)
#: Placeholder for the candidate while the first stage writes champion decisions.
_PENDING = ModelError(kind="skipped", message="pending")

# Per-record choice codes (see Pipeline._choose).
_CHAMPION, _CANDIDATE, _DEFAULT, _DEAD_LETTER = 0, 1, 2, 3
#: Per choice: the arm its comparison names as ``served_by`` (a default decision is the
#: champion's; a dead-lettered record was served by none).
_SERVED_BY: tuple[int | None, ...] = (_CHAMPION, _CANDIDATE, _CHAMPION, None)
_ARM_NAMES = ("champion", "candidate", "default", "dead_letter")
#: Score and decision slots of a scored arm's ModelResult, per output kind.
_OK_SLOTS: dict[str, tuple[str, ...]] = {
    "binary": ("score", "decision"),
    "multiclass": ("score",),
}
#: Template slots filled with JSON text rather than string bodies.
_RAW = frozenset(
    {
        "score",
        "decision",
        "bucket",
        "ts",
        "champion",
        "candidate",
        "c_score",
        "c_decision",
        "k_score",
        "k_decision",
        "fallback",
    }
)


@dataclass(slots=True)
class TopicOutput:
    """Parallel lists of key, value and headers for one output topic."""

    keys: list[bytes] = field(default_factory=list)
    values: list[bytes] = field(default_factory=list)
    headers: list[Headers] = field(default_factory=list)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter((self.keys, self.values, self.headers))

    def __len__(self) -> int:
        return len(self.values)


@dataclass(slots=True)
class BatchResult:
    """Everything one input batch produces, ready to send."""

    decisions: TopicOutput = field(default_factory=TopicOutput)
    comparisons: TopicOutput = field(default_factory=TopicOutput)
    dead_letters: TopicOutput = field(default_factory=TopicOutput)
    #: Decisions per choice (champion / candidate / default), for metrics.
    decided_by: dict[str, int] = field(default_factory=dict)
    dead_letter_kinds: dict[str, int] = field(default_factory=dict)
    champion: BatchScores | None = None
    candidate: BatchScores | None = None
    policy: RoutingPolicy | None = None
    #: Records encoded as full Structs (fallbacks, metadata) rather than templates.
    slow_path: int = 0
    #: Values outside a manifest's allowed range, per (arm, feature).
    out_of_range: dict[tuple[str, str], int] = field(default_factory=dict)
    #: Records the policy gave the champion but the candidate decided, because the champion
    #: failed (``rollout.champion_failure = "fallback_candidate"``).
    champion_fallbacks: int = 0
    #: The older API versions of ``decisions`` (``outputs.versions``), by topic: the same
    #: records, through each version's adapter (empty unless versions are configured).
    versions: dict[str, TopicOutput] = field(default_factory=dict)

    def extend(self, other: BatchResult) -> None:
        """Append ``other``'s outputs (a later part of the same batch) and counts. The
        model scores of the first part stand for the batch (they only feed latency
        metrics)."""
        for mine, theirs in (
            (self.decisions, other.decisions),
            (self.comparisons, other.comparisons),
            (self.dead_letters, other.dead_letters),
        ):
            mine.keys.extend(theirs.keys)
            mine.values.extend(theirs.values)
            mine.headers.extend(theirs.headers)
        for topic, theirs in other.versions.items():
            mine = self.versions.setdefault(topic, TopicOutput())
            mine.keys.extend(theirs.keys)
            mine.values.extend(theirs.values)
            mine.headers.extend(theirs.headers)
        _add_counts(self.decided_by, other.decided_by)
        _add_counts(self.dead_letter_kinds, other.dead_letter_kinds)
        _add_counts(self.out_of_range, other.out_of_range)
        self.champion = self.champion or other.champion
        self.candidate = self.candidate or other.candidate
        self.slow_path += other.slow_path
        self.champion_fallbacks += other.champion_fallbacks


@dataclass(frozen=True, slots=True)
class _Output:
    """An older output version being served: its adapter and the headers of its records."""

    adapter: Adapter
    headers: Headers


def _add_counts(counts: dict[K, int], more: dict[K, int]) -> None:
    for key, n in more.items():
        counts[key] = counts.get(key, 0) + n


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class _BatchFormats:
    """Output templates for one batch: everything constant within the batch is baked in."""

    def __init__(
        self,
        pipeline: Pipeline,
        policy: RoutingPolicy,
        champion: BatchScores,
        candidate: BatchScores,
    ) -> None:
        self.decided_at = now_ms()
        models = (pipeline.champion, pipeline.candidate)
        self.latency = (round(champion.latency_ms, 3), round(candidate.latency_ms, 3))
        self.version_headers = tuple(
            ("model_version", (m.version if m else "").encode()) for m in models
        )
        self._policy, self._models = policy, models
        self._fallbacks: dict[tuple[int, int], tuple[tuple[bytes, bytes], bytes]] = {}
        # decision[arm][has_routing_key]; slots: request_id, routing_key, score, decision,
        # bucket, ts.
        self.decision = tuple(
            self._decision_pair(arm, arm, None) if m is not None else (b"", b"")
            for arm, m in enumerate(models)
        )
        self._scores = (champion, candidate)

    # The comparison templates are made when a stage first needs them: the first stage of
    # a batch writes no comparison, and the fragment ones serve only batches where an arm
    # failed.

    @functools.cached_property
    def comparison(self) -> dict[int | None, tuple[bytes, bytes]]:
        """``[served_by][has_routing_key]``: arms given as ready-made JSON fragments (slots:
        request_id, routing_key, ts, champion, candidate)."""
        return {
            served: self._comparison_pair(
                self._policy, served, "@@champion@@", "@@candidate@@", ("champion", "candidate")
            )
            for served in (_CHAMPION, _CANDIDATE, None)
        }

    @functools.cached_property
    def comparison_both(self) -> tuple[tuple[bytes, bytes], ...]:
        """``[served_by][has_routing_key]``: both arms scored (the common case); slots:
        request_id, routing_key, ts, champion score and decision, candidate score and
        decision."""
        models = self._models
        return tuple(
            self._comparison_pair(
                self._policy,
                served,
                _scored(models[0], "c", self.latency[0]),
                _scored(models[1], "k", self.latency[1]),
                ("c_score", "c_decision", "k_score", "k_decision"),
            )
            for served in (_CHAMPION, _CANDIDATE)
        )

    @functools.cached_property
    def _arm_results(self) -> tuple[list[tuple[str, ...]], list[bytes], list[bytes]]:
        """Each arm's ModelResult templates: scored (with its score and decision slots) and
        failed."""
        ok, err = [], []
        # A multiclass model's result has a score (the label's probability) and no decision;
        # regression and ranking results neither (their output is in the kind's fields).
        ok_slots: list[tuple[str, ...]] = []
        for arm, (m, scores) in enumerate(zip(self._models, self._scores, strict=True)):
            name, version = (m.name, m.version) if m else ("", "")
            manifest_digest = m.manifest_digest if m else None
            kind = m.kind if m else "binary"
            slots = _OK_SLOTS.get(kind, ())
            ok_slots.append(slots)
            ok.append(
                template(
                    ModelResult(
                        model=name,
                        version=version,
                        score="@@score@@" if "score" in slots else None,  # type: ignore[arg-type]
                        decision="@@decision@@" if "decision" in slots else None,  # type: ignore[arg-type]
                        latency_ms=self.latency[arm],
                        manifest_digest=manifest_digest,
                    ),
                    slots,
                    _RAW,
                ).encode()
            )
            err.append(
                raw_json(
                    ModelResult(
                        model=name,
                        version=version,
                        latency_ms=self.latency[arm],
                        error=scores.error or scores.record_error,
                        manifest_digest=manifest_digest,
                    )
                ).encode()
            )
        return ok_slots, ok, err

    @property
    def champion_error(self) -> bytes:
        return self._arm_results[2][_CHAMPION]

    @property
    def candidate_error(self) -> bytes:
        return self._arm_results[2][_CANDIDATE]

    def prototype(self, arm: int, routed: int, fallback: str | None, keyed: bool) -> Decision:
        """The Decision a template is made from: every per-record field a sentinel slot (an
        older output version's adapter templates from it too)."""
        m = self._models[arm]
        assert m is not None
        return Decision(
            request_id="@@request_id@@",
            routing_key="@@routing_key@@" if keyed else None,
            rollout=self._policy.rollout,
            model=m.name,
            model_version=m.version,
            arm=_ARM_NAMES[arm],  # type: ignore[arg-type]
            routed_arm=_ARM_NAMES[routed],  # type: ignore[arg-type]
            score="@@score@@",  # type: ignore[arg-type]
            decision="@@decision@@",  # type: ignore[arg-type]
            threshold=m.threshold if m.kind == "binary" else None,
            policy_epoch=self._policy.epoch,
            policy_mode=self._policy.mode.value,
            bucket="@@bucket@@",  # type: ignore[arg-type]
            ts="@@ts@@",  # type: ignore[arg-type]
            decided_at=self.decided_at,
            latency_ms=self.latency[arm],
            fallback=fallback,
            manifest_digest=m.manifest_digest,
        )

    def arm_column(
        self,
        arm: int,
        scores: list[bytes],
        decisions: list[bytes],
        valid: BoolArray,
        extra: list[bytes] | None,
    ) -> list[bytes]:
        """Arm ``arm``'s ModelResult as JSON for every record of the batch, whatever its
        output kind: its scored template where the record is valid, its error otherwise
        (one format per record, columns zipped at C speed)."""
        ok_slots, ok, errors = self._arm_results
        error = errors[arm]
        n = len(valid)
        if not valid.any():
            return [error] * n
        tmpl = ok[arm]
        slots = len(ok_slots[arm])
        if slots == 2:
            column = list(map(tmpl.__mod__, zip(scores, decisions, strict=True)))
        elif slots == 1:
            column = list(map(tmpl.__mod__, scores))
        else:
            column = [tmpl] * n
        if extra is not None:  # a non-binary output: its fields come last
            column = [c[:-1] + e + b"}" for c, e in zip(column, extra, strict=True)]
        if not valid.all():
            column = [c if v else error for c, v in zip(column, valid.tolist(), strict=True)]
        return column

    def _decision_pair(self, arm: int, routed: int, fallback: str | None) -> tuple[bytes, bytes]:
        """Decision templates of ``arm`` deciding records routed to ``routed``, without and
        with a routing key; a fallback (``arm != routed``) adds the ``fallback`` slot."""
        slots: tuple[str, ...] = ("request_id", "routing_key", "score", "decision", "bucket", "ts")
        if fallback is not None:
            slots += ("fallback",)
        unkeyed, keyed = (
            _template_optional(self.prototype(arm, routed, fallback, keyed), slots, _RAW, keyed)
            for keyed in (False, True)
        )
        return unkeyed, keyed

    def fallback(self, arm: int, routed: int, reason: str) -> tuple[tuple[bytes, bytes], bytes]:
        """The decision templates of records ``arm`` decided because ``routed`` failed, and
        the JSON text of ``reason`` for their ``fallback`` slot. The reason (a model's error
        text) is a slot, never part of the template: it may hold anything. Built once per
        batch and direction."""
        key = (arm, routed)
        found = self._fallbacks.get(key)
        if found is None:
            found = self._fallbacks[key] = (
                self._decision_pair(arm, routed, "@@fallback@@"),
                raw_json(reason).encode(),
            )
        return found

    @staticmethod
    def _comparison_pair(
        policy: RoutingPolicy,
        served: int | None,
        champion: ModelResult | str,
        candidate: ModelResult | str,
        arm_slots: tuple[str, ...],
    ) -> tuple[bytes, bytes]:
        """Comparison templates without and with a routing key, for one ``served_by``."""
        unkeyed, keyed = (
            _template_optional(
                Comparison(
                    request_id="@@request_id@@",
                    routing_key="@@routing_key@@" if has_key else None,
                    rollout=policy.rollout,
                    ts="@@ts@@",  # type: ignore[arg-type]
                    policy_epoch=policy.epoch,
                    policy_mode=policy.mode.value,
                    served_by=None if served is None else _ARM_NAMES[served],  # type: ignore[arg-type]
                    champion=champion,  # type: ignore[arg-type]
                    candidate=candidate,  # type: ignore[arg-type]
                ),
                ("request_id", "routing_key", "ts", *arm_slots),
                _RAW,
                has_key,
            )
            for has_key in (False, True)
        )
        return unkeyed, keyed


class _Texts:
    """A batch's per-record values as JSON text (bytes), made once for its two stages:
    request ids and routing keys as string bodies (escaped only when needed), the ids as
    header values, event times, routing buckets, and each arm's scores and decisions."""

    __slots__ = ("_arms", "buckets", "header_ids", "ids", "keys", "longest_key", "ts")

    def __init__(self, batch: DecodedBatch, key_bytes: list[bytes], buckets: np.ndarray) -> None:
        ids, keys = batch.request_ids, batch.routing_keys
        self.header_ids = [t.encode() for t in ids]
        self.ids = (
            [escape(t).encode() for t in ids] if needs_escape("".join(ids)) else self.header_ids
        )
        self.keys = [escape(t).encode() for t in keys] if needs_escape("".join(keys)) else key_bytes
        self.ts = json_number_bytes(batch.ts)
        self.buckets = json_number_bytes(buckets.tolist())
        #: Bytes of the longest Kafka key (routing key) of the batch.
        self.longest_key = max(map(len, key_bytes), default=0)
        self._arms: dict[int, tuple[BatchScores, list[bytes], list[bytes]]] = {}

    @staticmethod
    def of(batch: DecodedBatch, key_bytes: list[bytes], buckets: np.ndarray) -> _Texts:
        texts = batch.texts
        if texts is None:
            texts = batch.texts = _Texts(batch, key_bytes, buckets)
        return texts  # type: ignore[no-any-return]

    def arm(
        self, model: ScoringModel | None, scores: BatchScores
    ) -> tuple[list[bytes], list[bytes]]:
        """``scores``' scores and decisions as JSON (``null`` decisions for the kinds other
        than binary: their decision is a label, a band or a ranking)."""
        found = self._arms.get(id(scores))
        if found is None or found[0] is not scores:
            n = len(scores.valid)
            if (
                scores.error is not None
                and not scores.decisions.any()
                and np.isnan(scores.scores).all()
            ):  # failed, skipped or pending as a whole: every score null, no decision
                found = (scores, [b"null"] * n, [b"false" if _binary(model) else b"null"] * n)
                self._arms[id(scores)] = found
                return found[1], found[2]
            if _binary(model):
                decisions = _BOOL_TEXTS[scores.decisions.astype(np.uint8)].tolist()
            else:
                decisions = [b"null"] * n
            found = (scores, json_number_bytes(scores.scores.tolist()), decisions)
            self._arms[id(scores)] = found
        return found[1], found[2]


_BOOL_TEXTS = np.array(JSON_BOOL_BYTES, dtype=object)


def _binary(model: ScoringModel | None) -> bool:
    return model is None or model.kind == "binary"


def _fragments(scores: BatchScores) -> list[bytes] | None:
    """A non-binary arm's per-record output fields as JSON bytes (None for binary)."""
    if scores.fragments is None:
        return None
    return [f.encode() for f in scores.fragments]


def _scored(model: ScoringModel | None, prefix: str, latency_ms: float) -> ModelResult:
    """A prototype ModelResult whose score and decision are template slots."""
    return ModelResult(
        model=model.name if model else "",
        version=model.version if model else "",
        score=f"@@{prefix}_score@@",  # type: ignore[arg-type]
        decision=f"@@{prefix}_decision@@",  # type: ignore[arg-type]
        latency_ms=latency_ms,
        manifest_digest=model.manifest_digest if model else None,
    )


def _template_optional(
    proto: msgspec.Struct, slots: tuple[str, ...], raw: frozenset[str], keyed: bool
) -> bytes:
    """The bytes ``template`` for a prototype whose
    routing_key is a slot when ``keyed`` and encoded as null otherwise. Both take the same
    arguments (unkeyed ones ignore the routing key's), so a batch formats every record with
    one argument shape whichever template it takes."""
    ignored = frozenset() if keyed else frozenset({"routing_key"})
    return template(proto, slots, raw, ignored=ignored).encode()


class Pipeline:
    """Scores batches for one rollout. Build once per process; ``process`` is the hot path."""

    def __init__(
        self, config: SidecarConfig, champion: ScoringModel, candidate: ScoringModel | None
    ) -> None:
        self.config = config
        self.champion = champion
        self.candidate = candidate
        models = [champion.config] + ([candidate.config] if candidate else [])
        self.decoder = RequestDecoder(models, config.input)
        self._champion_cols = self.decoder.columns_of(champion.config)
        self._candidate_cols = self.decoder.columns_of(candidate.config) if candidate else []
        self._encoder = msgspec.json.Encoder()
        self._failure_policy = config.rollout.champion_failure
        self._requests_topic = config.topics.requests
        self._comparisons_by_routing_key = config.shared_rollouts
        self._validator = RangeValidator(
            self.decoder.columns,
            [("champion", champion.manifest)]
            + ([("candidate", candidate.manifest)] if candidate else []),
            strict=config.request_contract.validation == "strict",
        )
        self._shadow_only = candidate is not None and candidate.config.shadow_only
        #: Champion calls tried a second time after a timeout.
        self.champion_retries = 0
        outputs = config.outputs
        self._api_header = (
            ("api_version", outputs.api_version.encode()) if outputs.api_version else None
        )
        self._adapters = {v.version: compile_adapter(v) for v in outputs.versions}
        #: The older output versions served now (sunset ones left out), with their headers.
        self._outputs: tuple[_Output, ...] = ()
        self.set_record_limits({})
        self.set_output_states(configured_outputs(outputs.versions))

    @property
    def output_versions(self) -> list[str]:
        """The older output versions served now (a sunset one is not)."""
        return [o.adapter.version for o in self._outputs]

    def set_output_states(self, states: Sequence[OutputState]) -> None:
        """Serve each configured older version as ``states`` say: its deprecation headers, and
        none of its records once it is sunset (its adapter is unloaded). Applies from the next
        batch on; both stages of a batch use the versions of its start."""
        by_name = {s.version: s for s in states}
        outputs = []
        for name, adapter in self._adapters.items():
            state = by_name.get(name, OutputState(version=name))
            if state.is_sunset:
                continue
            outputs.append(_Output(adapter, version_headers(state)))
        self._outputs = tuple(outputs)
        sunset = sorted(set(self._adapters) - {o.adapter.version for o in outputs})
        if sunset:
            # Unload: a sunset version is never served again by this process.
            for name in sunset:
                self._adapters.pop(name, None)
                log.info("output version %s is sunset: its adapter is unloaded", name)

    def set_record_limits(self, limits: dict[str, int]) -> None:
        """Largest record each output topic takes (``sidecar.kafka.topics.record_limits``);
        topics not given take ``kafka.max_record_bytes``."""
        t = self.config.topics
        default = self.config.kafka.max_record_bytes
        self._decision_limit = limits.get(t.decisions, default) - _RECORD_OVERHEAD_BYTES
        self._comparison_limit = limits.get(t.comparisons, default) - _RECORD_OVERHEAD_BYTES
        self._version_limits = {
            v.topic: limits.get(v.topic, default) - _RECORD_OVERHEAD_BYTES
            for v in self.config.outputs.versions
        }
        dl = self.config.dead_letter
        self._dead_letters = DeadLetterWriter(
            keep_bytes(dl.max_value_bytes, limits.get(t.dead_letter, default), dl.max_header_bytes),
            dl.max_header_bytes,
        )

    async def process(self, records: list[RawRecord], policy: RoutingPolicy) -> BatchResult:
        """Everything ``records`` produce under ``policy``. Never raises because of a record:
        an unexpected error is isolated to the record(s) causing it by bisecting the batch;
        those become dead letters (``processing_error``) and the rest is served, the way
        Kafka Streams' exception handlers continue past a poison record."""
        try:
            return await self._process(records, policy)
        except Exception as exc:
            log.error(
                "processing a batch of %d records raised %s; isolating the record(s) that cause it",
                len(records),
                error_text(exc),
                exc_info=exc,
            )
            error = exc
        result = BatchResult(policy=policy)
        await self._split(records, policy, result, error)
        return result

    async def _split(
        self, records: list[RawRecord], policy: RoutingPolicy, result: BatchResult, error: Exception
    ) -> None:
        """``records`` failed with ``error``: process each half (in order), splitting again
        whatever fails, down to the single records that fail alone."""
        if len(records) > 1:
            mid = len(records) // 2
            for half in (records[:mid], records[mid:]):
                try:
                    result.extend(await self._process(half, policy))
                except Exception as exc:
                    await self._split(half, policy, result, exc)
            return
        log.error("record %s is a poison pill: %s", where(records[0]), error_text(error))
        self._dead_letter(
            result,
            Rejected(
                records[0],
                "processing_error",
                f"processing this record raised {error_text(error)}; the rest of its batch "
                "was served. This is a bug: please report it with this dead letter",
            ),
        )

    async def start(
        self, records: list[RawRecord], policy: RoutingPolicy, *, shed_candidate: bool = False
    ) -> StagedBatch:
        """Stage one of a batch: decode, route, score the champion, and write the decisions
        the champion makes (``early``) -- without waiting for the candidate, which scores
        meanwhile; :meth:`StagedBatch.finish` gives the rest (the candidate's decisions,
        fallbacks, every comparison) once the candidate answered or its timeout passed.

        ``shed_candidate``: the candidate lane is full, so the candidate is not asked at all
        (its comparisons say ``shed``; records routed to it are decided by the champion).
        A batch that raises here goes through :meth:`process`, which isolates the record.
        """
        try:
            return await self._start(records, policy, shed_candidate, staged=True)
        except Exception as exc:
            log.error(
                "staging a batch of %d records raised %s; processing it whole instead",
                len(records),
                error_text(exc),
                exc_info=exc,
            )
        return StagedBatch(await self.process(records, policy), None)

    async def _process(self, records: list[RawRecord], policy: RoutingPolicy) -> BatchResult:
        """One stage: both arms awaited, outputs in record order."""
        return (await self._start(records, policy, False, staged=False)).early

    async def _start(
        self,
        records: list[RawRecord],
        policy: RoutingPolicy,
        shed_candidate: bool,
        *,
        staged: bool,
    ) -> StagedBatch:
        batch = self.decoder.decode(records)
        outputs = self._outputs  # one set of versions for both stages of the batch
        result = BatchResult(policy=policy)
        batch, out_of_range, flagged = self._validator.apply(batch, result.out_of_range)
        for rejected in batch.rejected + out_of_range:
            self._dead_letter(result, rejected)
        if not len(batch):
            return StagedBatch(result, None)
        # Encoded once: the routing hash and the decisions' Kafka keys both use these bytes.
        key_bytes = [k.encode() for k in batch.routing_keys]
        buckets, candidate_decides = policy.route(key_bytes)
        if self._shadow_only:  # may break the contracts: never lets it decide
            candidate_decides = np.zeros_like(candidate_decides)
        n = len(batch)
        known = self._candidate_job(batch, policy, candidate_decides, shed_candidate)
        candidate_job: BatchScores | asyncio.Future[BatchScores]
        if not isinstance(known, BatchScores):
            # Asked: it scores on its own while the champion does, and nobody waits for it
            # but the records it decides and the comparisons.
            candidate_job = asyncio.ensure_future(known)
        elif staged and shed_candidate:
            # Shed because earlier batches' candidate stages are still running: this one's
            # second stage (known already) queues behind theirs, so the decisions of the
            # keys routed to the candidate stay in order.
            candidate_job = asyncio.get_running_loop().create_future()
            candidate_job.set_result(known)
        else:
            candidate_job = known
        run_champion = policy.scores_champion or not candidate_decides.all()
        champion = await self._score_champion(batch) if run_champion else _SKIPPED_SCORES(n)
        result.champion = champion
        if not staged and not isinstance(candidate_job, BatchScores):
            candidate_job = await candidate_job
        if isinstance(candidate_job, BatchScores):  # known already: one stage
            result.candidate = candidate_job
            self._assemble(
                result,
                batch,
                key_bytes,
                policy,
                buckets,
                candidate_decides,
                champion,
                candidate_job,
                flagged,
                outputs=outputs,
            )
            return StagedBatch(result, None)
        # The champion's own decisions leave now: records it is routed and scored.
        early = ~candidate_decides & champion.valid
        dropped = (
            self._early_decisions(
                result, batch, key_bytes, policy, buckets, champion, early, outputs
            )
            if early.any()
            else []
        )
        job = candidate_job

        async def finish() -> BatchResult:
            candidate = await job
            late = BatchResult(policy=policy, champion=champion, candidate=candidate)
            self._assemble(
                late,
                batch,
                key_bytes,
                policy,
                buckets,
                candidate_decides,
                champion,
                candidate,
                flagged,
                decided=early,
                dropped=dropped,
                outputs=outputs,
            )
            return late

        return StagedBatch(result, finish)

    def _candidate_job(
        self,
        batch: DecodedBatch,
        policy: RoutingPolicy,
        candidate_decides: np.ndarray,
        shed: bool,
    ) -> BatchScores | Coroutine[Any, Any, BatchScores]:
        """The candidate's scores when they are known without asking it (none, skipped,
        shed), else the call that asks it."""
        n = len(batch)
        if self.candidate is None:
            return BatchScores.failed(n, _NO_CANDIDATE, 0.0)
        if not (policy.scores_candidate or candidate_decides.any()):
            return _SKIPPED_SCORES(n)
        if shed:
            return BatchScores.failed(n, _SHED, 0.0)
        return self.candidate.score(batch.matrix[:, self._candidate_cols], batch.items)

    async def _score_champion(self, batch: DecodedBatch) -> BatchScores:
        """The champion's scores; a call that timed out (a stall, a GC pause) is tried once
        more before its records get a fallback or a default decision."""
        matrix = batch.matrix[:, self._champion_cols]
        scores = await self.champion.score(matrix, batch.items)
        if scores.error is not None and scores.error.kind == "timeout":
            self.champion_retries += 1
            log.warning("champion timed out on a batch of %d; trying once more", len(batch))
            scores = await self.champion.score(matrix, batch.items, patient=True)
        return scores

    def _texts(self, batch: DecodedBatch) -> tuple[list[str], list[str]]:
        """Request ids and routing keys as JSON string bodies (escaped only when needed)."""
        ids, keys = batch.request_ids, batch.routing_keys
        if needs_escape("".join(ids)) or needs_escape("".join(keys)):
            return [escape(t) for t in ids], [escape(t) for t in keys]
        return ids, keys

    def _early_decisions(
        self,
        result: BatchResult,
        batch: DecodedBatch,
        key_bytes: list[bytes],
        policy: RoutingPolicy,
        buckets: np.ndarray,
        champion: BatchScores,
        rows_mask: np.ndarray,
        outputs: tuple[_Output, ...] = (),
    ) -> list[int]:
        """The decisions of ``rows_mask`` (routed to the champion, scored by it), written
        before the candidate has answered. Returns the rows dead-lettered instead (a decision
        too big for its topic, or one an older output version refused): the late stage
        writes no comparison for them either."""
        n = len(batch)
        pending = BatchScores.failed(n, _PENDING, 0.0)
        fmt = _BatchFormats(self, policy, champion, pending)
        texts = _Texts.of(batch, key_bytes, buckets)
        choice_list = [_CHAMPION] * n
        dec_values: list[bytes | None] = [None] * n
        dec_headers: list[Headers | None] = [None] * n
        rows = np.flatnonzero(rows_mask).tolist()
        routed_list = [_CHAMPION] * n
        bucket_list = buckets.tolist()
        self._write_decisions(
            batch,
            rows,
            choice_list,
            routed_list,
            policy,
            fmt,
            texts,
            bucket_list,
            champion,
            pending,
            dec_values,
            dec_headers,
            result,
        )
        dropped = sorted(_too_big(dec_values, key_bytes, self._decision_limit, texts.longest_key))
        for i in dropped:  # dead-lettered: the late stage writes no comparison either
            self._dead_letter(result, self._oversize(batch, i, dec_values[i], None))
            dec_values[i] = None
        versions: list[list[bytes | None]] = []
        refused: set[int] = set()
        if outputs:
            versions, refused = self._write_versions(
                outputs,
                batch,
                rows,
                choice_list,
                routed_list,
                fmt,
                bucket_list,
                champion,
                pending,
                key_bytes,
                dec_values,
                result,
            )
        self._emit_decisions(result, batch, key_bytes, dec_values, dec_headers, outputs, versions)
        dropped = sorted(set(dropped) | refused)
        counted = rows_mask.copy()
        counted[dropped] = False
        _count_choices(result, np.asarray(choice_list)[counted])
        return dropped

    def _write_decisions(
        self,
        batch: DecodedBatch,
        rows: list[int],
        choice_list: list[int],
        routed_list: list[int],
        policy: RoutingPolicy,
        fmt: _BatchFormats,
        texts: _Texts,
        bucket_list: list[int],
        champion: BatchScores,
        candidate: BatchScores,
        dec_values: list[bytes | None],
        dec_headers: list[Headers | None],
        result: BatchResult,
    ) -> int:
        """Decisions of ``rows``: a template format each when the routed arm decided and
        there is no metadata, else a full Struct (fallbacks, defaults, metadata) or a dead
        letter. Returns how many took the slow way."""
        champ_scores, champ_dec = texts.arm(self.champion, champion)
        cand_scores, cand_dec = texts.arm(self.candidate, candidate)
        arm_scores, arm_dec = (champ_scores, cand_scores), (champ_dec, cand_dec)
        extras = (_fragments(champion), _fragments(candidate))
        metadata, has_key, ts_list = batch.metadata, batch.has_routing_key, texts.ts
        rids, key_texts, header_ids = texts.ids, texts.keys, texts.header_ids
        bucket_texts = texts.buckets
        decision_tmpl = fmt.decision
        version_header = fmt.version_headers
        schema_header = _SCHEMA_HEADER
        if extras == (None, None):  # binary arms: templates for all but defaults and metadata
            columns = (batch, choice_list, fmt, texts, arm_scores, arm_dec, dec_values, dec_headers)
            if metadata.count(None) == len(metadata) and (
                choice_list == routed_list or all(choice_list[i] == routed_list[i] for i in rows)
            ):  # every row's routed arm decided, nothing per record to add
                self._plain_decisions(rows, *columns)
                return 0
            direct, fell_back, rest = [], [], []
            for i in rows:
                arm = choice_list[i]
                if arm > _CANDIDATE or metadata[i] is not None:
                    rest.append(i)
                elif arm == routed_list[i]:
                    direct.append(i)
                else:
                    fell_back.append(i)
            self._plain_decisions(direct, *columns)
            if fell_back:  # the routed arm failed: the other arm's templates with the reason
                scores = (champion, candidate)
                fallbacks = {
                    arm: fmt.fallback(
                        arm,
                        1 - arm,
                        f"{_ARM_NAMES[1 - arm]}_failed: "
                        f"{_error_text(scores[1 - arm].error or scores[1 - arm].record_error)}",
                    )
                    for arm in {choice_list[i] for i in fell_back}
                }
                self._plain_decisions(fell_back, *columns, fallbacks=fallbacks)
            rows = rest
        slow = 0
        for i in rows:
            arm = choice_list[i]
            if arm <= _CANDIDATE and metadata[i] is None:
                args = (
                    rids[i],
                    key_texts[i],
                    arm_scores[arm][i],
                    arm_dec[arm][i],
                    bucket_texts[i],
                    ts_list[i],
                )
                routed = routed_list[i]
                if arm == routed:
                    dec = decision_tmpl[arm][has_key[i]] % args
                else:  # a fallback: the routed arm failed
                    failed = candidate if routed == _CANDIDATE else champion
                    (unkeyed, keyed), reason = fmt.fallback(
                        arm,
                        routed,
                        f"{_ARM_NAMES[routed]}_failed: "
                        f"{_error_text(failed.error or failed.record_error)}",
                    )
                    dec = (keyed if has_key[i] else unkeyed) % (*args, reason)
                extra = extras[arm]
                if extra is not None:  # a non-binary output: its fields come last
                    dec = dec[:-1] + extra[i] + b"}"
                dec_values[i] = dec
                dec_headers[i] = [("request_id", header_ids[i]), version_header[arm], schema_header]
                continue
            slow += 1
            if arm == _DEAD_LETTER:
                self._dead_letter(
                    result,
                    Rejected(
                        batch.records[i],
                        "model_failure",
                        "champion failed and rollout.champion_failure is dead_letter: "
                        f"{_error_text(champion.error or champion.record_error)}",
                        batch.request_ids[i],
                    ),
                )
                continue
            dec_values[i], dec_headers[i] = self._slow_decision(
                batch, i, policy, fmt, arm, routed_list[i], champion, candidate, bucket_list[i]
            )
        return slow

    def _plain_decisions(
        self,
        rows: list[int],
        batch: DecodedBatch,
        choice_list: list[int],
        fmt: _BatchFormats,
        texts: _Texts,
        arm_scores: tuple[list[bytes], list[bytes]],
        arm_dec: tuple[list[bytes], list[bytes]],
        dec_values: list[bytes | None],
        dec_headers: list[Headers | None],
        fallbacks: dict[int, tuple[tuple[bytes, bytes], bytes]] | None = None,
    ) -> None:
        """:meth:`_write_decisions` of rows that need no more than a template (binary arms,
        no metadata): each row one template format, columns zipped at C speed rather than
        indexed per record. Without ``fallbacks`` every row's routed arm decided; with them
        (per deciding arm: its fallback templates and the reason's JSON text, see
        :meth:`_BatchFormats.fallback`) every row's routed arm failed and the other decided."""
        if not rows:
            return
        whole = len(rows) == len(batch)
        pick = _gather(rows, whole)
        arms = pick(choice_list)
        keyed = pick(batch.has_routing_key)
        tables = fmt.decision if fallbacks is None else {a: f[0] for a, f in fallbacks.items()}
        reasons: list[bytes] | None = None
        if len(set(arms)) == 1:
            arm = arms[0]
            scores, decided = pick(arm_scores[arm]), pick(arm_dec[arm])
            table = tables[arm]
            tmpls = [table[k] for k in keyed] if False in keyed else [table[True]] * len(rows)
            version = [fmt.version_headers[arm]] * len(rows)
            if fallbacks is not None:
                reasons = [fallbacks[arm][1]] * len(rows)
        else:  # both arms decide some rows (one stage, a canary): per row
            scores = [arm_scores[a][i] for a, i in zip(arms, rows, strict=True)]
            decided = [arm_dec[a][i] for a, i in zip(arms, rows, strict=True)]
            tmpls = [tables[a][k] for a, k in zip(arms, keyed, strict=True)]
            version = [fmt.version_headers[a] for a in arms]
            if fallbacks is not None:
                reasons = [fallbacks[a][1] for a in arms]
        columns = [
            pick(texts.ids),
            pick(texts.keys),
            scores,
            decided,
            pick(texts.buckets),
            pick(texts.ts),
        ]
        if reasons is not None:
            columns.append(reasons)
        values = list(map(bytes.__mod__, tmpls, zip(*columns, strict=True)))
        schema = _SCHEMA_HEADER
        headers: list[Headers] = [
            [("request_id", h), v, schema]
            for h, v in zip(pick(texts.header_ids), version, strict=True)
        ]
        if whole:
            dec_values[:] = values
            dec_headers[:] = headers
            return
        for i, value, header in zip(rows, values, headers, strict=True):
            dec_values[i] = value
            dec_headers[i] = header

    def _write_versions(
        self,
        outputs: tuple[_Output, ...],
        batch: DecodedBatch,
        rows: list[int],
        choice_list: list[int],
        routed_list: list[int],
        fmt: _BatchFormats,
        bucket_list: list[int],
        champion: BatchScores,
        candidate: BatchScores,
        key_bytes: list[bytes],
        dec_values: list[bytes | None],
        result: BatchResult,
    ) -> tuple[list[list[bytes | None]], set[int]]:
        """Each older output version of the decisions of ``rows`` (those not refused
        already), and the records refused: an adapter raised on it or its output does not
        fit the version's topic. A refused record is dead-lettered and gets no decision on
        any version (``dec_values`` set to None): every version carries the same records.

        Declarative adapters format the records the current version templated with their
        own batch template (see :mod:`sidecar.outputs.adapters`); the others are adapted from
        their encoded Decision.
        """
        n = len(batch)
        metadata, has_key, ts_list = batch.metadata, batch.has_routing_key, batch.ts
        texts, key_texts = self._texts(batch)
        arm_scores = (champion.scores, candidate.scores)
        arm_decisions = (champion.decisions.tolist(), candidate.decisions.tolist())
        base_scores: tuple[list[str], list[str]] | None = None
        refused: dict[int, Rejected] = {}
        versions: list[list[bytes | None]] = []
        for output in outputs:
            adapter = output.adapter
            values: list[bytes | None] = [None] * n
            versions.append(values)
            templated = adapter.templated
            if templated:
                assert isinstance(adapter, DeclarativeAdapter)
                tmpl = [
                    [
                        adapter.batch_template(fmt.prototype(arm, arm, None, keyed), keyed)
                        for keyed in (False, True)
                    ]
                    if model is not None
                    else None
                    for arm, model in enumerate((self.champion, self.candidate))
                ]
                mapped = [adapter.slot_texts("score", a) for a in arm_scores]
                if mapped[0] is None:
                    if base_scores is None:
                        base_scores = (
                            json_numbers(champion.scores.tolist()),
                            json_numbers(candidate.scores.tolist()),
                        )
                    score_texts: Sequence[list[str]] = base_scores
                else:
                    score_texts = mapped  # type: ignore[assignment]
                bucket_texts = adapter.slot_texts("bucket", np.asarray(bucket_list)) or bucket_list
                ts_texts = adapter.slot_texts("ts", np.asarray(ts_list)) or ts_list
                dec_texts = adapter.decision_texts()
            for i in rows:
                encoded = dec_values[i]
                if encoded is None or i in refused:
                    continue
                try:
                    arm = choice_list[i]
                    if templated and arm == routed_list[i] and metadata[i] is None:
                        text, pick = tmpl[arm][has_key[i]]  # type: ignore[index]
                        score = score_texts[arm][i]
                        decided = dec_texts[arm_decisions[arm][i]]
                        args: tuple[Any, ...]
                        if has_key[i]:
                            args = (
                                texts[i],
                                key_texts[i],
                                score,
                                decided,
                                bucket_texts[i],
                                ts_texts[i],
                            )
                        else:
                            args = (texts[i], score, decided, bucket_texts[i], ts_texts[i])
                        values[i] = (text % pick(args)).encode()
                    else:
                        values[i] = adapter.adapt_bytes(encoded)
                except Exception as exc:  # a callable's bug, a hostile value: this record only
                    refused[i] = Rejected(
                        batch.records[i],
                        "processing_error",
                        f"the adapter of output version {adapter.version} raised "
                        f"{error_text(exc)}; no version of its decision was sent",
                        batch.request_ids[i],
                    )
            limit = self._version_limits.get(adapter.topic, self._decision_limit)
            for i in _too_big(values, key_bytes, limit):
                refused.setdefault(i, self._oversize(batch, i, values[i], None))
        for i, rejected in sorted(refused.items()):
            self._dead_letter(result, rejected)
            dec_values[i] = None
            for values in versions:
                values[i] = None
        return versions, set(refused)

    def _emit_decisions(
        self,
        result: BatchResult,
        batch: DecodedBatch,
        key_bytes: list[bytes],
        dec_values: list[bytes | None],
        dec_headers: list[Headers | None],
        outputs: tuple[_Output, ...] = (),
        versions: Sequence[list[bytes | None]] = (),
    ) -> None:
        """The decisions of one stage, in record order: the current version, then each older
        one (headers: the current version's, with each version's own). Trace context and
        ``api_version`` are added here, and only when there is any."""
        for output, values in zip(outputs, versions, strict=True):
            out = result.versions.setdefault(output.adapter.topic, TopicOutput())
            # One shared header list per version (its api_version and lifecycle headers; the
            # request id is in the body): a distinct list per record costs the producer.
            shared = output.headers
            headers = [shared] * len(values)
            for i, found in batch.trace.items():  # rare: requests with a trace context
                headers[i] = [*shared, *found]
            if None in values:
                for i, value in enumerate(values):
                    if value is not None:
                        out.keys.append(key_bytes[i])
                        out.values.append(value)
                        out.headers.append(headers[i])
            else:
                out.keys.extend(key_bytes)
                out.values.extend(values)  # type: ignore[arg-type]
                out.headers.extend(headers)
        if self._api_header is not None:
            api = self._api_header
            for h in dec_headers:
                if h is not None:
                    h.append(api)
        if batch.trace:
            for i, found in batch.trace.items():
                h = dec_headers[i]
                if h is not None:
                    h.extend(found)
        out = result.decisions
        if None in dec_values:
            kept = [i for i, v in enumerate(dec_values) if v is not None]
            pick = _gather(kept, False)
            out.keys.extend(pick(key_bytes))
            out.values.extend(pick(dec_values))
            out.headers.extend(pick(dec_headers))
        else:
            out.keys.extend(key_bytes)
            out.values.extend(dec_values)  # type: ignore[arg-type]
            out.headers.extend(dec_headers)  # type: ignore[arg-type]

    def _oversize(
        self, batch: DecodedBatch, i: int, decision: bytes | None, comparison: bytes | None
    ) -> Rejected:
        return Rejected(
            batch.records[i],
            "output_oversize",
            f"its decision or comparison would be about "
            f"{len(decision or b'') + len(comparison or b'')} bytes, more than "
            "the output topics take (kafka.max_record_bytes or the topic's "
            "max.message.bytes); shrink its metadata or routing key",
            batch.request_ids[i],
        )

    def _assemble(
        self,
        result: BatchResult,
        batch: DecodedBatch,
        key_bytes: list[bytes],
        policy: RoutingPolicy,
        buckets: np.ndarray,
        candidate_decides: np.ndarray,
        champion: BatchScores,
        candidate: BatchScores,
        flagged: dict[int, list[str]],
        decided: np.ndarray | None = None,
        dropped: list[int] | None = None,
        outputs: tuple[_Output, ...] = (),
    ) -> None:
        """Choose the deciding arm per record (vectorised), then encode the outputs.

        ``decided`` marks records whose decision is out already (the champion's, written by
        the first stage): only their comparison is written here. A decision takes one
        template format when the routed arm decided and there is no metadata; a comparison
        takes one when both arms scored, two fragment formats when an arm failed -- a failed
        arm costs no Struct encode. Fallbacks, default decisions and metadata take the
        general path. Outputs are written by record index, so per-key order within the
        batch is kept whichever path a record took.
        """
        n = len(batch)
        choice = self._choose(candidate_decides, champion, candidate)
        fmt = _BatchFormats(self, policy, champion, candidate)
        texts = _Texts.of(batch, key_bytes, buckets)
        choice_list = choice.tolist()
        routed_list = candidate_decides.astype(np.int8).tolist()
        bucket_list = buckets.tolist()
        todo = np.ones(n, dtype=bool) if decided is None else ~decided
        dec_values: list[bytes | None] = [None] * n
        dec_headers: list[Headers | None] = [None] * n
        rows = np.flatnonzero(todo).tolist()
        result.slow_path = self._write_decisions(
            batch,
            rows,
            choice_list,
            routed_list,
            policy,
            fmt,
            texts,
            bucket_list,
            champion,
            candidate,
            dec_values,
            dec_headers,
            result,
        )
        versions: list[list[bytes | None]] = []
        refused: set[int] = set()
        if outputs:
            versions, refused = self._write_versions(
                outputs,
                batch,
                rows,
                choice_list,
                routed_list,
                fmt,
                bucket_list,
                champion,
                candidate,
                key_bytes,
                dec_values,
                result,
            )
            for i in refused:  # dead-lettered: no comparison either
                choice_list[i] = _DEAD_LETTER
        cmp_values = self._comparisons(batch, choice_list, fmt, texts, champion, candidate)
        for i, features in flagged.items():  # rare: records with out-of-range features
            cmp_values[i] = _with_out_of_range(cmp_values[i], features)
        for i in (*(dropped or ()), *refused):  # dead-lettered (by the first stage)
            cmp_values[i] = None
        if self._comparisons_by_routing_key:
            comparison_keys, longest = key_bytes, texts.longest_key
        else:
            rollout_key = policy.rollout.encode()
            comparison_keys, longest = [rollout_key] * n, len(rollout_key)
        oversize = _too_big(
            dec_values, key_bytes, self._decision_limit, texts.longest_key
        ) | _too_big(cmp_values, comparison_keys, self._comparison_limit, longest)
        for i in sorted(oversize):  # rare: a huge metadata or key; never sent, dead-lettered
            if choice_list[i] == _DEAD_LETTER or not todo[i]:
                cmp_values[i] = None  # dead-lettered or decided already: drop the comparison
                continue
            self._dead_letter(result, self._oversize(batch, i, dec_values[i], cmp_values[i]))
            dec_values[i] = cmp_values[i] = None
            for values in versions:
                values[i] = None
            choice_list[i] = _DEAD_LETTER
        out = result.comparisons
        # One shared header list: the request id is in the body, and every distinct header
        # costs the producer's record builder time per record.
        cmp_headers = [_COMPARISON_HEADERS] * n
        for i, found in batch.trace.items():  # rare: requests with a trace context
            cmp_headers[i] = [*_COMPARISON_HEADERS, *found]
        if oversize or dropped or refused:
            for i in range(n):
                if cmp_values[i] is not None:
                    out.keys.append(comparison_keys[i])
                    out.values.append(cmp_values[i])  # type: ignore[arg-type]
                    out.headers.append(cmp_headers[i])
        else:
            out.values.extend(cmp_values)  # type: ignore[arg-type]
            out.keys.extend(comparison_keys)
            out.headers.extend(cmp_headers)
        self._emit_decisions(result, batch, key_bytes, dec_values, dec_headers, outputs, versions)
        choice = np.asarray(choice_list)
        result.champion_fallbacks = int(
            np.count_nonzero((choice == _CANDIDATE) & ~candidate_decides)
        )
        _count_choices(result, choice[todo])

    def _comparisons(
        self,
        batch: DecodedBatch,
        choice_list: list[int],
        fmt: _BatchFormats,
        texts: _Texts,
        champion: BatchScores,
        candidate: BatchScores,
    ) -> list[bytes | None]:
        """Every record's comparison: both arms' results, ``served_by`` the deciding arm."""
        champ_scores, champ_dec = texts.arm(self.champion, champion)
        cand_scores, cand_dec = texts.arm(self.candidate, candidate)
        champ_extra, cand_extra = _fragments(champion), _fragments(candidate)
        has_key, ts_list = batch.has_routing_key, texts.ts
        rids, key_texts = texts.ids, texts.keys
        binary = champ_extra is None and cand_extra is None
        champ_valid, cand_valid = champion.valid, candidate.valid
        if binary and champ_valid.all() and cand_valid.all() and _DEAD_LETTER not in choice_list:
            # The common case: both arms scored every record (so no default decision
            # either), one template format per record, columns zipped at C speed.
            both = fmt.comparison_both
            keyed = batch.has_routing_key
            if False not in keyed:
                table = (both[_CHAMPION][True], both[_CANDIDATE][True])
                tmpls = [table[c] for c in choice_list]
            else:
                tmpls = [both[c][k] for c, k in zip(choice_list, keyed, strict=True)]
            return list(
                map(
                    bytes.__mod__,
                    tmpls,
                    zip(
                        rids,
                        key_texts,
                        ts_list,
                        champ_scores,
                        champ_dec,
                        cand_scores,
                        cand_dec,
                        strict=True,
                    ),
                )
            )
        # An arm failed, some records are invalid, or a kind other than binary: each arm
        # as a ready-made fragment, a column each.
        frag_tmpl = fmt.comparison
        champ_col = fmt.arm_column(_CHAMPION, champ_scores, champ_dec, champ_valid, champ_extra)
        cand_col = fmt.arm_column(_CANDIDATE, cand_scores, cand_dec, cand_valid, cand_extra)
        tmpls = [frag_tmpl[_SERVED_BY[c]][k] for c, k in zip(choice_list, has_key, strict=True)]
        return list(
            map(
                bytes.__mod__,
                tmpls,
                zip(rids, key_texts, ts_list, champ_col, cand_col, strict=True),
            )
        )

    def _choose(
        self, candidate_decides: np.ndarray, champion: BatchScores, candidate: BatchScores
    ) -> np.ndarray:
        """Per record: 0 champion decides, 1 candidate, 2 default decision, 3 dead letter.

        A routed arm that failed falls back to the other arm when that one is valid; a failed
        candidate never changes a champion decision, and a champion failure follows
        ``rollout.champion_failure``.
        """
        use_candidate = candidate_decides & candidate.valid
        champion_failed = ~use_candidate & ~champion.valid
        choice = np.where(use_candidate, _CANDIDATE, _CHAMPION)
        if self._failure_policy == "fallback_candidate":
            choice = np.where(champion_failed & candidate.valid, _CANDIDATE, choice)
            choice = np.where(champion_failed & ~candidate.valid, _DEFAULT, choice)
        elif self._failure_policy == "default_decision":
            choice = np.where(champion_failed, _DEFAULT, choice)
        else:
            choice = np.where(champion_failed, _DEAD_LETTER, choice)
        return choice

    def _slow_decision(
        self,
        batch: DecodedBatch,
        i: int,
        policy: RoutingPolicy,
        fmt: _BatchFormats,
        choice: int,
        routed: int,
        champion: BatchScores,
        candidate: BatchScores,
        bucket: int,
    ) -> tuple[bytes, Headers]:
        """Fallbacks, default decisions and records with metadata: a full Struct, encoded."""
        arm = _CANDIDATE if choice == _CANDIDATE else _CHAMPION
        model = self.candidate if arm == _CANDIDATE else self.champion
        assert model is not None
        scores = candidate if arm == _CANDIDATE else champion
        fallback = None
        kind_fields: dict[str, Any] = {}
        decision: bool | None
        if choice == _DEFAULT:
            score: float | None = self.config.rollout.default_score
            decision = self.config.rollout.default_decision
            fallback = f"default_decision: {_error_text(champion.error or champion.record_error)}"
            if model.kind != "binary":  # no default label, value or ranking: the kind only
                score, decision, kind_fields = None, None, {"output_kind": model.kind}
        else:
            score = float(scores.scores[i])
            decision = bool(scores.decisions[i]) if model.kind == "binary" else None
            if scores.output is not None:
                kind_fields = scores.output.fields(i)
            if arm != routed:
                failed = candidate if routed == _CANDIDATE else champion
                name = _ARM_NAMES[routed]
                fallback = f"{name}_failed: {_error_text(failed.error or failed.record_error)}"
        value = self._encoder.encode(
            Decision(
                request_id=batch.request_ids[i],
                routing_key=batch.routing_keys[i] if batch.has_routing_key[i] else None,
                rollout=policy.rollout,
                model=model.name,
                model_version=model.version,
                arm=_ARM_NAMES[arm],  # type: ignore[arg-type]
                routed_arm=_ARM_NAMES[routed],  # type: ignore[arg-type]
                score=score,
                decision=decision,
                threshold=model.threshold if model.kind == "binary" else None,
                policy_epoch=policy.epoch,
                policy_mode=policy.mode.value,
                bucket=bucket,
                ts=batch.ts[i],
                decided_at=fmt.decided_at,
                latency_ms=fmt.latency[arm],
                fallback=fallback,
                metadata=batch.metadata[i],
                manifest_digest=model.manifest_digest,
                **kind_fields,
            )
        )
        headers: Headers = [
            ("request_id", batch.request_ids[i].encode()),
            fmt.version_headers[arm],
            _SCHEMA_HEADER,
        ]
        return value, headers

    def _dead_letter(self, result: BatchResult, rejected: Rejected) -> None:
        key, value, headers = self._dead_letters.encode(
            rejected.record, rejected.kind, rejected.reason, rejected.request_id
        )
        out = result.dead_letters
        out.keys.append(key)
        out.values.append(value)
        out.headers.append(headers)
        result.dead_letter_kinds[rejected.kind] = result.dead_letter_kinds.get(rejected.kind, 0) + 1


_OUT_OF_RANGE_KEY = b',"out_of_range":'


def _gather(rows: list[int], whole: bool) -> Callable[[Sequence[Any]], Sequence[Any]]:
    """A function taking items ``rows`` of a column (at C speed; the column itself when
    ``whole``)."""
    if whole:
        return lambda column: column
    if not rows:
        return lambda column: ()
    if len(rows) == 1:
        (row,) = rows
        return lambda column: (column[row],)
    return operator.itemgetter(*rows)


def _too_big(
    values: list[bytes | None], keys: list[bytes], limit: int, longest_key: int | None = None
) -> set[int]:
    """Indices of records whose key and value exceed ``limit`` bytes (``None``: no record).
    C-level ``len`` passes in the usual case that none does (``longest_key``: the longest
    of ``keys``, when the caller knows it)."""
    try:
        biggest = max(map(len, values), default=0)  # type: ignore[arg-type]
    except TypeError:  # some None: no record there
        biggest = max(map(len, filter(None, values)), default=0)
    if longest_key is None:
        longest_key = max(map(len, keys), default=0)
    if biggest + longest_key <= limit:
        return set()
    return {i for i, v in enumerate(values) if v is not None and len(v) + len(keys[i]) > limit}


def _with_out_of_range(comparison: bytes | None, features: list[str]) -> bytes:
    """A templated Comparison with ``out_of_range`` set: the field is the Struct's last, so
    appending it before the closing brace gives exactly what msgspec would encode."""
    assert comparison is not None and comparison.endswith(b"}")
    return comparison[:-1] + _OUT_OF_RANGE_KEY + msgspec.json.encode(features) + b"}"


def _error_text(error: ModelError | None) -> str:
    return f"{error.kind}: {error.message}" if error else "unknown error"


def _SKIPPED_SCORES(n: int) -> BatchScores:
    return BatchScores.failed(n, _SKIPPED, 0.0)


def _count_choices(result: BatchResult, choice: np.ndarray) -> None:
    """Add the decisions of ``choice`` (per record) to ``result.decided_by``."""
    counts = result.decided_by
    for c, count in zip(*np.unique(choice, return_counts=True), strict=True):
        if int(c) != _DEAD_LETTER:
            counts[_ARM_NAMES[int(c)]] = counts.get(_ARM_NAMES[int(c)], 0) + int(count)


@dataclass(slots=True)
class StagedBatch:
    """A batch after :meth:`Pipeline.start`: ``early`` holds what can be sent now (the
    champion's decisions, dead letters); ``pending`` (None when nothing is pending) gives
    the rest once the candidate answered or timed out."""

    early: BatchResult
    pending: Callable[[], Awaitable[BatchResult]] | None

    async def finish(self) -> BatchResult | None:
        return None if self.pending is None else await self.pending()
