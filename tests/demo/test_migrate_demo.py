"""``sidecar demo --scenario migrate`` tells its story: every check it makes passes."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from sidecar.cli import main
from sidecar.demo.migrate import run_migrate


@pytest.mark.broker
@pytest.mark.timeout(150)
@pytest.mark.slow
async def test_migrate_story(tmp_path: Path) -> None:
    out = io.StringIO()
    result = await run_migrate(out, rate=300.0, broker_port=0, out_dir=tmp_path)
    text = out.getvalue()
    assert result.ok, result.summary + "\n" + text
    assert "FAIL" not in result.summary
    for step in ("MAJOR release", "ledger got its notice", "refused", "sunset v1 -> sunset"):
        assert step in text, text
    assert "**MAJOR**" in (tmp_path / "release-notes.md").read_text()


def test_migrate_rejects_a_bad_rate(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--scenario", "migrate", "--rate", "5"]) == 1
    assert "--rate" in capsys.readouterr().err
