"""Process set-up of the long-running commands (checked in a child: it is process-wide)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sidecar.runtime import GC_THRESHOLDS, GC_TUNING_ENV

PROBE = (
    "import gc, json; from sidecar.runtime import tune_gc; applied = tune_gc(); "
    "print(json.dumps([applied, list(gc.get_threshold()), gc.get_freeze_count()]))"
)


def probe(env_value: str | None) -> tuple[bool, tuple[int, ...], int]:
    env = {k: v for k, v in os.environ.items() if k != GC_TUNING_ENV}
    if env_value is not None:
        env[GC_TUNING_ENV] = env_value
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True
    )
    applied, thresholds, frozen = json.loads(out.stdout)
    return applied, tuple(thresholds), frozen


def test_the_collector_is_tuned_and_the_start_up_heap_frozen() -> None:
    applied, thresholds, frozen = probe(None)
    assert applied and thresholds == GC_THRESHOLDS and frozen > 1000


@pytest.mark.parametrize("value", ["0", "off", "false"])
def test_the_tuning_can_be_turned_off(value: str) -> None:
    applied, thresholds, frozen = probe(value)
    assert not applied and thresholds != GC_THRESHOLDS and frozen == 0


def test_malloc_arenas_are_capped_unless_the_environment_says() -> None:
    """In a child (the setting is process-wide): applied on glibc, left alone when
    ``MALLOC_ARENA_MAX`` is set (glibc read it at start)."""
    code = (
        "import ctypes, ctypes.util, json; from sidecar.runtime import limit_malloc_arenas; "
        "lib = ctypes.util.find_library('c'); "
        "glibc = bool(lib) and hasattr(ctypes.CDLL(lib), 'gnu_get_libc_version'); "
        "print(json.dumps([limit_malloc_arenas(), glibc]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    for extra, expect_applied in (({}, None), ({"MALLOC_ARENA_MAX": "4"}, False)):
        out = subprocess.run(
            [sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True
        )
        applied, glibc = json.loads(out.stdout)
        assert applied is (glibc if expect_applied is None else expect_applied)
