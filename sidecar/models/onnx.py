"""The ``onnx`` loader (optional extra ``sidecar[onnx]``): an ONNX model run by onnxruntime.

``target`` is the ``.onnx`` file. onnxruntime releases the GIL while it runs, so the model is
called from the usual thread pool. ``options``: ``input_name`` / ``output_name`` (default: the
graph's first input and output), ``output_column`` (column of a 2-D output such as
``probabilities``, default the last), ``intra_op_threads`` (default 1: ``concurrency`` already
runs calls side by side).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import ModelConfig
from ..errors import ModelLoadError
from .base import FloatArray

_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64}


class OnnxPredictor:
    def __init__(self, config: ModelConfig) -> None:
        try:
            import onnxruntime
        except ImportError as exc:
            raise ModelLoadError(
                f"model {config.name}: loader onnx needs onnxruntime: pip install 'sidecar[onnx]'"
            ) from exc
        options = dict(config.options)
        session_options = onnxruntime.SessionOptions()
        session_options.intra_op_num_threads = int(options.get("intra_op_threads", 1))
        try:
            self._session: Any = onnxruntime.InferenceSession(
                config.target, session_options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ModelLoadError(
                f"model {config.name}: cannot load ONNX model {config.target!r}: {exc}"
            ) from exc
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        self._input = str(options.get("input_name", inputs[0].name))
        spec = next((i for i in inputs if i.name == self._input), None)
        if spec is None:
            raise ModelLoadError(
                f"model {config.name}: no input {self._input!r}; the graph has "
                f"{[i.name for i in inputs]}"
            )
        if spec.type not in _DTYPES:
            raise ModelLoadError(f"model {config.name}: input type {spec.type} is not float")
        self._dtype = _DTYPES[spec.type]
        width = spec.shape[-1] if spec.shape else None
        if isinstance(width, int) and width != len(config.features):
            raise ModelLoadError(
                f"model {config.name}: the ONNX input takes {width} features, the config "
                f"declares {len(config.features)}"
            )
        self._output = str(options.get("output_name", outputs[0].name))
        self._column = int(options.get("output_column", -1))

    def predict(self, batch: FloatArray) -> FloatArray:
        (out,) = self._session.run([self._output], {self._input: batch.astype(self._dtype)})
        scores = np.asarray(out, dtype=np.float64)
        if scores.ndim == 2 and scores.shape[1] > 1:
            scores = scores[:, self._column]
        result: FloatArray = scores.reshape(-1)
        return result


def load_onnx(config: ModelConfig) -> OnnxPredictor:
    return OnnxPredictor(config)
