from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "sidecar.toml"

COMMANDS = ["broker", "run", "produce", "schemas", "config"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: sidecar" in capsys.readouterr().out


def test_run_help_is_short_and_points_to_the_settings(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert len(out.splitlines()) < 40
    assert "GuardRule(" not in out
    assert "`sidecar config`" in out and "Configuration table" in out


def test_config_lists_every_setting_and_its_environment_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    for env in [
        "SIDECAR_KAFKA__GROUP_ID",
        "SIDECAR_ROLLOUT__CANARY_SHARE_BP",
        "SIDECAR_PIPELINE__MAX_IN_FLIGHT_RECORDS",
        "SIDECAR_AGGREGATE__RULES",
    ]:
        assert env in out
    assert "GuardRule(" not in out and "decision_rate_ratio" in out
    assert "('shadow' | 'canary' | 'promoted' | 'rolled_back')" in out
    assert max(len(line) for line in out.splitlines()) < 200  # no 1,000-character repr


def test_config_filters_and_says_when_nothing_matches(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "canary"]) == 0
    assert capsys.readouterr().out.strip().startswith("rollout.canary_share_bp")
    assert main(["config", "no-such-thing"]) == 1
    assert "no setting matches 'no-such-thing'" in capsys.readouterr().err


def test_config_checks_a_file_and_names_a_mistyped_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "--config", str(EXAMPLE)]) == 0
    assert "valid" in capsys.readouterr().out
    monkeypatch.setenv("SIDECAR_ROLLOUT__CANARY_SHARE", "5")
    assert main(["config", "--config", str(EXAMPLE)]) == 1
    err = capsys.readouterr().err
    assert "environment variable SIDECAR_ROLLOUT__CANARY_SHARE:" in err
    assert "did you mean SIDECAR_ROLLOUT__CANARY_SHARE_BP?" in err


def run_cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``sidecar ARGV`` in a subprocess, without any SIDECAR_* settings of the caller's shell."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    return subprocess.run(
        [sys.executable, "-m", "sidecar.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
    )


def test_run_without_a_config_says_how_to_give_one() -> None:
    proc = run_cli("run")
    assert proc.returncode == 1, proc.stderr
    assert "no configuration given: pass --config FILE" in proc.stderr
    assert "examples/sidecar.toml" in proc.stderr
    assert "Object missing" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_bad_config_exits_non_zero_with_a_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "run", "--config", str(tmp_path / "missing.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_taken_broker_port_is_a_clear_error(taken_port: int) -> None:
    proc = run_cli("broker", "--port", str(taken_port))
    assert proc.returncode == 1 and "already in use" in proc.stderr
    assert "pick another port with --port" in proc.stderr


def test_a_taken_embedded_broker_port_names_the_run_flag(taken_port: int) -> None:
    proc = run_cli(
        "run", "--config", str(EXAMPLE), "--embedded-broker", "--broker-port", str(taken_port)
    )
    assert proc.returncode == 1, proc.stderr
    assert f"port {taken_port} on 127.0.0.1 is already in use" in proc.stderr
    assert "pick another port with --broker-port" in proc.stderr and "Traceback" not in proc.stderr


def test_a_taken_metrics_port_names_the_setting(taken_port: int) -> None:
    proc = run_cli("run", "--config", str(EXAMPLE), env={"SIDECAR_METRICS__PORT": str(taken_port)})
    assert proc.returncode == 1, proc.stderr
    assert f"cannot serve /metrics on 127.0.0.1:{taken_port} (Address already in use)" in (
        proc.stderr
    )
    assert "set metrics.port (or SIDECAR_METRICS__PORT) to a free port" in proc.stderr
    assert "Traceback" not in proc.stderr and "OSError" not in proc.stderr


def test_a_taken_aggregator_metrics_port_names_its_setting(taken_port: int) -> None:
    proc = run_cli(
        "aggregate",
        "--config",
        str(EXAMPLE),
        "--dry-run",
        env={"SIDECAR_AGGREGATE__METRICS_PORT": str(taken_port)},
    )
    assert proc.returncode == 1, proc.stderr
    assert "set aggregate.metrics_port (or SIDECAR_AGGREGATE__METRICS_PORT)" in proc.stderr
    assert "Traceback" not in proc.stderr


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = block.replace("\\\n", " ")  # shell line continuations
        lines += [
            line.strip() for line in joined.splitlines() if line.strip().startswith("sidecar ")
        ]
    return lines


def test_every_sidecar_command_line_in_the_readme_parses() -> None:
    commands = _readme_commands()
    assert any(c.startswith("sidecar ctl --config") for c in commands)
    parser = build_parser()
    for line in commands:
        argv = shlex.split(line, comments=True)[1:]
        args = parser.parse_args(argv)  # exits 2 (failing the test) on a usage error
        if argv[0] == "ctl" and args.ctl_command != "keygen":
            assert args.config and args.ctl_command, line


def test_produce_to_an_unreachable_broker_is_a_clear_error() -> None:
    """Before: a KafkaConnectionError traceback and an 'Unclosed AIOKafkaProducer' warning."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: nobody listens there
    proc = run_cli(
        "produce",
        "--config",
        str(EXAMPLE),
        "--count",
        "1",
        env={"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}"},
    )
    assert proc.returncode == 1, proc.stderr
    assert f"sidecar produce: error: cannot reach broker 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr and "Unclosed" not in proc.stderr
