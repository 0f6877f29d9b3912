"""Model health: a circuit breaker over a model's recent calls (pure logic, injectable clock).

Closed: every batch is sent to the model and its outcome recorded over a sliding window of
the last ``window`` calls. When at least ``min_calls`` are in the window and the failure share
reaches ``failure_rate``, the breaker opens: calls are skipped (error kind ``unavailable``)
so a dead model server costs no timeouts on the hot path. After ``open_s`` it is half-open:
one probe call at a time goes through; a success closes it, a failure opens it again.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..config import BreakerConfig

if TYPE_CHECKING:
    from .base import ScoringModel


class BreakerState(enum.IntEnum):
    """Values are what the ``sidecar_model_health`` gauge shows."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(self, config: BreakerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._outcomes: deque[bool] = deque(maxlen=max(1, config.window))
        self.state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._probing = False
        #: Times the breaker opened (for status and tests).
        self.opened = 0
        self.on_change: Callable[[BreakerState], None] | None = None

    def allow(self) -> bool:
        """May a call go to the model now? In half-open, only one probe at a time."""
        if not self.config.enabled or self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            if self._clock() - self._opened_at < self.config.open_s:
                return False
            self._set(BreakerState.HALF_OPEN)
        if self._probing:
            return False
        self._probing = True
        return True

    def record(self, ok: bool) -> None:
        if not self.config.enabled:
            return
        if self.state is BreakerState.HALF_OPEN:
            self._probing = False
            if ok:
                self._outcomes.clear()
                self._set(BreakerState.CLOSED)
            else:
                self._open()
            return
        if self.state is BreakerState.OPEN:
            return  # a call that started before the breaker opened
        self._outcomes.append(ok)
        failures = self._outcomes.count(False)
        if (
            len(self._outcomes) >= self.config.min_calls
            and failures / len(self._outcomes) >= self.config.failure_rate
        ):
            self._open()

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._outcomes.clear()
        self.opened += 1
        self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        if state is not self.state:
            self.state = state
            if self.on_change is not None:
                self.on_change(state)


def watch_health(gauge: Any, champion: ScoringModel, candidate: ScoringModel | None) -> None:
    """Keep a ``{arm, model, version}`` gauge equal to each model's breaker state."""
    for arm, model in (("champion", champion), ("candidate", candidate)):
        if model is None:
            continue
        child = gauge.labels(arm, model.name, model.version)
        child.set(int(model.breaker.state))
        model.breaker.on_change = lambda state, child=child: child.set(int(state))
