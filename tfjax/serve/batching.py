"""Dynamic batching: a bounded queue of requests, grouped into shared model calls by a worker.

Requests arrive from the server's event loop as `Job`s; one worker thread takes the oldest
job, waits up to `max_wait` seconds for more jobs with the same key (the same decoding
settings), and runs them as one call of `run(key, items)` over all their items (sentences),
up to `max_items` items and `max_tokens` input tokens. `ContinuousBatcher` instead feeds
the jobs an `Engine` accepts (greedy decoding) into its running rows between its steps
(`tfjax.continuous`). The event loop never waits on the model, so the server answers health
checks and rejects excess load while a batch decodes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol

from absl import logging

# run(key, items) -> one result per item, in order.
Runner = Callable[[Hashable, Sequence[Any]], Sequence[Any]]


class QueueFull(Exception):
    """The queue holds `max_queue` jobs; the request should be retried later."""


class DeadlineExceeded(Exception):
    """The job's deadline passed before a model call took it."""


@dataclasses.dataclass(eq=False)
class Job:
    """One request: its items share its key's settings; its future gets their results."""

    key: Hashable  # jobs with equal keys may share a model call
    items: Sequence[Any]  # inputs of the request (sentences), run in one model call
    tokens: int  # input tokens of all items, counted against `max_tokens`
    deadline: float  # time.monotonic() after which the job is not started
    enqueued: float = dataclasses.field(default_factory=time.monotonic)
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)


@dataclasses.dataclass
class BatchStats:
    """What the worker reports for each model call (see `Batcher.on_batch`)."""

    items: int  # items (sentences) in the call
    jobs: int  # requests in the call
    waits: list[float]  # each job's seconds in the queue
    seconds: float  # the call's wall time
    results: Sequence[Any]  # the call's results, one per item


class Batcher:
    """A bounded job queue and the worker thread that groups jobs into model calls."""

    def __init__(
        self,
        run: Runner,
        *,
        max_items: int = 32,
        max_tokens: int = 4096,
        max_wait: float = 0.005,
        max_queue: int = 256,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        """max_items: items per call (a larger job runs alone); max_tokens: input tokens per
        call; max_wait: seconds the oldest job waits for company; max_queue: jobs queued
        before `submit` raises `QueueFull`; on_batch(stats) after each call."""
        if max_items < 1 or max_tokens < 1 or max_queue < 1 or max_wait < 0:
            raise ValueError("max_items, max_tokens and max_queue must be >= 1, max_wait >= 0")
        self._run = run
        self.max_items, self.max_tokens = max_items, max_tokens
        self.max_wait, self.max_queue = max_wait, max_queue
        self._on_batch = on_batch or (lambda stats: None)
        self._queue: collections.deque[Job] = collections.deque()
        self._ready = threading.Condition()
        self._stopping = False
        self.calls = 0  # model calls made, for tests and the load benchmark
        self._thread = threading.Thread(target=self._work, name="batcher", daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        """Jobs waiting (not yet in a model call)."""
        return len(self._queue)

    def submit(self, job: Job) -> concurrent.futures.Future:
        """Queue `job`; raises `QueueFull` when max_queue jobs wait, RuntimeError once stopped."""
        with self._ready:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are queued")
            self._queue.append(job)
            self._ready.notify()
        return job.future

    def cancel(self, job: Job) -> bool:
        """Removes a queued job (its client left, or its deadline passed) and cancels its
        future; False when a model call has taken it already."""
        with self._ready:
            try:
                self._queue.remove(job)
            except ValueError:
                return False
            self._ready.notify()
        job.future.cancel()
        return True

    def stop(self) -> None:
        """Finish every queued job, then end the worker."""
        with self._ready:
            self._stopping = True
            self._ready.notify()
        self._thread.join()

    def _work(self) -> None:
        while True:
            jobs = self._next_batch()
            if jobs is None:
                return
            if jobs:
                self._call(jobs)

    def _next_batch(self) -> list[Job] | None:
        """The next call's jobs (possibly none, when all were dropped); None once stopped."""
        with self._ready:
            while True:
                if not self._queue:
                    if self._stopping:
                        return None
                    self._ready.wait()
                    continue
                # Wait for company until the oldest job has waited max_wait, or the call is
                # full; recomputed on every wake-up, as jobs come, go (cancel) and settings change.
                until = self._queue[0].enqueued + self.max_wait
                if self._stopping or self._full() or time.monotonic() >= until:
                    return self._take()
                self._ready.wait(until - time.monotonic())

    def _full(self, key: Hashable = None) -> bool:
        """Whether the queued jobs with `key` (default: the oldest's) already fill a call."""
        key = self._queue[0].key if key is None else key
        same = [job for job in self._queue if job.key == key]
        return (
            sum(len(job.items) for job in same) >= self.max_items
            or sum(job.tokens for job in same) >= self.max_tokens
        )

    def _take(self, key: Hashable = None) -> list[Job]:
        """Removes and returns the oldest job with `key` (default: the oldest's) plus the next
        ones with it that fit; fails expired jobs on the way. Called with the lock held."""
        now = time.monotonic()
        key = self._queue[0].key if key is None else key
        items, tokens, taken, kept = 0, 0, [], []
        for job in self._queue:
            if now > job.deadline:  # its waiter is about to answer 504 and cancel it
                job.future.set_exception(DeadlineExceeded())
                continue
            fits = (
                not taken
                or items + len(job.items) <= self.max_items
                and tokens + job.tokens <= self.max_tokens
            )
            if job.key != key or not fits:
                kept.append(job)
            elif job.future.set_running_or_notify_cancel():  # False: its waiter gave up
                taken.append(job)
                items, tokens = items + len(job.items), tokens + job.tokens
        self._queue = collections.deque(kept)
        return taken

    def _call(self, jobs: list[Job]) -> None:
        """One model call over the jobs' items; its results split back to their futures.

        Should the call fail, each job is retried alone, so one request's failure never
        fails the others it was batched with.
        """
        start = time.monotonic()
        items = [item for job in jobs for item in job.items]
        try:
            self.calls += 1
            results = list(self._run(jobs[0].key, items))
        except Exception as e:  # a model or input failure: isolate it
            if len(jobs) > 1:
                for job in jobs:
                    self._call([job])
                return
            logging.exception("a model call failed")
            jobs[0].future.set_exception(e)
            return
        seconds = time.monotonic() - start
        waits = [start - job.enqueued for job in jobs]
        self._on_batch(BatchStats(len(items), len(jobs), waits, seconds, results))
        for job in jobs:
            job.future.set_result(results[: len(job.items)])
            results = results[len(job.items) :]


class Engine(Protocol):
    """What `ContinuousBatcher` drives: a decoder whose rows jobs' items join and leave."""

    def accepts(self, key: Hashable) -> bool:
        """Whether jobs with this key can be decoded continuously."""
        ...

    def add(self, key: Hashable, items: Sequence[Any], tag: Hashable) -> None:
        """Queue a job's items; their results come back from `step` as ((tag, i), result)."""
        ...

    def step(self) -> list[tuple[tuple[Hashable, int], Any]]:
        """Runs the rows once; the items that ended."""
        ...

    def drop(self) -> list[tuple[Hashable, int]]:
        """Forgets every item (after a failed step); their (tag, i)."""
        ...

    @property
    def busy(self) -> int:
        """Items added and not yet ended."""
        ...


class ContinuousBatcher(Batcher):
    """A `Batcher` whose jobs with keys the engine accepts join its running rows as soon as
    rows free up, instead of waiting for whole model calls; other jobs are grouped into
    calls of `run` as before, between the engine's steps. A one-item job that finds the
    engine idle and no other job is run as a call of its own.

    A job leaves the queue when the engine has room for its items (running plus waiting items
    below max_items), so the queue bound, 429s, deadlines and `cancel` work as before; once
    in the engine a job is finished.
    """

    def __init__(self, run: Runner, engine: Engine, **kwargs: Any) -> None:
        self._engine = engine
        self._parts: dict[Job, list[Any]] = {}  # jobs in the engine -> their results so far
        self._waits: dict[Job, float] = {}  # jobs in the engine -> their seconds in the queue
        super().__init__(run, **kwargs)

    def _work(self) -> None:
        while True:
            with self._ready:
                joining = self._joining()
                static = self._static()
                if not joining and not static and not self._engine.busy:
                    if self._stopping and not self._queue:
                        return
                    self._ready.wait(self._static_wait())
                    continue
            if static:
                self._call(static)
            if not self._engine.busy and len(joining) == 1 and len(joining[0].items) == 1:
                # Alone, a sentence has no one to share steps with: one whole-decode call
                # (a jitted loop, no host round trip per step) serves it sooner.
                self._call(joining)
                continue
            for job in joining:
                self._add(job)
            if self._engine.busy:
                self._step()

    def _joining(self) -> list[Job]:
        """Removes the queued jobs the engine takes, oldest first, while it has room; fails
        expired ones. Called with the lock held."""
        room, now, taken, kept = self.max_items - self._engine.busy, time.monotonic(), [], []
        blocked = False  # by an older job that does not fit: jobs join in order
        for job in self._queue:
            if self._engine.accepts(job.key) and not blocked:
                # A job larger than max_items joins an idle engine, which queues the excess.
                blocked = len(job.items) > room and not (self._engine.busy == 0 and not taken)
            if not self._engine.accepts(job.key) or blocked:
                kept.append(job)
            elif now > job.deadline:
                job.future.set_exception(DeadlineExceeded())
            elif job.future.set_running_or_notify_cancel():
                taken.append(job)
                room -= len(job.items)
        self._queue = collections.deque(kept)
        return taken

    def _static(self) -> list[Job]:
        """The oldest other job plus its company, once it has waited max_wait (or the call
        is full, or the server stops); else none. Called with the lock held."""
        job = next((j for j in self._queue if not self._engine.accepts(j.key)), None)
        if job is None:
            return []
        due = time.monotonic() >= job.enqueued + self.max_wait
        due = due or self._stopping or self._full(job.key)
        return self._take(job.key) if due else []

    def _static_wait(self) -> float | None:
        """Seconds until the oldest other job is due; None (until notified) when none waits."""
        job = next((j for j in self._queue if not self._engine.accepts(j.key)), None)
        return None if job is None else max(job.enqueued + self.max_wait - time.monotonic(), 0)

    def _add(self, job: Job) -> None:
        try:
            self._engine.add(job.key, job.items, job)
        except Exception as e:  # a bad input of this job alone
            logging.exception("a job could not join the running rows")
            job.future.set_exception(e)
            return
        self._parts[job] = [None] * len(job.items)
        self._waits[job] = time.monotonic() - job.enqueued

    def _step(self) -> None:
        """One engine step; completes the jobs whose last item ended, fails all on error."""
        start, rows = time.monotonic(), self._engine.busy
        try:
            self.calls += 1
            ended = self._engine.step()
        except Exception as e:
            logging.exception("a continuous decoding step failed")
            for job in {tag for tag, _ in self._engine.drop()}:
                self._parts.pop(job, None)
                self._waits.pop(job, None)
                job.future.set_exception(e)
            return
        done = []
        for (job, i), result in ended:
            parts = self._parts[job]
            parts[i] = result
            if all(p is not None for p in parts):
                done.append(job)
        waits = [self._waits.pop(job) for job in done]
        seconds = time.monotonic() - start
        stats = BatchStats(rows, len(self._parts), waits, seconds, [r for _, r in ended])
        self._on_batch(stats)
        for job in done:
            job.future.set_result(self._parts.pop(job))
