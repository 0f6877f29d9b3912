from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import load_config
from sidecar.errors import ConfigError
from sidecar.routing import Mode

EXAMPLE = Path(__file__).parent.parent / "examples" / "sidecar.toml"
MINIMAL = """
[models.champion]
name = "m"
version = "1.0.0"
target = "sidecar.examples.fraud:champion"
features = [{ name = "amount" }]

"""


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


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"SIDECAR_ROLLOUT__CANARY_SHARE": "5"},
            "environment variable SIDECAR_ROLLOUT__CANARY_SHARE: `rollout.canary_share` is not "
            "a setting; did you mean SIDECAR_ROLLOUT__CANARY_SHARE_BP?",
        ),
        (
            {"SIDECAR_KAFKA__BOOTSTRAP_SERVER": "k:9092"},
            "did you mean SIDECAR_KAFKA__BOOTSTRAP_SERVERS?",
        ),
        (
            {"SIDECAR_MODELZ__CHAMPION__NAME": "m"},
            "environment variable SIDECAR_MODELZ__CHAMPION__NAME: there is no section 'modelz'; "
            "did you mean SIDECAR_MODELS__...?",
        ),
        (
            {"SIDECAR_MODELS__CHAMPION__NAME__X": "m"},
            "models.champion.name is a single setting, not a table; did you mean "
            "SIDECAR_MODELS__CHAMPION__NAME?",
        ),
        (
            {"SIDECAR_ROLLOUT__MODE": "yolo"},
            "environment variable SIDECAR_ROLLOUT__MODE: `rollout.mode` = 'yolo' is not one of "
            "'shadow', 'canary', 'promoted', 'rolled_back'",
        ),
        (
            {"SIDECAR_PIPELINE__MAX_BATCH": "0"},
            "environment variable SIDECAR_PIPELINE__MAX_BATCH: `pipeline.max_batch`: Expected "
            "`int` >= 1",
        ),
        (
            {"SIDECAR_MODELS__CHAMPION__FEATURES": '[{"name": "amount", "typ": "number"}]'},
            "environment variable SIDECAR_MODELS__CHAMPION__FEATURES: unknown setting "
            "`models.champion.features[0].typ`; did you mean `models.champion.features[0].type`?",
        ),
        (
            {"SIDECAR_AGGREGATE__RULES": '[{"name": "r"}]'},
            "missing required setting `aggregate.rules[0].figure`",
        ),
    ],
)
def test_environment_errors_name_the_variable_and_suggest_the_right_one(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(EXAMPLE, env=env)
    assert message in str(info.value)
    assert str(EXAMPLE) not in str(info.value), "an environment error blamed the file"


def test_environment_paths_that_are_settings_are_accepted() -> None:
    cfg = load_config(
        EXAMPLE,
        env={
            "SIDECAR_MODELS__CANDIDATE__TIMEOUT_MS": "7",  # inside an optional table
            "SIDECAR_MODELS__CHAMPION__OPTIONS__SEED": "3",  # inside a free-form table
            "SIDECAR_MODELS__CHAMPION__BREAKER__ENABLED": "true",
        },
    )
    assert cfg.models.candidate is not None and cfg.models.candidate.timeout_ms == 7
    assert cfg.models.champion.options == {"seed": "3"}
    assert cfg.models.champion.breaker.enabled


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            "[rollout]\ncanary_share = 5\n",
            ": unknown setting `rollout.canary_share`; did you mean `rollout.canary_share_bp`?",
        ),
        (
            "[rolout]\nmode = 'shadow'\n",
            ": unknown setting `rolout`; did you mean `rollout`?",
        ),
        (
            "[kafka]\nacks = 'most'\n",
            ": `kafka.acks` = 'most' is not one of '0', '1', 'all'",
        ),
        (
            "[kafka]\nzzz = 1\n",
            "unknown setting `kafka.zzz` (known here: bootstrap_servers, group_id,",
        ),
    ],
)
def test_file_errors_suggest_the_closest_key_and_list_choices(
    tmp_path: Path, toml: str, message: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(MINIMAL + toml)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(str(path))
    assert message in str(info.value)


def test_no_config_at_all_says_how_to_give_one() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env={})
    assert "no configuration given: pass --config FILE" in str(info.value)
    assert "Object missing" not in str(info.value)


def test_a_file_without_models_names_the_missing_setting(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[kafka]\ngroup_id = 'g'\n")
    with pytest.raises(ConfigError, match=r"missing required setting `models`"):
        load_config(path, env={})


def _with_bootstrap(tmp_path: Path, servers: str) -> Path:
    path = tmp_path / "c.toml"
    text = EXAMPLE.read_text().replace('"127.0.0.1:9092"', f'"{servers}"')
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("servers", "words"),
    [
        ("kafka:abc", "port 'abc' of 'kafka:abc' is not a number"),
        ("kafka:0", "port 0 of 'kafka:0'"),
        ("kafka:70000", "port 70000 of 'kafka:70000'"),
        ("kafka-1:9092,,kafka-2:9092", "an empty entry"),
        ("kafka-1:9092,", "an empty entry"),
        (":9092", "no host"),
        ("[::1:9092", "no closing"),
        ("", "an empty entry"),
    ],
)
def test_a_malformed_bootstrap_address_names_the_setting(
    servers: str, words: str, tmp_path: Path
) -> None:
    """Before: `nohost:abc` got as far as the first client's start and died with a bare
    ValueError traceback from aiokafka's address parser."""
    with pytest.raises(ConfigError, match=r"kafka\.bootstrap_servers") as err:
        load_config(_with_bootstrap(tmp_path, servers), env={})
    assert words in str(err.value)
    with pytest.raises(ConfigError, match="KAFKA_BOOTSTRAP_SERVERS"):
        load_config(EXAMPLE, env={"KAFKA_BOOTSTRAP_SERVERS": servers or ","})


@pytest.mark.parametrize(
    "servers", ["kafka", "kafka-1:9092, kafka-2:9093", "[::1]:9092", "[::1]", "10.0.0.1:1"]
)
def test_well_formed_bootstrap_addresses_are_accepted(servers: str, tmp_path: Path) -> None:
    cfg = load_config(_with_bootstrap(tmp_path, servers), env={})
    assert cfg.kafka.bootstrap_servers == servers
    # From the environment too: a value starting with "[" (IPv6) is no JSON list here.
    for var in ("KAFKA_BOOTSTRAP_SERVERS", "SIDECAR_KAFKA__BOOTSTRAP_SERVERS"):
        assert load_config(EXAMPLE, env={var: servers}).kafka.bootstrap_servers == servers
