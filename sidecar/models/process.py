"""The ``process`` loader: the ``python`` factory in a pool of worker processes, for models
that hold the GIL (pure-Python tree ensembles, feature code) and would stall the event loop's
process.

Batches travel through shared memory, never pickled record by record: each worker owns an
input and an output ``SharedMemory`` buffer (grown when a batch needs more); the parent copies
the float64 matrix in with one numpy assignment and sends a tiny ``(names, n, d)`` message
over a pipe; the worker scores a zero-copy view and writes the scores back. The parent awaits
the pipe with ``loop.add_reader``, so no thread is parked per call.

A worker that dies mid-batch (segfault, OOM kill, ``os._exit``) is replaced and the batch is
retried on the new one (``options.retries``, default 1); when retries run out the batch fails
as ``exception`` — it is never silently lost. A call that times out kills its worker (unlike a
thread, a process can be stopped), so a hung model never holds a slot for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import multiprocessing
import multiprocessing.connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..errors import ModelLoadError
from .base import FloatArray

log = logging.getLogger(__name__)

_READY_TIMEOUT_S = 120.0


class _WorkerDied(Exception):
    pass


def _attach(name: str) -> SharedMemory:
    # The parent owns and unlinks every buffer. Workers share the parent's resource tracker
    # (spawn and fork both pass it on), so attaching registers nothing new.
    return SharedMemory(name=name)


def _worker_main(target: str, options: dict[str, Any], conn: Any) -> None:
    """Worker process: build the model once, then score batches from shared memory."""
    try:
        module_name, _, attr = target.partition(":")
        predictor = getattr(importlib.import_module(module_name), attr)(**options)
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    buffers: dict[str, SharedMemory] = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "stop":
            return
        _, in_name, out_name, n, d = message
        if in_name not in buffers or out_name not in buffers:
            for name, old in buffers.items():
                if name not in (in_name, out_name):
                    old.close()
            buffers = {
                name: buffers[name] if name in buffers else _attach(name)
                for name in (in_name, out_name)
            }
        batch = np.ndarray((n, d), dtype=np.float64, buffer=buffers[in_name].buf)
        try:
            scores = np.asarray(predictor.predict(batch), dtype=np.float64).reshape(-1)
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"[:500]))
            continue
        if scores.shape[0] != n:
            conn.send(("length", int(scores.shape[0])))
            continue
        np.ndarray((n,), dtype=np.float64, buffer=buffers[out_name].buf)[:] = scores
        conn.send(("ok", n))


class _Worker:
    def __init__(
        self, ctx: Any, target: str, options: dict[str, Any], name: str, index: int
    ) -> None:
        self.index = index
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_worker_main, args=(target, options, child), name=name, daemon=True
        )
        self.process.start()
        child.close()
        self.shm_in: SharedMemory | None = None
        self.shm_out: SharedMemory | None = None
        self.ready = False

    @property
    def alive(self) -> bool:
        return bool(self.process.is_alive())

    async def _recv(self) -> Any:
        loop = asyncio.get_running_loop()
        fd = self.conn.fileno()
        readable: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(fd, wake)
        try:
            await readable
        finally:
            loop.remove_reader(fd)
        try:
            return self.conn.recv()
        except (EOFError, OSError) as exc:
            self.process.join(1)
            raise _WorkerDied(f"worker exited with code {self.process.exitcode}") from exc

    async def wait_ready(self) -> None:
        async with asyncio.timeout(_READY_TIMEOUT_S):
            kind, detail = await self._recv()
        if kind != "ready":
            raise ModelLoadError(f"worker could not build the model: {detail}")
        self.ready = True

    def _buffers(self, n: int, d: int) -> tuple[SharedMemory, SharedMemory]:
        need_in, need_out = max(8, n * d * 8), max(8, n * 8)
        if self.shm_in is None or self.shm_in.size < need_in:
            _release(self.shm_in)
            self.shm_in = SharedMemory(create=True, size=need_in * 2)
        if self.shm_out is None or self.shm_out.size < need_out:
            _release(self.shm_out)
            self.shm_out = SharedMemory(create=True, size=need_out * 2)
        return self.shm_in, self.shm_out

    async def score(self, batch: FloatArray) -> FloatArray:
        n, d = batch.shape
        shm_in, shm_out = self._buffers(n, d)
        np.ndarray((n, d), dtype=np.float64, buffer=shm_in.buf)[:] = batch
        try:
            self.conn.send(("score", shm_in.name, shm_out.name, n, d))
        except (BrokenPipeError, OSError) as exc:
            raise _WorkerDied(f"worker gone: {exc}") from exc
        kind, detail = await self._recv()
        if kind == "error":
            raise RuntimeError(detail)
        if kind == "length":
            result: FloatArray = np.full(detail, np.nan)  # reported as invalid_output
            return result
        return np.ndarray((n,), dtype=np.float64, buffer=shm_out.buf).copy()

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.process.kill()
        self.process.join(5)
        self.conn.close()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.send(("stop",))
        self.process.join(2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2)
        self.conn.close()
        _release(self.shm_in)
        _release(self.shm_out)
        self.shm_in = self.shm_out = None


def _release(shm: SharedMemory | None) -> None:
    if shm is not None:
        shm.close()
        with contextlib.suppress(FileNotFoundError):
            shm.unlink()


class ProcessPredictor:
    """``concurrency`` worker processes, each scoring one batch at a time."""

    def __init__(self, config: ModelConfig) -> None:
        options = dict(config.options)
        self._retries = int(options.pop("process_retries", 1))
        start_method = str(options.pop("start_method", "spawn"))
        self._ctx = multiprocessing.get_context(start_method)
        self._target, self._options = config.target, options
        self.name = config.name
        self._workers = [self._spawn(i) for i in range(config.concurrency)]
        self._idle: asyncio.Queue[_Worker] | None = None
        self._refills: set[asyncio.Task[None]] = set()
        self.restarts = 0

    def _spawn(self, i: int) -> _Worker:
        return _Worker(self._ctx, self._target, self._options, f"model-{self.name}-{i}", i)

    def wait_ready(self) -> None:
        """Block until every worker built its model (at load time, before any traffic)."""
        for worker in self._workers:
            if not worker.conn.poll(_READY_TIMEOUT_S):
                raise ModelLoadError(f"model {self.name}: worker not ready")
            try:
                kind, detail = worker.conn.recv()
            except EOFError as exc:
                raise ModelLoadError(
                    f"model {self.name}: worker exited during start "
                    f"(code {worker.process.exitcode})"
                ) from exc
            if kind != "ready":
                self.close()
                raise ModelLoadError(f"model {self.name}: {self._target} failed: {detail}")
            worker.ready = True

    async def _replace(self, worker: _Worker) -> _Worker:
        for old in {
            id(worker): worker,
            id(self._workers[worker.index]): self._workers[worker.index],
        }.values():
            old.kill()
            _release(old.shm_in)
            _release(old.shm_out)
        index = worker.index
        fresh = self._spawn(index)
        self._workers[index] = fresh
        self.restarts += 1
        await fresh.wait_ready()
        return fresh

    async def predict_async(self, batch: FloatArray) -> FloatArray:
        if self._idle is None:
            self._idle = asyncio.Queue()
            for w in self._workers:
                self._idle.put_nowait(w)
        worker = await self._idle.get()
        attempt = 0
        try:
            while True:
                if not worker.alive:
                    worker = await self._replace(worker)
                try:
                    scores = await worker.score(batch)
                    break
                except _WorkerDied as exc:
                    log.warning("model %s: %s; restarting it", self.name, exc)
                    if attempt >= self._retries:
                        raise RuntimeError(
                            f"worker crashed on this batch {attempt + 1} time(s): {exc}"
                        ) from exc
                    attempt += 1
        except asyncio.CancelledError:
            # Timed out (or shutting down): the worker may still be busy with this batch;
            # kill it and start its replacement now, so the slot is free again soon.
            worker.kill()
            refill = asyncio.get_running_loop().create_task(self._refill(worker))
            self._refills.add(refill)
            refill.add_done_callback(self._refills.discard)
            raise
        except BaseException:
            self._idle.put_nowait(worker)
            raise
        self._idle.put_nowait(worker)
        return scores

    async def _refill(self, dead: _Worker) -> None:
        assert self._idle is not None
        try:
            fresh = await self._replace(dead)
        except Exception as exc:  # replaced again on its next use
            log.warning("model %s: restarting a worker failed: %s", self.name, exc)
            fresh = dead
        self._idle.put_nowait(fresh)

    def close(self) -> None:
        for refill in self._refills:
            refill.cancel()
        for worker in self._workers:
            worker.stop()
        self._workers = []

    async def aclose(self) -> None:
        self.close()


def load_process(config: ModelConfig) -> ProcessPredictor:
    predictor = ProcessPredictor(config)
    predictor.wait_ready()
    return predictor
