"""``sidecar ctl`` argument handling, without a broker: every subcommand has help, and
mistakes are reported with what to do, before anything is published."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.cli import build_parser, main
from sidecar.config import config_from_dict
from sidecar.control.client import build_command
from sidecar.control.keys import write_key_set
from sidecar.control.plane import configured_state, load_trust
from sidecar.errors import ConfigError

ACTIONS = [
    "status",
    "history",
    "shadow",
    "canary",
    "ramp",
    "promote",
    "rollback",
    "pause",
    "resume",
    "retire",
]

CONFIG = """
[models.champion]
name = "m"
version = "1.0.0"
target = "sidecar.examples.fraud:champion"
features = [{ name = "amount" }]

[control]
trust_file = "{trust}"
"""


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    keys = write_key_set(tmp_path / "keys")
    monkeypatch.delenv("SIDECAR_CTL_KEY", raising=False)
    path = tmp_path / "sidecar.toml"
    path.write_text(CONFIG.replace("{trust}", str(keys.trust_file)))
    return path


@pytest.mark.parametrize("action", ACTIONS)
def test_every_subcommand_has_help(action: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["ctl", action, "--help"])
    assert exit_.value.code == 0
    assert "--config" in capsys.readouterr().out


def test_rollback_needs_a_reason(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = config_file.parent / "keys" / "dev-operator.key"
    assert main(["ctl", "rollback", "--config", str(config_file), "--key", str(key)]) == 1
    assert "rollback needs --reason" in capsys.readouterr().err


def test_a_mutating_action_needs_a_key(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ctl", "promote", "--config", str(config_file)]) == 1
    assert "pass --key" in capsys.readouterr().err


def test_an_empty_candidate_version_is_refused_before_publishing(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = config_file.parent / "keys" / "dev-operator.key"
    argv = ["ctl", "promote", "--config", str(config_file), "--key", str(key)]
    assert main([*argv, "--candidate-version", " "]) == 1
    assert "--candidate-version needs a version" in capsys.readouterr().err


def test_a_key_outside_the_trust_file_is_refused_before_publishing(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = write_key_set(tmp_path / "other", "stranger")
    argv = ["ctl", "promote", "--config", str(config_file), "--key", str(other.operator)]
    assert main(argv) == 1
    assert "is not in the trust file" in capsys.readouterr().err


def test_a_bad_share_is_refused_with_the_accepted_forms(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = config_file.parent / "keys" / "dev-operator.key"
    argv = ["ctl", "canary", "five", "--config", str(config_file), "--key", str(key)]
    assert main(argv) == 1
    assert "'5%'" in capsys.readouterr().err


def test_no_config_says_how_to_give_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SIDECAR_CONFIG", raising=False)
    assert main(["ctl", "status"]) == 1
    assert "--config" in capsys.readouterr().err


def test_shares_accept_percent_and_basis_points() -> None:
    parser = build_parser()
    for text in ("5%", "500bp"):
        args = parser.parse_args(["ctl", "canary", text])
        assert args.share == text
    cmd = build_command("ramp", "r1", plan="1%:5m:1k,100%:1h:5k")
    assert cmd.args.plan is not None and [s.share_bp for s in cmd.args.plan] == [100, 10_000]
    assert cmd.reason == "ramp via sidecar ctl" and cmd.command_id.startswith("ctl:ramp:")


def test_the_sidecar_trust_fails_closed_without_a_trust_file() -> None:
    cfg = config_from_dict(
        {
            "models": {
                "champion": {
                    "name": "m",
                    "version": "1.0.0",
                    "target": "x:y",
                    "features": [{"name": "a"}],
                }
            }
        }
    )
    assert len(load_trust(cfg.control, required=False)) == 0
    with pytest.raises(ConfigError, match=r"control\.trust_file"):
        load_trust(cfg.control, required=True)
    assert configured_state(cfg).epoch == 0


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_and_rollout_go_before_or_after_the_action(
    where: str, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    opts = ["--config", str(config_file), "--rollout", "r1"]
    argv = ["ctl", *opts, "rollback"] if where == "before" else ["ctl", "rollback", *opts]
    args = build_parser().parse_args(argv)
    assert (args.config, args.rollout, args.ctl_command) == (str(config_file), "r1", "rollback")
    # The config given before the action is the one loaded (its trust file has no key given).
    assert main([*argv, "--reason", "r"]) == 1
    assert "pass --key" in capsys.readouterr().err


def test_an_option_after_the_action_wins_over_the_same_one_before(config_file: Path) -> None:
    args = build_parser().parse_args(
        ["ctl", "--config", "first.toml", "status", "--config", str(config_file)]
    )
    assert args.config == str(config_file)


def test_sidecar_config_from_the_environment_is_the_default(
    monkeypatch: pytest.MonkeyPatch, config_file: Path
) -> None:
    monkeypatch.setenv("SIDECAR_CONFIG", str(config_file))
    assert build_parser().parse_args(["ctl", "history"]).config == str(config_file)
