"""``sidecar run --workers N``: N sidecar processes of one consumer group under one supervisor.

One Python process runs one event loop on one core; the per-record work (decode, score,
format, produce) is all Python, so a machine's other cores are used by more processes, as
more instances on more machines are: members of the same consumer group, each consuming its
share of the partitions. The supervisor:

* starts the workers (``sidecar run --workers 1`` with the same config and environment);
  worker *i* serves its metrics, ``/healthz`` and ``/readyz`` on ``metrics.port + i`` (none
  when ``metrics.port`` is 0: off);
* forwards SIGTERM/SIGINT to every worker, so each drains and commits, and exits 0 when all
  did; it kills what is still running ``pipeline.drain_timeout_s`` + 15 s later;
* restarts a worker that exits on its own, with backoff; a worker failing
  :attr:`RestartPolicy.max_failures` times within :attr:`RestartPolicy.window_s` (a config
  that cannot work, a broker that refuses it) stops everything with exit code 1;
* dies with its workers: on Linux each worker gets SIGTERM when the supervisor dies (even by
  SIGKILL), so no orphan keeps consuming.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("sidecar.workers")

_PR_SET_PDEATHSIG = 1


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def worker_port(base: int, index: int) -> int:
    """Metrics port of worker ``index``: consecutive ports from ``base``; 0 stays 0."""
    return base + index if base else 0


@dataclass
class RestartPolicy:
    """When a worker that exited on its own is started again (pure: no processes).

    Each failure waits ``backoff_s`` doubled per recent failure (up to ``max_backoff_s``);
    ``max_failures`` within ``window_s`` means the worker cannot run and the supervisor
    gives up."""

    max_failures: int = 5
    window_s: float = 60.0
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    _failures: dict[int, list[float]] = field(default_factory=dict)

    def failed(self, index: int, now: float) -> float | None:
        """Record a failure of worker ``index`` at ``now``; the delay before restarting it,
        or None to give up."""
        recent = [t for t in self._failures.get(index, []) if now - t < self.window_s]
        recent.append(now)
        self._failures[index] = recent
        if len(recent) >= self.max_failures:
            return None
        return float(min(self.max_backoff_s, self.backoff_s * 2 ** (len(recent) - 1)))


#: Set in each worker's environment to the supervisor's pid.
PARENT_ENV = "SIDECAR_WORKER_OF"


def die_with_parent(env: dict[str, str] | None = None) -> None:
    """In a worker: SIGTERM this process when the supervisor dies (Linux's parent-death
    signal; set here rather than between fork and exec, where only async-signal-safe calls
    belong). A supervisor that died before this ran is noticed at once."""
    parent = (os.environ if env is None else env).get(PARENT_ENV)
    if not parent:
        return
    if sys.platform == "linux":
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):
        log.error("the worker supervisor (pid %s) is gone; stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    restart_at: float | None = None
    restarts: int = 0


Spawn = Callable[[int], "subprocess.Popen[bytes]"]


class WorkerSupervisor:
    """Runs ``count`` workers made by ``spawn(index)`` until a signal or a hopeless worker."""

    def __init__(
        self,
        count: int,
        spawn: Spawn,
        *,
        stop_timeout_s: float,
        policy: RestartPolicy | None = None,
        poll_s: float = 0.2,
    ) -> None:
        self.workers = [_Worker(i) for i in range(count)]
        self._spawn = spawn
        self._stop_timeout_s = stop_timeout_s
        self._policy = policy or RestartPolicy()
        self._poll_s = poll_s
        self._stopping = False

    def request_stop(self, *_: object) -> None:
        self._stopping = True

    def run(self, *, install_signals: bool = True) -> int:
        """Start every worker and supervise them; the exit code for the command.
        ``install_signals``: SIGTERM/SIGINT stop the workers (main thread only)."""
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self.request_stop)
        for w in self.workers:
            self._start(w)
        code = 0
        while not self._stopping:
            now = time.monotonic()
            for w in self.workers:
                if w.process is not None and (rc := w.process.poll()) is not None:
                    w.process = None
                    delay = self._policy.failed(w.index, now)
                    if delay is None:
                        log.error(
                            "worker %d exited with code %d %d times within %.0fs; stopping all",
                            w.index,
                            rc,
                            self._policy.max_failures,
                            self._policy.window_s,
                        )
                        self._stopping, code = True, 1
                        break
                    log.warning(
                        "worker %d exited with code %d; restarting it in %.1fs", w.index, rc, delay
                    )
                    w.restart_at = now + delay
                elif w.process is None and w.restart_at is not None and now >= w.restart_at:
                    w.restarts += 1
                    self._start(w)
            time.sleep(self._poll_s)
        return max(code, self._stop_all())

    def _start(self, w: _Worker) -> None:
        w.restart_at = None
        w.process = self._spawn(w.index)
        log.info("worker %d started (pid %d)", w.index, w.process.pid)

    def _stop_all(self) -> int:
        """SIGTERM every worker, wait for them to drain, kill stragglers; 0 if all exited 0."""
        running = [w.process for w in self.workers if w.process is not None]
        for p in running:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._stop_timeout_s
        code = 0
        for p in running:
            try:
                rc = p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not stop in time; killing it", p.pid)
                p.kill()
                rc = p.wait()
            if rc != 0:
                log.warning("worker pid %d exited with code %d", p.pid, rc)
                code = 1
        return code


def worker_command(config: str | None, example_traffic: float, index: int) -> list[str]:
    """The command line of worker ``index``: ``sidecar run --workers 1`` with the same config
    (the supervisor alone starts an embedded broker and creates topics; example traffic comes
    from worker 0 only)."""
    out = [sys.executable, "-m", "sidecar.cli", "run", "--workers", "1"]
    if config is not None:
        out += ["--config", config]
    if example_traffic and index == 0:
        out += ["--example-traffic", str(example_traffic)]
    return out


def worker_env(
    base: dict[str, str], metrics_port: int, index: int, bootstrap: str | None
) -> dict[str, str]:
    """Worker ``index``'s environment: ``base`` with its metrics port and, with an embedded
    broker, that broker (which keeps producer record times: ``control.allow_create_time``)."""
    env = dict(base, SIDECAR_METRICS__PORT=str(worker_port(metrics_port, index)))
    env[PARENT_ENV] = str(os.getpid())
    if bootstrap is not None:
        env["SIDECAR_KAFKA__BOOTSTRAP_SERVERS"] = bootstrap
        env["SIDECAR_CONTROL__ALLOW_CREATE_TIME"] = "true"
    return env


def spawn_worker(
    command: list[str], env: dict[str, str]
) -> subprocess.Popen[bytes]:  # pragma: no cover - exercised by the broker tests
    return subprocess.Popen(command, env=env)
