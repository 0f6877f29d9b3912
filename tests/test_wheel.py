"""The schema files ship in the wheel: build it, install it into a fresh virtual environment,
and run ``sidecar schemas`` there, away from the source tree.

Offline-tolerant: the wheel is built with the current environment's setuptools
(``--no-build-isolation``, both in the dev extra), installed with ``--no-deps --no-index``, and
its dependencies are taken from the current environment through a ``.pth`` file.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from sidecar import schemas

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parent.parent


def run(*argv: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=240
    )
    return proc


def test_sidecar_schemas_works_from_an_installed_wheel(tmp_path: Path) -> None:
    pytest.importorskip("setuptools", reason="the build backend (a dev extra)")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "sidecar", src / "sidecar", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    dist = tmp_path / "dist"
    build = run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--quiet",
        "--wheel-dir",
        dist,
        src,
        cwd=tmp_path,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = dist.glob("sidecar-*.whl")

    venv = tmp_path / "venv"
    made = run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    site = Path(
        run(
            python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path
        ).stdout.strip()
    )
    # The dependencies (msgspec, orjson, ...) from this environment, after the wheel's own files.
    (site / "zz_sidecar_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--no-deps",
        "--no-index",
        "--quiet",
        wheel,
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stdout + install.stderr

    installed = site / "sidecar" / "_schemas"
    expected = {p.name for p in schemas.default_dir().glob("*.json")}
    assert expected and {p.name for p in installed.glob("*.json")} == expected
    where = run(python, "-c", "import sidecar; print(sidecar.__file__)", cwd=tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr

    check = run(venv / "bin" / "sidecar", "schemas", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"schemas in {installed} are current" in check.stdout

    # It really reads the installed files: one missing is reported, exit 1.
    (installed / "decision.json").unlink()
    check = run(venv / "bin" / "sidecar", "schemas", cwd=tmp_path)
    assert check.returncode == 1 and f"{installed / 'decision.json'} is missing" in check.stderr
