"""The outcomes stage's quality gate reaches the control plane as a signed ``verdict`` command
(``quality_ok``), and ``control.promote_gate = "quality"`` acts on it."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from kafka_helpers import make_config
from test_gates import verdict

from sidecar.config import SidecarConfig
from sidecar.control import Applied, ControlConfig, Rejected, RejectReason, apply, initial_state
from sidecar.control.commands import CommandArgs, ControlCommand, sign_command, verify_command
from sidecar.control.keys import TrustStore, write_key_set
from sidecar.errors import ConfigError
from sidecar.outcomes.gates import quality_gate
from sidecar.outcomes.report import GateDecision, QualityRequirement
from sidecar.outcomes.service import quality_command, signing_key
from sidecar.routing import Mode

T0 = 1_800_000_000_000


def promote(issued_at_ms: int, epoch: int, candidate: str | None = "2.1.0") -> ControlCommand:
    return ControlCommand(
        command_id=f"promote-{issued_at_ms}",
        rollout="fraud-v2",
        action="promote",
        issued_by="ops",
        reason="quality looks right",
        issued_at_ms=issued_at_ms,
        expected_epoch=epoch,
        args=CommandArgs(candidate_version=candidate),
    )


def gated(diff: float) -> ControlCommand:
    v = verdict(diff, 0.004)
    decision = quality_gate(v, QualityRequirement(min_pairs=100))
    v = msgspec.structs.replace(
        v, gate=GateDecision(ok=decision.ok, code=decision.code, reason=decision.reason)
    )
    return quality_command(v, T0)


def test_a_quality_verdict_command_carries_the_gate_and_no_epoch() -> None:
    good, bad = gated(0.0), gated(-0.1)
    for cmd in (good, bad):
        assert cmd.action == "verdict" and cmd.expected_epoch is None
        assert cmd.args.verdict is not None and cmd.args.verdict.guards_ok is None
        assert "2.1.0 vs fraud-lr 1.4.0" in cmd.args.verdict.detail  # the models judged
        assert cmd.args.verdict.candidate_version == "2.1.0"
        assert cmd.args.verdict.champion_version == "1.4.0"
    assert good.args.verdict is not None and good.args.verdict.quality_ok is True
    assert bad.args.verdict is not None and bad.args.verdict.quality_ok is False
    assert good.command_id == "quality-verdict:fraud-v2:2.1.0:3000"


@pytest.mark.parametrize(("diff", "promotes"), [(0.0, True), (-0.1, False)])
def test_promotion_waits_for_the_stages_verdict(diff: float, promotes: bool) -> None:
    config = ControlConfig(promote_gate="quality")
    s = initial_state("fraud-v2", now_ms=T0)
    held = apply(s, promote(T0, s.epoch), T0, config=config)
    assert isinstance(held, Rejected) and held.reason is RejectReason.TOO_EARLY
    noted = apply(s, gated(diff), T0 + 1, config=config)
    assert not isinstance(noted, Rejected)
    s = noted.new_state
    for other in ("2.2.0", None):  # a verdict about 2.1.0 never promotes another candidate
        elsewhere = apply(s, promote(T0 + 2, s.epoch, other), T0 + 2, config=config)
        assert isinstance(elsewhere, Rejected) and elsewhere.reason is RejectReason.TOO_EARLY
    out = apply(s, promote(T0 + 2, s.epoch), T0 + 2, config=config)
    if promotes:
        assert isinstance(out, Applied) and out.new_state.mode is Mode.PROMOTED
    else:
        assert isinstance(out, Rejected) and out.reason is RejectReason.TOO_EARLY


def test_the_stage_signs_with_a_guard_key_and_refuses_others(tmp_path: Path) -> None:
    keys = write_key_set(tmp_path / "keys")

    def cfg(**outcomes: object) -> SidecarConfig:
        return make_config("unused:9092", outcomes=dict(outcomes))

    with pytest.raises(ConfigError, match=r"outcomes\.signing_key_file"):
        signing_key(cfg(), None)
    with pytest.raises(ConfigError, match="role sidecar"):
        signing_key(cfg(signing_key_file=str(keys.sidecar)), None)
    # Nothing to sign: alert-only rules and no control verdicts.
    quiet = cfg(rules=[], control_verdicts=False)
    assert signing_key(quiet, None) is None
    key = signing_key(cfg(signing_key_file=str(keys.guard)), None)
    assert key is not None
    signed = sign_command(gated(0.0), key)
    verify_command(signed, TrustStore.from_file(keys.trust_file), T0)  # a guard may sign it
