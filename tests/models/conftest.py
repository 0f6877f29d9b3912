"""Fixtures for the model-loader tests: a real MLServer in a cached side venv."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mlserver_support import MLServer, ensure_venv, train_model


@pytest.fixture(scope="session")
def mlserver_bin() -> Path:
    bin_dir, reason = ensure_venv()
    if bin_dir is None:
        pytest.skip(f"MLServer could not be installed in its test venv: {reason}")
    return bin_dir


@pytest.fixture(scope="session")
def mlserver_model(
    mlserver_bin: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, np.ndarray]:
    """A scikit-learn model trained and saved for MLServer, and its probe-batch scores."""
    model_dir = tmp_path_factory.mktemp("mlserver-model")
    return model_dir, train_model(mlserver_bin, model_dir)


@pytest.fixture
def mlserver(
    mlserver_bin: Path, mlserver_model: tuple[Path, np.ndarray], tmp_path: Path
) -> Iterator[MLServer]:
    server = MLServer(mlserver_bin, mlserver_model[0], tmp_path / "mlserver.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()
