"""``sidecar demo``: the story runs to the end on its own embedded broker, and it is the real
one -- the rollback comes from the aggregator, the ramp visits every step, in order."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest

from sidecar.aggregate.actions import is_guard_command
from sidecar.aggregate.guards import default_rules
from sidecar.cli import main
from sidecar.demo.run import DemoOptions, Traffic, run_demo
from sidecar.demo.scenarios import DOMAINS, calibrate, timing
from sidecar.demo.view import Snapshot, guard_states, render_line, render_panel
from sidecar.outcomes.contract import Outcome, decode_outcome
from sidecar.report.model import read_jsonl


def test_calibration_gives_a_2x_candidate_and_a_matched_one() -> None:
    cal = calibrate(0.02)
    assert 1.9 < cal.bad_ratio < 2.1
    assert cal.healthy_threshold > cal.champion_threshold
    assert 0.005 < cal.champion_rate < 0.05


def test_timing_fits_the_duration() -> None:
    quick, full = timing(35, 1500), timing(90, 1000)
    assert quick.window_s == 2.0 and full.window_s == 3.0
    assert [s.split(":")[0] for s in full.plan.split(",")] == ["1%", "5%", "10%", "50%", "100%"]
    assert 5 * full.hold_s < 60 and quick.hold_s >= quick.window_s


def test_views_render_without_a_report() -> None:
    snap = Snapshot(
        scenario="flags",
        elapsed_s=3,
        act_index=1,
        acts=2,
        headline="h",
        phase="p",
        produced=10,
        produced_rate=1.0,
        scored_rate=1.0,
        backlog=0,
        rollout="r",
        mode="canary",
        share_bp=500,
        epoch=2,
        ramp="ramp step 2/5",
        instances=2,
        report=None,
        guards=guard_states(default_rules(), None, []),
        ap_champion=math.nan,
        ap_candidate=math.nan,
        ap_pairs=0,
    )
    panel = render_panel(snap)
    assert "canary 5%, ramp step 2/5" in panel and "decision_rate_ratio - (>1.5" in panel
    assert "waiting" in panel and "none yet" in panel
    assert "canary 5% epoch 2" in render_line(snap)


def test_demo_cli_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--duration", "5"]) == 1
    assert "--duration" in capsys.readouterr().err
    assert main(["demo", "--rate", "10"]) == 1


@pytest.mark.broker
@pytest.mark.timeout(150)
@pytest.mark.slow
async def test_quick_flags_demo_tells_the_whole_story(tmp_path: Path) -> None:
    out = io.StringIO()
    result = await run_demo(
        DemoOptions(scenario="flags", duration_s=35, rate=1500, out_dir=tmp_path, live=False),
        out,
    )
    text = out.getvalue()
    print(text[-3000:])
    print(result.summary)
    assert result.ok, result.summary
    assert result.elapsed_s < 75
    bad, healthy = (a.act.rollout for a in result.acts)

    # Act 1: rolled back in shadow by the aggregator itself, on the decision-rate guard.
    first = [e for e in result.timeline if e.command.rollout == bad]
    assert [e.command.action for e in first if e.applied] == ["rollback"]
    rollback = next(e for e in first if e.applied)
    assert rollback.command.issued_by == "demo-guard"  # the holder of the guard key
    assert "decision_rate_ratio" in rollback.command.reason
    assert rollback.command.command_id.startswith(f"guard:{bad}:decision_rate_ratio:")
    assert sorted(rollback.applied_by) == ["bad-1", "bad-2"]

    # Act 2: the healthy candidate visits every step in order and ends promoted, no guard acts.
    second = [e for e in result.timeline if e.command.rollout == healthy and e.applied]
    assert [(e.mode, e.share_bp) for e in second] == [
        ("canary", 100),
        ("canary", 500),
        ("canary", 1000),
        ("canary", 5000),
        ("canary", 10000),
        ("promoted", 10000),
    ]
    assert [e.command.action for e in second] == ["ramp"] + ["advance"] * 5
    # The control plane's own quality gate let the last step promote this candidate version.
    assert second[-1].command.args.candidate_version == "2.1.0"
    assert not any(is_guard_command(e.command) for e in result.timeline[len(first) :])

    # Better ranking, measured by the outcomes stage: the generator's frauds reach it only as
    # chargebacks on the outcomes topic, seconds later, joined to the comparisons.
    # The bad act is rolled back within seconds: how many of its requests reach a final window
    # depends on the machine's load (600-3,000 seen), so only the long healthy act is judged.
    bad_act, healthy_act = result.acts
    assert bad_act.pairs > 0
    assert healthy_act.pairs > 3000 and healthy_act.frauds > 50
    assert healthy_act.ap_candidate > healthy_act.ap_champion + 0.15, healthy_act
    assert "rolled back by the aggregator" in result.summary
    assert "average precision (outcomes stage" in result.summary
    # The healthy candidate was ramped only once its quality gate was met.
    gated = result.acts[1]
    assert gated.gate is not None and gated.gate.ok and gated.gate.code == "met"
    ramp = next(e for e in second if e.command.action == "ramp")
    verdicts = [v for v in result.recording.verdicts if v.rollout == healthy]
    first_met = min(v.emitted_at_ms for v in verdicts if v.gate.ok)
    assert first_met <= ramp.ts_ms, "the ramp started before the quality gate was met"
    assert "quality gate met after" in result.summary

    # The report and the recording it can be rebuilt from.
    html = result.report_path.read_text()
    assert "rollback by the aggregator" in html and 'id="evidence-1"' in html
    assert 'id="plot-quality_auc"' in html and "quality gate <b>MET</b>" in html
    again = read_jsonl(result.record_path)
    # Every command is recorded; guard verdicts (one per window at most) are not on the
    # timeline.
    recorded = [c for _, c in again.commands if c.action != "verdict"]
    assert len(recorded) == len(result.timeline) and again.reports
    assert any(c.action == "verdict" for _, c in again.commands)
    assert result.log_path.stat().st_size > 0


@pytest.mark.broker
@pytest.mark.timeout(150)
@pytest.mark.slow
async def test_quick_recommend_demo_rolls_back_the_collapse_and_promotes_the_personal_one(
    tmp_path: Path,
) -> None:
    out = io.StringIO()
    result = await run_demo(
        DemoOptions(scenario="recommend", duration_s=35, rate=1500, out_dir=tmp_path, live=False),
        out,
    )
    print(result.summary)
    assert result.ok, result.summary
    collapse, personal = (a.act.rollout for a in result.acts)
    first = [e for e in result.timeline if e.command.rollout == collapse and e.applied]
    assert [e.command.action for e in first] == ["rollback"]
    assert first[0].command.issued_by == "demo-guard"
    assert any(g in first[0].command.reason for g in ("item_exposure_jump", "catalogue_coverage"))
    second = [e for e in result.timeline if e.command.rollout == personal and e.applied]
    assert second[-1].mode == "promoted"
    assert not any(is_guard_command(e.command) for e in second)
    bad, good = result.acts
    assert bad.ap_candidate < bad.ap_champion - 0.1  # NDCG@10 against the generator's clicks
    assert good.ap_candidate > good.ap_champion + 0.02
    assert "NDCG@10" in result.summary
    assert "click outcomes" in result.summary  # the clicks went through the outcomes stage
    assert "Rankings: exposure" in result.report_path.read_text()


def test_recommend_clicks_become_delayed_item_set_outcomes() -> None:
    domain = DOMAINS["recommend"]
    traffic = Traffic(None, 100.0, 1, 0.0, domain)  # type: ignore[arg-type]  # cfg: not read
    requests, truth = domain.generate(200, 3, 0, 0.0)
    traffic._clicks(requests, truth, np.random.default_rng(0))
    clicked = {rid for rid, c in truth.items() if c}
    assert clicked and {rid for _, rid, _ in traffic._due} == clicked
    for _, rid, raw in traffic._due:
        got = decode_outcome(raw)
        assert isinstance(got, Outcome) and got.source == "clicks"
        assert got.label == sorted(truth[rid])


def test_the_panel_shows_the_outcomes_stages_quality_and_the_gate() -> None:
    snap = Snapshot(
        scenario="flags",
        elapsed_s=20,
        act_index=2,
        acts=2,
        headline="h",
        phase="p",
        produced=10,
        produced_rate=1.0,
        scored_rate=1.0,
        backlog=0,
        rollout="r",
        mode="shadow",
        share_bp=0,
        epoch=0,
        ramp="",
        instances=2,
        report=None,
        guards=[],
        ap_champion=0.142,
        ap_candidate=0.48,
        ap_pairs=4800,
        quality="outcomes stage, final windows: 2, 4,800 judged, 96 chargebacks (coverage 2.0%)",
        gate="MET (met): candidate auc >= champion - 0.02 holds at 95%",
    )
    panel = render_panel(snap)
    assert "average precision (outcomes stage, final windows: 2" in panel
    assert "champion 0.142, candidate 0.480" in panel
    assert "quality gate MET (met)" in panel
