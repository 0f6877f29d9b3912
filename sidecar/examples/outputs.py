"""Example adapters of older Decision shapes (``outputs.versions``), used by the demo's
``migrate`` story, ``examples/migrate.toml`` and the tests.

``V1`` is declarative (the common case): the v1 API carried the score in percent as
``score_pct``, the decision as ``flagged``, arms as ``A``/``B``, and none of the policy fields
added since. ``legacy`` is a callable for a shape no declarative rule reaches.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..contracts import Decision

#: The v1 shape of the decisions, as ``[[outputs.versions]]`` keys (without version/topic).
V1: dict[str, Any] = {
    "link": "https://example.com/fraud/decisions/v1-to-v2",
    "map": {
        "score": {"scale": 100.0, "round": 2},
        "arm": {"values": {"champion": "A", "candidate": "B"}},
    },
    "rename": {"decision": "flagged", "model_version": "version", "score": "score_pct"},
    "drop": [
        "routed_arm",
        "policy_epoch",
        "policy_mode",
        "bucket",
        "decided_at",
        "latency_ms",
        "manifest_digest",
        "schema_version",
    ],
    "defaults": {"fallback": "none", "currency": "EUR"},
}


class LegacyDecision(msgspec.Struct, kw_only=True):
    """The oldest shape: a verdict string and a risk on 0..1000."""

    id: str
    entity: str | None
    verdict: str
    risk: int | None
    model: str


def legacy(decision: Decision) -> LegacyDecision:
    """A Decision in the legacy shape (``adapter = "sidecar.examples.outputs:legacy"``)."""
    return LegacyDecision(
        id=decision.request_id,
        entity=decision.routing_key,
        verdict="DECLINE" if decision.decision else "APPROVE",
        risk=None if decision.score is None else round(decision.score * 1000),
        model=f"{decision.model}@{decision.model_version}",
    )
