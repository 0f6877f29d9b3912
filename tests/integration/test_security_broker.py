"""The control key never reaches a log record, the CLI's output or a repr, through the real code
paths that load and use it: a sidecar's control plane, ``sidecar ctl``, the aggregator."""

from __future__ import annotations

import asyncio
import logging
import traceback
from pathlib import Path

import msgspec
import pytest
from kafka_helpers import create_topics, make_config, unique, wait_until, write_toml

from sidecar.aggregate.service import AggregatorService
from sidecar.cli import main
from sidecar.control import ControlCommand, encode_command
from sidecar.control.ctl import build_command
from sidecar.control.plane import CONTROL_PARTITION, now_ms
from sidecar.kafka import ensure_control_topics
from sidecar.runner import Sidecar

pytestmark = [pytest.mark.broker, pytest.mark.timeout(90)]

SECRET = "c0ffee5ec12e75" + "ab" * 25
OTHER = "ab" * 32


def leaks(record: logging.LogRecord) -> bool:
    texts = [record.getMessage(), repr(record.args), repr(record.msg)]
    if record.exc_info:
        texts.append("".join(traceback.format_exception(*record.exc_info)))
    return any(SECRET in t for t in texts)


async def test_the_control_key_is_never_logged_printed_or_in_a_repr(
    bootstrap: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in (None, "sidecar", "aiokafka"):  # other tests' setup_logging may raise them
        caplog.set_level(logging.DEBUG, logger=name)
    monkeypatch.setenv("SIDECAR_CONTROL_KEYS", f"ops:{SECRET}")
    cfg = make_config(
        bootstrap,
        control={"key_id": "ops", "heartbeat_interval_s": 0.3},
        aggregate={
            "group_id": unique("agg"),
            "dry_run": False,
            "rules": [{"name": "r", "figure": "decision_rate_ratio", "threshold": 2.0}],
        },
    )
    await ensure_control_topics(cfg)
    await create_topics(cfg)
    path = write_toml(cfg, tmp_path / "sidecar.toml")

    sidecar = Sidecar(cfg, instance_id="sec-1")
    aggregator = AggregatorService(cfg)
    tasks = [asyncio.create_task(sidecar.run())]
    try:
        await asyncio.wait_for(sidecar.ready.wait(), 30)
        tasks.append(asyncio.create_task(aggregator.run()))
        await asyncio.wait_for(aggregator.ready.wait(), 30)
        plane = sidecar.control
        assert plane is not None and "ops" in plane.keyring

        # sidecar ctl: signs with the key and waits until the instance applied the command.
        code = await asyncio.to_thread(
            main, ["ctl", "canary", "30%", "--config", str(path), "--reason", "sec test"]
        )
        assert code == 0
        # A command signed with a key the instances do not have: rejected and audited.
        from sidecar.control import Keyring

        forged = Keyring.parse(f"ops={OTHER}").sign(
            build_command("rollback", cfg.rollout.name, issued_by="mallory", reason="x"), "ops"
        )
        assert plane._producer is not None
        await plane._producer.send_and_wait(
            cfg.topics.control, encode_command(forged), partition=CONTROL_PARTITION
        )
        await wait_until(lambda: any("rejected" in r.getMessage() for r in caplog.records), 10)
        # Bad key material on the way in: the error names the key id, not the secret.
        monkeypatch.setenv("SIDECAR_CONTROL_KEYS", f"ops:{SECRET}zz")
        assert await asyncio.to_thread(main, ["ctl", "promote", "--config", str(path)]) == 1
        assert await asyncio.to_thread(main, ["ctl", "status", "--config", str(path)]) == 1

        reprs = [repr(x) for x in (plane, plane.keyring, cfg, aggregator, aggregator.keyring)]
        reprs += [repr(c) for c in aggregator.commands]
        signed: list[ControlCommand] = [
            msgspec.json.decode(encode_command(forged), type=ControlCommand)
        ]
        reprs += [repr(c) for c in signed]
        assert not [r for r in reprs if SECRET in r]
        assert now_ms() > 0
    finally:
        sidecar.request_stop()
        aggregator.request_stop()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        sidecar.close_models()

    out = capsys.readouterr()
    assert "applied" in out.out + out.err and "not hex" in out.err
    assert SECRET not in out.out and SECRET not in out.err
    assert len(caplog.records) > 20  # the paths above did log (at DEBUG, aiokafka included)
    leaked = [r for r in caplog.records if leaks(r)]
    assert not leaked, [r.getMessage()[:200] for r in leaked]
