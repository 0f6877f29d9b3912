"""``sidecar run --workers N``: the restart policy, the worker command lines, and the
supervisor driving real (tiny) processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidecar.workers import (
    PARENT_ENV,
    RestartPolicy,
    WorkerSupervisor,
    default_workers,
    worker_command,
    worker_env,
    worker_port,
)


def test_restarts_back_off_and_give_up_after_repeated_failures_in_the_window() -> None:
    policy = RestartPolicy(max_failures=4, window_s=60, backoff_s=1, max_backoff_s=3)
    assert [policy.failed(0, t) for t in (0, 1, 2)] == [1, 2, 3]  # doubling, capped
    assert policy.failed(1, 2.5) == 1  # per worker
    assert policy.failed(0, 3) is None  # the fourth within a minute: hopeless
    later = RestartPolicy(max_failures=2, window_s=10)
    assert later.failed(0, 0) == 1
    assert later.failed(0, 30) == 1  # the first one has left the window


def test_worker_commands_and_environments() -> None:
    assert worker_command("a.toml", 50.0, 0)[3:] == [
        "run",
        "--workers",
        "1",
        "--config",
        "a.toml",
        "--example-traffic",
        "50.0",
    ]
    assert worker_command(None, 50.0, 1)[3:] == ["run", "--workers", "1"]  # traffic once
    env = worker_env({"X": "1"}, 9100, 2, "127.0.0.1:1234")
    assert env["SIDECAR_METRICS__PORT"] == "9102" and env["X"] == "1"
    assert env["SIDECAR_KAFKA__BOOTSTRAP_SERVERS"] == "127.0.0.1:1234"
    assert env["SIDECAR_CONTROL__ALLOW_CREATE_TIME"] == "true"
    assert env[PARENT_ENV] == str(os.getpid())
    assert "SIDECAR_KAFKA__BOOTSTRAP_SERVERS" not in worker_env({}, 0, 1, None)
    assert worker_port(0, 3) == 0 and worker_port(9100, 0) == 9100
    assert default_workers() >= 1


# A worker stand-in: appends its index and pid to a file, exits 0 on SIGTERM, or crashes
# (exit 3) at once when its index is listed in CRASH.
_CHILD = """
import os, signal, sys, time
index = int(sys.argv[1])
with open(sys.argv[2], "a") as f:
    f.write(f"{index} {os.getpid()}\\n")
if str(index) in os.environ.get("CRASH", "").split(","):
    sys.exit(3)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    time.sleep(0.05)
"""


def _spawner(log: Path, crash: str = "") -> object:
    env = dict(os.environ, CRASH=crash)
    return lambda i: subprocess.Popen([sys.executable, "-c", _CHILD, str(i), str(log)], env=env)


def _starts(log: Path) -> list[tuple[int, int]]:
    if not log.exists():
        return []
    return [(int(a), int(b)) for a, b in (line.split() for line in log.read_text().splitlines())]


def _run_in_thread(sup: WorkerSupervisor) -> tuple[object, list[int]]:
    import threading

    code: list[int] = []
    # Signal handlers can only be installed from the main thread: these tests stop it with
    # request_stop, which is what the handlers call.
    thread = threading.Thread(target=lambda: code.append(sup.run(install_signals=False)))
    thread.start()
    return thread, code


def _wait(predicate: object, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_the_supervisor_restarts_a_crashed_worker_and_stops_all_cleanly(tmp_path: Path) -> None:
    log = tmp_path / "starts"
    sup = WorkerSupervisor(
        2, _spawner(log), stop_timeout_s=10, policy=RestartPolicy(backoff_s=0.1), poll_s=0.05
    )
    thread, code = _run_in_thread(sup)
    _wait(lambda: len(_starts(log)) == 2)
    victim = dict(_starts(log))[1]
    os.kill(victim, signal.SIGKILL)
    _wait(lambda: len(_starts(log)) == 3)  # worker 1 again, a new process
    assert _starts(log)[2][0] == 1 and _starts(log)[2][1] != victim
    assert sup.workers[1].restarts == 1
    sup.request_stop()
    thread.join(20)  # type: ignore[attr-defined]
    assert code == [0]  # every worker drained and exited 0
    assert all(w.process is None or w.process.poll() == 0 for w in sup.workers)


def test_a_worker_that_keeps_failing_stops_everything_with_exit_code_1(tmp_path: Path) -> None:
    log = tmp_path / "starts"
    sup = WorkerSupervisor(
        2,
        _spawner(log, crash="1"),
        stop_timeout_s=10,
        policy=RestartPolicy(max_failures=3, backoff_s=0.05),
        poll_s=0.05,
    )
    thread, code = _run_in_thread(sup)
    thread.join(30)  # type: ignore[attr-defined]
    assert code == [1]
    assert [i for i, _ in _starts(log)].count(1) == 3
    assert sup.workers[0].process is not None and sup.workers[0].process.poll() == 0


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_a_worker_stops_when_its_supervisor_is_killed(tmp_path: Path) -> None:
    """A supervisor killed with SIGKILL cannot forward anything: each worker gets SIGTERM
    from the kernel (``die_with_parent``) and stops on its own."""
    script = tmp_path / "supervisor.py"
    script.write_text(
        "import subprocess, sys, os, time\n"
        "from sidecar.workers import worker_env\n"
        "env = worker_env(dict(os.environ), 0, 0, None)\n"
        "code = 'from sidecar.workers import die_with_parent; import time, signal, sys; "
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); die_with_parent(); "
        'print("up", flush=True); time.sleep(60)\'\n'
        "child = subprocess.Popen([sys.executable, '-c', code], env=env)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    sup = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert sup.stdout is not None
    child = int(sup.stdout.readline())
    assert sup.stdout.readline().strip() == "up"
    sup.kill()
    sup.wait()

    def gone() -> bool:
        try:
            state = Path(f"/proc/{child}/status").read_text()
        except FileNotFoundError:
            return True
        return "\nState:\tZ" in state  # exited; waiting to be reaped by init

    _wait(gone, 10)
