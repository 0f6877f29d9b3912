"""``sidecar outcomes status``: the latest verdict per rollout, read from the verdicts topic."""

from __future__ import annotations

import msgspec

from ..config import SidecarConfig
from ..kafka import read_until_idle
from ..timefmt import utc_window
from ..untrusted import decoded_or_none, printable
from .gates import quality_gate
from .report import QualityVerdict

_DECODE = msgspec.json.Decoder(QualityVerdict).decode


async def read_verdicts(
    cfg: SidecarConfig, *, idle_s: float = 1.0
) -> tuple[dict[str, QualityVerdict], int]:
    """The latest verdict per rollout (by emission time), and how many records were not
    verdicts (skipped: the topic is untrusted)."""
    latest: dict[str, QualityVerdict] = {}
    skipped = 0
    for rec in await read_until_idle(
        cfg, cfg.outcomes.verdicts_topic, role="outcomes-status", idle_s=idle_s
    ):
        v = decoded_or_none(_DECODE, rec.value)
        if v is None:
            skipped += 1
            continue
        old = latest.get(v.rollout)
        if old is None or v.emitted_at_ms >= old.emitted_at_ms:
            latest[v.rollout] = v
    return latest, skipped


def _f(x: float | None, fmt: str = ".4f") -> str:
    return "n/a" if x is None else format(x, fmt)


def render_status(
    verdicts: dict[str, QualityVerdict], skipped: int, cfg: SidecarConfig, now_ms: int
) -> str:
    if not verdicts:
        return (
            f"no quality verdict on {cfg.outcomes.verdicts_topic} yet: sidecar outcomes run "
            "publishes one when a rollout's first quality window becomes final"
            + (f" ({skipped} records there were not verdicts)" if skipped else "")
        )
    lines = []
    for rollout, v in sorted(verdicts.items()):
        requirement = cfg.outcomes.for_rollout(rollout).non_inferiority
        gate = quality_gate(v, requirement, now_ms=now_ms)
        cov = "n/a" if v.label_coverage is None else f"{v.label_coverage:.1%}"
        lines.append(
            printable(
                f"{rollout}: {v.candidate_model} {v.candidate_version} vs {v.champion_model} "
                f"{v.champion_version}: {v.judged_pairs:,} judged pairs ({v.labelled:,} "
                f"labelled, coverage {cov}) over {v.windows} final window(s) "
                f"{utc_window(v.first_window_start_ms, v.last_window_end_ms)}"
            )
        )
        lines.append(f"  gate {'MET' if gate.ok else 'NOT MET'} ({gate.code}): {gate.reason}")
        for name, m in v.metrics.items():
            better = "higher" if m.higher_is_better else "lower"
            lines.append(
                f"  {name:18} champion {_f(m.champion)}  candidate {_f(m.candidate)}  "
                f"diff {_f(m.diff, '+.4f')} (se {_f(m.se, '.2g')}; {better} is better)"
            )
    if skipped:
        lines.append(f"({skipped} records on {cfg.outcomes.verdicts_topic} were not verdicts)")
    return "\n".join(lines)


__all__ = ["read_verdicts", "render_status"]
