"""The report's ground-truth section: quality per arm over time (final windows, with their 95%
intervals), label coverage, the reliability diagram, and each rollout's latest verdict with
its quality gate. Pure: a recording in, chart specs and HTML out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

from ..aggregate.stats import Figure
from ..outcomes.report import QualityReport, QualityVerdict
from ..timefmt import humanise, utc_window
from .model import CommandEntry, Point, Recording
from .svg import PALETTE, Chart, Series

CHAMPION, CANDIDATE = PALETTE[0], PALETTE[1]
BOUND_DASH = "3 3"


def _mid(q: QualityReport) -> float:
    return (q.window_start_ms + q.window_end_ms) / 2


def _series(
    reports: Sequence[QualityReport], get: Callable[[QualityReport], float | None]
) -> list[Point]:
    """One line in window order, broken (None) where the rollout pair changes."""
    out: list[Point] = []
    last: tuple[str, str, str] | None = None
    for q in sorted(reports, key=lambda r: r.window_start_ms):
        pair = (q.rollout, q.champion.version, q.candidate.version)
        if last is not None and pair != last:
            out.append((_mid(q), None))
        last = pair
        out.append((_mid(q), get(q)))
    return out


def _value(fig: Figure, part: str = "value") -> float | None:
    if not fig.ok:
        return None
    v = fig.value if part == "value" else (fig.lo if part == "lo" else fig.hi)
    return float(v) if v is not None else None


def _arm_figure(arm: str, metric: str, part: str) -> Callable[[QualityReport], float | None]:
    return lambda q: _value(getattr(getattr(q, arm), metric), part)


def _with_bounds(finals: Sequence[QualityReport], metric: str, label: str) -> list[Series]:
    series = []
    for arm, color in (("champion", CHAMPION), ("candidate", CANDIDATE)):
        for part in ("value", "lo", "hi"):
            series.append(
                Series(
                    f"{arm} {label}" if part == "value" else f"{arm} 95% {part}",
                    _series(finals, _arm_figure(arm, metric, part)),
                    color,
                    dash=None if part == "value" else BOUND_DASH,
                    width=2.0 if part == "value" else 1.0,
                    dots=part == "value",
                )
            )
    return series


def quality_charts(rec: Recording) -> list[Chart]:
    """Charts of the outcomes stage's reports (none when the recording has none)."""
    if not rec.quality:
        return []
    finals = [q for q in rec.quality if q.status == "final"]
    provisional: dict[tuple[str, int], QualityReport] = {}
    for q in rec.quality:
        if q.status == "provisional":
            provisional[(q.rollout, q.window_start_ms)] = q  # the last one of each window
    charts = [
        Chart(
            "quality_auc",
            "Ground truth: ROC AUC of each model on the same labelled requests (final windows)",
            "ROC AUC",
            _with_bounds(finals, "auc", "ROC AUC"),
            y_format="{:.3f}",
            note="Dashed: 95% intervals (DeLong). Windows by request time; a window is final "
            "once every request in it has had its whole label window.",
        ),
        Chart(
            "quality_cost",
            "Ground truth: cost of errors per judged request, each model (final windows)",
            "cost / request",
            _with_bounds(finals, "mean_cost", "mean cost"),
            y_format="{:.3g}",
            y_min=0.0,
            note="False positives and false negatives at each model's own threshold, weighted "
            "by the configured costs (and the outcome's value). Lower is better.",
        ),
        Chart(
            "quality_coverage",
            "Label coverage: share of requests with an outcome",
            "coverage",
            [
                Series(
                    "final",
                    _series(finals, lambda q: _value(q.label_coverage)),
                    PALETTE[2],
                ),
                Series(
                    "latest provisional",
                    _series(list(provisional.values()), lambda q: _value(q.label_coverage)),
                    PALETTE[3],
                    dash="4 2",
                ),
            ],
            y_format="{:.1%}",
            y_min=0.0,
            note="Provisional reports count requests without an outcome by the rollout's rule "
            "(negative, or left out) as if their label windows had closed.",
        ),
    ]
    return [c for c in charts if c.has_data]


# --------------------------------------------------------------------------- reliability


@dataclass(frozen=True)
class ReliabilityPoint:
    mean_predicted: float
    observed: float
    count: int


def pooled_reliability(finals: Sequence[QualityReport], arm: str) -> list[ReliabilityPoint]:
    """Each reliability bin pooled over ``finals`` (counts add; means weighted by counts)."""
    acc: dict[int, list[float]] = {}
    for q in finals:
        for i, b in enumerate(getattr(q, arm).reliability):
            if not b.count or b.mean_predicted is None or b.observed_rate is None:
                continue
            cell = acc.setdefault(i, [0.0, 0.0, 0.0])
            cell[0] += b.count
            cell[1] += b.count * b.mean_predicted
            cell[2] += b.count * b.observed_rate
    return [ReliabilityPoint(s / n, o / n, int(n)) for _, (n, s, o) in sorted(acc.items()) if n]


def reliability_svg(finals: Sequence[QualityReport], size: int = 320) -> str:
    """The reliability diagram of both models (mean score against observed positive rate per
    bin, pooled over the final windows); the diagonal is perfect calibration."""
    pad = 36
    inner = size - 2 * pad

    def xy(p: float, o: float) -> tuple[float, float]:
        return pad + p * inner, size - pad - o * inner

    parts = [
        f'<svg class="reliability" width="{size}" height="{size}" viewBox="0 0 {size} {size}" '
        'role="img" aria-label="reliability diagram">',
        f'<rect x="{pad}" y="{pad}" width="{inner}" height="{inner}" class="frame"/>',
        f'<line x1="{pad}" y1="{size - pad}" x2="{size - pad}" y2="{pad}" stroke="#999" '
        'stroke-dasharray="4 3"/>',
    ]
    for t in (0.0, 0.5, 1.0):
        x, y = xy(t, t)
        parts.append(f'<text x="{x:.1f}" y="{size - pad + 14}" text-anchor="middle">{t:g}</text>')
        parts.append(f'<text x="{pad - 6}" y="{y + 4:.1f}" text-anchor="end">{t:g}</text>')
    parts.append(
        f'<text x="{size / 2}" y="{size - 6}" text-anchor="middle" class="axis-label">mean '
        "score in the bin</text>"
    )
    parts.append(
        f'<text x="12" y="{size / 2}" text-anchor="middle" class="axis-label" '
        f'transform="rotate(-90 12 {size / 2})">observed positive rate</text>'
    )
    for arm, color in (("champion", CHAMPION), ("candidate", CANDIDATE)):
        points = pooled_reliability(finals, arm)
        if not points:
            continue
        path = " ".join(
            f"{'M' if i == 0 else 'L'}{x:.1f},{y:.1f}"
            for i, (x, y) in enumerate(xy(p.mean_predicted, p.observed) for p in points)
        )
        parts.append(
            f'<g class="arm" data-arm="{arm}"><path d="{path}" fill="none" '
            f'stroke="{color}" stroke-width="2"/>'
        )
        for p in points:
            x, y = xy(p.mean_predicted, p.observed)
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{color}"><title>{arm}: mean '
                f"score {p.mean_predicted:.3f}, observed {p.observed:.3f}, {p.count:,} requests"
                "</title></circle>"
            )
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- verdicts


def latest_verdicts(rec: Recording) -> list[QualityVerdict]:
    latest: dict[str, QualityVerdict] = {}
    for v in sorted(rec.verdicts, key=lambda v: v.emitted_at_ms):
        latest[v.rollout] = v
    return [latest[k] for k in sorted(latest)]


def _num(x: float | None, fmt: str = "{:.4f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _verdict_html(v: QualityVerdict) -> str:
    gate = v.gate
    status = "MET" if gate.ok else "NOT MET"
    rows = "".join(
        f"<tr><th>{escape(name)}</th><td class='num'>{_num(m.champion)}</td>"
        f"<td class='num'>{_num(m.candidate)}</td>"
        f"<td class='num'>{_num(m.diff, '{:+.4f}')}"
        + (f" &plusmn; {1.96 * m.se:.4f}" if m.se is not None else "")
        + f"</td><td>{'higher' if m.higher_is_better else 'lower'}</td></tr>"
        for name, m in v.metrics.items()
    )
    req = v.requirement
    cov = "n/a" if v.label_coverage is None else f"{v.label_coverage:.1%}"
    return (
        f'<div class="verdict {"met" if gate.ok else "held"}" data-rollout="{escape(v.rollout)}">'
        f"<h3>{escape(v.rollout)}: candidate {escape(v.candidate_model)} "
        f"{escape(v.candidate_version)} vs champion {escape(v.champion_model)} "
        f"{escape(v.champion_version)}: quality gate <b>{status}</b></h3>"
        f"<p>Requirement: <code>{escape(req.metric)}</code> non-inferiority, margin "
        f"{req.margin:g}, {req.confidence:.0%} confidence, at least {req.min_pairs:,} judged "
        f"pairs. {escape(gate.code)}: {escape(gate.reason)}</p>"
        f"<p>{v.judged_pairs:,} judged pairs ({v.labelled:,} with an outcome, coverage {cov}) "
        f"over {v.windows} final window(s) "
        f"{escape(utc_window(v.first_window_start_ms, v.last_window_end_ms))}.</p>"
        "<table><tr><th>metric</th><th>champion</th><th>candidate</th>"
        "<th>candidate - champion (95%)</th><th>better</th></tr>"
        f"{rows}</table></div>"
    )


def quality_guard_html(timeline: Sequence[CommandEntry], rec: Recording) -> str:
    """Commands the outcomes stage's quality guards issued, with the final window they cite."""
    out = []
    for e in timeline:
        c = e.command
        if c.issued_by != "outcomes":
            continue
        start = c.command_id.rsplit(":", 1)[-1]
        window = next(
            (
                q
                for q in rec.quality
                if q.status == "final"
                and q.rollout == c.rollout
                and str(q.window_start_ms) == start
            ),
            None,
        )
        figures = ""
        if window is not None:
            d = window.diff
            figures = (
                f" Cost difference {_num(d.cost.value, '{:+.4g}')} "
                f"[{_num(d.cost.lo, '{:+.4g}')}, {_num(d.cost.hi, '{:+.4g}')}], ROC AUC "
                f"difference {_num(d.auc.value, '{:+.4f}')}, {window.counts.records:,} judged "
                f"pairs, label coverage {_num(window.label_coverage.value, '{:.1%}')}."
            )
        out.append(
            f'<div class="evidence quality-guard"><h3>{escape(c.action)} of rollout '
            f"{escape(c.rollout)} by the outcomes stage ({escape(e.outcome)})</h3>"
            f"<p><code>{escape(humanise(c.reason))}</code>{escape(figures)}</p></div>"
        )
    return "".join(out)


def quality_section(rec: Recording, timeline: Sequence[CommandEntry]) -> str:
    """The verdicts, the quality guards' commands and the reliability diagram (HTML)."""
    if not rec.quality and not rec.verdicts:
        return ""
    verdicts = "".join(_verdict_html(v) for v in latest_verdicts(rec)) or (
        "<p>No verdict yet: a rollout's first quality window has not become final.</p>"
    )
    finals = [q for q in rec.quality if q.status == "final"]
    legend = (
        f'<div class="legend"><span><svg width="26" height="10"><line x1="1" y1="5" x2="25" '
        f'y2="5" stroke="{CHAMPION}" stroke-width="2"/></svg>champion</span><span><svg '
        f'width="26" height="10"><line x1="1" y1="5" x2="25" y2="5" stroke="{CANDIDATE}" '
        'stroke-width="2"/></svg>candidate</span></div>'
    )
    diagram = (
        '<section class="plot" id="plot-reliability"><h2>Reliability diagram (final windows, '
        f"pooled)</h2>{legend}{reliability_svg(finals)}<p class='note'>Per score bin: the mean "
        "score against the observed share of positives; on the diagonal, a score means what "
        "it says.</p></section>"
        if finals
        else ""
    )
    return (
        "<h2>Ground truth: is the candidate better?</h2>"
        f"{verdicts}{quality_guard_html(timeline, rec)}{diagram}"
    )


__all__ = [
    "ReliabilityPoint",
    "latest_verdicts",
    "pooled_reliability",
    "quality_charts",
    "quality_section",
    "reliability_svg",
]
