"""Helpers the benchmarks share: a worker run against another git ref's ``sidecar`` package
in the same run (``--baseline`` of ``bench_ranking.py`` and ``bench_outcomes.py join``), and
a process's own resident size."""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def baseline_tree(ref: str, into: Path) -> Path | None:
    """The ``sidecar`` package of git ref ``ref``, unpacked under ``into`` (None: no git)."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "sidecar"], capture_output=True, check=False
    )
    if archive.returncode != 0:
        print(f"baseline {ref!r} skipped: {archive.stderr.decode().strip()}")
        return None
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def last_line_of(cmd: list[str], tree: Path | None, who: str) -> str:
    """The last line ``cmd`` (a Python worker) prints, run with ``tree``'s ``sidecar`` package
    first on its path when given (else this checkout's); exits with its stderr on failure."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        sys.exit(f"worker ({who}) failed:\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1]


def _status_mib(field: str) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return None


def peak_rss_mib() -> float:
    """Peak resident size of this process image. ``VmHWM``, not ``ru_maxrss``: Linux keeps
    ``ru_maxrss`` across ``execve``, so a worker spawned by a parent holding the preloaded
    records would report the parent's size."""
    peak = _status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """Resident size of this process now (MiB; NaN where ``/proc`` is not there)."""
    now = _status_mib("VmRSS")
    return now if now is not None else float("nan")
