"""Inline SVG line charts, generated here: no plotting library, no JavaScript, no CDN.

Why hand-written: the report must open offline as one file, and every chart is a time series
with a few lines, horizontal thresholds and vertical command markers -- a few hundred lines of
SVG text, far smaller than inlining a plotting library (hundreds of kB of JS) and without a
dependency to keep up to date. Hover titles (``<title>``) give the exact values.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

from .model import Point

WIDTH = 1160
HEIGHT = 250
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 22, 30

#: Colour-blind-safe palette (Okabe-Ito).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#000000")


@dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[Point]
    color: str
    dash: str | None = None
    width: float = 2.0
    #: Draw markers at every point (windows are few: a dot per window reads well).
    dots: bool = True

    @property
    def has_data(self) -> bool:
        return any(v is not None for _, v in self.points)


@dataclass(frozen=True)
class HLine:
    value: float
    label: str
    color: str = "#D55E00"
    dash: str = "6 4"


@dataclass(frozen=True)
class Marker:
    """A vertical line at a control command; ``number`` links it to the command table."""

    ts_ms: float
    number: int
    label: str
    color: str
    #: Short text written next to the marker's number (guard actions), empty for none.
    text: str = ""


@dataclass(frozen=True)
class Band:
    """A shaded time range (one rollout) labelled at its top."""

    start_ms: float
    end_ms: float
    label: str
    color: str
    #: Used when ``label`` does not fit the band's width.
    short: str = ""


@dataclass
class Chart:
    key: str
    title: str
    y_label: str
    series: list[Series]
    y_format: str = "{:.3g}"
    hlines: list[HLine] = field(default_factory=list)
    highlights: list[Point] = field(default_factory=list)
    highlight_label: str = ""
    y_min: float | None = None
    y_max: float | None = None
    note: str = ""

    @property
    def has_data(self) -> bool:
        return any(s.has_data for s in self.series)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def time_ticks(lo_ms: float, hi_ms: float, count: int = 8) -> list[float]:
    """Round wall-clock ticks (1, 2, 5, 10, 15, 30 s; 1, 2, 5, 10, 15, 30 min; hours)."""
    span_s = max((hi_ms - lo_ms) / 1000, 1e-3)
    steps = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400]
    step = next((s for s in steps if span_s / s <= count), steps[-1]) * 1000
    first = math.ceil(lo_ms / step) * step
    return [float(t) for t in range(int(first), int(hi_ms) + 1, int(step))]


def fmt_time(ms: float) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%H:%M:%S")


def _y_range(chart: Chart) -> tuple[float, float]:
    values = [v for s in chart.series for _, v in s.points if v is not None]
    values += [h.value for h in chart.hlines]
    lo = min(values) if values else 0.0
    hi = max(values) if values else 1.0
    if chart.y_min is not None:
        lo = min(lo, chart.y_min)
    if chart.y_max is not None:
        hi = max(hi, chart.y_max)
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    pad = (hi - lo) * 0.08
    return (lo if chart.y_min is not None and lo >= chart.y_min else lo - pad), hi + pad


def _path(points: Sequence[Point], x: _Scale, y: _Scale) -> str:
    parts: list[str] = []
    pen_up = True
    for t, v in points:
        if v is None:
            pen_up = True
            continue
        parts.append(f"{'M' if pen_up else 'L'}{x(t):.1f},{y(v):.1f}")
        pen_up = False
    return " ".join(parts)


class _Scale:
    def __init__(self, d0: float, d1: float, r0: float, r1: float) -> None:
        self.d0, self.d1, self.r0, self.r1 = d0, d1, r0, r1

    def __call__(self, v: float) -> float:
        if self.d1 == self.d0:
            return self.r0
        return self.r0 + (v - self.d0) / (self.d1 - self.d0) * (self.r1 - self.r0)


def render(
    chart: Chart,
    domain: tuple[float, float],
    markers: Sequence[Marker] = (),
    bands: Sequence[Band] = (),
    marker_labels: bool = False,
) -> str:
    """One chart as an ``<svg>`` element (a string)."""
    w, h = WIDTH, HEIGHT
    x = _Scale(domain[0], domain[1], LEFT, w - RIGHT)
    y_lo, y_hi = _y_range(chart)
    y = _Scale(y_lo, y_hi, h - BOTTOM, TOP)
    out = [
        f'<svg class="chart" id="chart-{escape(chart.key)}" data-chart="{escape(chart.key)}" '
        f'viewBox="0 0 {w} {h}" width="100%" role="img" '
        f'aria-label="{escape(chart.title)}" xmlns="http://www.w3.org/2000/svg">'
    ]
    for b in bands:
        x0, x1 = max(x(b.start_ms), LEFT), min(x(b.end_ms), w - RIGHT)
        if x1 <= x0:
            continue
        fits = [t for t in (b.label, b.short) if t and len(t) * 6.4 < x1 - x0 - 6]
        label = fits[0] if fits else ""
        out.append(
            f'<rect class="band" x="{x0:.1f}" y="{TOP}" width="{x1 - x0:.1f}" '
            f'height="{h - TOP - BOTTOM}" fill="{b.color}" opacity="0.08"/>'
            f'<text x="{x0 + 4:.1f}" y="{TOP + 11}" class="band-label">{escape(label)}</text>'
        )
    for t in nice_ticks(y_lo, y_hi):
        yy = y(t)
        out.append(
            f'<line x1="{LEFT}" x2="{w - RIGHT}" y1="{yy:.1f}" y2="{yy:.1f}" class="grid"/>'
            f'<text x="{LEFT - 6}" y="{yy + 4:.1f}" class="tick" text-anchor="end">'
            f"{escape(chart.y_format.format(t))}</text>"
        )
    for t in time_ticks(*domain):
        xx = x(t)
        out.append(
            f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{TOP}" y2="{h - BOTTOM}" class="grid"/>'
            f'<text x="{xx:.1f}" y="{h - BOTTOM + 16}" class="tick" text-anchor="middle">'
            f"{fmt_time(t)}</text>"
        )
    out.append(
        f'<rect x="{LEFT}" y="{TOP}" width="{w - LEFT - RIGHT}" height="{h - TOP - BOTTOM}" '
        'class="frame"/>'
        f'<text x="14" y="{(h - BOTTOM + TOP) / 2:.0f}" class="axis-label" text-anchor="middle" '
        f'transform="rotate(-90 14 {(h - BOTTOM + TOP) / 2:.0f})">{escape(chart.y_label)}</text>'
    )
    for hl in chart.hlines:
        yy = y(hl.value)
        out.append(
            f'<line x1="{LEFT}" x2="{w - RIGHT}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="{hl.color}" '
            f'stroke-dasharray="{hl.dash}" stroke-width="1.5" class="threshold">'
            f"<title>{escape(hl.label)}</title></line>"
            f'<text x="{w - RIGHT - 4}" y="{yy - 4:.1f}" class="threshold-label" '
            f'text-anchor="end" style="fill:{hl.color}">{escape(hl.label)}</text>'
        )
    for m in markers:
        xx = x(m.ts_ms)
        out.append(
            f'<g class="marker" data-number="{m.number}"><line x1="{xx:.1f}" x2="{xx:.1f}" '
            f'y1="{TOP}" y2="{h - BOTTOM}" stroke="{m.color}" stroke-width="1.2" '
            f'stroke-dasharray="2 2"><title>#{m.number} {escape(m.label)}</title></line>'
        )
        if marker_labels:
            out.append(
                f'<circle cx="{xx:.1f}" cy="{TOP + 22 + (m.number % 3) * 18}" r="8" '
                f'fill="{m.color}"><title>#{m.number} {escape(m.label)}</title></circle>'
                f'<text x="{xx:.1f}" y="{TOP + 26 + (m.number % 3) * 18}" class="marker-num" '
                f'text-anchor="middle">{m.number}</text>'
            )
            if m.text:
                out.append(
                    f'<text x="{xx + 11:.1f}" y="{TOP + 26 + (m.number % 3) * 18}" '
                    f'class="marker-text" style="fill:{m.color}">{escape(m.text)}</text>'
                )
        out.append("</g>")
    for s in chart.series:
        d = _path(s.points, x, y)
        if not d:
            continue
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        out.append(
            f'<g class="series" data-series="{escape(s.name)}"><path d="{d}" fill="none" '
            f'stroke="{s.color}" stroke-width="{s.width}"{dash} stroke-linejoin="round"/>'
        )
        if s.dots:
            for t, v in s.points:
                if v is not None:
                    out.append(
                        f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="2.2" fill="{s.color}">'
                        f"<title>{escape(s.name)} at {fmt_time(t)}: "
                        f"{escape(chart.y_format.format(v))}</title></circle>"
                    )
        out.append("</g>")
    for t, v in chart.highlights:
        if v is None:
            continue
        out.append(
            f'<circle class="breach" cx="{x(t):.1f}" cy="{y(v):.1f}" r="5.5" fill="none" '
            f'stroke="#D55E00" stroke-width="2"><title>{escape(chart.highlight_label)} at '
            f"{fmt_time(t)}: {escape(chart.y_format.format(v))}</title></circle>"
        )
    out.append("</svg>")
    return "".join(out)


__all__ = [
    "PALETTE",
    "Band",
    "Chart",
    "HLine",
    "Marker",
    "Series",
    "fmt_time",
    "nice_ticks",
    "render",
    "time_ticks",
]
