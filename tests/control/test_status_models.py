"""The models' health in the instance heartbeat (``InstanceStatus.models``) and in
``sidecar ctl status``: built from real models and their real circuit breakers."""

from __future__ import annotations

import msgspec
import pytest

from sidecar.config import BreakerConfig, FeatureSpec, ModelConfig, config_from_dict
from sidecar.control import (
    ControlConfig,
    InstanceStatus,
    ModelHealth,
    Verdict,
    initial_state,
    instance_status,
)
from sidecar.control.client import ControlView, Heartbeat, candidate_to_promote
from sidecar.control.format import format_status
from sidecar.control.plane import configured_state, models_health
from sidecar.errors import SidecarError
from sidecar.examples.fraud import CANDIDATE_FEATURES, CHAMPION_FEATURES
from sidecar.models import load_model

T0 = 1_700_000_000_000


def model(name: str, version: str, target: str, features: tuple[str, ...], **kw: object):  # type: ignore[no-untyped-def]
    return load_model(
        ModelConfig(
            name=name,
            version=version,
            target=target,
            features=[FeatureSpec(name=f) for f in features],
            **kw,  # type: ignore[arg-type]
        )
    )


def test_models_health_follows_the_breakers() -> None:
    champion = model(
        "fraud-lr",
        "1.4.0",
        "sidecar.examples.fraud:champion",
        CHAMPION_FEATURES,
        breaker=BreakerConfig(enabled=False),
    )
    candidate = model(
        "fraud-lr",
        "2.0.0",
        "sidecar.examples.fraud:candidate",
        CANDIDATE_FEATURES,
        breaker=BreakerConfig(enabled=True, min_calls=2, window=4, open_s=60),
    )
    health = models_health(champion, candidate)
    assert health == [
        ModelHealth(
            arm="champion",
            model="fraud-lr",
            version="1.4.0",
            manifest_digest=champion.manifest_digest,
            breaker="off",
        ),
        ModelHealth(
            arm="candidate",
            model="fraud-lr",
            version="2.0.0",
            manifest_digest=candidate.manifest_digest,
            breaker="closed",
        ),
    ]
    for _ in range(2):
        candidate.breaker.record(False)
    (after,) = models_health(candidate, None)
    assert (after.arm, after.breaker, after.breaker_opened) == ("champion", "open", 1)
    champion.close()
    candidate.close()


def test_status_carries_models_and_old_heartbeats_still_decode() -> None:
    cfg = config_from_dict(
        {
            "models": {
                "champion": {
                    "name": "m",
                    "version": "1.0.0",
                    "target": "sidecar.examples.fraud:champion",
                    "features": [{"name": "amount"}],
                }
            }
        }
    )
    state = configured_state(cfg)
    models = [
        ModelHealth(
            arm="champion",
            model="m",
            version="1.0.0",
            manifest_digest="sha256:00112233aabbccdd",
            breaker="half_open",
            breaker_opened=3,
            registry_version="7",
        )
    ]
    status = instance_status(state, instance_id="i1", ts_ms=T0, models=models)
    wire = msgspec.json.encode(status)
    assert msgspec.json.decode(wire, type=InstanceStatus) == status
    # A heartbeat from an instance that predates the field decodes with models=None.
    old = msgspec.json.decode(wire.replace(b',"models":', b',"x":'), type=InstanceStatus)
    assert old.models is None
    bare = instance_status(state, instance_id="i0", ts_ms=T0)
    assert b"models" not in msgspec.json.encode(bare)

    beats = [Heartbeat(bare, "s1"), Heartbeat(status, None)]
    view = ControlView({state.rollout: state}, [], beats, T0 + 1000, 6000)
    text = format_status(view, None, last=5)
    assert (
        "    champion  m 1.0.0 (registry version 7)  sha256:00112233aabbccdd  "
        "breaker HALF_OPEN, opened 3x"
    ) in text.splitlines()
    assert text.count("breaker") == 1  # the old heartbeat shows no model lines
    assert "signed s1" in text and "UNVERIFIED" in text


def _beat(
    instance: str, candidate: str, *, ts_ms: int = T0, signer: str | None = "s1"
) -> Heartbeat:
    state = initial_state("r1", now_ms=T0)
    models = [
        ModelHealth(arm="champion", model="m", version="1.0.0"),
        ModelHealth(arm="candidate", model="m", version=candidate),
    ]
    return Heartbeat(
        instance_status(state, instance_id=instance, ts_ms=ts_ms, models=models), signer
    )


def test_a_promote_names_the_candidate_the_live_instances_run() -> None:
    state = initial_state("r1", now_ms=T0)

    def view(*beats: Heartbeat) -> ControlView:
        return ControlView({"r1": state}, [], list(beats), T0 + 1000, 6000)

    assert candidate_to_promote(view(), "r1", "2.0.0") == "2.0.0"  # nobody live: the config
    assert candidate_to_promote(view(_beat("a", "2.1.0"), _beat("b", "2.1.0")), "r1", "2.0.0") == (
        "2.1.0"
    )
    ignored = (
        _beat("old", "1.9.0", ts_ms=T0 - 60_000),  # stale
        _beat("forged", "6.6.6", signer=None),  # unverified
    )
    assert candidate_to_promote(view(_beat("a", "2.1.0"), *ignored), "r1", None) == "2.1.0"
    assert candidate_to_promote(view(_beat("a", "2.1.0")), "another", None) is None
    with pytest.raises(SidecarError, match=r"candidate versions 2\.1\.0, 2\.2\.0: finish"):
        candidate_to_promote(view(_beat("a", "2.1.0"), _beat("b", "2.2.0")), "r1", None)


def test_status_says_which_candidate_the_quality_verdict_is_about() -> None:
    rules = ControlConfig(promote_gate="quality")
    judged = Verdict(
        quality_ok=True,
        window_end_ms=T0,
        detail="met",
        candidate_version="2.0.0",
        champion_version="1.0.0",
    )
    state = msgspec.structs.replace(initial_state("r1", now_ms=T0), quality=judged)
    beats = [_beat("a", "2.1.0")]
    text = format_status(ControlView({"r1": state}, [], beats, T0 + 1000, 6000), "r1", 5, rules)
    assert "quality verdict: ok about candidate 2.0.0 vs champion 1.0.0" in text
    assert (
        "promotion held back: the latest quality verdict is about candidate 2.0.0, not 2.1.0"
        in (text)
    )
    # Nobody live: promoting the judged candidate would pass.
    quiet = format_status(ControlView({"r1": state}, [], [], T0 + 1000, 6000), "r1", 5, rules)
    assert "promotion held back" not in quiet
