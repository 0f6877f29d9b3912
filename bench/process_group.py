"""K benchmark children started together: the scale benchmarks' common driver.

Each child is its own OS process (as deployed) that prints its state as one JSON line every
few milliseconds (with ``"t"``, its ``time.time()``) and waits for a ``go`` line on its standard
input before it starts work; a second line (or EOF) tells it to stop. The parent waits until
the group has settled, starts every child at once and waits until the work is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

State = dict[str, Any]


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of every core so far (``/proc/stat``)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


async def run_group(
    argv: list[list[str]],
    settled: Callable[[list[State]], bool],
    done: Callable[[list[State]], bool],
) -> tuple[float, float]:
    """Start one child a ``argv`` entry (``python <argv...>``); once ``settled`` has held for
    a second, say go to all; return the seconds from go to the latest state when ``done``
    first holds, and how busy the machine's cores were meanwhile (0-1)."""
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for args in argv
    ]
    latest: list[State] = [{} for _ in procs]

    async def follow(i: int) -> None:
        stdout = procs[i].stdout
        assert stdout is not None
        while line := await stdout.readline():
            latest[i] = json.loads(line)

    def check_alive() -> None:
        for p in procs:
            if p.returncode is not None:
                sys.exit(f"a benchmark child exited with {p.returncode}")

    readers = [asyncio.create_task(follow(i)) for i in range(len(procs))]
    try:
        settled_since = None
        while True:
            await asyncio.sleep(0.1)
            check_alive()
            if not settled(latest):
                settled_since = None
            elif settled_since is None:
                settled_since = time.monotonic()
            elif time.monotonic() - settled_since > 1.0:
                break
        t0 = time.time()
        busy0 = machine_busy()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            await p.stdin.drain()
        while not done(latest):
            await asyncio.sleep(0.01)
            check_alive()
        busy1 = machine_busy()
        t_end = float(max(s["t"] for s in latest))
        return t_end - t0, (busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1)
    finally:
        for p in procs:
            with contextlib.suppress(Exception):
                assert p.stdin is not None
                p.stdin.write(b"stop\n")
                await p.stdin.drain()
        for p in procs:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(p.wait(), 60)
        for r in readers:
            r.cancel()


async def wait_for_go(on_go: Callable[[], None], on_stop: Callable[[], None]) -> None:
    """(In a child.) Call ``on_go`` at the parent's go line, ``on_stop`` at the next (or EOF)."""
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.readline()
    on_go()
    await reader.readline()  # EOF or "stop"
    on_stop()
