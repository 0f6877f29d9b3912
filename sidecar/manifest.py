"""Model manifests: the contract a model makes with the producers that feed it and the
consumers that act on its decisions, plus the semantic-versioning rules for changing it.

A manifest names the model and its semantic version, its inputs (type, allowed range or
categories, required or optional), its output (score range and decision threshold), the
training data it was fitted on and its owner. Everything here is pure logic: the diff rules,
the digest and the start-up gate are plain functions, tested directly; reading files is the
only I/O.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from .errors import ContractError

FeatureType = Literal["number", "integer", "bool", "category"]
_SEMVER = r"^\d+\.\d+\.\d+([-+].*)?$"


class InputSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """One model input as the manifest declares it."""

    name: Annotated[str, msgspec.Meta(min_length=1)]
    type: FeatureType = "number"
    #: ``false``: the model copes without it (new optional inputs are a MINOR change).
    required: bool = True
    nullable: bool = False
    #: Allowed range (inclusive); values outside are counted per feature as a data-quality
    #: signal and dead-lettered when validation is strict.
    min: float | None = None
    max: float | None = None
    categories: list[str] | None = None
    description: str | None = None


class OutputSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """What the model emits. ``name``, ``score_min`` and ``score_max`` are the output
    contract consumers rely on; ``threshold`` turns the score into a decision."""

    name: str = "score"
    score_min: float = 0.0
    score_max: float = 1.0
    threshold: float = 0.5


class Manifest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    name: Annotated[str, msgspec.Meta(min_length=1)]
    version: Annotated[str, msgspec.Meta(pattern=_SEMVER)]
    inputs: list[InputSpec]
    output: OutputSpec = msgspec.field(default_factory=OutputSpec)
    #: Where the training data lives (a dataset URI, a table and snapshot, a commit).
    training_data: str | None = None
    owner: str | None = None
    description: str | None = None
    #: Set by registry loaders (``mlflow``) at load: the registered model and the version the
    #: alias resolved to, so the digest names the exact artifact. A manifest that sets them
    #: pins that version: the model refuses to load when the registry resolves another.
    registry_model: str | None = None
    registry_version: str | None = None

    def input(self, name: str) -> InputSpec | None:
        return next((i for i in self.inputs if i.name == name), None)


def digest(manifest: Manifest) -> str:
    """A short stable digest of the manifest's canonical JSON (sorted keys, defaults included),
    recorded in every decision and comparison so an output names the exact contract."""
    canonical = json.dumps(msgspec.to_builtins(manifest), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


def parse_manifest(data: bytes | str, source: str = "manifest") -> Manifest:
    """A manifest from TOML or JSON text (JSON when it starts with ``{``)."""
    text = data.decode() if isinstance(data, bytes) else data
    try:
        tree = json.loads(text) if text.lstrip().startswith("{") else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ContractError(f"{source}: not valid TOML or JSON: {exc}") from exc
    return manifest_from_dict(tree, source)


def manifest_from_dict(tree: object, source: str = "manifest") -> Manifest:
    try:
        manifest = msgspec.convert(tree, Manifest, strict=False)
    except msgspec.ValidationError as exc:
        raise ContractError(f"{source}: not a valid model manifest: {exc}") from exc
    names = [i.name for i in manifest.inputs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ContractError(f"{source}: input(s) declared twice: {dupes}")
    for spec in manifest.inputs:
        if spec.min is not None and spec.max is not None and spec.min > spec.max:
            raise ContractError(f"{source}: input {spec.name}: min {spec.min} > max {spec.max}")
        if spec.type == "category" and not spec.categories:
            raise ContractError(f"{source}: category input {spec.name} needs categories")
    out = manifest.output
    if out.score_min > out.score_max:
        raise ContractError(f"{source}: output score_min > score_max")
    return manifest


def load_manifest(path: str | Path) -> Manifest:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ContractError(f"cannot read manifest {p}: {exc}") from exc
    return parse_manifest(data, str(p))


# -- semantic versioning -------------------------------------------------------------------


class Bump(enum.IntEnum):
    NONE = 0
    PATCH = 1
    MINOR = 2
    MAJOR = 3


@dataclass(frozen=True, slots=True)
class Change:
    bump: Bump
    what: str

    def __str__(self) -> str:
        return f"{self.bump.name:<5}  {self.what}"


@dataclass(frozen=True, slots=True)
class ManifestDiff:
    """Every change between two manifests, the bump they require and the bump declared."""

    changes: list[Change]
    required: Bump
    declared: Bump
    old_version: str
    new_version: str
    #: The new version is lower than the old one (never acceptable).
    backwards: bool = False

    @property
    def ok(self) -> bool:
        return not self.backwards and self.declared >= self.required


def version_tuple(version: str) -> tuple[int, int, int]:
    match = re.match(r"^(\d+)\.(\d+)\.(\d+)", version)
    if match is None:
        raise ContractError(f"version {version!r} is not semantic (MAJOR.MINOR.PATCH)")
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


def declared_bump(old: str, new: str) -> tuple[Bump, bool]:
    """The bump ``old -> new`` declares, and whether it goes backwards."""
    a, b = version_tuple(old), version_tuple(new)
    if b < a:
        return Bump.NONE, True
    if b[0] > a[0]:
        return Bump.MAJOR, False
    if b[1] > a[1]:
        return Bump.MINOR, False
    if b[2] > a[2]:
        return Bump.PATCH, False
    return Bump.NONE, False


def _range_text(lo: float | None, hi: float | None) -> str:
    return f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"


def _input_changes(old: InputSpec, new: InputSpec) -> list[Change]:
    out: list[Change] = []
    name = new.name
    if old.type != new.type:
        out.append(Change(Bump.MAJOR, f"input {name}: type changed {old.type} -> {new.type}"))
    if not old.required and new.required:
        out.append(Change(Bump.MAJOR, f"input {name}: optional -> required"))
    elif old.required and not new.required:
        out.append(Change(Bump.MINOR, f"input {name}: required -> optional"))
    if old.nullable and not new.nullable:
        out.append(Change(Bump.MAJOR, f"input {name}: null no longer accepted"))
    elif not old.nullable and new.nullable:
        out.append(Change(Bump.MINOR, f"input {name}: null now accepted"))
    narrower = (new.min is not None and (old.min is None or new.min > old.min)) or (
        new.max is not None and (old.max is None or new.max < old.max)
    )
    wider = (old.min is not None and (new.min is None or new.min < old.min)) or (
        old.max is not None and (new.max is None or new.max > old.max)
    )
    rng = f"{_range_text(old.min, old.max)} -> {_range_text(new.min, new.max)}"
    if narrower:
        out.append(Change(Bump.MAJOR, f"input {name}: allowed range narrowed {rng}"))
    elif wider:
        out.append(Change(Bump.MINOR, f"input {name}: allowed range widened {rng}"))
    old_cats, new_cats = set(old.categories or []), set(new.categories or [])
    if old.type == new.type == "category":
        if old_cats - new_cats:
            removed = sorted(old_cats - new_cats)
            out.append(Change(Bump.MAJOR, f"input {name}: categories removed {removed}"))
        if new_cats - old_cats:
            added = sorted(new_cats - old_cats)
            out.append(Change(Bump.MINOR, f"input {name}: categories added {added}"))
        if (old.categories or []) != (new.categories or []) and old_cats == new_cats:
            out.append(Change(Bump.MAJOR, f"input {name}: category order (encoding) changed"))
    if old.description != new.description:
        out.append(Change(Bump.PATCH, f"input {name}: description changed"))
    return out


def diff_manifests(old: Manifest, new: Manifest) -> ManifestDiff:
    """Classify every change between two manifests by the semantic-versioning rules:

    * MAJOR (breaks producers or consumers): the model renamed; an input removed, retyped,
      made required, or newly required; its range narrowed, a category removed, null no longer
      accepted; the input order changed (models read positional columns); the output renamed
      or its score range changed.
    * MINOR (behaviour changes, nothing breaks): a new optional input; an input made optional,
      its range widened, a category added; the decision threshold changed (decision rate
      moves); new training data (retrained).
    * PATCH: owner, descriptions.
    """
    changes: list[Change] = []
    if old.name != new.name:
        changes.append(Change(Bump.MAJOR, f"model renamed {old.name} -> {new.name}"))
    old_inputs = {i.name: i for i in old.inputs}
    new_inputs = {i.name: i for i in new.inputs}
    for name, spec in old_inputs.items():
        if name not in new_inputs:
            changes.append(Change(Bump.MAJOR, f"input {name}: removed"))
        else:
            changes.extend(_input_changes(spec, new_inputs[name]))
    for name, spec in new_inputs.items():
        if name in old_inputs:
            continue
        if spec.required:
            changes.append(Change(Bump.MAJOR, f"input {name}: added as required"))
        else:
            changes.append(Change(Bump.MINOR, f"input {name}: added as optional"))
    kept_old = [n for n in old_inputs if n in new_inputs]
    kept_new = [n for n in new_inputs if n in old_inputs]
    if kept_old != kept_new:
        changes.append(Change(Bump.MAJOR, "inputs reordered (models read positional columns)"))
    o, n = old.output, new.output
    if o.name != n.name:
        changes.append(Change(Bump.MAJOR, f"output renamed {o.name} -> {n.name}"))
    if (o.score_min, o.score_max) != (n.score_min, n.score_max):
        changes.append(
            Change(
                Bump.MAJOR,
                f"output score range changed [{o.score_min}, {o.score_max}] -> "
                f"[{n.score_min}, {n.score_max}]",
            )
        )
    if o.threshold != n.threshold:
        changes.append(
            Change(Bump.MINOR, f"output threshold changed {o.threshold} -> {n.threshold}")
        )
    if old.training_data != new.training_data:
        changes.append(
            Change(Bump.MINOR, f"training data changed {old.training_data} -> {new.training_data}")
        )
    if old.owner != new.owner:
        changes.append(Change(Bump.PATCH, f"owner changed {old.owner} -> {new.owner}"))
    if old.description != new.description:
        changes.append(Change(Bump.PATCH, "description changed"))
    required = max((c.bump for c in changes), default=Bump.NONE)
    declared, backwards = declared_bump(old.version, new.version)
    return ManifestDiff(
        changes=changes,
        required=required,
        declared=declared,
        old_version=old.version,
        new_version=new.version,
        backwards=backwards,
    )


def format_diff(diff: ManifestDiff) -> str:
    lines = [f"{c}" for c in diff.changes] or ["no contract changes"]
    lines.append(
        f"required bump: {diff.required.name}; declared: {diff.declared.name} "
        f"({diff.old_version} -> {diff.new_version})"
    )
    if diff.backwards:
        lines.append("FAIL: the new version is lower than the old one")
    elif not diff.ok:
        lines.append(
            f"FAIL: these changes need a {diff.required.name} version bump; "
            f"{diff.old_version} -> {diff.new_version} is {diff.declared.name}"
        )
    else:
        lines.append("OK")
    return "\n".join(lines)


# -- the start-up gate ----------------------------------------------------------------------


def output_contract(manifest: Manifest) -> tuple[str, float, float]:
    """What consumers of decisions rely on; the threshold is per model on purpose."""
    o = manifest.output
    return (o.name, o.score_min, o.score_max)


@dataclass(frozen=True, slots=True)
class GateProblem:
    arm: Literal["champion", "candidate"]
    reason: str


def gate_problems(
    champion: Manifest, candidate: Manifest | None, request_features: list[str] | None
) -> list[GateProblem]:
    """Why a rollout must not start: a model needs a required input the request contract does
    not carry, or the candidate's output contract differs from the champion's."""
    problems: list[GateProblem] = []
    if request_features is not None:
        carried = set(request_features)
        arms: list[tuple[Literal["champion", "candidate"], Manifest | None]] = [
            ("champion", champion),
            ("candidate", candidate),
        ]
        for arm, manifest in arms:
            if manifest is None:
                continue
            missing = [i.name for i in manifest.inputs if i.required and i.name not in carried]
            if missing:
                problems.append(
                    GateProblem(
                        arm,
                        f"{arm} {manifest.name} {manifest.version} needs feature(s) "
                        f"{', '.join(missing)} that the request contract "
                        "(request_contract.features) does not carry",
                    )
                )
    if candidate is not None and output_contract(candidate) != output_contract(champion):
        problems.append(
            GateProblem(
                "candidate",
                f"candidate {candidate.name} {candidate.version} declares output "
                f"(name, score_min, score_max) = {output_contract(candidate)} but the champion "
                f"declares {output_contract(champion)}: consumers of decisions would break",
            )
        )
    return problems


# -- release notes --------------------------------------------------------------------------


def rollback_problems(old: Manifest, new: Manifest) -> list[str]:
    """Why rolling back from ``new`` to ``old`` may break someone (empty: safe).

    A rollback runs ``old`` again: producers must still send what it requires (an input
    ``new`` dropped or made optional may no longer be sent), and consumers that moved to
    ``new``'s output contract see ``old``'s again.
    """
    problems = []
    new_inputs = {i.name: i for i in new.inputs}
    for spec in old.inputs:
        if not spec.required:
            continue
        now = new_inputs.get(spec.name)
        if now is None:
            problems.append(
                f"{spec.name} is required by {old.version} but {new.version} dropped it: "
                "producers may stop sending it"
            )
        elif not now.required:
            problems.append(
                f"{spec.name} is required by {old.version} but optional in {new.version}: "
                "producers may stop sending it"
            )
    if output_contract(old) != output_contract(new):
        problems.append(
            f"the output contract differs ({output_contract(new)} -> {output_contract(old)}): "
            "consumers of the new output would see the old one; keep the old API version "
            "served (outputs.versions) while a rollback is possible"
        )
    return problems


def release_notes(old: Manifest, new: Manifest, guide: str | None = None) -> str:
    """A release note in Markdown: the bump, every change, the migration guide and whether
    rolling back to the old version is safe."""
    diff = diff_manifests(old, new)
    lines = [
        f"# {new.name} {new.version}",
        "",
        f"Release of {new.name} {new.version} (from {old.version}): a **{diff.required.name}** "
        f"change by the contract rules (declared: {diff.declared.name}"
        + ("; the version number is too small" if not diff.ok else "")
        + ").",
        "",
        "## Changes",
        "",
    ]
    lines += [f"- **{c.bump.name}** {c.what}" for c in diff.changes] or ["- no contract changes"]
    lines += ["", "## Migration", ""]
    if diff.required >= Bump.MAJOR:
        lines.append(
            "Consumers or producers must change: "
            + (f"follow the migration guide: {guide}" if guide else "no migration guide given")
            + "."
        )
    else:
        lines.append(
            "Nothing breaks: no migration needed" + (f" (guide: {guide})" if guide else "") + "."
        )
    problems = rollback_problems(old, new)
    lines += ["", "## Rollback", ""]
    if problems:
        lines.append(f"Rolling back to {old.version} is **not safe** as it stands:")
        lines += [f"- {p}" for p in problems]
    else:
        lines.append(
            f"Rolling back to {old.version} is safe: it needs nothing {new.version}'s "
            "producers do not send, and its output contract is the same."
        )
    lines += [
        "",
        f"Manifest digests: {old.version} `{digest(old)}`, {new.version} `{digest(new)}`.",
        "",
    ]
    return "\n".join(lines)
