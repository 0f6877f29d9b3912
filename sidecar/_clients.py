"""Small helpers around aiokafka clients shared by the sidecar, control plane and aggregator."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)


async def stop_quietly(client: Any) -> None:
    """Stop an aiokafka client, never letting its shutdown take ours down.

    After a broker outage aiokafka's ``stop()`` can raise the ``CancelledError`` of one of its
    own background fetch tasks. That error is not a request to cancel *us*: it is swallowed
    unless the calling task itself is being cancelled, in which case it propagates.
    """
    if client is None:
        return
    try:
        await client.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        log.debug("ignored a CancelledError from stopping %s", type(client).__name__)
    except Exception as exc:  # a client that failed to start may fail to stop; we are done
        log.debug("error stopping %s: %s", type(client).__name__, exc)
