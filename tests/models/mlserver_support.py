"""A real MLServer for the ``http`` loader tests, in its own virtual environment.

MLServer pins its own stack (FastAPI, pydantic, pandas, scikit-learn) and is heavy, so it is
kept out of the project's dependencies: it is installed once per machine into a cached venv
(``~/.cache/sidecar-test-mlserver``, override with ``SIDECAR_TEST_MLSERVER_VENV``); about 45 s
the first time, nothing afterwards. The model is trained and saved by that venv's
scikit-learn (pickles must be loaded by the version that wrote them).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from sidecar.broker import free_port
from sidecar.examples.fraud import CHAMPION_FEATURES, generate

MLSERVER_SPEC = ["mlserver==1.7.1", "mlserver-sklearn==1.7.1"]
MODEL_NAME = "fraud-sklearn"


def venv_dir() -> Path:
    default = Path.home() / ".cache" / "sidecar-test-mlserver"
    return Path(os.environ.get("SIDECAR_TEST_MLSERVER_VENV", default))


def ensure_venv() -> tuple[Path | None, str]:
    """The venv's bin directory, built once (under a lock); ``(None, reason)`` on failure."""
    root = venv_dir()
    stamp = root / "installed.json"
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(str(root) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and json.loads(stamp.read_text()) == MLSERVER_SPEC:
            return root / "bin", ""
        started = time.monotonic()
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(root)],
            [str(root / "bin" / "pip"), "install", "--quiet", *MLSERVER_SPEC],
        ]
        for step in steps:
            proc = subprocess.run(step, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
                return None, f"`{' '.join(step)}` failed: {' | '.join(tail)}"
        stamp.write_text(json.dumps(MLSERVER_SPEC))
        print(f"installed MLServer in {root} in {time.monotonic() - started:.0f}s")
        return root / "bin", ""


def train_model(bin_dir: Path, model_dir: Path) -> np.ndarray:
    """Train a scikit-learn logistic regression on the champion's six features, save it with
    joblib and its MLServer settings; return its probabilities on a probe batch."""
    model_dir.mkdir(parents=True, exist_ok=True)
    data = generate(20_000, seed=1)
    x = data.features[:, : len(CHAMPION_FEATURES)]
    np.save(model_dir / "x.npy", x)
    np.save(model_dir / "y.npy", data.is_fraud)
    probe = generate(200, seed=77).features[:, : len(CHAMPION_FEATURES)]
    np.save(model_dir / "probe.npy", probe)
    script = (
        "import sys, joblib, numpy as np\n"
        "from sklearn.linear_model import LogisticRegression\n"
        "from sklearn.pipeline import make_pipeline\n"
        "from sklearn.preprocessing import StandardScaler\n"
        "d = sys.argv[1]\n"
        "x, y = np.load(d + '/x.npy'), np.load(d + '/y.npy')\n"
        "model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, y)\n"
        "joblib.dump(model, d + '/model.joblib')\n"
        "np.save(d + '/expected.npy', model.predict_proba(np.load(d + '/probe.npy'))[:, 1])\n"
    )
    subprocess.run([str(bin_dir / "python"), "-c", script, str(model_dir)], check=True)
    (model_dir / "model-settings.json").write_text(
        json.dumps(
            {
                "name": MODEL_NAME,
                "implementation": "mlserver_sklearn.SKLearnModel",
                "parameters": {"uri": "./model.joblib", "version": "1.0.0"},
            }
        )
    )
    expected: np.ndarray = np.load(model_dir / "expected.npy")
    return expected


class MLServer:
    """``mlserver start`` on loopback; stop and start again on the same port."""

    def __init__(self, bin_dir: Path, model_dir: Path, log_path: Path) -> None:
        self.bin_dir, self.model_dir, self.log_path = bin_dir, model_dir, log_path
        self.port = free_port()
        (model_dir / "settings.json").write_text(
            json.dumps(
                {
                    "host": "127.0.0.1",
                    "http_port": self.port,
                    "grpc_port": free_port(),
                    "metrics_port": free_port(),
                    # 1.7.1 hangs here with worker processes; in-process inference works.
                    "parallel_workers": 0,
                }
            )
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.process = subprocess.Popen(
            [str(self.bin_dir / "mlserver"), "start", str(self.model_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlserver exited: {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                ready = f"{self.url}/v2/models/{MODEL_NAME}/ready"
                if httpx.get(ready, timeout=1.0).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"mlserver not ready in {timeout_s}s: {self.log_path.read_text()}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
