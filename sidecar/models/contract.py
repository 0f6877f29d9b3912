"""A declared model's manifest: inline, from a file, or derived from its config."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import msgspec

from ..config import ModelConfig, SidecarConfig
from ..errors import ContractError
from ..manifest import InputSpec, Manifest, OutputSpec, gate_problems, load_manifest
from ..routing import Mode

log = logging.getLogger(__name__)


def derived_manifest(config: ModelConfig) -> Manifest:
    """The contract a model without a manifest implicitly makes: its features, no ranges,
    scores in [0, 1] at its threshold."""
    return Manifest(
        name=config.name,
        version=config.version,
        inputs=[
            InputSpec(name=f.name, type=f.type, nullable=f.nullable, categories=f.categories)
            for f in config.features
        ],
        output=output_spec(config),
    )


def output_spec(config: ModelConfig) -> OutputSpec:
    """The output part of the contract the model's config declares."""
    return OutputSpec(
        threshold=config.threshold,
        kind=config.output_kind,
        labels=config.labels,
        bands=config.bands,
        k=config.k,
        items_from=config.items_from,
    )


def _output_of(spec: OutputSpec) -> tuple[object, ...]:
    return (spec.kind, spec.labels, spec.bands, spec.k, spec.items_from)


def model_manifest(config: ModelConfig) -> Manifest:
    """The model's manifest, checked against its config (the config drives decoding, the
    manifest is the contract: they must agree on name, version, features and threshold)."""
    if config.manifest is not None and config.manifest_file is not None:
        raise ContractError(f"model {config.name}: set manifest or manifest_file, not both")
    if config.manifest is not None:
        manifest = config.manifest
    elif config.manifest_file is not None:
        manifest = load_manifest(config.manifest_file)
    else:
        beside = manifest_beside_model(config)
        if beside is None:
            return derived_manifest(config)
        manifest = beside
    where = f"model {config.name}: manifest"
    if (manifest.name, manifest.version) != (config.name, config.version):
        raise ContractError(
            f"{where} is for {manifest.name} {manifest.version} but the config declares "
            f"{config.name} {config.version}: point it at the right manifest"
        )
    declared = [(f.name, f.type) for f in config.features]
    manifested = [(i.name, i.type) for i in manifest.inputs]
    if declared != manifested:
        raise ContractError(
            f"{where} inputs {manifested} differ from the configured features {declared} "
            "(names, types and order must match)"
        )
    declared_output = _output_of(output_spec(config))
    if _output_of(manifest.output) != declared_output:
        raise ContractError(
            f"{where} output (kind, labels, bands, k, items_from) "
            f"{_output_of(manifest.output)} differs from the configured {declared_output}"
        )
    if manifest.output.threshold != config.threshold:
        raise ContractError(
            f"{where} threshold {manifest.output.threshold} differs from the configured "
            f"threshold {config.threshold}"
        )
    return manifest


def model_file(config: ModelConfig) -> Path | None:
    """The file a model is loaded from, when there is one: the ``.onnx`` file, or the module
    of a ``python``/``process`` factory (found without importing the module itself)."""
    if config.loader == "onnx":
        return Path(config.target)
    if config.loader not in ("python", "process"):
        return None
    module = config.target.partition(":")[0]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None  # the loader reports the missing module with the full context
    if spec is None or not spec.origin or not spec.has_location:
        return None
    return Path(spec.origin)


def manifest_beside_model(config: ModelConfig) -> Manifest | None:
    """A manifest shipped next to the model file: ``<stem>.manifest.toml`` (e.g.
    ``fraud_lr.manifest.toml`` for ``fraud_lr.onnx``, ``fraud.manifest.toml`` for the module
    ``fraud.py``), then ``manifest.toml`` in the same folder. A file that names another model
    is skipped (one folder may hold several models); one naming this model must then agree
    with the config like any manifest, so a stale manifest stops the start."""
    path = model_file(config)
    if path is None:
        return None
    names = [] if path.stem == "__init__" else [f"{path.stem}.manifest.toml"]
    for candidate in (path.parent / name for name in [*names, "manifest.toml"]):
        if not candidate.is_file():
            continue
        manifest = load_manifest(candidate)
        if manifest.name == config.name:
            log.info("model %s: using the manifest beside the model, %s", config.name, candidate)
            return manifest
        log.info("model %s: %s is for model %s; skipped", config.name, candidate, manifest.name)
    return None


def with_registry(manifest: Manifest, model: str, version: str) -> Manifest:
    """``manifest`` recording the registry version a registry loader resolved; a manifest
    that pins another registry model or version refuses the load."""
    pinned = (manifest.registry_model, manifest.registry_version)
    if pinned != (None, None) and pinned != (model, version):
        raise ContractError(
            f"model {manifest.name}: the manifest pins registry model {pinned[0]} version "
            f"{pinned[1]} but the registry resolved {model} version {version}: point the "
            "target at that version or update the manifest"
        )
    return msgspec.structs.replace(manifest, registry_model=model, registry_version=version)


def check_startup(
    config: SidecarConfig, champion: Manifest, candidate: Manifest | None
) -> list[str]:
    """The start-up gate. Raises ContractError (the sidecar refuses to start) when a model
    needs a feature the request contract does not carry or the candidate declares another
    output contract than the champion; a candidate with ``shadow_only = true`` is let through
    in shadow mode (returned as warnings) and never decides."""
    problems = gate_problems(
        champion,
        candidate,
        config.request_contract.features,
        config.request_contract.candidates,
    )
    if config.request_contract.features is None:
        log.info("request_contract.features is not set: the feature gate is off")
    cand_cfg = config.models.candidate
    shadow_only = cand_cfg is not None and cand_cfg.shadow_only
    if shadow_only and config.rollout.mode is not Mode.SHADOW:
        raise ContractError(
            f"models.candidate.shadow_only is set but rollout.mode is "
            f"{config.rollout.mode.value}: a shadow-only candidate may only start in shadow mode"
        )
    fatal = [p.reason for p in problems if p.arm == "champion" or not shadow_only]
    if fatal:
        raise ContractError(
            "refusing to start: "
            + "; ".join(fatal)
            + ". Fix the contract (add the features upstream and to request_contract.features, "
            "or align the output), or set models.candidate.shadow_only = true to run this "
            "candidate in shadow only."
        )
    warnings = [p.reason for p in problems]
    for w in warnings:
        log.warning("shadow-only candidate breaks the contract: %s", w)
    return warnings
