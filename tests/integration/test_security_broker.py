"""Private keys never reach a log record, the CLI's output or a repr, through the real code
paths that load and use them: a sidecar's control plane, ``sidecar ctl``, the aggregator."""

from __future__ import annotations

import asyncio
import logging
import traceback
from pathlib import Path

import msgspec
import pytest
from control_helpers import control_config, key_set
from kafka_helpers import create_topics, unique, wait_until, write_toml

from sidecar.aggregate.service import AggregatorService
from sidecar.cli import main
from sidecar.control import ControlCommand, SigningKey, encode_command, sign_command
from sidecar.control.client import build_command
from sidecar.control.plane import CONTROL_PARTITION
from sidecar.kafka import ensure_control_topics
from sidecar.runner import Sidecar

pytestmark = [pytest.mark.broker, pytest.mark.timeout(90)]


def secrets_of(*paths: Path) -> list[str]:
    """The private key strings of key files (what must never be shown anywhere)."""
    return [p.read_text().split('private_key = "')[1].split('"')[0] for p in paths]


def leaks(record: logging.LogRecord, secrets: list[str]) -> bool:
    texts = [record.getMessage(), repr(record.args), repr(record.msg)]
    if record.exc_info:
        texts.append("".join(traceback.format_exception(*record.exc_info)))
    return any(secret in t for t in texts for secret in secrets)


async def test_private_keys_are_never_logged_printed_or_in_a_repr(
    bootstrap: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in (None, "sidecar", "aiokafka"):  # other tests' setup_logging may raise them
        caplog.set_level(logging.DEBUG, logger=name)
    cfg = control_config(
        bootstrap,
        tmp_path,
        control={"heartbeat_interval_s": 0.3},
        aggregate={
            "group_id": unique("agg"),
            "dry_run": False,
            "rules": [{"name": "r", "figure": "decision_rate_ratio", "threshold": 2.0}],
        },
    )
    keys = key_set(tmp_path)
    secrets = secrets_of(keys.operator, keys.guard, keys.sidecar)
    await ensure_control_topics(cfg)
    await create_topics(cfg)
    path = write_toml(cfg, tmp_path / "sidecar.toml")
    monkeypatch.setenv("SIDECAR_CTL_KEY", str(keys.operator))

    sidecar = Sidecar(cfg, instance_id="sec-1")
    aggregator = AggregatorService(cfg)
    tasks = [asyncio.create_task(sidecar.run())]
    try:
        await asyncio.wait_for(sidecar.ready.wait(), 30)
        tasks.append(asyncio.create_task(aggregator.run()))
        await asyncio.wait_for(aggregator.ready.wait(), 30)
        plane = sidecar.control
        assert plane is not None and "dev-operator" in plane.trust

        # sidecar ctl: signs with the key and waits until the instance applied the command.
        code = await asyncio.to_thread(
            main, ["ctl", "canary", "30%", "--config", str(path), "--reason", "sec test"]
        )
        assert code == 0
        # A command signed with a key the instances do not trust: rejected and audited.
        stranger = SigningKey.generate("dev-operator", "operator")
        forged = sign_command(build_command("rollback", cfg.rollout.name, reason="x"), stranger)
        assert plane._producer is not None
        await plane._producer.send_and_wait(
            cfg.topics.control, encode_command(forged), partition=CONTROL_PARTITION
        )
        await wait_until(lambda: any("rejected" in r.getMessage() for r in caplog.records), 10)
        # Bad key material on the way in: the error names the file, not the secret.
        broken = tmp_path / "broken.key"
        broken.write_text(keys.operator.read_text().replace(secrets[0], secrets[0][:-2] + "!!"))
        monkeypatch.setenv("SIDECAR_CTL_KEY", str(broken))
        assert await asyncio.to_thread(main, ["ctl", "promote", "--config", str(path)]) == 1

        reprs = [repr(x) for x in (plane, plane.trust, plane.signing_key, cfg, aggregator)]
        reprs += [repr(aggregator.key)]
        reprs += [repr(c) for c in aggregator.commands]
        signed: list[ControlCommand] = [
            msgspec.json.decode(encode_command(forged), type=ControlCommand)
        ]
        reprs += [repr(c) for c in signed]
        assert not [r for r in reprs if any(secret in r for secret in secrets)]
    finally:
        sidecar.request_stop()
        aggregator.request_stop()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        sidecar.close_models()

    out = capsys.readouterr()
    assert "applied" in out.out + out.err and "not a sidecar key file" in out.err
    for secret in secrets:
        assert secret not in out.out and secret not in out.err
    assert len(caplog.records) > 20  # the paths above did log (at DEBUG, aiokafka included)
    leaked = [r for r in caplog.records if leaks(r, secrets)]
    assert not leaked, [r.getMessage()[:200] for r in leaked]
