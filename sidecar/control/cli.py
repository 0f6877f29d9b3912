"""``sidecar ctl``: the operator's CLI for the control topic (see :mod:`.client`).

Every mutating action signs a command with the operator's private key (``--key``), binds it
to the rollout's current epoch, produces it to partition 0 of the control topic, and waits
until every live instance has proved it applied it, or one refused it. ``keygen`` makes a key
pair. Exit codes: 0 applied everywhere (or no live instance to wait for), 1 rejected or an
error, 2 timed out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from ..config import SidecarConfig, load_config
from ..errors import ConfigError, SidecarError
from ..kafka import ensure_control_topics
from ..untrusted import printable
from .client import EXIT_OK, build_command, candidate_to_promote, issue, load_view
from .commands import parse_share
from .format import format_status, history_line
from .keys import ROLES, SigningKey, TrustStore, parse_time, trust_entry_text, write_private
from .plane import control_config, load_trust, now_ms

#: Environment variable naming the operator's private key file (``--key``).
KEY_ENV = "SIDECAR_CTL_KEY"

_MUTATING: dict[str, str] = {
    "shadow": "champion decides; the candidate is scored and compared",
    "canary": "the candidate decides a share of the traffic",
    "ramp": "canary through a plan of steps, advanced by the sidecars",
    "promote": "the candidate decides everything",
    "rollback": "the champion decides everything, at once (needs --reason)",
    "pause": "hold the rollout where it stands (a ramp, or shadow/canary): no advance, no "
    "promote, no change of share until resume",
    "resume": "release a hold (a ramp's step floors restart)",
    "retire": "stop scoring the old champion of a promoted rollout",
    "deprecate": "announce that an older output version is deprecated, its sunset date and "
    "migration guide (headers on its records)",
    "sunset": "switch an older output version off: refused while consumer groups still read "
    "it or before its sunset date, unless --force (with --reason)",
}


def _where(parser: argparse.ArgumentParser, default: Any) -> None:
    """``--config`` and ``--rollout``. Both are accepted before the action (``sidecar ctl
    --config X status``) and after it: the action's parser has ``default`` SUPPRESS so that,
    when they are not repeated there, the values given before the action are kept."""
    parser.add_argument(
        "--config",
        default=os.environ.get("SIDECAR_CONFIG") if default is None else default,
        help="the sidecars' TOML config (default $SIDECAR_CONFIG); settings may also come "
        "from SIDECAR_* environment variables",
    )
    parser.add_argument(
        "--rollout", default=default, help="rollout name (default: rollout.name of the config)"
    )


def _common(parser: argparse.ArgumentParser, mutating: bool) -> None:
    _where(parser, argparse.SUPPRESS)
    if not mutating:
        return
    parser.add_argument(
        "--key",
        default=os.environ.get(KEY_ENV),
        metavar="FILE",
        help=f"your private key file (default ${KEY_ENV}; `sidecar ctl keygen` makes one)",
    )
    parser.add_argument("--reason", help="why (audited); required for rollback")
    parser.add_argument(
        "--expect-epoch",
        type=int,
        metavar="N",
        help="apply only if the rollout is still at epoch N (default: the epoch the control "
        "topic shows now; rollback needs none)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds to wait for every live instance (default 10)",
    )
    parser.add_argument("--no-wait", action="store_true", help="publish and return at once")


def _keygen_parser(actions: Any) -> None:
    p = actions.add_parser(
        "keygen",
        help="make an Ed25519 key pair: a private key file and its trust-file entry",
        description="Write a new private key to --out (created readable by you only; never "
        "overwritten) and print its [[keys]] entry for the trust file (or append it to "
        "--trust-file). Give operators role operator, the aggregator role guard, sidecars "
        "role sidecar.",
    )
    p.add_argument("--id", required=True, help="key id, e.g. ops-alice-2026 ([A-Za-z0-9_.-])")
    p.add_argument("--role", required=True, choices=ROLES, help="what the key may sign")
    p.add_argument(
        "--principal", help="who holds it: the issued_by of its commands (default: the key id)"
    )
    p.add_argument("--not-before", metavar="TIME", help="valid from (ISO-8601, UTC if no zone)")
    p.add_argument("--not-after", metavar="TIME", help="valid until (ISO-8601)")
    p.add_argument("--out", required=True, type=Path, help="private key file to create")
    p.add_argument("--trust-file", type=Path, help="append the public entry to this file")
    p.set_defaults(ctl_command="keygen")


def add_ctl_parser(sub: Any) -> None:
    """Add ``sidecar ctl ...`` to the top-level subparsers ``sub``."""
    ctl = sub.add_parser(
        "ctl",
        help="steer every sidecar instance: status, canary, ramp, promote, rollback, ...",
        usage="sidecar ctl [--config FILE] ACTION [options]",
        description="Operator commands on the control topic. Each command is signed with your "
        "private key (--key or $SIDECAR_CTL_KEY), bound to the rollout's current epoch, "
        "published, and applied by every instance; ctl waits until every live instance "
        "proves it with a signed record. Exit codes: 0 applied, 1 rejected or error, "
        "2 timed out.",
    )
    _where(ctl, None)
    ctl.set_defaults(func=cmd_ctl, ctl_command=None)
    actions = ctl.add_subparsers(dest="ctl_command", metavar="ACTION")
    p = actions.add_parser(
        "status",
        help="rollout state, live instances and their epochs, recent commands",
        description="Replay the control topic with the trust file and read recent "
        "heartbeats: the state of each rollout and since when, the guard verdict and what "
        "holds a ramp or a promotion back, the epoch every instance reports (stale after 3 "
        "missed heartbeats; unverified when not signed by a trusted key), and the last "
        "records with their outcome.",
    )
    _common(p, mutating=False)
    p.add_argument("--last", type=int, default=10, help="records to show (default 10)")
    p = actions.add_parser(
        "history",
        help="every record on the control topic and its outcome",
        description="Every control record, in order, with the verdict the instances reach.",
    )
    _common(p, mutating=False)
    for action, text in _MUTATING.items():
        p = actions.add_parser(action, help=text, description=text[:1].upper() + text[1:] + ".")
        if action == "canary":
            p.add_argument("share", metavar="PCT", help="candidate share: 5%%, 0.5%% or 500bp")
        if action == "ramp":
            p.add_argument(
                "plan",
                metavar="PLAN",
                help="steps share:hold:min_samples, e.g. 1%%:5m:1000,5%%:10m:5k,100%%:30m:20k",
            )
        if action == "promote":
            p.add_argument(
                "--candidate-version",
                metavar="VERSION",
                help="the candidate version promoted (audited); with control.promote_gate = "
                "quality the quality verdict must be about it (default: models.candidate.version "
                "of --config; with the quality gate, the version the live instances report)",
            )
        if action in ("deprecate", "sunset"):
            p.add_argument("version", metavar="VERSION", help="the older output version, e.g. v1")
        if action == "deprecate":
            p.add_argument(
                "--sunset",
                required=True,
                metavar="WHEN",
                help="when it may be switched off: a date (2026-03-31), an ISO-8601 time, or "
                "+DURATION from now (+90d)",
            )
            p.add_argument("--deprecation", metavar="WHEN", help="deprecated from (default: now)")
            p.add_argument("--link", metavar="URL", help="the migration guide")
        if action == "sunset":
            p.add_argument(
                "--force",
                action="store_true",
                help="even with active readers or before the sunset date (needs --reason)",
            )
            p.add_argument(
                "--sample",
                type=float,
                default=5.0,
                metavar="SECONDS",
                help="watch the readers' committed offsets this long first (default 5)",
            )
        _common(p, mutating=True)
    _keygen_parser(actions)


def _load(args: argparse.Namespace) -> SidecarConfig:
    if not args.config:
        raise ConfigError(
            "no config: pass --config with the sidecars' TOML file or set $SIDECAR_CONFIG"
        )
    return load_config(args.config)


def _signing_key(args: argparse.Namespace, trust: TrustStore) -> SigningKey:
    if not args.key:
        raise ConfigError(
            f"no signing key: pass --key with your private key file or set ${KEY_ENV} "
            "(`sidecar ctl keygen` makes one; its public entry goes in control.trust_file)"
        )
    key = SigningKey.from_file(args.key)
    trusted = trust.key(key.id)
    if trusted is None:
        raise ConfigError(
            f"key {key.id!r} is not in the trust file: every instance would refuse its commands"
        )
    if trusted.public_key != key.public_key():
        raise ConfigError(f"key {key.id!r} does not match its public key in the trust file")
    return key


def keygen(args: argparse.Namespace) -> int:
    for name in ("not_before", "not_after"):
        value = getattr(args, name)
        if value is not None:
            try:
                parse_time(value, what=f"--{name.replace('_', '-')}")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    key = SigningKey.generate(args.id, args.role, args.principal)
    try:
        write_private(args.out, key.key_file_text())
    except FileExistsError:
        raise ConfigError(f"{args.out} exists; keys are never overwritten") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {args.out}: {exc.strerror}") from None
    entry = trust_entry_text(key.trusted(not_before=args.not_before, not_after=args.not_after))
    if args.trust_file is not None:
        TrustStore.parse(  # refuse to append a duplicate id
            (args.trust_file.read_text() if args.trust_file.exists() else "") + "\n" + entry,
            source=str(args.trust_file),
        )
        with args.trust_file.open("a", encoding="utf-8") as out:
            out.write("\n" + entry)
        print(f"wrote {args.out} (private) and appended key {key.id} to {args.trust_file}")
    else:
        print(f"# wrote {args.out} (private); add this to the trust file:")
        print(entry, end="")
    return EXIT_OK


def cmd_ctl(args: argparse.Namespace) -> int:
    if args.ctl_command is None:
        print("usage: sidecar ctl ACTION [options]; see `sidecar ctl --help`", file=sys.stderr)
        return 2
    if args.ctl_command == "keygen":
        return keygen(args)
    return asyncio.run(run_ctl(args))


async def run_ctl(args: argparse.Namespace) -> int:
    """One ``sidecar ctl`` invocation; returns the exit code."""
    cfg = _load(args)
    rollout = args.rollout or cfg.rollout.name
    action = args.ctl_command
    if action in ("status", "history"):
        trust = load_trust(cfg.control, required=False)
        view = await load_view(cfg, trust)
        if action == "status":
            print(format_status(view, rollout, max(0, args.last), control_config(cfg.control)))
        else:
            for entry in view.history:
                if entry.command is None or entry.command.rollout == rollout:
                    print(printable(history_line(entry)))
        return EXIT_OK
    if action == "rollback" and not args.reason:
        raise ConfigError("rollback needs --reason 'why' (it is audited)")
    if action == "sunset" and args.force and not args.reason:
        raise ConfigError("sunset --force needs --reason 'why' (it is audited)")
    trust = load_trust(cfg.control, required=True)
    key = _signing_key(args, trust)
    output: dict[str, Any] = {}
    if action in ("deprecate", "sunset"):
        output = await _output_args(cfg, args)
    if action == "promote":
        named = args.candidate_version
        if named is not None and not 0 < len(named.strip()) <= 256:
            raise ConfigError("--candidate-version needs a version, e.g. 2.1.0")
        output["candidate_version"] = named or await _running_candidate(cfg, trust, rollout)
    try:
        share = parse_share(args.share) if action == "canary" else None
        command = build_command(
            action,
            rollout,
            reason=args.reason,
            share_bp=share,
            plan=args.plan if action == "ramp" else None,
            expected_epoch=args.expect_epoch,
            **output,
        )
    except ValueError as exc:
        raise SidecarError(str(exc)) from None
    await ensure_control_topics(cfg)
    result = await issue(
        cfg, command, key=key, trust=trust, timeout_s=args.timeout, wait=not args.no_wait
    )
    print(printable(result.message), file=sys.stdout if result.code == EXIT_OK else sys.stderr)
    return result.code


async def _running_candidate(cfg: SidecarConfig, trust: TrustStore, rollout: str) -> str | None:
    """The candidate version a ``promote`` names when ``--candidate-version`` is not given:
    the config's, or, when a quality gate will check it, the one the live instances report
    (reading their heartbeats takes a replay of the control topic)."""
    configured = cfg.models.candidate.version if cfg.models.candidate is not None else None
    if cfg.control.promote_gate != "quality":
        return configured
    return candidate_to_promote(await load_view(cfg, trust), rollout, configured)


def _when(text: str, what: str) -> int:
    """``+90d`` (from now), a date or an ISO-8601 time -> epoch ms."""
    from ..outputs.lifecycle import parse_date
    from .commands import parse_duration

    if text.strip().startswith("+"):
        try:
            return now_ms() + int(parse_duration(text.strip()[1:]) * 1000)
        except ValueError as exc:
            raise ConfigError(f"{what}: {exc}") from None
    return parse_date(text, what=what)


async def _output_args(cfg: SidecarConfig, args: argparse.Namespace) -> dict[str, Any]:
    """The arguments of ``deprecate``/``sunset``; for ``sunset``, the active readers counted
    from the cluster now (printed, and signed into the command: the instances refuse a
    sunset with readers unless forced)."""
    from ..outputs.cli import active_readers

    if cfg.outputs.version(args.version) is None:
        known = ", ".join(v.version for v in cfg.outputs.versions) or "none"
        raise ConfigError(f"no older output version {args.version!r} (configured: {known})")
    if args.ctl_command == "deprecate":
        return {
            "output_version": args.version,
            "sunset_ms": _when(args.sunset, "--sunset"),
            "deprecation_ms": None
            if args.deprecation is None
            else _when(args.deprecation, "--deprecation"),
            "link": args.link,
        }
    readers = await active_readers(
        cfg, args.version, sample_s=max(0.0, args.sample), strict=not args.force
    )
    for r in readers:
        print(f"active reader of {args.version}: {printable(r.group)} ({r.why})", file=sys.stderr)
    return {
        "output_version": args.version,
        "active_readers": len(readers),
        "force": bool(args.force),
    }


__all__ = ["KEY_ENV", "add_ctl_parser", "cmd_ctl", "keygen", "run_ctl"]
