"""The models' health in the instance heartbeat (``InstanceStatus.models``) and in
``sidecar ctl status``: built from real models and their real circuit breakers."""

from __future__ import annotations

import msgspec

from sidecar.config import BreakerConfig, FeatureSpec, ModelConfig, config_from_dict
from sidecar.control import InstanceStatus, ModelHealth, instance_status
from sidecar.control.client import ControlView, Heartbeat
from sidecar.control.format import format_status
from sidecar.control.plane import configured_state, models_health
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
