"""The denoiser's step loop: a running batch that requests join and leave at step boundaries.

Pure asyncio, no Ray: the Ray deployment (``deployments.Denoiser``) wraps one ``StepLoop`` per replica.

* ``await loop.run(slot)`` admits a request (a ``litefocus.runtime.batching`` slot) into a bounded
  waiting queue (``QueueFull`` when it is full) and returns the slot once its last step ran.
* One background task repeats: move waiting slots into the active set while their rows fit the
  UNet's ``capacity`` (in order: a request never overtakes an earlier one), run ONE
  ``unet.step(active)`` on a dedicated thread (the event loop stays free to admit and cancel), then
  resolve the slots that finished.
* A caller that goes away (client disconnect, timeout: its task is cancelled) leaves the queue at
  once, or the running batch at the next step boundary: the step in flight is never interrupted.
* Progress (optional, per request): ``run(slot, progress=fn)``, or ``fn`` set in ``PROGRESS`` in the
  caller's context, is told ``fn(step, steps, queue_position)`` while the request waits (position 1 =
  next in line) and after each of its steps (position 0). A failing callback is logged, never fatal.

``unet`` is anything with ``capacity`` (rows per step) and ``step(slots)`` that advances every slot
by one step in place (``slot.rows``, ``slot.done``, ``slot.step``, ``slot.steps``); optionally
``stats`` (calls, rows_used, rows_run: what its engine calls held and ran, padding included).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

logger = logging.getLogger(__name__)

# a per-request progress callback ``fn(step, steps, queue_position)`` that ``StepLoop.run`` picks up
PROGRESS: contextvars.ContextVar = contextvars.ContextVar("litefocus_progress", default=None)


class QueueFull(Exception):
    """The bucket's waiting queue is full; ``retry_after`` (seconds) estimates when a slot frees."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class LoopStats:
    """Counters since the replica started (the ``GET /v1/stats`` numbers of one replica)."""

    steps: int = 0  # loop iterations (one per denoising step of the running batch)
    unet_calls: int = 0  # engine calls (one per step with batching; one per request per step without)
    rows_used: int = 0  # request rows those calls held
    rows_available: int = 0  # rows those calls ran (the engine batch sizes: padding included)
    step_seconds: float = 0.0  # wall time inside unet.step
    admitted: int = 0
    completed: int = 0
    cancelled: int = 0
    rejected: int = 0  # queue full
    failed: int = 0  # unet.step raised

    def to_dict(self) -> dict:
        return asdict(self)


class _Entry:
    __slots__ = ("slot", "future", "progress")

    def __init__(self, slot, future: asyncio.Future, progress=None):
        self.slot = slot
        self.future = future
        self.progress = progress

    def tell(self, queue_position: int) -> None:
        if self.progress is None or self.gone:
            return
        try:
            self.progress(self.slot.step, self.slot.steps, queue_position)
        except Exception:  # noqa: BLE001 - a listener's bug must not stop the batch
            logger.exception("a progress callback failed; it is dropped")
            self.progress = None

    @property
    def gone(self) -> bool:  # cancelled by its caller (or already resolved)
        return self.future.done()


class StepLoop:
    """Step-level batching over ``unet`` (see the module docstring). One per replica and bucket.

    ``observer(event, **values)`` (optional) is told ``queue`` (depth, active) whenever the queue
    changes and ``step`` (seconds, rows, calls, rows_used, rows_available) after every step: the
    deployment turns these into metrics."""

    def __init__(self, unet, *, queue_size: int, observer=None):
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size must be an int >= 1, got {queue_size!r}")
        self.unet = unet
        self.capacity = int(unet.capacity)
        self.queue_size = queue_size
        self.stats = LoopStats()
        self._observer = observer
        self._waiting: deque[_Entry] = deque()
        self._active: list[_Entry] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="litefocus-unet")
        self._closed = False

    # ---- callers -------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    async def run(self, slot, progress=None):
        """Queue ``slot``, return it when done. ``QueueFull`` when the queue is full; ``ValueError``
        when the request alone has more rows than a step holds. ``progress``: see the module docstring
        (default: ``PROGRESS`` of the caller's context)."""
        if self._closed:
            raise RuntimeError("the denoiser is shutting down")
        if slot.rows > self.capacity:
            raise ValueError(
                f"a request of {slot.rows} rows does not fit this bucket's engines ({self.capacity} rows "
                "per step); use guidance 1, or export a larger --batch"
            )
        if len(self._waiting) >= self.queue_size:
            self.stats.rejected += 1
            raise QueueFull(
                f"the queue of this bucket is full ({self.queue_size} waiting); retry later",
                self.retry_after(),
            )
        progress = progress if progress is not None else PROGRESS.get()
        entry = _Entry(slot, asyncio.get_running_loop().create_future(), progress)
        self._waiting.append(entry)
        self.stats.admitted += 1
        self._notify_queue()
        self._ensure_task()
        self._wake.set()
        try:
            return await entry.future
        except asyncio.CancelledError:
            # awaiting the future cancelled it: the loop drops the entry at the next boundary
            if entry in self._waiting:
                self._waiting.remove(entry)
                self._notify_queue()
            self.stats.cancelled += 1
            raise

    def retry_after(self) -> int:
        """Seconds until the first running request is expected to finish (at least 1)."""
        mean = self.stats.step_seconds / self.stats.steps if self.stats.steps else 1.0
        left = min((e.slot.steps - e.slot.step for e in self._active), default=1)
        return max(1, math.ceil(mean * left))

    def healthy(self) -> bool:
        return self._task is None or not self._task.done()

    def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        for entry in [*self._waiting, *self._active]:
            if not entry.gone:
                entry.future.set_exception(RuntimeError("the denoiser is shutting down"))
        self._waiting.clear()
        self._active.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- the loop --------------------------------------------------------------------------------
    def _ensure_task(self) -> None:
        if self._task is None or self._task.done():
            if self._task is not None and not self._task.cancelled() and self._task.exception():
                logger.error("the step loop had stopped (%s); restarting it", self._task.exception())
            self._wake = self._wake or asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="litefocus-step-loop")

    def _admit(self) -> None:
        """Drop callers that went away; move waiting entries in, in order, while their rows fit."""
        left = [e for e in self._active if e.gone]
        self._active = [e for e in self._active if not e.gone]
        gone = [e for e in self._waiting if e.gone]
        for e in gone:
            self._waiting.remove(e)
        gone += left
        rows = sum(e.slot.rows for e in self._active)
        moved = False
        while self._waiting and rows + self._waiting[0].slot.rows <= self.capacity:
            entry = self._waiting.popleft()
            self._active.append(entry)
            rows += entry.slot.rows
            moved = True
            entry.tell(0)
        if moved or gone:
            self._notify_queue()

    async def _loop(self) -> None:
        try:
            await self._steps()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug here must not leave callers waiting forever
            logger.exception("the step loop stopped")
            for entry in [*self._waiting, *self._active]:
                if not entry.gone:
                    entry.future.set_exception(
                        RuntimeError(f"the step loop stopped: {type(e).__name__}: {e}")
                    )
            self._waiting.clear()
            self._active.clear()
            raise

    async def _steps(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            self._admit()
            if not self._active:
                self._wake.clear()
                if not self._waiting:
                    await self._wake.wait()
                continue
            batch = list(self._active)
            slots = [e.slot for e in batch]
            before = dict(getattr(self.unet, "stats", None) or {})
            t0 = time.perf_counter()
            try:
                await loop.run_in_executor(self._executor, self.unet.step, slots)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the step failed: fail its requests, keep serving
                logger.exception("a denoising step failed for %d request(s)", len(batch))
                self.stats.failed += len(batch)
                for entry in batch:
                    if not entry.gone:
                        entry.future.set_exception(RuntimeError(f"denoising failed: {type(e).__name__}: {e}"))
                self._active = [e for e in self._active if e not in batch]
                continue
            self._record(time.perf_counter() - t0, slots, before)
            for entry in batch:
                entry.tell(0)
            finished = [e for e in batch if e.slot.done]
            for entry in finished:
                if not entry.gone:
                    entry.future.set_result(entry.slot)
                    self.stats.completed += 1
                if entry in self._active:
                    self._active.remove(entry)
            if finished:
                self._notify_queue()

    def _record(self, seconds: float, slots: list, before: dict) -> None:
        after = getattr(self.unet, "stats", None)
        rows = sum(s.rows for s in slots)
        if after:  # what the engine calls really held and ran
            calls = after["calls"] - before.get("calls", 0)
            used = after["rows_used"] - before.get("rows_used", 0)
            run = after["rows_run"] - before.get("rows_run", 0)
        else:
            calls, used, run = 1, rows, self.capacity
        s = self.stats
        s.steps += 1
        s.unet_calls += calls
        s.rows_used += used
        s.rows_available += run
        s.step_seconds += seconds
        if self._observer is not None:
            self._observer(
                "step", seconds=seconds, rows=rows, calls=calls, rows_used=used, rows_available=run
            )

    def _notify_queue(self) -> None:
        for position, entry in enumerate(self._waiting, 1):
            entry.tell(position)
        if self._observer is not None:
            self._observer("queue", depth=len(self._waiting), active=len(self._active))


async def progress_stream(run):
    """Run ``run()`` (a coroutine function that awaits ``StepLoop.run``) with a progress callback in
    its context; yield ``{"progress": {step, steps, queue_position}}`` as it changes (the latest only:
    a slow reader skips stale values, nothing queues up), then ``run()``'s result. Closing the stream
    (a cancelled caller) cancels ``run()``: the request leaves the queue or the batch."""
    latest: dict = {}
    changed = asyncio.Event()

    def progress(step: int, steps: int, queue_position: int) -> None:
        latest.update(step=step, steps=steps, queue_position=queue_position)
        changed.set()

    context = contextvars.copy_context()
    context.run(PROGRESS.set, progress)
    task = asyncio.get_running_loop().create_task(run(), context=context)
    try:
        while True:
            if changed.is_set():
                changed.clear()
                yield {"progress": dict(latest)}
            if task.done():
                break
            waiter = asyncio.ensure_future(changed.wait())
            try:
                await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
        yield task.result()
    finally:
        task.cancel()
