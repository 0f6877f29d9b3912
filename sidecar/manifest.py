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
import itertools
import json
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from .errors import ContractError

FeatureType = Literal["number", "integer", "bool", "category"]
#: What a model returns (see :class:`OutputSpec`).
OutputKind = Literal["binary", "multiclass", "regression", "ranking"]
OUTPUT_KINDS: tuple[OutputKind, ...] = ("binary", "multiclass", "regression", "ranking")
#: Where a ranking model's items come from: the model's own catalogue, or the request's
#: ``candidates`` (a re-ranker).
ItemsFrom = Literal["model", "request"]
#: Most labels of a multiclass model (or bands of a regression model), and the largest ``k``.
MAX_LABELS = 256
MAX_K = 1000
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
    """What the model emits. ``name``, ``score_min``, ``score_max`` and the kind's shape
    (``kind``, ``labels``, ``k``, ``items_from``) are the output contract consumers rely on;
    ``threshold`` (binary) and ``bands`` (regression) turn the output into a decision.

    * ``binary``: a score; the decision is ``score >= threshold``.
    * ``multiclass``: a probability per label (in ``labels`` order); the decision is the
      label with the highest probability.
    * ``regression``: a number; with ``bands`` (ascending cut points) the decision is the
      band it falls in, named by ``labels`` (one more label than cut points) when given.
    * ``ranking``: the top ``k`` item ids with their scores, best first; the items are the
      model's own (``items_from = "model"``) or the request's ``candidates``
      (``items_from = "request"``, a re-ranker).
    """

    name: str = "score"
    score_min: float = 0.0
    score_max: float = 1.0
    threshold: float = 0.5
    kind: OutputKind = "binary"
    labels: list[str] | None = None
    bands: list[float] | None = None
    k: int | None = None
    items_from: ItemsFrom = "model"


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
    problem = output_shape_problem(out.kind, out.labels, out.bands, out.k, out.items_from)
    if problem:
        raise ContractError(f"{source}: output {problem}")
    return manifest


def output_shape_problem(
    kind: OutputKind,
    labels: list[str] | None,
    bands: list[float] | None,
    k: int | None,
    items_from: ItemsFrom,
) -> str | None:
    """Why an output declaration is inconsistent (None when it is fine). Shared by manifests
    and model configs, so both refuse the same things with the same words."""
    if labels is not None:
        if len(set(labels)) != len(labels):
            return f"labels must be distinct, got {labels}"
        if len(labels) > MAX_LABELS or any(not 0 < len(x) <= 256 for x in labels):
            return f"labels: at most {MAX_LABELS}, each 1 to 256 characters"
    if kind == "multiclass":
        if not labels or len(labels) < 2:
            return "kind multiclass needs labels (at least two)"
    elif kind == "regression":
        if bands is not None:
            if not bands or len(bands) >= MAX_LABELS:
                return f"bands: 1 to {MAX_LABELS - 1} cut points"
            if any(not math.isfinite(b) for b in bands) or any(
                b >= c for b, c in itertools.pairwise(bands)
            ):
                return f"bands must be finite and strictly ascending, got {bands}"
            if labels is not None and len(labels) != len(bands) + 1:
                return (
                    f"kind regression with {len(bands)} band cut point(s) names "
                    f"{len(bands) + 1} bands: labels has {len(labels)}"
                )
        elif labels is not None:
            return "kind regression: labels name the bands, so they need bands"
    elif labels is not None:
        return f"labels only apply to kinds multiclass and regression, not {kind}"
    if kind == "ranking":
        if k is None or not 1 <= k <= MAX_K:
            return f"kind ranking needs k (1 to {MAX_K}), the number of items returned"
    elif k is not None:
        return f"k only applies to kind ranking, not {kind}"
    if kind != "regression" and bands is not None:
        return f"bands only apply to kind regression, not {kind}"
    if kind != "ranking" and items_from != "model":
        return f"items_from only applies to kind ranking, not {kind}"
    return None


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

    Output kinds (see :func:`_output_changes`): the kind changed, a label removed or the
    labels reordered, ``k`` lowered, the item source changed to the request, or the number
    of regression bands changed is MAJOR; a label added, ``k`` raised, the item source
    changed to the model, or band cut points moved is MINOR.
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
    if o.threshold != n.threshold and o.kind == n.kind == "binary":
        changes.append(
            Change(Bump.MINOR, f"output threshold changed {o.threshold} -> {n.threshold}")
        )
    changes.extend(_output_changes(o, n))
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


def _output_changes(o: OutputSpec, n: OutputSpec) -> list[Change]:
    """The output-kind part of :func:`diff_manifests`."""
    if o.kind != n.kind:
        return [
            Change(
                Bump.MAJOR,
                f"output kind changed {o.kind} -> {n.kind} (consumers read another shape)",
            )
        ]
    out: list[Change] = []
    old_labels, new_labels = o.labels or [], n.labels or []
    removed = [x for x in old_labels if x not in new_labels]
    added = [x for x in new_labels if x not in old_labels]
    if removed:
        out.append(Change(Bump.MAJOR, f"output labels removed {removed}"))
    if added:
        out.append(Change(Bump.MINOR, f"output labels added {added}"))
    kept_old = [x for x in old_labels if x in new_labels]
    kept_new = [x for x in new_labels if x in old_labels]
    if kept_old != kept_new:
        out.append(Change(Bump.MAJOR, "output labels reordered (probabilities are in label order)"))
    if o.kind == "regression" and o.bands != n.bands:
        if len(o.bands or []) != len(n.bands or []):
            out.append(
                Change(
                    Bump.MAJOR,
                    f"output bands changed {o.bands} -> {n.bands} (another number of bands: "
                    "decisions take other values)",
                )
            )
        else:
            out.append(Change(Bump.MINOR, f"output band cut points moved {o.bands} -> {n.bands}"))
    if o.k != n.k and o.k is not None and n.k is not None:
        if n.k < o.k:
            out.append(Change(Bump.MAJOR, f"output k lowered {o.k} -> {n.k} (fewer items)"))
        else:
            out.append(Change(Bump.MINOR, f"output k raised {o.k} -> {n.k}"))
    if o.items_from != n.items_from:
        if n.items_from == "request":
            out.append(
                Change(
                    Bump.MAJOR,
                    "output items now come from the request's candidates (producers must "
                    "send them)",
                )
            )
        else:
            out.append(
                Change(Bump.MINOR, "output items now come from the model (candidates ignored)")
            )
    return out


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


def output_shape(manifest: Manifest) -> tuple[OutputKind, list[str] | None, int | None]:
    """The shape of the output consumers read: kind, labels (multiclass, or regression
    band names) and k. Bands, like the threshold, are per model on purpose; where the
    items come from is the producers' business (the request contract), not the consumers'."""
    o = manifest.output
    return (o.kind, o.labels, o.k)


@dataclass(frozen=True, slots=True)
class GateProblem:
    arm: Literal["champion", "candidate"]
    reason: str


def gate_problems(
    champion: Manifest,
    candidate: Manifest | None,
    request_features: list[str] | None,
    request_candidates: bool | None = None,
) -> list[GateProblem]:
    """Why a rollout must not start: a model needs a required input the request contract does
    not carry (features; candidate items for a re-ranker when ``request_candidates`` is
    declared false), or the candidate's output contract differs from the champion's (another
    output kind, other labels or k, another score name or range)."""
    problems: list[GateProblem] = []
    if request_candidates is False:
        for arm, manifest in (("champion", champion), ("candidate", candidate)):
            if manifest is not None and manifest.output.items_from == "request":
                problems.append(
                    GateProblem(
                        arm,  # type: ignore[arg-type]
                        f"{arm} {manifest.name} {manifest.version} re-ranks the request's "
                        "candidates but the request contract (request_contract.candidates) "
                        "says requests carry none",
                    )
                )
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
    if candidate is not None and candidate.output.kind != champion.output.kind:
        problems.append(
            GateProblem(
                "candidate",
                f"candidate {candidate.name} {candidate.version} returns a "
                f"{candidate.output.kind} output but the champion returns {champion.output.kind}: "
                "consumers of decisions read one shape",
            )
        )
    elif candidate is not None and output_shape(candidate) != output_shape(champion):
        _, cl, cn = output_shape(champion)
        kk, kl, kn = output_shape(candidate)
        what = f"k {kn} (champion {cn})" if kn != cn else f"labels {kl} (champion {cl})"
        problems.append(
            GateProblem(
                "candidate",
                f"candidate {candidate.name} {candidate.version} declares {kk} output with "
                f"{what}: consumers of decisions would break",
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
