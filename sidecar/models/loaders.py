"""Loaders turn a declared model into a :class:`~sidecar.models.base.ScoringModel`."""

from __future__ import annotations

import importlib

from ..config import ModelConfig
from ..errors import ModelLoadError
from .base import Predictor, ScoringModel


def load_python(config: ModelConfig) -> Predictor:
    """``package.module:factory`` -> ``factory(**options)``, checked to have ``predict``."""
    module_name, _, attr = config.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(
            f"model {config.name}: cannot import module {module_name!r} from target "
            f"{config.target!r}: {exc}"
        ) from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelLoadError(
            f"model {config.name}: {module_name!r} has no callable {attr!r} (target "
            f"{config.target!r})"
        )
    try:
        predictor = factory(**config.options)
    except Exception as exc:
        raise ModelLoadError(
            f"model {config.name}: factory {config.target} failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(predictor, Predictor):
        raise ModelLoadError(
            f"model {config.name}: {config.target} returned {type(predictor).__name__}, "
            "which has no predict(batch) method"
        )
    return predictor


def load_model(config: ModelConfig) -> ScoringModel:
    if config.loader == "python":
        return ScoringModel(config, load_python(config))
    if config.loader == "process":
        from .process import load_process

        return ScoringModel(config, load_process(config))
    if config.loader == "onnx":
        from .onnx import load_onnx

        return ScoringModel(config, load_onnx(config))
    if config.loader == "http":
        from .http import load_http

        return ScoringModel(config, load_http(config))
    if config.loader == "mlflow":
        from .contract import model_manifest, with_registry
        from .mlflow_registry import load_mlflow

        predictor = load_mlflow(config)
        manifest = with_registry(
            model_manifest(config), predictor.registry_model, predictor.registry_version
        )
        return ScoringModel(config, predictor, manifest=manifest)
    raise ModelLoadError(f"model {config.name}: unknown loader {config.loader!r}")
