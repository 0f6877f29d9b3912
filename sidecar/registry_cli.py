"""``sidecar registry prune``: apply a retention policy to archived registry versions
(dry-run unless ``--apply``); see :mod:`sidecar.registry`."""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

from .config import load_config
from .errors import ConfigError
from .registry import (
    DAY_MS,
    apply_prune,
    mlflow_client,
    parse_policy,
    plan_prune,
    registry_versions,
)


async def decided_digests(cfg: Any, since_ms: int) -> frozenset[str]:
    """The manifest digests of every decision on the decisions topic since ``since_ms``
    (the versions that decided within the horizon, as far as the topic still holds them)."""
    import msgspec

    from .kafka import read_until_idle

    decode = msgspec.json.Decoder().decode
    found: set[str] = set()
    for rec in await read_until_idle(
        cfg, cfg.topics.decisions, role="registry", since_ms=since_ms, max_s=600.0
    ):
        try:
            digest = decode(rec.value).get("manifest_digest")
        except Exception:  # untrusted bytes: not a decision of ours
            continue
        if isinstance(digest, str):
            found.add(digest)
    return frozenset(found)


def cmd_prune(args: argparse.Namespace) -> int:
    from .models.mlflow_registry import parse_target

    if not args.config:
        raise ConfigError("no config: pass --config FILE or set $SIDECAR_CONFIG")
    cfg = load_config(args.config)
    policy = parse_policy(args.policy)
    mlflow_models = [
        m for m in (cfg.models.champion, cfg.models.candidate) if m and m.loader == "mlflow"
    ]
    if args.model is None and not mlflow_models:
        raise ConfigError("no model comes from MLflow in this config: pass --model NAME")
    name = args.model or parse_target(mlflow_models[0].target).name
    uri = (
        args.registry_uri
        or (mlflow_models[0].mlflow_tracking_uri if mlflow_models else None)
        or os.environ.get("MLFLOW_TRACKING_URI")
    )
    now = int(time.time() * 1000)
    horizon = cfg.registry.compliance_horizon_days
    digests: frozenset[str] = frozenset()
    if not args.no_scan:
        digests = asyncio.run(decided_digests(cfg, now - int(horizon * DAY_MS)))
    client = mlflow_client(uri)
    verdicts = plan_prune(
        registry_versions(client, name),
        policy,
        now_ms=now,
        horizon_days=horizon,
        decided_digests=digests,
    )
    for v in verdicts:
        print(f"{name}/{v.version}: {'DELETE' if v.delete else 'keep  '}  {v.why}")
    doomed = [v for v in verdicts if v.delete]
    if not args.apply:
        print(f"dry run: {len(doomed)} version(s) would be deleted; --apply deletes them")
        return 0
    deleted = apply_prune(client, name, verdicts)
    print(f"deleted {len(deleted)} version(s): {', '.join(deleted) or 'none'}")
    return 0


def add_registry_parser(sub: Any) -> None:
    p = sub.add_parser(
        "registry",
        help="the model registry side of the lifecycle: prune archived versions",
        description="MLflow registry versions the sidecar archived (promote) and retired "
        "(retire). `prune` applies a retention policy, dry-run unless --apply, and never "
        "deletes a version with an alias, one not yet retired, or one that decided within "
        "registry.compliance_horizon_days (by its retired_at tag and the decisions topic).",
    )
    rsub = p.add_subparsers(dest="registry_command", metavar="SUBCOMMAND", required=True)
    r = rsub.add_parser(
        "prune",
        help="delete archived versions by a retention policy (dry-run by default)",
        description="Apply --policy to the archived versions of the registered model.",
    )
    r.add_argument("--config", default=os.environ.get("SIDECAR_CONFIG"), help="sidecar config")
    r.add_argument(
        "--policy",
        default="keep-forever",
        help="keep-forever (default), time:90d (archived longer ago) or count:20 (keep newest)",
    )
    r.add_argument("--model", help="registered model (default: the config's mlflow model)")
    r.add_argument("--registry-uri", help="tracking/registry URI (default: the config's)")
    r.add_argument("--apply", action="store_true", help="delete (default: only show)")
    r.add_argument(
        "--no-scan",
        action="store_true",
        help="do not read the decisions topic (the retired_at tags alone guard the horizon)",
    )
    r.set_defaults(func=cmd_prune)
