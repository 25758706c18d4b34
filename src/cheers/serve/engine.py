"""The engine: one worker thread owns the model; requests wait in a bounded queue in front of it.

The worker takes everything waiting (up to ``max_batch`` requests), plans calls with
:func:`cheers.serve.tasks.plan_batches` (compatible requests share ONE pipeline call) and runs them one after
the other. Each request has a future; every accepted request is answered with a result or an
:class:`APIError`, never left waiting:

* a full queue refuses at once (429, ``Retry-After``);
* a request cancelled while queued (its client went away, or its timeout passed) is removed and never runs;
  one cancelled after it was taken is skipped if its call has not started;
* a call that raises is retried request by request (so one bad request does not fail its neighbours); a
  request that still fails gets 400 (a ``ValueError``: bad input) or 500, and the worker carries on;
* :meth:`Engine.stop` answers whatever is still waiting with 503.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from cheers.serve.errors import APIError
from cheers.serve.metrics import Metrics
from cheers.serve.tasks import ChatTask, Task, kind, plan_batches, run_batch, run_stream

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The engine's queue holds ``max_queue`` requests already."""


class StreamSink:
    """Hands a streamed answer's events from the worker thread to the request's event loop, in order:
    ``("piece", text)`` ... then ``("done", ChatResult)`` or ``("error", APIError)``."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()

    def put(self, event: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (event, value))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


@dataclass(eq=False)
class Job:
    """One accepted request: its task, its future, and (streams) its sink."""

    task: Task
    sink: StreamSink | None = None
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.monotonic)

    def resolve(self, value: Any) -> None:
        _settle(self.future, value, None)
        if self.sink is not None:
            self.sink.put("done", value)

    def fail(self, error: APIError) -> None:
        _settle(self.future, None, error)
        if self.sink is not None:
            self.sink.put("error", error)


def _settle(future: Future, value: Any, error: BaseException | None) -> None:
    try:
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)
    except InvalidStateError:  # already answered (or cancelled by its waiter)
        pass


class JobQueue:
    """A bounded FIFO that also lets a waiting job be taken out (its client went away)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._jobs: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._jobs)

    def put(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise APIError(503, "the server is shutting down", code="shutting_down")
            if len(self._jobs) >= self.capacity:
                raise QueueFull
            self._jobs.append(job)
            self._cond.notify()

    def discard(self, job: Job) -> bool:
        """Take ``job`` out if it is still waiting; True if it was."""
        with self._cond:
            try:
                self._jobs.remove(job)
            except ValueError:
                return False
            return True

    def take(self, most: int, linger_s: float) -> list[Job]:
        """Block until a job waits (or the queue closes), linger ``linger_s`` for more, take up to
        ``most``."""
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            if self._jobs and linger_s > 0 and len(self._jobs) < most:
                end = time.monotonic() + linger_s
                while len(self._jobs) < most and not self._closed and (left := end - time.monotonic()) > 0:
                    self._cond.wait(left)
            n = min(most, len(self._jobs))
            return [self._jobs.popleft() for _ in range(n)]

    def close(self) -> list[Job]:
        """Refuse new jobs, wake the worker, and return the jobs still waiting."""
        with self._cond:
            self._closed = True
            left = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()
            return left


class Engine:
    """Batches requests onto one pipeline from one worker thread.

    Args:
        pipe: a :class:`cheers.pipeline.CheersPipeline` (or anything with its ``generate`` / ``edit`` /
            ``chat`` methods).
        max_batch: most rows (images, answers) per pipeline call, and most requests taken at once.
        max_queue: most requests waiting.
        batch_wait_s: how long the worker lingers for more requests once one arrives.
        metrics: where queue and batch figures go (a fresh :class:`Metrics` if None).
    """

    def __init__(
        self,
        pipe: Any,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        batch_wait_s: float = 0.002,
        metrics: Metrics | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        self.pipe = pipe
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        self.queue = JobQueue(max_queue)
        self.metrics = metrics or Metrics()
        self.metrics.watch_queue(lambda: len(self.queue))
        self._thread: threading.Thread | None = None
        self._call_s = 1.0  # running mean of a pipeline call's time, for Retry-After
        self.calls = 0  # pipeline calls made (batches), for tests and logs

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="cheers-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Answer waiting requests with 503, let the running call finish, end the worker."""
        for job in self.queue.close():
            job.fail(APIError(503, "the server is shutting down", code="shutting_down"))
        if self._thread is not None:
            self._thread.join(timeout)

    # -- requests --------------------------------------------------------------------------------------------
    def submit(self, task: Task, sink: StreamSink | None = None) -> Job:
        """Queue ``task``; raises :class:`APIError` 429 (with ``Retry-After``) when the queue is full."""
        if not self.alive:
            raise APIError(503, "the model worker is not running", code="worker_down")
        job = Job(task, sink)
        try:
            self.queue.put(job)
        except QueueFull:
            self.metrics.dropped.labels("queue_full").inc()
            raise APIError(
                429,
                f"the server is busy: {self.queue.capacity} requests are waiting; retry later",
                code="queue_full",
                headers={"Retry-After": str(self.retry_after())},
            ) from None
        return job

    def cancel(self, job: Job, reason: str = "client_gone") -> None:
        """Drop ``job``: out of the queue if it still waits, else its running stream stops at the next
        token (a batched call runs on; its result is discarded)."""
        if job.future.done():
            return
        job.cancelled.set()
        if self.queue.discard(job):
            self.metrics.dropped.labels(reason).inc()
        job.fail(APIError(499, "the request was cancelled", code=reason))

    def retry_after(self) -> int:
        """Seconds until the queue likely has room: (waiting batches + 1) x a call's mean time."""
        return max(1, math.ceil(self._call_s * (len(self.queue) / self.max_batch + 1)))

    # -- the worker ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            jobs = self.queue.take(self.max_batch, self.batch_wait_s)
            if not jobs:  # closed
                return
            try:
                self._run(jobs)
            except Exception:  # a bug here must not end the worker: answer the jobs and go on
                logger.exception("engine loop error")
                for job in jobs:
                    job.fail(APIError(500, "internal error in the model worker", code="engine_error"))

    def _run(self, jobs: list[Job]) -> None:
        jobs = [j for j in jobs if not j.cancelled.is_set()]
        for indices in plan_batches([j.task for j in jobs], self.max_batch):
            chunk = [jobs[i] for i in indices if not jobs[i].cancelled.is_set()]
            if chunk:
                self._call(chunk)

    def _call(self, chunk: list[Job]) -> None:
        label = kind(chunk[0].task)
        rows = sum(j.task.rows for j in chunk)
        start = time.monotonic()
        try:
            if label == "stream":
                job = chunk[0]
                assert isinstance(job.task, ChatTask) and job.sink is not None
                sink = job.sink
                result = run_stream(
                    self.pipe, job.task, lambda piece: sink.put("piece", piece), job.cancelled.is_set
                )
                job.resolve(result)
            else:
                for job, result in zip(chunk, run_batch(self.pipe, [j.task for j in chunk])):
                    job.resolve(result)
        except Exception as err:
            if len(chunk) > 1:  # find the request at fault: run each alone
                logger.warning(
                    "a batch of %d %s requests failed (%s); retrying one by one", len(chunk), label, err
                )
                for job in chunk:
                    if not job.cancelled.is_set():
                        self._call([job])
                return
            chunk[0].fail(_as_api_error(err))
        finally:
            elapsed = time.monotonic() - start
            self._call_s = 0.8 * self._call_s + 0.2 * elapsed
            self.calls += 1
            self.metrics.observe_batch(label, len(chunk), rows, elapsed)


def _as_api_error(err: Exception) -> APIError:
    if isinstance(err, APIError):
        return err
    if isinstance(err, ValueError):  # the pipeline's checks: the request's input is at fault
        return APIError(400, str(err), code="invalid_value")
    logger.error("model call failed", exc_info=err)
    return APIError(500, f"the model call failed ({type(err).__name__})", code="model_error")
