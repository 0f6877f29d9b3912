"""Stopping a client (``stop_quietly``): what is swallowed, what propagates, what is logged."""

from __future__ import annotations

import asyncio
import logging

import pytest

from sidecar.kafka import stop_quietly


class SlowStop:
    """A client whose ``stop()`` takes ``seconds`` and then raises ``error`` (if any)."""

    def __init__(self, seconds: float, error: BaseException | None = None) -> None:
        self.seconds = seconds
        self.error = error
        self.stopped = False
        self.cancelled = False

    async def stop(self) -> None:
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.error is not None:
            raise self.error
        self.stopped = True


async def test_a_slow_stop_is_logged_while_it_lasts_and_then_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = SlowStop(0.35)
    with caplog.at_level(logging.WARNING, logger="sidecar.kafka.clients"):
        await stop_quietly(client, warn_every_s=0.1)
    assert client.stopped
    waits = [r.getMessage() for r in caplog.records if "has taken" in r.getMessage()]
    assert 2 <= len(waits) <= 4, waits
    assert "SlowStop" in waits[0] and "broker requests in flight" in waits[0]


async def test_a_quick_stop_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sidecar.kafka.clients"):
        await stop_quietly(SlowStop(0.0), warn_every_s=0.1)
    assert not caplog.records


@pytest.mark.parametrize("error", [asyncio.CancelledError(), RuntimeError("half started")])
async def test_errors_of_the_client_own_stop_are_swallowed(error: BaseException) -> None:
    """aiokafka's stop can raise a CancelledError of its own fetch task after an outage, or
    anything when it never fully started: neither stops the caller's shutdown."""
    await stop_quietly(SlowStop(0.01, error))
    await stop_quietly(None)


async def test_cancelling_the_caller_cancels_the_stop_and_propagates() -> None:
    client = SlowStop(10.0)
    task = asyncio.create_task(stop_quietly(client, warn_every_s=0.05))
    await asyncio.sleep(0.12)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert client.cancelled and not client.stopped
