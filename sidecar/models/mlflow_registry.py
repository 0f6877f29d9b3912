"""The ``mlflow`` loader (optional extra ``sidecar[mlflow]``): a pyfunc model from an MLflow
model registry.

``target`` is ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``. An alias is resolved once, at
start-up, to a registry version, and exactly that version is loaded (``models:/NAME/N``), so an
alias moved between the lookup and the download cannot mix two versions. Moving the alias
later changes nothing until the sidecar restarts: the rollout's comparison keeps one model.

The config's ``version`` stays the model's semantic version (what decisions and comparisons
carry as ``model_version``; the contract rules work on it); the registry name and version are
written into the manifest (``registry_model``, ``registry_version``), so they change the
``manifest_digest`` every output carries and show in ``sidecar ctl status``.

The tracking/registry URI comes from ``mlflow_tracking_uri`` or ``$MLFLOW_TRACKING_URI``
(``$MLFLOW_REGISTRY_URI`` overrides the registry); mlflow keeps it process-wide, so it is set
just before each load. ``options``: ``output_column`` (column of a 2-D or DataFrame output, by
index or name, default the last).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..errors import ModelLoadError
from .base import FloatArray

log = logging.getLogger(__name__)

_TARGET = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


@dataclass(frozen=True, slots=True)
class RegistryRef:
    """A parsed ``models:/`` target: a registered model and an alias or a version."""

    name: str
    alias: str | None = None
    version: str | None = None


def parse_target(target: str) -> RegistryRef:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (stages are not accepted: MLflow
    deprecated them for aliases)."""
    match = _TARGET.match(target)
    if match is None:
        raise ModelLoadError(
            f"mlflow target {target!r} must look like 'models:/NAME@ALIAS' or "
            "'models:/NAME/VERSION' (a number)"
        )
    return RegistryRef(match["name"], match["alias"], match["version"])


class MlflowPredictor:
    """A loaded pyfunc model; batches go in as a DataFrame with the configured feature names
    as columns (what a model logged with a signature expects)."""

    def __init__(self, config: ModelConfig) -> None:
        try:
            import mlflow
            import mlflow.pyfunc
            import pandas
        except ImportError as exc:
            raise ModelLoadError(
                f"model {config.name}: loader mlflow needs mlflow-skinny and pandas: "
                "pip install 'sidecar[mlflow]'"
            ) from exc
        self._pandas: Any = pandas
        ref = parse_target(config.target)
        uri = config.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            mlflow.set_tracking_uri(uri)
        registry_uri = os.environ.get("MLFLOW_REGISTRY_URI") or uri
        if registry_uri:
            mlflow.set_registry_uri(registry_uri)
        where = f"model {config.name}: {config.target} (registry {registry_uri or 'default'})"
        try:
            client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=registry_uri)
            if ref.alias is not None:
                found = client.get_model_version_by_alias(ref.name, ref.alias)
            else:
                found = client.get_model_version(ref.name, str(ref.version))
        except Exception as exc:  # mlflow raises MlflowException, connection errors, ...
            raise ModelLoadError(f"{where}: cannot resolve: {exc}") from exc
        #: The registered model and the version the target resolved to.
        self.registry_model = ref.name
        self.registry_version = str(found.version)
        pinned = f"models:/{ref.name}/{self.registry_version}"
        try:
            self._model: Any = mlflow.pyfunc.load_model(pinned)
        except Exception as exc:
            raise ModelLoadError(f"{where}: cannot load {pinned}: {exc}") from exc
        log.info("model %s: %s resolved to %s", config.name, config.target, pinned)
        self._columns = [f.name for f in config.features]
        self._output_column: int | str = config.options.get("output_column", -1)

    def predict(self, batch: FloatArray) -> FloatArray:
        frame = self._pandas.DataFrame(batch, columns=self._columns, copy=False)
        out = self._model.predict(frame)
        if isinstance(out, self._pandas.DataFrame):
            column = self._output_column
            out = out[column] if isinstance(column, str) else out.iloc[:, column]
        scores = np.asarray(out, dtype=np.float64)
        if scores.ndim == 2 and scores.shape[1] > 1:
            if isinstance(self._output_column, str):
                raise ValueError("output_column by name needs a DataFrame output")
            scores = scores[:, self._output_column]
        result: FloatArray = scores.reshape(-1)
        return result


def load_mlflow(config: ModelConfig) -> MlflowPredictor:
    return MlflowPredictor(config)
