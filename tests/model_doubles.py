"""Models for pipeline tests (loaded by ``target``, like a user's model): one that waits for
the test to let it answer, one that stalls on its first call only, one that raises a chosen
message. Each wraps the real fraud model, so the scores that come back are real."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import numpy as np

from sidecar.examples import fraud

_GATES: dict[str, threading.Event] = {}
_CALLS: dict[str, int] = {}
_ids = itertools.count()


def new_gate() -> str:
    """A closed gate's name: models built with it wait until :func:`release`."""
    name = f"gate-{next(_ids)}"
    _GATES[name] = threading.Event()
    _CALLS[name] = 0
    return name


def release(gate: str) -> None:
    _GATES[gate].set()


def calls(gate: str) -> int:
    return _CALLS[gate]


class _Gated:
    def __init__(self, gate: str, inner: Any) -> None:
        self._gate, self._inner = gate, inner

    def predict(self, batch: np.ndarray) -> np.ndarray:
        _CALLS[self._gate] += 1
        if not _GATES[self._gate].wait(30):  # never hang a test run for good
            raise TimeoutError("gate never opened")
        return np.asarray(self._inner.predict(batch), dtype=np.float64)


def gated(gate: str) -> _Gated:
    """The fraud candidate, answering only once ``gate`` is released."""
    return _Gated(gate, fraud.candidate())


class _StallOnce:
    def __init__(self, delay_s: float, inner: Any) -> None:
        self._delay, self._inner, self._calls = delay_s, inner, 0
        self._lock = threading.Lock()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            self._calls += 1
            first = self._calls == 1
        if first:
            time.sleep(self._delay)
        return np.asarray(self._inner.predict(batch), dtype=np.float64)


def champion_stalling_once(delay_s: float) -> _StallOnce:
    """The fraud champion, stalling ``delay_s`` on its first call (a GC pause, a CPU stall)."""
    return _StallOnce(delay_s, fraud.champion())


class _Raising:
    def __init__(self, message: str) -> None:
        self._message = message

    def predict(self, batch: np.ndarray) -> np.ndarray:
        raise RuntimeError(self._message)


def raising_with(message: str) -> _Raising:
    return _Raising(message)


def candidate_stalling_once(delay_s: float) -> _StallOnce:
    """The fraud candidate, stalling ``delay_s`` on its first call (a hung model server)."""
    return _StallOnce(delay_s, fraud.candidate())
