"""The model side of the lifecycle, in the MLflow model registry (extra ``sidecar[mlflow]``).

* **Write-back** (:func:`write_back`): when a ``promote`` applies, the promoted candidate's
  registry version gets the alias ``registry.champion_alias`` and tags ``promoted_at``,
  ``promoted_by``, ``rollout``; the old champion's version is tagged ``archived_at`` -- it is
  kept warm, still scored in shadow, for an instant rollback -- until a ``retire`` tags it
  ``retired_at``. Both carry ``sidecar.manifest_digest`` (what their decisions carry). Times
  are the command's record time, so every instance writes the same values (idempotent).
* **Prune** (:func:`plan_prune`, pure; :func:`apply_prune`): a retention policy over the
  archived versions -- ``keep-forever``, ``time:90d`` (archived longer ago than that) or
  ``count:20`` (keep the newest 20) -- that never touches a version with an alias, one not
  archived by the lifecycle, one not yet retired (it may still decide as a fallback), or
  one that decided within ``registry.compliance_horizon_days``: by its ``retired_at`` tag, and
  by the decisions topic (a decision's ``manifest_digest`` names the version).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from .errors import ConfigError, SidecarError
from .manifest import Manifest
from .timefmt import utc

log = logging.getLogger(__name__)

ARCHIVED_AT, RETIRED_AT, PROMOTED_AT = "archived_at", "retired_at", "promoted_at"
DIGEST_TAG = "sidecar.manifest_digest"
DAY_MS = 86_400_000


class RegistrySettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The MLflow registry write-back and retention (models with ``loader = "mlflow"``)."""

    #: On ``promote`` and ``retire``, write the lifecycle back to the registry (alias, tags).
    write_back: bool = True
    #: The alias that moves to the promoted version.
    champion_alias: str = "champion"
    #: ``sidecar registry prune`` never deletes a version that decided within this many days.
    compliance_horizon_days: float = 365.0


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds")


def parse_iso(text: str | None) -> int | None:
    if not text:
        return None
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def mlflow_client(tracking_uri: str | None) -> Any:
    try:
        import mlflow
    except ImportError as exc:
        raise SidecarError("the registry needs mlflow: pip install 'sidecar[mlflow]'") from exc
    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


# --------------------------------------------------------------------------- write-back


@dataclass(frozen=True, slots=True)
class ModelRef:
    """One arm's registry version (from its manifest, set by the mlflow loader)."""

    name: str
    version: str
    digest: str | None
    tracking_uri: str | None

    @classmethod
    def of(
        cls, manifest: Manifest, digest: str | None, tracking_uri: str | None
    ) -> ModelRef | None:
        if manifest.registry_model is None or manifest.registry_version is None:
            return None
        return cls(manifest.registry_model, manifest.registry_version, digest, tracking_uri)


def write_back(
    action: Literal["promote", "retire"],
    *,
    champion: ModelRef | None,
    candidate: ModelRef | None,
    at_ms: int,
    issued_by: str,
    rollout: str,
    settings: RegistrySettings,
    client: Any = None,
) -> list[str]:
    """Write ``action`` back to the registry; returns what was done (for the log)."""
    done: list[str] = []
    if action == "promote" and candidate is not None:
        c = client or mlflow_client(candidate.tracking_uri)
        # Tags first, the alias last: whoever sees the alias move sees why and by whom.
        for key, value in (
            *([(DIGEST_TAG, candidate.digest)] if candidate.digest else []),
            ("promoted_by", issued_by),
            ("rollout", rollout),
            (PROMOTED_AT, iso(at_ms)),
        ):
            c.set_model_version_tag(candidate.name, candidate.version, key, value)
        c.set_registered_model_alias(candidate.name, settings.champion_alias, candidate.version)
        done.append(f"{candidate.name}/{candidate.version}: alias {settings.champion_alias}")
    if champion is not None:
        c = client or mlflow_client(champion.tracking_uri)
        tag = ARCHIVED_AT if action == "promote" else RETIRED_AT
        if champion.digest:  # before the mark: whoever sees the mark sees the digest
            c.set_model_version_tag(champion.name, champion.version, DIGEST_TAG, champion.digest)
        c.set_model_version_tag(champion.name, champion.version, tag, iso(at_ms))
        done.append(f"{champion.name}/{champion.version}: {tag} {iso(at_ms)}")
    return done


# --------------------------------------------------------------------------- prune

_POLICY = re.compile(r"^(?:keep-forever|time:(\d+(?:\.\d+)?)d|count:(\d+))$")


@dataclass(frozen=True, slots=True)
class Policy:
    kind: Literal["keep-forever", "time", "count"]
    days: float = 0.0
    count: int = 0


def parse_policy(text: str) -> Policy:
    m = _POLICY.match(text.strip())
    if m is None:
        raise ConfigError(
            f"retention policy {text!r}: expected keep-forever, time:<days>d (time:90d) or "
            "count:<n> (count:20)"
        )
    if m.group(1) is not None:
        return Policy("time", days=float(m.group(1)))
    if m.group(2) is not None:
        return Policy("count", count=int(m.group(2)))
    return Policy("keep-forever")


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """What prune needs of one registry version."""

    version: str
    aliases: tuple[str, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()

    def tag(self, key: str) -> str | None:
        return dict(self.tags).get(key)


@dataclass(frozen=True, slots=True)
class Verdict:
    version: str
    delete: bool
    why: str


def plan_prune(
    versions: Iterable[VersionInfo],
    policy: Policy,
    *,
    now_ms: int,
    horizon_days: float,
    decided_digests: frozenset[str] = frozenset(),
) -> list[Verdict]:
    """What ``policy`` does to each version (pure). Only versions the lifecycle archived and
    retired are candidates; the policy picks among them; the compliance horizon vetoes."""
    horizon_ms = int(horizon_days * DAY_MS)
    archived: list[tuple[int, VersionInfo]] = []
    out: dict[str, Verdict] = {}
    for v in versions:
        when = parse_iso(v.tag(ARCHIVED_AT))
        if v.aliases:
            out[v.version] = Verdict(v.version, False, f"has alias {', '.join(v.aliases)}")
        elif when is None:
            out[v.version] = Verdict(v.version, False, "not archived by the lifecycle")
        else:
            archived.append((when, v))
    archived.sort(key=lambda pair: (pair[0], _num(pair[1].version)), reverse=True)
    for rank, (when, v) in enumerate(archived):
        if policy.kind == "keep-forever":
            out[v.version] = Verdict(v.version, False, "policy keep-forever")
            continue
        if policy.kind == "time" and now_ms - when < policy.days * DAY_MS:
            out[v.version] = Verdict(
                v.version, False, f"archived {utc(when)}, within {policy.days:g}d"
            )
            continue
        if policy.kind == "count" and rank < policy.count:
            out[v.version] = Verdict(v.version, False, f"among the newest {policy.count} archived")
            continue
        retired = parse_iso(v.tag(RETIRED_AT))
        if retired is None:
            out[v.version] = Verdict(v.version, False, "archived but not retired: may still decide")
            continue
        if now_ms - retired < horizon_ms:
            out[v.version] = Verdict(
                v.version,
                False,
                f"decided until {utc(retired)}, within the {horizon_days:g}-day compliance horizon",
            )
            continue
        digest = v.tag(DIGEST_TAG)
        if digest is not None and digest in decided_digests:
            out[v.version] = Verdict(
                v.version, False, "its decisions are on the decisions topic within the horizon"
            )
            continue
        out[v.version] = Verdict(v.version, True, f"archived {utc(when)}, retired {utc(retired)}")
    return sorted(out.values(), key=lambda verdict: _num(verdict.version))


def _num(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (0, version)


def registry_versions(client: Any, name: str) -> list[VersionInfo]:
    found = client.search_model_versions(f"name='{name}'")
    model = client.get_registered_model(name)
    aliases: dict[str, list[str]] = {}
    for alias, version in (getattr(model, "aliases", None) or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    return [
        VersionInfo(
            str(v.version),
            tuple(sorted(aliases.get(str(v.version), []))),
            tuple(sorted((v.tags or {}).items())),
        )
        for v in found
    ]


def apply_prune(client: Any, name: str, verdicts: list[Verdict]) -> list[str]:
    deleted = []
    for v in verdicts:
        if v.delete:
            client.delete_model_version(name, v.version)
            deleted.append(v.version)
    return deleted
