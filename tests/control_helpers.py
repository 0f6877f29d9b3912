"""Helpers for broker tests of the control plane: configs with a fresh key set, running
in-process instances, issuing commands with the operator's key, reading the audit."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from kafka_helpers import create_topics, decode_values, make_config, read_topic

from sidecar.config import SidecarConfig
from sidecar.control import AuditRecord, SigningKey, TrustStore
from sidecar.control.client import build_command, issue
from sidecar.control.keys import KeySet, write_key_set
from sidecar.kafka import ensure_control_topics
from sidecar.runner import Sidecar
from sidecar.traffic import produce_forever

HB_S = 0.5


def control_config(bootstrap: str, tmp_path: Path, **sections: dict[str, Any]) -> SidecarConfig:
    """A config on fresh topics whose instances trust a fresh key set (``key_set``)."""
    keys = key_set(tmp_path)
    control: dict[str, Any] = {
        "trust_file": str(keys.trust_file),
        "signing_key_file": str(keys.sidecar),
        "heartbeat_interval_s": HB_S,
        # The embedded broker keeps producer times; an external one may not need this.
        "allow_create_time": True,
    }
    control.update(sections.pop("control", {}))
    aggregate = {"signing_key_file": str(keys.guard), **sections.pop("aggregate", {})}
    return make_config(bootstrap, control=control, aggregate=aggregate, **sections)


def key_set(tmp_path: Path) -> KeySet:
    """The key set of ``tmp_path`` (made on first use): operator, guard and sidecar keys."""
    directory = tmp_path / "keys"
    if not (directory / "trust.toml").exists():
        return write_key_set(directory)
    return KeySet(
        directory / "trust.toml",
        directory / "dev-operator.key",
        directory / "dev-guard.key",
        directory / "dev-sidecar.key",
    )


def operator_key(cfg: SidecarConfig) -> SigningKey:
    assert cfg.control.trust_file is not None
    return SigningKey.from_file(Path(cfg.control.trust_file).parent / "dev-operator.key")


def trust_of(cfg: SidecarConfig) -> TrustStore:
    assert cfg.control.trust_file is not None
    return TrustStore.from_file(cfg.control.trust_file)


def task_stacks() -> str:
    """Where every task of the running loop waits (why a stop hangs)."""
    out = io.StringIO()
    for task in asyncio.all_tasks():
        task.print_stack(limit=12, file=out)
    return out.getvalue()


@contextlib.asynccontextmanager
async def running(cfg: SidecarConfig, count: int) -> AsyncIterator[list[Sidecar]]:
    """``count`` in-process sidecars in one consumer group, stopped (drained) on exit."""
    sidecars = [Sidecar(cfg, instance_id=f"inst-{i}") for i in range(count)]
    tasks = [asyncio.create_task(s.run()) for s in sidecars]
    try:
        await asyncio.wait_for(asyncio.gather(*(s.ready.wait() for s in sidecars)), 30)
        yield sidecars
    finally:
        for s in sidecars:
            s.request_stop()
        # The longest a stop may take by design: a drain, then one broker request that
        # times out (a lost response) while the clients close.
        bound_s = cfg.pipeline.drain_timeout_s + cfg.kafka.request_timeout_ms / 1000 + 10
        done, pending = await asyncio.wait(tasks, timeout=bound_s)
        for task in done:  # retrieved, as gather(return_exceptions=True) did
            if not task.cancelled():
                task.exception()
        if pending:
            stacks = task_stacks()
            for task in pending:
                task.cancel()
            raise AssertionError(f"instances did not stop within {bound_s:.0f} s:\n{stacks}")
        for s in sidecars:
            s.close_models()


@contextlib.asynccontextmanager
async def traffic(cfg: SidecarConfig, rate: float) -> AsyncIterator[None]:
    task = asyncio.create_task(produce_forever(cfg, rate=rate))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def setup(cfg: SidecarConfig) -> None:
    await ensure_control_topics(cfg)  # control topic with one partition, first
    await create_topics(cfg)


async def ctl(
    cfg: SidecarConfig,
    action: Any,
    timeout_s: float = 10.0,
    key: SigningKey | None = None,
    **kw: Any,
) -> Any:
    """Issue ``action`` as the operator (or with ``key``) and wait, as ``sidecar ctl`` does."""
    cmd = build_command(action, cfg.rollout.name, **kw)
    return await issue(
        cfg, cmd, key=key or operator_key(cfg), trust=trust_of(cfg), timeout_s=timeout_s
    )


async def audits(cfg: SidecarConfig, idle_s: float = 1.0) -> list[AuditRecord]:
    records = await read_topic(cfg.kafka.bootstrap_servers, cfg.audit_topic, idle_s=idle_s)
    return list(decode_values(records, AuditRecord))
