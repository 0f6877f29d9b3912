"""Turn a :class:`~sidecar.report.model.Recording` into charts, then into one HTML page.

:func:`build_charts` is pure (recording -> chart specs, tested directly); :func:`render_page`
only formats. The page is self-contained: inline CSS, inline SVG, and a few lines of inline
script that count what the browser actually drew (the headless-browser test reads it).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

import msgspec

from ..aggregate.actions import is_guard_command
from ..aggregate.guards import GuardRule
from ..aggregate.report import WindowReport, figure_of
from ..control.commands import format_ramp_plan
from ..timefmt import humanise
from .model import (
    CommandEntry,
    Point,
    Recording,
    Span,
    command_timeline,
    disagreement,
    figure_series,
    firing_window,
    guard_breaches,
    named,
    rollout_spans,
    rule_for,
    rules_of,
    served_share,
    share_steps,
    time_domain,
)
from .quality import quality_charts, quality_section
from .svg import PALETTE, Band, Chart, HLine, Marker, Series, fmt_time, render

CHAMPION, CANDIDATE = PALETTE[0], PALETTE[1]
#: Line styles of the percentiles: p50 dotted, p95 dashed, p99 solid (and thicker: the
#: figure the latency guard watches). The legend draws the same strokes.
DOTTED, DASHED = "1 3", "5 3"
#: Each latency line its own colour: the champion's percentiles in blues, the candidate's in
#: oranges (light to dark from p50 to p99), so neither colour nor dash alone tells them apart.
LATENCY_COLORS = {
    ("champion", "p50"): "#56B4E9",
    ("champion", "p95"): "#0072B2",
    ("champion", "p99"): "#003B5C",
    ("candidate", "p50"): "#E69F00",
    ("candidate", "p95"): "#D55E00",
    ("candidate", "p99"): "#8A3A00",
}
ACTION_COLORS = {
    "rollback": "#D55E00",
    "pause": "#CC79A7",
    "advance": "#009E73",
    "promote": "#009E73",
}


def joined(by_rollout: dict[str, list[Point]], spans: Sequence[Span]) -> list[Point]:
    """One line across rollouts in time order, broken (None) between rollouts."""
    out: list[Point] = []
    for span in spans:
        pts = by_rollout.get(span.rollout, [])
        if not pts:
            continue
        if out:
            out.append((pts[0][0], None))
        out.extend(pts)
    return out


def _fig(
    reports: Sequence[WindowReport], spans: Sequence[Span], get: Callable[[WindowReport], object]
) -> list[Point]:
    return joined(figure_series(reports, get), spans)  # type: ignore[arg-type]


def _rule_lines(rule: GuardRule | None, fmt: str) -> list[HLine]:
    if rule is None:
        return []
    lines = [
        HLine(
            rule.threshold,
            f"guard {rule.name} ({rule.action}): {rule.comparison} {fmt.format(rule.threshold)}",
        )
    ]
    if rule.clear != rule.threshold:
        lines.append(HLine(rule.clear, f"clears below {fmt.format(rule.clear)}", "#999999", "2 3"))
    low = rule.lower_threshold
    if low is not None:
        lines.append(HLine(low, f"guard {rule.name} ({rule.action}): < {fmt.format(low)}"))
        if rule.lower_clear != low:
            lines.append(
                HLine(
                    rule.lower_clear,
                    f"clears above {fmt.format(rule.lower_clear)}",
                    "#999999",
                    "2 3",
                )
            )
    return lines


def _rules_lines(rules: Sequence[GuardRule | None], fmt: str) -> list[HLine]:
    return [line for rule in rules for line in _rule_lines(rule, fmt)]


def _breaches(reports: Sequence[WindowReport], rules: Sequence[GuardRule | None]) -> list[Point]:
    return [p for rule in rules if rule is not None for p in guard_breaches(reports, rule)]


def build_charts(rec: Recording) -> list[Chart]:
    """Every plot of the report, as data (series, thresholds, breaches)."""
    reports = rec.reports
    spans = rollout_spans(rec)
    rules = rules_of(rec)
    timeline = command_timeline(rec)

    def both(name: str, getter: str, fmt: str = "{:.3g}") -> list[Series]:
        return [
            Series(f"champion {name}", _fig(reports, spans, named(f"champion_{getter}")), CHAMPION),
            Series(
                f"candidate {name}", _fig(reports, spans, named(f"candidate_{getter}")), CANDIDATE
            ),
        ]

    charts: list[Chart] = []
    charts.append(
        Chart(
            "decision_rates",
            "Decision rate of each model (share of requests flagged)",
            "flagged",
            both("decision rate", "decision_rate"),
            y_format="{:.1%}",
            y_min=0.0,
            note="Both models score every request; the rate is over the same paired requests.",
        )
    )
    ratio_rule = rule_for(rules, "decision_rate_ratio")
    charts.append(
        Chart(
            "ratio",
            "Decision-rate ratio (candidate / champion) and its guard",
            "ratio",
            [
                Series(
                    "decision-rate ratio",
                    _fig(reports, spans, named("decision_rate_ratio")),
                    "#000",
                )
            ],
            y_format="{:.2f}",
            hlines=_rule_lines(ratio_rule, "{:g}"),
            highlights=guard_breaches(reports, ratio_rule) if ratio_rule else [],
            highlight_label="breach",
            y_min=0.0,
            note="Red rings: windows over the guard's threshold with enough pairs.",
        )
    )
    psi_rule = rule_for(rules, "psi_candidate_vs_champion")
    charts.append(
        Chart(
            "drift",
            "Score drift, candidate vs champion: PSI, Jensen-Shannon distance, KS",
            "drift",
            [
                Series("PSI", _fig(reports, spans, named("psi_candidate_vs_champion")), PALETTE[2]),
                Series(
                    "JS distance",
                    _fig(reports, spans, named("js_candidate_vs_champion")),
                    PALETTE[3],
                ),
                Series("KS", _fig(reports, spans, named("ks_candidate_vs_champion")), PALETTE[4]),
            ],
            hlines=_rule_lines(psi_rule, "{:g}"),
            highlights=guard_breaches(reports, psi_rule) if psi_rule else [],
            highlight_label="PSI breach",
            y_min=0.0,
        )
    )
    latency: list[Series] = []
    for arm in ("champion", "candidate"):
        for q, dash in (("p50", DOTTED), ("p95", DASHED), ("p99", None)):
            latency.append(
                Series(
                    f"{arm} {q}",
                    _fig(reports, spans, named_path(f"{arm}.latency.{q}")),
                    LATENCY_COLORS[arm, q],
                    dash=dash,
                    width=2.0 if q == "p99" else 1.6,
                    dots=q == "p99",
                )
            )
    charts.append(
        Chart(
            "latency",
            "Model latency percentiles (wall time of the model call on each batch)",
            "ms",
            latency,
            y_format="{:.3g}",
            y_min=0.0,
            note="Over records; the latency guards compare the two models batch by batch (next).",
        )
    )
    median_rule = rule_for(rules, "latency_slower_share")
    tail_rule = rule_for(rules, "latency_tail_excess")
    charts.append(
        Chart(
            "latency_paired",
            "Latency, paired: batches on which the candidate was much slower than the champion",
            "share of batches",
            [
                Series(
                    "candidate slower by the margin (lower 95% bound)",
                    _fig(reports, spans, _bound("latency_slower_share", "lo")),
                    CANDIDATE,
                ),
                Series(
                    "tail surplus: candidate tail excursions less champion ones (lower bound)",
                    _fig(reports, spans, _bound("latency_tail_excess", "lo")),
                    PALETTE[4],
                    dash=DASHED,
                ),
            ],
            y_format="{:.0%}",
            hlines=_rules_lines([median_rule, tail_rule], "{:.0%}"),
            highlights=_breaches(reports, [median_rule, tail_rule]),
            highlight_label="latency breach",
            note=(
                "A batch counts when the candidate took more than the margin (1.5x by default) "
                "times the champion's time on that very batch: host stalls slow both and cancel "
                "out."
            ),
        )
    )
    charts.append(
        Chart(
            "disagreement",
            "Disagreement: paired requests the two models decided differently",
            "share of pairs",
            [
                Series("disagree (either way)", _fig(reports, spans, disagreement), "#000"),
                Series(
                    "only candidate flags",
                    _fig(reports, spans, _cell("champion_no_candidate_yes")),
                    CANDIDATE,
                    dash=DASHED,
                ),
                Series(
                    "only champion flags",
                    _fig(reports, spans, _cell("champion_yes_candidate_no")),
                    CHAMPION,
                    dash=DASHED,
                ),
            ],
            y_format="{:.2%}",
            y_min=0.0,
        )
    )
    err_rules = [
        rule_for(rules, "candidate_excess_error_rate"),
        rule_for(rules, "candidate_excess_timeout_rate"),
    ]
    charts.append(
        Chart(
            "errors",
            "Model error rate (exceptions, timeouts, invalid output), and the candidate's own",
            "errors",
            [
                *both("error rate", "error_rate"),
                Series(
                    "candidate-only errors less champion-only ones (paired)",
                    _fig(reports, spans, named("candidate_excess_error_rate")),
                    PALETTE[4],
                    dash=DASHED,
                ),
                Series(
                    "candidate-only timeouts less champion-only ones (host stalls left out)",
                    _fig(reports, spans, named("candidate_excess_timeout_rate")),
                    PALETTE[3],
                    dash=DOTTED,
                ),
            ],
            y_format="{:.1%}",
            hlines=_rules_lines(err_rules, "{:.1%}"),
            highlights=_breaches(reports, err_rules),
            highlight_label="error breach",
            y_min=0.0,
            note=(
                "The guards watch the paired lines: a request that failed on both arms (a host "
                "stall) blames neither model."
            ),
        )
    )
    watch = [rule_for(rules, "champion_nan_rate"), rule_for(rules, "champion_fallback_rate")]
    charts.append(
        Chart(
            "champion",
            "The champion watched: invalid scores, and fallbacks to the unpromoted candidate",
            "share",
            [
                Series(
                    "champion NaN / invalid scores",
                    _fig(reports, spans, named("champion_nan_rate")),
                    CHAMPION,
                ),
                Series(
                    "decided by the candidate while the champion should decide (fallbacks)",
                    _fig(reports, spans, named("champion_fallback_rate")),
                    CANDIDATE,
                    dash=DASHED,
                ),
            ],
            y_format="{:.2%}",
            hlines=_rules_lines(watch, "{:.2%}"),
            highlights=_breaches(reports, watch),
            highlight_label="alert",
            y_min=0.0,
            note=(
                "Fallbacks: windows in shadow or rolled back where the champion failed and "
                "rollout.champion_failure = fallback_candidate let the candidate decide."
            ),
        )
    )
    charts.append(
        Chart(
            "share",
            "Routing: the candidate's share of decisions, with every control command",
            "candidate share",
            [
                Series(
                    "commanded share (control topic)",
                    joined(share_steps(timeline, spans), spans),
                    PALETTE[5],
                    dots=False,
                ),
                Series(
                    "observed share (decided by the candidate)",
                    _fig(reports, spans, served_share),
                    PALETTE[2],
                    dash="4 2",
                ),
            ],
            y_format="{:.0%}",
            y_min=0.0,
            y_max=1.0,
            note="Numbered markers are the commands in the table below.",
        )
    )
    kind_charts = _kind_charts(reports, spans, rules)
    if kind_charts:  # a non-binary rollout: its own figures first, the binary ones drop out
        charts = kind_charts + [c for c in charts if c.key not in _BINARY_ONLY]
    return charts + quality_charts(rec)


#: Charts of a binary model's score and yes/no decision (empty for other output kinds).
_BINARY_ONLY = frozenset({"decision_rates", "ratio", "drift", "disagreement"})


def _kind_charts(
    reports: Sequence[WindowReport], spans: Sequence[Span], rules: Sequence[GuardRule]
) -> list[Chart]:
    """Charts of the ranking, label and regression figures, for windows that have them."""
    charts: list[Chart] = []

    def line(label: str, name: str, color: str, dash: str | None = None) -> Series:
        return Series(label, _fig(reports, spans, named(name)), color, dash=dash)

    if any(r.ranking is not None for r in reports):
        overlap_rule = rule_for(rules, "overlap_at_k")
        charts.append(
            Chart(
                "ranking_agreement",
                "Rankings: how much the candidate's lists agree with the champion's",
                "agreement",
                [
                    line("overlap@k (shared items / k)", "overlap_at_k", "#000"),
                    line("rank-biased overlap (top ranks weigh most)", "rbo", PALETTE[2]),
                    line("Kendall tau of the shared items", "kendall_tau", PALETTE[3], DASHED),
                    line("champion's top item still first", "top_item_kept", PALETTE[4], DOTTED),
                ],
                y_format="{:.2f}",
                hlines=_rule_lines(overlap_rule, "{:g}"),
                highlights=guard_breaches(reports, overlap_rule) if overlap_rule else [],
                highlight_label="overlap breach",
                note="Both models rank every request; each figure is the mean over the same "
                "requests (1 = the same list).",
            )
        )
        exposure_rules = [rule_for(rules, "coverage_ratio"), rule_for(rules, "item_exposure_jump")]
        charts.append(
            Chart(
                "ranking_exposure",
                "Rankings: exposure -- catalogue coverage, the largest item jump, drift",
                "ratio / share",
                [
                    line(
                        "coverage ratio (distinct items, candidate / champion)",
                        "coverage_ratio",
                        CANDIDATE,
                    ),
                    Series(
                        "largest item exposure jump (lower 95% bound)",
                        _fig(reports, spans, _bound("item_exposure_jump", "lo")),
                        PALETTE[4],
                    ),
                    line(
                        "popularity lift (candidate / champion)",
                        "popularity_lift",
                        PALETTE[3],
                        DASHED,
                    ),
                    line("exposure PSI", "exposure_psi", PALETTE[2], DOTTED),
                ],
                y_format="{:.2f}",
                hlines=_rules_lines(exposure_rules, "{:g}"),
                highlights=_breaches(reports, exposure_rules),
                highlight_label="exposure breach",
                y_min=0.0,
                note="A jump is the share of requests whose candidate list shows an item, less "
                "the share whose champion list does. Coverage counts distinct items shown.",
            )
        )
    if any(r.labels is not None for r in reports):
        label_rules = [rule_for(rules, "label_rate_ratio")]
        charts.append(
            Chart(
                "labels",
                "Labels: agreement, the label whose rate moved most, PSI of the label mix",
                "share / ratio",
                [
                    line("agreement (same label)", "label_agreement", "#000"),
                    line("most moved label: rate ratio", "label_rate_ratio", CANDIDATE),
                    line("PSI of the label distribution", "label_psi", PALETTE[2], DASHED),
                ],
                y_format="{:.2f}",
                hlines=_rules_lines(label_rules, "{:g}"),
                highlights=_breaches(reports, label_rules),
                highlight_label="label breach",
                y_min=0.0,
            )
        )
    if any(r.regression is not None for r in reports):
        value_rules = [rule_for(rules, "value_diff_share")]
        charts.append(
            Chart(
                "values",
                "Regression: pairs beyond the tolerance, distribution drift",
                "share / drift",
                [
                    line("pairs differing beyond the tolerance", "value_diff_share", CANDIDATE),
                    line("PSI of the values", "value_psi", PALETTE[2], DASHED),
                    line("KS of the values", "value_ks", PALETTE[3], DOTTED),
                ],
                y_format="{:.2f}",
                hlines=_rules_lines(value_rules, "{:g}"),
                highlights=_breaches(reports, value_rules),
                highlight_label="value breach",
                y_min=0.0,
            )
        )
    return charts


def _bound(name: str, bound: str) -> Callable[[WindowReport], float | None]:
    """A figure's CI bound (what a guard with that ``bound`` compares)."""

    def get(r: WindowReport) -> float | None:
        f = figure_of(r, name)
        return getattr(f, bound) if f.ok else None

    return get


def named_path(path: str) -> Callable[[WindowReport], object]:
    return lambda r: figure_of(r, path)


def _cell(field: str) -> Callable[[WindowReport], float | None]:
    def get(r: WindowReport) -> float | None:
        p = r.paired
        return getattr(p, field) / p.pairs if p.pairs else None

    return get


# --------------------------------------------------------------------------- page


def _when(ms: float) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _args(e: CommandEntry) -> str:
    a = e.command.args
    parts = []
    if a.share_bp is not None:
        parts.append(f"share {a.share_bp / 100:g}%")
    if a.plan is not None:
        parts.append(f"plan {format_ramp_plan(a.plan)}")
    if a.samples is not None:
        parts.append(f"samples {a.samples}")
    return ", ".join(parts)


def _marker_label(e: CommandEntry) -> str:
    return (
        f"{e.command.action} by {e.command.issued_by}: {humanise(e.command.reason)} [{e.outcome}]"
    )


def markers_of(timeline: Sequence[CommandEntry]) -> list[Marker]:
    return [
        Marker(
            e.ts_ms,
            i,
            _marker_label(e),
            ACTION_COLORS.get(e.command.action, "#0072B2") if e.applied else "#999999",
            f"{e.command.action} by the aggregator" if is_guard_command(e.command) else "",
        )
        for i, e in enumerate(timeline, start=1)
    ]


def bands_of(spans: Sequence[Span]) -> list[Band]:
    colors = ("#0072B2", "#009E73", "#CC79A7", "#E69F00")
    bands = []
    for i, s in enumerate(spans):
        # A rollout's last (partial) window may reach past the next one's start: cut it there.
        end = min(s.end_ms, spans[i + 1].start_ms) if i + 1 < len(spans) else s.end_ms
        label = f"rollout {s.rollout}: candidate {s.candidate}"
        bands.append(Band(s.start_ms, end, label, colors[i % 4], s.candidate.split()[-1]))
    return bands


@dataclass(frozen=True)
class Evidence:
    entry: CommandEntry
    number: int
    window: WindowReport | None
    previous: list[WindowReport]
    rule: GuardRule | None


def evidence_of(rec: Recording, timeline: Sequence[CommandEntry]) -> list[Evidence]:
    """Every command the aggregator issued, with the windows that made it fire."""
    rules = rules_of(rec)
    out = []
    for i, e in enumerate(timeline, start=1):
        if not is_guard_command(e.command):
            continue
        window = firing_window(rec, e.command)
        parts = e.command.command_id.split(":")
        rule = next((r for r in rules if len(parts) > 2 and r.name == parts[2]), None)
        previous: list[WindowReport] = []
        if window is not None:
            earlier = [
                r
                for r in rec.reports
                if r.rollout == window.rollout and r.window_end_ms <= window.window_start_ms
            ]
            if rule is not None and rule.consecutive > 1:
                previous = earlier[-(rule.consecutive - 1) :]
        out.append(Evidence(e, i, window, previous, rule))
    return out


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1b1b1b;
background:#fafafa}
main{max-width:1200px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 6px}
.sub{color:#555;margin:0 0 16px}
section.plot{background:#fff;border:1px solid #e2e2e2;border-radius:6px;padding:12px 14px;
margin:14px 0}
section.plot h2{margin:0 0 4px;font-size:16px}
.legend{display:flex;flex-wrap:wrap;gap:14px;font-size:12.5px;color:#333;margin:4px 0}
.legend span{display:inline-flex;align-items:center;gap:5px}
.note{color:#666;font-size:12.5px;margin:2px 0 0}
svg .grid{stroke:#ececec} svg .frame{fill:none;stroke:#bbb}
svg text{font:11px system-ui,sans-serif;fill:#555} svg .axis-label{font-size:12px;fill:#333}
svg .band-label{font-size:11px;fill:#444;font-weight:600}
svg .threshold-label{font-size:11px;font-weight:600}
svg .marker-num{fill:#fff;font-size:10px;font-weight:700}
svg .marker-text{font-size:12px;font-weight:700}
table{border-collapse:collapse;width:100%;font-size:12.5px;background:#fff}
th,td{border:1px solid #e2e2e2;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.rejected td{color:#888} tr.guard td{background:#fff4ee}
.facts{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;background:#fff;
border:1px solid #e2e2e2;border-radius:6px;padding:10px 14px}
.facts dt{font-weight:600} .facts dd{margin:0}
.evidence{background:#fff4ee;border:1px solid #f0c8b0;border-radius:6px;padding:10px 14px;
margin:12px 0}
.evidence h3{margin:0 0 6px;font-size:15px;color:#a33b00}
.verdict{border-radius:6px;padding:10px 14px;margin:12px 0;border:1px solid}
.verdict.met{background:#eefaf3;border-color:#9fd6b4} .verdict.held{background:#fff8e6;
border-color:#e8cf8f} .verdict h3{margin:0 0 6px;font-size:15px}
svg.reliability .frame{fill:#fff;stroke:#bbb} svg.reliability text{font:11px system-ui;fill:#555}
code{font:12px ui-monospace,Menlo,Consolas,monospace;background:#f3f3f3;padding:1px 3px;
border-radius:3px;word-break:break-word}
"""

#: Counts what the browser drew in each chart (read by the headless-browser test).
_CHECK_JS = """
(function(){var charts=document.querySelectorAll('svg.chart'),empty=[];
charts.forEach(function(svg){var n=0;svg.querySelectorAll('g.series path').forEach(function(p){
var b=p.getBBox();if(b.width>0||b.height>0)n++;});svg.setAttribute('data-drawn',n);
if(!n)empty.push(svg.getAttribute('data-chart'));});
document.documentElement.setAttribute('data-report-check','charts='+charts.length+
';markers='+document.querySelectorAll('svg.chart g.marker').length+';empty='+empty.join(','));
})();
"""


def _swatch(color: str, dash: str | None, width: float) -> str:
    """A legend sample drawn with the line's own stroke: colour, dash pattern and width."""
    dashed = f' stroke-dasharray="{dash}"' if dash else ""
    return (
        '<svg class="swatch" width="26" height="10" viewBox="0 0 26 10" aria-hidden="true">'
        f'<line x1="1" y1="5" x2="25" y2="5" stroke="{color}" stroke-width="{width:g}"'
        f"{dashed}/></svg>"
    )


def _legend(chart: Chart) -> str:
    items = [
        f'<span data-dash="{s.dash or "solid"}">{_swatch(s.color, s.dash, s.width)}'
        f"{escape(s.name)}</span>"
        for s in chart.series
        if s.has_data
    ]
    items += [
        f'<span data-dash="{h.dash}">{_swatch(h.color, h.dash, 1.5)}{escape(h.label)}</span>'
        for h in chart.hlines
    ]
    return f'<div class="legend">{"".join(items)}</div>'


def _figure_cell(r: WindowReport, name: str, fmt: str) -> str:
    f = figure_of(r, name)
    if not f.ok or f.value is None:
        return f"n/a ({escape(f.reason or f.status)})"
    text = fmt.format(f.value)
    if f.lo is not None and f.hi is not None:
        text += f" [{fmt.format(f.lo)}, {fmt.format(f.hi)}]"
    return escape(text)


_EVIDENCE_ROWS = (
    ("pairs", None, ""),
    ("champion decision rate", "champion_decision_rate", "{:.2%}"),
    ("candidate decision rate", "candidate_decision_rate", "{:.2%}"),
    ("decision-rate ratio", "decision_rate_ratio", "{:.3f}"),
    ("PSI (candidate vs champion)", "psi_candidate_vs_champion", "{:.3f}"),
    ("candidate error rate", "candidate_error_rate", "{:.2%}"),
    ("candidate-only errors, less the champion's", "candidate_excess_error_rate", "{:.2%}"),
    ("candidate-only timeouts, less the champion's", "candidate_excess_timeout_rate", "{:.2%}"),
    ("batches the candidate was slower on", "latency_slower_share", "{:.0%}"),
    ("latency median ratio (same batches)", "latency_p50_ratio", "{:.2f}"),
    ("latency p95 ratio (same batches)", "latency_p95_ratio", "{:.2f}"),
    ("champion fallbacks to the candidate", "champion_fallback_rate", "{:.2%}"),
)


def _evidence_html(ev: Evidence) -> str:
    e = ev.entry
    cmd = e.command
    windows = [*ev.previous, *([ev.window] if ev.window else [])]
    head = "".join(
        f"<th>window {fmt_time(w.window_start_ms)}-{fmt_time(w.window_end_ms)}</th>"
        for w in windows
    )
    rows = []
    for label, name, fmt in _EVIDENCE_ROWS:
        cells = "".join(
            f'<td class="num">{w.counts.records if name is None else _figure_cell(w, name, fmt)}'
            "</td>"
            for w in windows
        )
        rows.append(f"<tr><th>{escape(label)}</th>{cells}</tr>")
    applied = f"applied by {', '.join(e.applied_by)}" if e.applied_by else f"outcome: {e.outcome}"
    rule = ev.rule
    rule_text = (
        f"Rule <code>{escape(rule.name)}</code>: <code>{escape(rule.figure)}</code> "
        f"{escape(rule.comparison)} {rule.threshold:g} in {rule.consecutive} consecutive "
        f"window(s) with at least {rule.min_pairs} pairs &rarr; {escape(rule.action)}."
        if rule
        else ""
    )
    offsets = (
        ", ".join(f"partition {o.partition}: offsets {o.first}-{o.last}" for o in ev.window.offsets)
        if ev.window
        else "the cited window is not in the recording"
    )
    return (
        f'<div class="evidence" id="evidence-{ev.number}"><h3>#{ev.number} {escape(cmd.action)} '
        f"of rollout {escape(cmd.rollout)} by the aggregator at {_when(e.ts_ms)}</h3>"
        f"<p>{rule_text} {escape(applied)}; the rollout is now <b>{escape(e.mode)}</b> "
        f"(epoch {e.epoch}).</p>"
        f"<p>Reason on the signed command: <code>{escape(humanise(cmd.reason))}</code></p>"
        f"<table><tr><th>figure</th>{head}</tr>{''.join(rows)}</table>"
        f'<p class="note">Evidence: comparison records {escape(offsets)}. Command '
        f"<code>{escape(cmd.command_id)}</code>, key <code>{escape(cmd.key_id or 'unsigned')}"
        "</code>.</p></div>"
    )


def _command_rows(timeline: Sequence[CommandEntry]) -> str:
    rows = []
    for i, e in enumerate(timeline, start=1):
        c = e.command
        cls = "guard" if is_guard_command(c) else ("" if e.applied else "rejected")
        state = f"{e.mode} {e.share_bp / 100:g}% (epoch {e.epoch})"
        rows.append(
            f'<tr class="{cls}"><td class="num">{i}</td><td>{fmt_time(e.ts_ms)}</td>'
            f"<td>{escape(c.rollout)}</td><td><b>{escape(c.action)}</b> {escape(_args(e))}</td>"
            f"<td>{escape(c.issued_by)}</td><td>{escape(humanise(c.reason))}</td>"
            f"<td>{escape(e.outcome)}"
            f"{'<br>by ' + escape(', '.join(e.applied_by)) if e.applied_by and e.applied else ''}"
            "</td>"
            f"<td>{escape(state)}</td></tr>"
        )
    return "".join(rows)


def _facts(rec: Recording, spans: Sequence[Span], timeline: Sequence[CommandEntry]) -> str:
    items: list[tuple[str, str]] = []
    for key, value in (rec.meta.get("facts") or {}).items():
        items.append((str(key), str(value)))
    for s in spans:
        last = [e for e in timeline if e.command.rollout == s.rollout and e.applied]
        final = f"{last[-1].mode} {last[-1].share_bp / 100:g}%" if last else "no command applied"
        n = sum(1 for r in rec.reports if r.rollout == s.rollout)
        items.append(
            (
                f"rollout {s.rollout}",
                f"champion {s.champion}, candidate {s.candidate}; {n} windows "
                f"{fmt_time(s.start_ms)}-{fmt_time(s.end_ms)}; final state: {final}",
            )
        )
    body = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in items)
    return f'<dl class="facts">{body}</dl>'


def render_page(rec: Recording, title: str | None = None) -> str:
    """The whole report as one HTML document."""
    rec = rec.normalised()
    domain = time_domain(rec)
    spans = rollout_spans(rec)
    timeline = command_timeline(rec)
    markers = markers_of(timeline)
    bands = bands_of(spans)
    charts = build_charts(rec)
    title = title or str(rec.meta.get("title") or "Rollout report")
    story = "".join(f"<p>{escape(p)}</p>" for p in rec.meta.get("story") or [])
    sections = []
    for chart in charts:
        svg = render(chart, domain, markers, bands, marker_labels=chart.key == "share")
        note = f'<p class="note">{escape(chart.note)}</p>' if chart.note else ""
        sections.append(
            f'<section class="plot" id="plot-{chart.key}"><h2>{escape(chart.title)}</h2>'
            f"{_legend(chart)}{svg}{note}</section>"
        )
    quality_html = quality_section(rec, timeline)
    evidence = evidence_of(rec, timeline)
    evidence_html = "".join(_evidence_html(ev) for ev in evidence) or (
        "<p>No command was issued by the aggregator in this range.</p>"
    )
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    meta_json = escape(msgspec.json.encode({"charts": [c.key for c in charts]}).decode())
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en" data-report="{meta_json}"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body><main>"
        f"<h1>{escape(title)}</h1>"
        f'<p class="sub">{_when(domain[0])} to {_when(domain[1])}; {len(rec.reports)} window '
        f"reports, {len(rec.quality)} quality reports, {len(timeline)} control commands. "
        f"Generated {generated} by "
        "<code>sidecar report</code>. Times on the axes are UTC.</p>"
        f"{story}{_facts(rec, spans, timeline)}"
        f"<h2>Guard actions and their evidence</h2>{evidence_html}{quality_html}"
        f"{''.join(sections)}"
        "<h2>Control commands</h2><table><tr><th>#</th><th>time</th><th>rollout</th>"
        "<th>action</th><th>issued by</th><th>reason</th><th>outcome</th><th>state after</th>"
        f"</tr>{_command_rows(timeline)}</table>"
        f"<script>{_CHECK_JS}</script></main></body></html>\n"
    )


__all__ = ["Evidence", "build_charts", "evidence_of", "joined", "markers_of", "render_page"]
