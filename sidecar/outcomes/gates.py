"""Quality gates: may a ramp step (or promotion) go ahead on what the outcomes say?

:func:`quality_gate` is pure: given the latest :class:`QualityVerdict` of a rollout (or None)
and a :class:`QualityRequirement`, it answers with a :class:`GateDecision` whose ``code`` and
``reason`` say which condition holds the step back. It is the seam between the outcomes stage
(which publishes verdicts on ``outcomes.verdicts_topic``, keyed by rollout) and the control
plane (which reads the latest verdict of its rollout and calls this before a ramp advance or a
promote; ``ctl status`` shows the decision).

The test is one-sided non-inferiority on the pooled final windows: with ``d`` the candidate
minus champion difference and ``se`` its standard error, the gate is met when
``d - z * se >= -margin`` for metrics where higher is better (``d + z * se <= margin`` where
lower is better: log loss, Brier, cost), ``z`` the one-sided normal quantile of
``confidence`` (1.645 at 95%), on at least ``min_pairs`` judged pairs.
"""

from __future__ import annotations

from .quality import normal_quantile
from .report import GateDecision, QualityRequirement, QualityVerdict


def _models(v: QualityVerdict) -> str:
    return f"{v.candidate_model} {v.candidate_version} vs {v.champion_model} {v.champion_version}"


def quality_gate(
    verdict: QualityVerdict | None,
    requirement: QualityRequirement,
    *,
    champion_version: str | None = None,
    candidate_version: str | None = None,
    now_ms: int | None = None,
) -> GateDecision:
    """Whether ``verdict`` meets ``requirement``.

    ``champion_version``/``candidate_version``: the versions the caller is about to act on; a
    verdict about other versions never counts. ``now_ms``: the caller's clock, for
    ``requirement.max_age_s``.
    """
    metric = requirement.metric
    if verdict is None:
        return GateDecision(
            ok=False,
            code="no_verdict",
            reason="no quality verdict yet: the outcomes stage publishes one when the first "
            "quality window of this rollout becomes final",
        )
    if (candidate_version is not None and verdict.candidate_version != candidate_version) or (
        champion_version is not None and verdict.champion_version != champion_version
    ):
        return GateDecision(
            ok=False,
            code="wrong_models",
            reason=f"the latest verdict is about {_models(verdict)}, not candidate "
            f"{candidate_version or verdict.candidate_version} vs champion "
            f"{champion_version or verdict.champion_version}",
        )
    if requirement.max_age_s is not None and now_ms is not None:
        age_s = (now_ms - verdict.emitted_at_ms) / 1000
        if age_s > requirement.max_age_s:
            return GateDecision(
                ok=False,
                code="stale",
                reason=f"the latest verdict is {age_s:.0f}s old (max_age_s "
                f"{requirement.max_age_s:g}): is sidecar outcomes running?",
            )
    if verdict.judged_pairs < requirement.min_pairs:
        return GateDecision(
            ok=False,
            code="too_few_pairs",
            reason=f"{verdict.judged_pairs:,} of {requirement.min_pairs:,} judged pairs over "
            f"{verdict.windows} final window(s) ({_models(verdict)})",
        )
    est = verdict.metrics.get(metric)
    if est is None or est.diff is None or est.se is None:
        return GateDecision(
            ok=False,
            code="insufficient_data",
            reason=f"no {metric} difference with a standard error yet over "
            f"{verdict.judged_pairs:,} judged pairs (too few positives or negatives?)",
        )
    z = normal_quantile(requirement.confidence)
    conf = f"{requirement.confidence:.0%}"
    margin = requirement.margin
    if est.higher_is_better:
        bound = est.diff - z * est.se
        ok = bound >= -margin
        claim = f"candidate {metric} >= champion - {margin:g}"
        detail = f"lower {conf} bound of the difference {bound:+.4g}"
    else:
        bound = est.diff + z * est.se
        ok = bound <= margin
        claim = f"candidate {metric} <= champion + {margin:g}"
        detail = f"upper {conf} bound of the difference {bound:+.4g}"
    values = (
        f"champion {est.champion:.4g}, candidate {est.candidate:.4g}, "
        if est.champion is not None and est.candidate is not None
        else ""
    )
    reason = (
        f"{claim} {'holds' if ok else 'not shown'} at {conf}: {detail} "
        f"({values}difference {est.diff:+.4g} +/- {est.se:.2g} se, "
        f"{verdict.judged_pairs:,} judged pairs, {verdict.windows} final window(s))"
    )
    return GateDecision(ok=ok, code="met" if ok else "inferior", reason=reason)


__all__ = ["GateDecision", "QualityRequirement", "QualityVerdict", "quality_gate"]
