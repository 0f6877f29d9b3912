"""A declared model's manifest: inline, from a file, or derived from its config."""

from __future__ import annotations

import logging

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
        output=OutputSpec(threshold=config.threshold),
    )


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
        return derived_manifest(config)
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
    if manifest.output.threshold != config.threshold:
        raise ContractError(
            f"{where} threshold {manifest.output.threshold} differs from the configured "
            f"threshold {config.threshold}"
        )
    return manifest


def check_startup(
    config: SidecarConfig, champion: Manifest, candidate: Manifest | None
) -> list[str]:
    """The start-up gate. Raises ContractError (the sidecar refuses to start) when a model
    needs a feature the request contract does not carry or the candidate declares another
    output contract than the champion; a candidate with ``shadow_only = true`` is let through
    in shadow mode (returned as warnings) and never decides."""
    problems = gate_problems(champion, candidate, config.request_contract.features)
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
