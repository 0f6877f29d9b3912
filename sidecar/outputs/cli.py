"""``sidecar deprecations status``: every output version of a config, its dates, and which
consumer groups still read it (from the cluster: see :mod:`.readers` for what is measured).

``sidecar ctl deprecate`` and ``sidecar ctl sunset`` (in :mod:`sidecar.control.cli`) use
:func:`active_readers` from here to count the readers a sunset would cut off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..config import SidecarConfig, load_config
from ..errors import BrokerError, ConfigError
from ..timefmt import utc
from ..untrusted import printable
from .lifecycle import OutputState, configured_outputs
from .readers import GroupInspector, GroupReading, now_ms

EXIT_OK = 0


@dataclass
class VersionStatus:
    version: str
    topic: str
    current: bool
    state: OutputState | None
    readers: list[GroupReading] = field(default_factory=list)

    @property
    def active(self) -> list[GroupReading]:
        return [r for r in self.readers if r.active]

    def to_dict(self) -> dict[str, Any]:
        s = self.state
        return {
            "version": self.version,
            "topic": self.topic,
            "current": self.current,
            "deprecation_ms": None if s is None else s.deprecation_ms,
            "sunset_ms": None if s is None else s.sunset_ms,
            "sunset_at_ms": None if s is None else s.sunset_at_ms,
            "link": None if s is None else s.link,
            "active_readers": len(self.active),
            "readers": [r.to_dict() for r in self.readers],
        }


async def output_states(cfg: SidecarConfig) -> tuple[OutputState, ...]:
    """The older versions' states as every instance has them: the control topic replayed
    (the configured dates when the control plane is off or the topic is empty)."""
    if not cfg.control.enabled:
        return configured_outputs(cfg.outputs.versions)
    from ..control.client import load_states
    from ..control.plane import load_trust

    trust = load_trust(cfg.control, required=False)
    states, _ = await load_states(cfg, trust)
    return states[cfg.rollout.name].outputs


async def version_status(cfg: SidecarConfig, *, sample_s: float = 5.0) -> list[VersionStatus]:
    """Every output version (the current one first) with its readers."""
    if cfg.outputs.api_version is None:
        raise ConfigError(
            "the config declares no output versions (outputs.api_version, outputs.versions)"
        )
    states = {s.version: s for s in await output_states(cfg)}
    out = [VersionStatus(cfg.outputs.api_version, cfg.topics.decisions, True, None)]
    out += [
        VersionStatus(v.version, v.topic, False, states.get(v.version))
        for v in cfg.outputs.versions
    ]
    async with GroupInspector(cfg) as inspector:
        found = await inspector.look(
            [v.topic for v in out], window_s=cfg.outputs.active_window_s, sample_s=sample_s
        )
    for v in out:
        v.readers = found.get(v.topic, [])
    return out


async def active_readers(
    cfg: SidecarConfig, version: str, *, sample_s: float, strict: bool = True
) -> list[GroupReading]:
    """The consumer groups actively reading older version ``version`` now.

    Raises BrokerError when ``strict`` and the committed offsets of some group could not be
    read (its principal may not Describe it, typically): an unknown reader is never counted
    as no reader. Groups the principal may not even list are invisible to Kafka's
    ListGroups: grant Describe on every consumer group to whoever signs a sunset."""
    spec = cfg.outputs.version(version)
    if spec is None:
        known = ", ".join(v.version for v in cfg.outputs.versions) or "none"
        raise ConfigError(
            f"no older output version {version!r} in the config (configured: {known})"
        )
    async with GroupInspector(cfg) as inspector:
        found = await inspector.look(
            [spec.topic], window_s=cfg.outputs.active_window_s, sample_s=sample_s
        )
        unknown = sorted(inspector.unreadable)
    if unknown and strict:
        raise BrokerError(
            f"cannot read the committed offsets of consumer group(s) {unknown}: they may "
            f"still read {version}. Allow this principal to Describe them (deploy/kafka-acls.sh: "
            "READER_GROUPS), or sunset with --force"
        )
    return [r for r in found.get(spec.topic, []) if r.active]


def _ago(ms: int | None, now: int) -> str:
    if ms is None:
        return "-"
    return f"{utc(ms)} ({max(0, now - ms) / 1000:.0f}s ago)"


def format_status(versions: list[VersionStatus], now: int) -> str:
    lines = []
    for v in versions:
        s = v.state
        if v.current:
            head = f"{v.version} (current) on {v.topic}"
        elif s is not None and s.is_sunset:
            head = f"{v.version} on {v.topic}: SUNSET since {utc(s.sunset_at_ms or 0)}"
        else:
            parts = []
            if s is not None and s.deprecation_ms is not None:
                word = "deprecated since" if s.deprecation_ms <= now else "deprecated from"
                parts.append(f"{word} {utc(s.deprecation_ms)}")
            if s is not None and s.sunset_ms is not None:
                parts.append(f"sunset {utc(s.sunset_ms)}")
            if s is not None and s.link:
                parts.append(f"guide {s.link}")
            head = f"{v.version} on {v.topic}: " + (", ".join(parts) or "active, not deprecated")
        lines.append(head)
        lines.append(f"  active readers: {len(v.active)} of {len(v.readers)} group(s)")
        for r in v.readers:
            flag = "ACTIVE" if r.active else "idle  "
            lag = "?" if r.lag is None else str(r.lag)
            lines.append(
                f"    {flag} {printable(r.group)}: lag {lag}, last consumed "
                f"{_ago(r.last_consumed_ms, now)}; {r.why}"
            )
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    if not args.config:
        raise ConfigError("no config: pass --config FILE or set $SIDECAR_CONFIG")
    cfg = load_config(args.config)
    versions = asyncio.run(version_status(cfg, sample_s=args.sample))
    if args.json:
        print(json.dumps([v.to_dict() for v in versions], indent=2))
    else:
        print(format_status(versions, now_ms()))
    return EXIT_OK


def add_deprecations_parser(sub: Any) -> None:
    p = sub.add_parser(
        "deprecations",
        help="output versions, their deprecation and sunset dates, and who still reads them",
        description="Versioned outputs (outputs.versions). `status` lists every output "
        "version with its dates (the control topic replayed) and the consumer groups with "
        "committed offsets on its topic: lag, the time of the last record each consumed, "
        "and whether it is an active reader (offsets moving during the sample, a subscribed "
        "live member, or a record consumed within outputs.active_window_s).",
    )
    dsub = p.add_subparsers(dest="deprecations_command", metavar="SUBCOMMAND", required=True)
    s = dsub.add_parser(
        "status",
        help="every output version, its dates and its readers",
        description="Every output version with its dates and readers; exit 0.",
    )
    s.add_argument(
        "--config",
        default=os.environ.get("SIDECAR_CONFIG"),
        help="the sidecars' TOML config (default $SIDECAR_CONFIG)",
    )
    s.add_argument(
        "--sample",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="read committed offsets twice this far apart to see which move (default 5)",
    )
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_status)


__all__ = ["VersionStatus", "active_readers", "add_deprecations_parser", "version_status"]
