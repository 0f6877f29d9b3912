from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import load_config
from sidecar.errors import ConfigError
from sidecar.routing import Mode

EXAMPLE = Path(__file__).parent.parent / "examples" / "sidecar.toml"


def test_the_example_config_loads() -> None:
    cfg = load_config(EXAMPLE, env={})
    assert cfg.models.candidate is not None and cfg.rollout.mode is Mode.CANARY


def test_environment_overrides_the_file() -> None:
    cfg = load_config(
        EXAMPLE,
        env={
            "KAFKA_BOOTSTRAP_SERVERS": "kafka-1:9092,kafka-2:9092",
            "SIDECAR_KAFKA__GROUP_ID": "fraud-prod",
            "SIDECAR_ROLLOUT__MODE": "shadow",
            "SIDECAR_MODELS__CANDIDATE__TIMEOUT_MS": "75",
            "SIDECAR_PIPELINE__MAX_BATCH": "500",
            "SIDECAR_ROLLOUT__SCORE_SHADOW_ARM": "false",
            "SIDECAR_TEST_BROKER": "not a setting, ignored",
        },
    )
    assert cfg.kafka.bootstrap_servers == "kafka-1:9092,kafka-2:9092"
    assert cfg.kafka.group_id == "fraud-prod"
    assert cfg.rollout.mode is Mode.SHADOW and cfg.rollout.score_shadow_arm is False
    assert cfg.models.candidate is not None and cfg.models.candidate.timeout_ms == 75
    assert cfg.pipeline.max_batch == 500


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"SIDECAR_ROLLOUT__MODE": "yolo"}, "rollout.mode"),
        ({"SIDECAR_PIPELINE__MAX_BATCH": "0"}, "pipeline.max_batch"),
        ({"SIDECAR_ROLLOUT__CANARY_SHARE_BP": "20000"}, "canary_share_bp"),
        ({"SIDECAR_KAFKA__NOPE": "1"}, "nope"),
        ({"SIDECAR_MODELS__CHAMPION__VERSION": "v2"}, "version"),
    ],
)
def test_bad_settings_name_the_setting(env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_config(EXAMPLE, env=env)


def test_missing_and_broken_files_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[kafka\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, env={})


def test_canary_without_candidate_is_refused(tmp_path: Path) -> None:
    text = EXAMPLE.read_text().split("[models.candidate]")[0]
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"needs models\.candidate"):
        load_config(path, env={})


def test_the_readme_configuration_reference_is_current() -> None:
    from sidecar.reference import render_block

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert render_block() in readme, "run `python -m sidecar.reference --write README.md`"


def test_a_request_timeout_shorter_than_the_session_is_refused() -> None:
    with pytest.raises(ConfigError, match="must exceed"):
        load_config(EXAMPLE, env={"SIDECAR_KAFKA__REQUEST_TIMEOUT_MS": "5000"})
