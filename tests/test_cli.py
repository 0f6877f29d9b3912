from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.cli import main

COMMANDS = ["broker", "run", "produce", "schemas"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: sidecar" in capsys.readouterr().out


def test_run_help_documents_every_setting_and_its_environment_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for env in [
        "SIDECAR_KAFKA__GROUP_ID",
        "SIDECAR_ROLLOUT__CANARY_SHARE_BP",
        "SIDECAR_PIPELINE__MAX_IN_FLIGHT_RECORDS",
        "KAFKA_BOOTSTRAP_SERVERS",
    ]:
        assert env in out


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


def test_a_taken_broker_port_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "sidecar.cli", "broker", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1 and "already in use" in proc.stderr
