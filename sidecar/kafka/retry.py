"""Backoff for everything that waits on a broker: connecting, re-sending, re-fetching."""

from __future__ import annotations

import asyncio
import contextlib


class Backoff:
    """Doubling delays from ``first_s`` up to ``max_s``; :meth:`reset` after a success."""

    def __init__(self, first_s: float = 0.5, max_s: float = 10.0, factor: float = 2.0) -> None:
        if not 0 < first_s <= max_s or factor < 1:
            raise ValueError("backoff needs 0 < first_s <= max_s and factor >= 1")
        self.first_s, self.max_s, self.factor = first_s, max_s, factor
        self._next = first_s
        #: Waits since the last reset.
        self.attempts = 0

    @property
    def delay(self) -> float:
        """The delay the next :meth:`wait` will sleep."""
        return self._next

    def reset(self) -> None:
        self._next = self.first_s
        self.attempts = 0

    def step(self) -> float:
        """Take the next delay (and grow the one after it) without sleeping."""
        delay = self._next
        self._next = min(self._next * self.factor, self.max_s)
        self.attempts += 1
        return delay

    async def wait(self, stop: asyncio.Event | None = None) -> bool:
        """Sleep the next delay; False (at once) if ``stop`` is set before it ends."""
        delay = self.step()
        if stop is None:
            await asyncio.sleep(delay)
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        return not stop.is_set()
