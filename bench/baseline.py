"""Running a benchmark worker against another git ref's ``sidecar`` package, in the same run
(``--baseline`` of ``bench_ranking.py`` and ``bench_outcomes.py join``)."""

from __future__ import annotations

import os
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
