"""``sidecar contract``: compare model manifests by the semantic-versioning rules, and run the
start-up gate on a config without starting anything (both meant for CI before a rollout)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from .manifest import (
    Manifest,
    diff_manifests,
    digest,
    format_diff,
    load_manifest,
    release_notes,
    rollback_problems,
)

#: Exit status when the declared version bump is smaller than the changes require.
EXIT_BUMP_TOO_SMALL = 3


def cmd_contract_diff(args: argparse.Namespace) -> int:
    old, new = load_manifest(args.old), load_manifest(args.new)
    diff = diff_manifests(old, new)
    if args.json:
        print(
            json.dumps(
                {
                    "required": diff.required.name,
                    "declared": diff.declared.name,
                    "old_version": diff.old_version,
                    "new_version": diff.new_version,
                    "backwards": diff.backwards,
                    "ok": diff.ok,
                    "changes": [{"bump": c.bump.name, "what": c.what} for c in diff.changes],
                    "old_digest": digest(old),
                    "new_digest": digest(new),
                },
                indent=2,
            )
        )
    else:
        print(format_diff(diff))
    if args.release_notes:
        write_release_notes(args, old, new)
    return 0 if diff.ok else EXIT_BUMP_TOO_SMALL


def write_release_notes(args: argparse.Namespace, old: Manifest, new: Manifest) -> None:
    """``--release-notes FILE`` (``-``: stdout), and ``--store models:/NAME/VERSION``: the
    note becomes that registry version's description and its ``release_notes`` tag."""
    from .errors import ConfigError

    note = release_notes(old, new, args.guide)
    if args.release_notes == "-":
        print(note)
    else:
        Path(args.release_notes).write_text(note)
        print(f"wrote {args.release_notes}")
    if args.store:
        from .models.mlflow_registry import parse_target
        from .registry import mlflow_client

        ref = parse_target(args.store)
        if ref.version is None:
            raise ConfigError("--store needs models:/NAME/VERSION (a version, not an alias)")
        client = mlflow_client(args.registry_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        client.update_model_version(ref.name, ref.version, description=note)
        client.set_model_version_tag(ref.name, ref.version, "release_notes", note[:5000])
        client.set_model_version_tag(
            ref.name, ref.version, "rollback_safe", str(not rollback_problems(old, new)).lower()
        )
        print(f"stored the release note on {args.store}")


def cmd_contract_check(args: argparse.Namespace) -> int:
    from .config import load_config
    from .models.contract import check_startup, model_manifest

    cfg = load_config(args.config)
    champion = model_manifest(cfg.models.champion)
    candidate = model_manifest(cfg.models.candidate) if cfg.models.candidate else None
    warnings = check_startup(cfg, champion, candidate)  # raises ContractError: exit 1
    for arm, m in (("champion", champion), ("candidate", candidate)):
        if m is not None:
            print(f"{arm:9}  {m.name} {m.version}  {digest(m)}")
    for w in warnings:
        print(f"warning (shadow only): {w}")
    print("OK: the rollout passes the start-up gate")
    return 0


def add_contract_parser(sub: Any) -> None:
    p = sub.add_parser(
        "contract",
        help="compare model manifests (semver rules) or check a config's start-up gate",
        description="Model contracts: `diff OLD NEW` classifies every change between two "
        "manifests as MAJOR, MINOR or PATCH and exits 3 when the declared version bump is "
        "smaller than required; `check --config` runs the start-up gate.",
    )
    csub = p.add_subparsers(dest="contract_command", metavar="SUBCOMMAND", required=True)
    d = csub.add_parser("diff", help="classify the changes between two manifests")
    d.add_argument("old", help="the old manifest (TOML or JSON)")
    d.add_argument("new", help="the new manifest (TOML or JSON)")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.add_argument(
        "--release-notes",
        metavar="FILE",
        help="also write a release note (Markdown: bump, changes, migration guide, whether "
        "rollback is safe) to FILE (- for stdout)",
    )
    d.add_argument("--guide", metavar="URL", help="the migration guide the note links to")
    d.add_argument(
        "--store",
        metavar="MODELS_URI",
        help="store the note on this registry version (models:/NAME/VERSION): its "
        "description and release_notes/rollback_safe tags",
    )
    d.add_argument("--registry-uri", help="MLflow tracking/registry URI for --store")
    d.set_defaults(func=cmd_contract_diff)
    c = csub.add_parser("check", help="run the start-up gate on a config (loads no model)")
    c.add_argument("--config", required=True, help="TOML config file")
    c.set_defaults(func=cmd_contract_check)
