"""``sidecar report``: plot series from a recorded demo run, the page, and a real browser.

``recorded_flags.jsonl`` is what ``sidecar demo --quick`` recorded (flags scenario): a
2.0.0 candidate rolled back by the aggregator in shadow, then 2.1.0 ramped 1% -> 100% and
promoted. Regenerate it with ``sidecar demo --quick --out-dir d && cp d/recorded.jsonl ...``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import msgspec
import pytest

from sidecar.cli import main
from sidecar.report.model import (
    Recording,
    command_timeline,
    decode_jsonl,
    encode_jsonl,
    read_jsonl,
    rollout_spans,
    share_steps,
    time_domain,
)
from sidecar.report.page import build_charts, evidence_of, markers_of, render_page
from sidecar.report.svg import nice_ticks, time_ticks

RECORDED = Path(__file__).parent / "recorded_flags.jsonl"
#: The same story recorded by the aggregator before issue 12 (reports without the paired
#: figures, policy epochs or fallbacks; windows in command reasons as raw epoch ms): a report
#: over an older topic must still render.
RECORDED_BEFORE = Path(__file__).parent / "recorded_before_issue_12.jsonl"
CHARTS = {
    "decision_rates",
    "ratio",
    "drift",
    "latency",
    "latency_paired",
    "disagreement",
    "errors",
    "champion",
    "share",
}
BAD, HEALTHY = "fraud-lr-v2", "fraud-lr-v2-1"


@pytest.fixture(scope="module")
def rec() -> Recording:
    return read_jsonl(RECORDED).normalised()


def test_jsonl_round_trips(rec: Recording) -> None:
    again = decode_jsonl(encode_jsonl(rec)).normalised()
    assert again.reports == rec.reports and again.commands == rec.commands
    assert again.audits == rec.audits and again.meta == rec.meta


def test_a_bad_line_is_an_error_naming_it() -> None:
    from sidecar.errors import SidecarError

    with pytest.raises(SidecarError, match="input:2"):
        decode_jsonl(b'{"type":"meta","data":{}}\n{"type":"report","data":{"x":1}}\n')


def test_every_plot_has_data(rec: Recording) -> None:
    charts = build_charts(rec)
    assert {c.key for c in charts} == CHARTS
    for chart in charts:
        assert chart.has_data, chart.key
        lines = [s for s in chart.series if s.has_data]
        # Every line of every plot has data, except the error rate of healthy models (zeros are
        # data too, so this holds as well).
        assert len(lines) == len(chart.series), (chart.key, [s.name for s in chart.series])


def test_the_rollback_is_marked_with_its_evidence(rec: Recording) -> None:
    timeline = command_timeline(rec)
    rollbacks = [e for e in timeline if e.command.action == "rollback"]
    assert len(rollbacks) == 1
    rb = rollbacks[0]
    assert rb.command.issued_by == "aggregator" and rb.command.rollout == BAD
    assert rb.applied and rb.mode == "rolled_back" and len(rb.applied_by) == 2
    assert "decision_rate_ratio" in rb.command.reason
    markers = markers_of(timeline)
    marked = [m for m in markers if m.text == "rollback by the aggregator"]
    assert len(marked) == 1 and marked[0].ts_ms == rb.ts_ms
    (ev,) = evidence_of(rec, timeline)
    assert ev.window is not None and ev.rule is not None and ev.rule.name == "decision_rate_ratio"
    ratio = ev.window.paired.decision_rate_ratio.value
    assert ratio is not None and ratio > ev.rule.threshold
    assert len(ev.previous) == ev.rule.consecutive - 1
    ratio_chart = next(c for c in build_charts(rec) if c.key == "ratio")
    assert ratio_chart.highlights, "breaching windows are ringed"
    assert any(h.value == 1.5 for h in ratio_chart.hlines)


def test_share_follows_the_commands(rec: Recording) -> None:
    timeline = command_timeline(rec)
    steps = share_steps(timeline, rollout_spans(rec))
    assert {v for _, v in steps[BAD]} == {0.0}
    shares = [v for _, v in steps[HEALTHY]]
    assert shares[-1] == 1.0
    distinct = list(dict.fromkeys(shares))
    assert distinct == [0.0, 0.01, 0.05, 0.1, 0.5, 1.0]
    applied = [e for e in timeline if e.command.rollout == HEALTHY and e.applied]
    assert [e.mode for e in applied][-1] == "promoted"


def test_between_selects_by_time(rec: Recording) -> None:
    lo, hi = time_domain(rec)
    mid = (lo + hi) // 2
    first, second = rec.between(None, mid), rec.between(mid, None)
    assert len(first.reports) + len(second.reports) == len(rec.reports)
    assert first.reports and second.reports
    assert rec.only_rollouts([HEALTHY]).commands == [
        c for c in rec.commands if c[1].rollout == HEALTHY
    ]


def test_ticks() -> None:
    assert nice_ticks(0, 1) == [0, 0.25, 0.5, 0.75, 1.0]
    assert nice_ticks(0, 0.031)[:3] == [0, 0.01, 0.02]
    ticks = time_ticks(1_000_500, 1_036_000)
    assert all(t % 5000 == 0 for t in ticks) and 5 <= len(ticks) <= 8


def test_page_is_self_contained(rec: Recording) -> None:
    html = render_page(rec)
    assert html.count('<svg class="chart"') == len(CHARTS)
    assert 'id="evidence-1"' in html and "rollback by the aggregator" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:""", html), "no external resources"
    assert "<link" not in html


def test_cli_from_a_recording(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.html"
    assert main(["report", "--input", str(RECORDED), "--out", str(out)]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert "18 window reports" in capsys.readouterr().out
    only = tmp_path / "only.html"
    assert main(["report", "--input", str(RECORDED), "--rollout", HEALTHY, "--out", str(only)]) == 0
    table = only.read_text().split("<h2>Control commands</h2>")[1]
    assert f"<td>{HEALTHY}</td>" in table and f"<td>{BAD}</td>" not in table


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--out", str(tmp_path / "x.html")]) == 1
    assert "--input" in capsys.readouterr().err
    assert main(["report", "--input", str(RECORDED), "--from", "offset:3"]) == 1
    assert "by time" in capsys.readouterr().err
    assert (
        main(["report", "--input", str(RECORDED), "--from", "2000-01-01", "--to", "2000-01-02"])
        == 1
    )
    assert "no window reports" in capsys.readouterr().err
    assert main(["report", "--input", str(tmp_path / "missing.jsonl")]) == 1


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HEADLESS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (Debian: apt-get install -y chromium): the report's "
    "rendering in a real browser is not checked",
)
def test_renders_in_headless_chromium(rec: Recording, tmp_path: Path) -> None:
    assert CHROMIUM is not None
    page = tmp_path / "report.html"
    page.write_text(render_page(rec), encoding="utf-8")
    base = [CHROMIUM, *HEADLESS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60
    ).stdout
    # The page's own script counted, in the browser, the drawn lines of every chart.
    check = re.search(r'data-report-check="charts=(\d+);markers=(\d+);empty=([^"]*)"', dom)
    assert check is not None, dom[:500]
    assert int(check.group(1)) == len(CHARTS)
    assert int(check.group(2)) == len(CHARTS) * len(rec.commands)
    assert check.group(3) == "", f"charts drawn without a line: {check.group(3)}"
    drawn = re.findall(r'data-chart="([a-z_]+)"[^>]*data-drawn="(\d+)"', dom)
    assert {k for k, n in drawn if int(n) > 0} == CHARTS
    shot = tmp_path / "report.png"
    subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1400,3000", page.as_uri()],
        capture_output=True,
        timeout=60,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


def test_meta_is_plain_json(rec: Recording) -> None:
    msgspec.json.encode(rec.meta)  # what the demo put there stays serialisable
    assert rec.meta["rules"] and rec.meta["initial"][BAD] == {"mode": "shadow"}


def test_legend_swatches_are_drawn_like_their_lines(rec: Recording) -> None:
    page = render_page(rec)
    for chart in build_charts(rec):
        section = page[page.index(f'id="plot-{chart.key}"') :]
        legend = section[: section.index("</div>")]
        swatches = re.findall(
            r'<span data-dash="([^"]+)"><svg class="swatch"[^>]*><line [^>]*'
            r'stroke="([^"]+)" stroke-width="([^"]+)"( stroke-dasharray="([^"]+)")?/></svg>'
            r"([^<]+)</span>",
            legend,
        )
        by_name = {name: (color, dash or None) for _, color, _, _, dash, name in swatches}
        for series in chart.series:
            assert by_name[series.name] == (series.color, series.dash), (chart.key, series.name)
    latency = next(c for c in build_charts(rec) if c.key == "latency")
    assert len({s.color for s in latency.series}) == len(latency.series) == 6, "distinct colours"
    dashes = {s.name.split()[-1]: s.dash for s in latency.series}
    assert (
        dashes["p99"] is None
        and dashes["p50"] != dashes["p95"]
        and None
        not in (
            dashes["p50"],
            dashes["p95"],
        )
    )


def test_windows_in_command_reasons_are_utc_times() -> None:
    rec = read_jsonl(RECORDED_BEFORE).normalised()
    rollback = next(e for e in command_timeline(rec) if e.command.action == "rollback")
    assert re.search(r"\[\d{13},\d{13}\) ms", rollback.command.reason), "recorded raw"
    page = render_page(rec)
    assert not re.search(r"\d{13},\s*\d{13}", page), "a raw epoch-ms window on the page"
    assert "window 2026-11-25 23:02:30-23:02:32 UTC" in page


def test_reports_of_an_older_aggregator_still_render() -> None:
    rec = read_jsonl(RECORDED_BEFORE).normalised()
    assert all(r.latency_paired is None and r.policy_epoch_max is None for r in rec.reports)
    charts = {c.key: c for c in build_charts(rec)}
    assert set(charts) == CHARTS
    assert not charts["latency_paired"].has_data  # not reported then: no line, no error
    assert charts["ratio"].has_data
    render_page(rec)


def test_champion_fallbacks_are_shown(rec: Recording) -> None:
    champion = next(c for c in build_charts(rec) if c.key == "champion")
    assert [s.name for s in champion.series] == [
        "champion NaN / invalid scores",
        "decided by the candidate while the champion should decide (fallbacks)",
    ]
    # shadow and rolled-back windows have a fallback rate (zero here); canary ones have none
    rates = [v for _, v in champion.series[1].points if v is not None]
    assert rates and all(v == 0.0 for v in rates)
    assert any(h.label.startswith("guard champion_fallback (alert)") for h in champion.hlines)
