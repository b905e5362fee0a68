"""Dynamic batching on one worker thread: requests wait in a bounded priority queue, are merged
along the batch axis up to the measured ``max_batch_size`` (waiting at most the queue delay for
more), run once, and split back per request. Lower priority numbers go first (as Triton); a full
queue refuses at once (the server answers 503 with Retry-After) instead of growing.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

Feed = dict[str, np.ndarray]


class QueueFull(Exception):
    """The queue holds its maximum; the client should retry later."""


class Expired(Exception):
    """The request's timeout passed while it waited in the queue."""


@dataclass(frozen=True)
class BatchConfig:
    max_batch: int  # 0: the model has no batch axis; every request runs alone
    queue_delay_s: float
    max_queue: int  # requests waiting, at most


@dataclass
class Stats:
    """Counters in the shape of Triton's statistics extension (nanoseconds)."""

    success: list[int] = field(default_factory=lambda: [0, 0])  # count, ns (queue + compute)
    fail: list[int] = field(default_factory=lambda: [0, 0])
    queue: list[int] = field(default_factory=lambda: [0, 0])
    compute: list[int] = field(default_factory=lambda: [0, 0])
    inference_count: int = 0  # samples
    execution_count: int = 0  # model runs
    last_inference_ms: int = 0
    batches: dict[int, list[int]] = field(default_factory=dict)  # batch size -> [count, compute ns]


@dataclass(order=True)
class _Item:
    priority: int
    seq: int
    feed: Feed = field(compare=False)
    batch: int = field(compare=False)
    future: Future = field(compare=False)
    enqueued: int = field(compare=False)  # monotonic ns
    deadline: int | None = field(compare=False)  # monotonic ns


class Batcher:
    """Runs ``run(feed) -> outputs`` on merged requests from one worker thread."""

    def __init__(self, run: Callable[[Feed], Feed], config: BatchConfig):
        self.run, self.config = run, config
        self.stats = Stats()
        self._heap: list[_Item] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._busy = False
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="mlopt-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=5)

    def submit(self, feed: Feed, batch: int, priority: int, timeout_us: int | None = None) -> Future:
        """Queue one request; its future gives the outputs for its own samples."""
        now = time.monotonic_ns()
        item = _Item(priority, next(self._seq), feed, batch, Future(), now,
                     now + timeout_us * 1000 if timeout_us else None)
        with self._cv:
            if len(self._heap) >= self.config.max_queue:
                raise QueueFull(f"the queue holds {len(self._heap)} requests, its limit")
            heapq.heappush(self._heap, item)
            self._cv.notify()
        return item.future

    @property
    def idle(self) -> bool:
        with self._cv:
            return not self._heap and not self._busy

    # ------------------------------------------------------------ the worker
    def _loop(self) -> None:
        while True:
            items = self._take()
            if items is None:
                return
            try:
                self._execute(items)
            finally:
                with self._cv:
                    self._busy = False

    def _take(self) -> list[_Item] | None:
        """The next batch: the highest-priority requests that fit, after waiting up to the queue
        delay (from the oldest one's arrival) for the batch to fill."""
        with self._cv:
            while not self._heap:
                if self._stop:
                    return None
                self._cv.wait()
            limit = max(self.config.max_batch, 1)
            deadline = self._heap[0].enqueued + int(self.config.queue_delay_s * 1e9)
            while self.config.max_batch and self._queued_samples() < limit and not self._stop:
                left = (deadline - time.monotonic_ns()) / 1e9
                if left <= 0:
                    break
                self._cv.wait(left)
            self._busy = True
            return self._pop(limit)

    def _queued_samples(self) -> int:
        return sum(i.batch for i in self._heap)

    def _pop(self, limit: int) -> list[_Item]:
        first = heapq.heappop(self._heap)
        items, total, skipped = [first], first.batch, []
        while self.config.max_batch and self._heap and total < limit:
            nxt = heapq.heappop(self._heap)
            if total + nxt.batch <= limit:
                items.append(nxt)
                total += nxt.batch
            else:
                skipped.append(nxt)
        for s in skipped:
            heapq.heappush(self._heap, s)
        return items

    def _execute(self, items: list[_Item]) -> None:
        now = time.monotonic_ns()
        live = []
        for it in items:
            if it.deadline is not None and now > it.deadline:
                self._fail(it, Expired(f"the request's timeout passed after {(now - it.enqueued) / 1e3:.0f} us in the queue"))
            elif it.future.set_running_or_notify_cancel():
                live.append(it)
        if not live:
            return
        feed = live[0].feed if len(live) == 1 else {k: np.concatenate([i.feed[k] for i in live]) for k in live[0].feed}
        try:
            out = self.run(feed)
        except Exception as e:  # a runtime fault on valid input: every request of the batch gets it
            for it in live:
                self._fail(it, e, running=True)
            return
        done = time.monotonic_ns()
        self._record(live, now, done)
        offset = 0
        for it in live:
            if len(live) == 1:
                it.future.set_result(out)
            else:
                it.future.set_result({k: v[offset:offset + it.batch] for k, v in out.items()})
            offset += it.batch

    def _fail(self, it: _Item, error: Exception, running: bool = False) -> None:
        self.stats.fail[0] += 1
        self.stats.fail[1] += time.monotonic_ns() - it.enqueued
        if running or it.future.set_running_or_notify_cancel():
            it.future.set_exception(error)

    def _record(self, live: list[_Item], start: int, done: int) -> None:
        s, size = self.stats, sum(i.batch for i in live)
        s.execution_count += 1
        s.inference_count += size
        s.compute[0] += 1
        s.compute[1] += done - start
        s.last_inference_ms = int(time.time() * 1000)
        row = s.batches.setdefault(size, [0, 0])
        row[0] += 1
        row[1] += done - start
        for it in live:
            s.success[0] += 1
            s.success[1] += done - it.enqueued
            s.queue[0] += 1
            s.queue[1] += start - it.enqueued
