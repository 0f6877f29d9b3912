"""The data path, top to bottom, for one batch of request records (no Kafka in here).

    raw records -> decode + validate -> route (one policy per batch) -> score both models
    concurrently, off the event loop -> choose the deciding arm per record (with fallbacks)
    -> encode decisions, comparisons and dead letters

The Kafka loop (:mod:`sidecar.runner`) feeds it consumer records and produces what it returns.
Everything per batch is vectorised with numpy; the one per-record loop only formats outputs.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import msgspec
import numpy as np

from .config import SidecarConfig
from .contracts import (
    OUTPUT_SCHEMA_VERSION,
    Comparison,
    DeadLetter,
    Decision,
    ModelError,
    ModelResult,
)
from .decoding import DecodedBatch, RawRecord, Rejected, RequestDecoder
from .encoding import JSON_BOOL, escape, needs_escape, raw_json, template
from .models.base import BatchScores, ScoringModel
from .routing import RoutingPolicy

Headers = list[tuple[str, bytes]]
_SCHEMA_HEADER = ("schema_version", OUTPUT_SCHEMA_VERSION.encode())
_SKIPPED = ModelError(kind="skipped", message="not scored: policy scores only the deciding arm")
_NO_CANDIDATE = ModelError(kind="unavailable", message="no candidate model configured")

# Per-record choice codes (see Pipeline._choose).
_CHAMPION, _CANDIDATE, _DEFAULT, _DEAD_LETTER = 0, 1, 2, 3
_ARM_NAMES = ("champion", "candidate", "default", "dead_letter")


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
        # decision[arm][has_routing_key]; slots: request_id, routing_key, score, decision,
        # bucket, ts.
        self.decision = tuple(
            tuple(
                _template_optional(
                    Decision(
                        request_id="@@request_id@@",
                        routing_key="@@routing_key@@" if keyed else None,
                        rollout=policy.rollout,
                        model=m.name,
                        model_version=m.version,
                        arm=_ARM_NAMES[arm],  # type: ignore[arg-type]
                        routed_arm=_ARM_NAMES[arm],  # type: ignore[arg-type]
                        score="@@score@@",  # type: ignore[arg-type]
                        decision="@@decision@@",  # type: ignore[arg-type]
                        threshold=m.threshold,
                        policy_epoch=policy.epoch,
                        policy_mode=policy.mode.value,
                        bucket="@@bucket@@",  # type: ignore[arg-type]
                        ts="@@ts@@",  # type: ignore[arg-type]
                        decided_at=self.decided_at,
                        latency_ms=self.latency[arm],
                    ),
                    ("request_id", "routing_key"),
                    ("score", "decision", "bucket", "ts"),
                    keyed,
                )
                if m is not None
                else ""
                for keyed in (False, True)
            )
            for arm, m in enumerate(models)
        )
        # comparison[served_by][has_routing_key]; served_by None is index 2 (via dict below).
        self.comparison: dict[int | None, tuple[str, str]] = {}
        for served in (_CHAMPION, _CANDIDATE, None):
            pair = []
            for keyed in (False, True):
                proto = Comparison(
                    request_id="@@request_id@@",
                    routing_key="@@routing_key@@" if keyed else None,
                    rollout=policy.rollout,
                    ts="@@ts@@",  # type: ignore[arg-type]
                    policy_epoch=policy.epoch,
                    policy_mode=policy.mode.value,
                    served_by=None if served is None else _ARM_NAMES[served],  # type: ignore[arg-type]
                    champion="@@champion@@",  # type: ignore[arg-type]
                    candidate="@@candidate@@",  # type: ignore[arg-type]
                )
                pair.append(
                    _template_optional(
                        proto, ("request_id", "routing_key"), ("ts", "champion", "candidate"), keyed
                    )
                )
            self.comparison[served] = (pair[0], pair[1])
        ok, err = [], []
        for arm, (m, scores) in enumerate(zip(models, (champion, candidate), strict=True)):
            name, version = (m.name, m.version) if m else ("", "")
            ok.append(
                template(
                    ModelResult(
                        model=name,
                        version=version,
                        score="@@score@@",  # type: ignore[arg-type]
                        decision="@@decision@@",  # type: ignore[arg-type]
                        latency_ms=self.latency[arm],
                    ),
                    (),
                    ("score", "decision"),
                )
            )
            err.append(
                raw_json(
                    ModelResult(
                        model=name,
                        version=version,
                        latency_ms=self.latency[arm],
                        error=scores.error or scores.record_error,
                    )
                )
            )
        self.champion_ok, self.candidate_ok = ok
        self.champion_error, self.candidate_error = err


def _template_optional(
    proto: msgspec.Struct, text_slots: tuple[str, ...], raw_slots: tuple[str, ...], keyed: bool
) -> str:
    """``template`` where the routing_key slot may be absent (encoded as null): its index is
    kept so every variant takes the same positional arguments."""
    if keyed:
        return template(proto, text_slots, raw_slots)
    tmpl = template(proto, text_slots[:1], ())
    # Re-number the raw slots after the (absent) routing_key slot.
    for offset, name in enumerate(raw_slots):
        tmpl = tmpl.replace(f'"@@{name}@@"', "{" + str(len(text_slots) + offset) + "}")
    return tmpl


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

    async def process(self, records: list[RawRecord], policy: RoutingPolicy) -> BatchResult:
        batch = self.decoder.decode(records)
        result = BatchResult(policy=policy)
        for rejected in batch.rejected:
            self._dead_letter(result, rejected)
        if not len(batch):
            return result
        buckets, candidate_decides = policy.route([k.encode() for k in batch.routing_keys])
        champion, candidate = await self._score(batch, policy, candidate_decides)
        result.champion, result.candidate = champion, candidate
        self._assemble(result, batch, policy, buckets, candidate_decides, champion, candidate)
        return result

    async def _score(
        self, batch: DecodedBatch, policy: RoutingPolicy, candidate_decides: np.ndarray
    ) -> tuple[BatchScores, BatchScores]:
        """Both arms at once, each off the event loop; failures come back as data."""
        n = len(batch)
        any_candidate = bool(candidate_decides.any())
        run_champion = policy.scores_champion or not candidate_decides.all()
        run_candidate = self.candidate is not None and (policy.scores_candidate or any_candidate)
        champion_job = (
            self.champion.score(batch.matrix[:, self._champion_cols])
            if run_champion
            else _skipped(n)
        )
        if self.candidate is None:
            candidate_job = _unavailable(n, _NO_CANDIDATE)
        elif run_candidate:
            candidate_job = self.candidate.score(batch.matrix[:, self._candidate_cols])
        else:
            candidate_job = _skipped(n)
        champion, candidate = await asyncio.gather(champion_job, candidate_job)
        return champion, candidate

    def _assemble(
        self,
        result: BatchResult,
        batch: DecodedBatch,
        policy: RoutingPolicy,
        buckets: np.ndarray,
        candidate_decides: np.ndarray,
        champion: BatchScores,
        candidate: BatchScores,
    ) -> None:
        """Choose the deciding arm per record (vectorised), then encode the outputs."""
        choice = self._choose(candidate_decides, champion, candidate)
        fmt = _BatchFormats(self, policy, champion, candidate)
        ids = batch.request_ids
        if any(map(needs_escape, ids)) or any(map(needs_escape, batch.routing_keys)):
            texts = [escape(t) for t in ids]
            key_texts = [escape(t) for t in batch.routing_keys]
        else:
            texts, key_texts = ids, batch.routing_keys
        champ_scores = champion.scores.tolist()
        cand_scores = candidate.scores.tolist()
        champ_valid = champion.valid.tolist()
        cand_valid = candidate.valid.tolist()
        champ_dec = champion.decisions.tolist()
        cand_dec = candidate.decisions.tolist()
        routed_list = candidate_decides.tolist()
        bucket_list = buckets.tolist()
        has_key = batch.has_routing_key
        ts_list = batch.ts
        metadata = batch.metadata
        dec_keys, dec_values, dec_headers = result.decisions
        cmp_keys, cmp_values, cmp_headers = result.comparisons
        comparison_key = policy.rollout.encode()
        schema_header = _SCHEMA_HEADER
        version_header = fmt.version_headers
        decision_tmpl = fmt.decision
        comparison_tmpl = fmt.comparison
        champ_ok_tmpl, cand_ok_tmpl = fmt.champion_ok, fmt.candidate_ok
        champ_err, cand_err = fmt.champion_error, fmt.candidate_error
        counts = result.decided_by
        slow = 0

        for i, c in enumerate(choice.tolist()):
            rid_text = texts[i]
            rid = ids[i].encode()
            keyed = has_key[i]
            ts = ts_list[i]
            champ_frag = (
                champ_ok_tmpl.format(champ_scores[i], JSON_BOOL[champ_dec[i]])
                if champ_valid[i]
                else champ_err
            )
            cand_frag = (
                cand_ok_tmpl.format(cand_scores[i], JSON_BOOL[cand_dec[i]])
                if cand_valid[i]
                else cand_err
            )
            routed = _CANDIDATE if routed_list[i] else _CHAMPION
            served: int | None = c if c < 2 else (_CHAMPION if c == _DEFAULT else None)
            if c == _DEAD_LETTER:
                served = None
                self._dead_letter(
                    result,
                    Rejected(
                        batch.records[i],
                        "model_failure",
                        "champion failed and rollout.champion_failure is dead_letter: "
                        f"{_error_text(champion.error or champion.record_error)}",
                        ids[i],
                    ),
                )
            elif c == routed and metadata[i] is None:
                scores = cand_scores if c else champ_scores
                decided = cand_dec if c else champ_dec
                dec_values.append(
                    decision_tmpl[c][keyed]
                    .format(
                        rid_text,
                        key_texts[i],
                        scores[i],
                        JSON_BOOL[decided[i]],
                        bucket_list[i],
                        ts,
                    )
                    .encode()
                )
                dec_keys.append(batch.routing_keys[i].encode())
                dec_headers.append([("request_id", rid), version_header[c], schema_header])
            else:
                slow += 1
                self._slow_decision(
                    result,
                    batch,
                    i,
                    policy,
                    fmt,
                    c,
                    routed,
                    champion,
                    candidate,
                    int(bucket_list[i]),
                )
            cmp_values.append(
                comparison_tmpl[served][keyed]
                .format(rid_text, key_texts[i], ts, champ_frag, cand_frag)
                .encode()
            )
            cmp_keys.append(comparison_key)
            cmp_headers.append([("request_id", rid), schema_header])
        for c, n in zip(*np.unique(choice, return_counts=True), strict=True):
            counts[_ARM_NAMES[int(c)]] = counts.get(_ARM_NAMES[int(c)], 0) + int(n)
        result.slow_path = slow

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
        result: BatchResult,
        batch: DecodedBatch,
        i: int,
        policy: RoutingPolicy,
        fmt: _BatchFormats,
        choice: int,
        routed: int,
        champion: BatchScores,
        candidate: BatchScores,
        bucket: int,
    ) -> None:
        """Fallbacks, default decisions and records with metadata: a full Struct, encoded."""
        arm = _CANDIDATE if choice == _CANDIDATE else _CHAMPION
        model = self.candidate if arm == _CANDIDATE else self.champion
        assert model is not None
        scores = candidate if arm == _CANDIDATE else champion
        fallback = None
        if choice == _DEFAULT:
            score: float | None = self.config.rollout.default_score
            decision = self.config.rollout.default_decision
            fallback = f"default_decision: {_error_text(champion.error or champion.record_error)}"
        else:
            score = float(scores.scores[i])
            decision = bool(scores.decisions[i])
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
                threshold=model.threshold,
                policy_epoch=policy.epoch,
                policy_mode=policy.mode.value,
                bucket=bucket,
                ts=batch.ts[i],
                decided_at=fmt.decided_at,
                latency_ms=fmt.latency[arm],
                fallback=fallback,
                metadata=batch.metadata[i],
            )
        )
        keys, values, headers = result.decisions
        keys.append(batch.routing_keys[i].encode())
        values.append(value)
        headers.append(
            [
                ("request_id", batch.request_ids[i].encode()),
                fmt.version_headers[arm],
                _SCHEMA_HEADER,
            ]
        )

    def _dead_letter(self, result: BatchResult, rejected: Rejected) -> None:
        record = rejected.record
        letter = DeadLetter(
            kind=rejected.kind,
            reason=rejected.reason,
            source_topic=record.topic,
            source_partition=record.partition,
            source_offset=record.offset,
            ts=now_ms(),
            original_value=record.value,
            original_key=record.key,
            request_id=rejected.request_id,
        )
        keys, values, headers = result.dead_letters
        keys.append(record.key or f"{record.topic}/{record.partition}/{record.offset}".encode())
        values.append(self._encoder.encode(letter))
        headers.append([("dead_letter_kind", rejected.kind.encode()), _SCHEMA_HEADER])
        result.dead_letter_kinds[rejected.kind] = result.dead_letter_kinds.get(rejected.kind, 0) + 1


def _error_text(error: ModelError | None) -> str:
    return f"{error.kind}: {error.message}" if error else "unknown error"


async def _skipped(n: int) -> BatchScores:
    return BatchScores.failed(n, _SKIPPED, 0.0)


async def _unavailable(n: int, error: ModelError) -> BatchScores:
    return BatchScores.failed(n, error, 0.0)
