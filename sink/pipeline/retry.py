"""Waiting for a dependency: one backoff (`Backoff`) for every wait, and the retry of a step of
the commit order until its dependency answers (`Retry`).

A failed dependency never loses the batch: the step is tried again with exponential backoff and
jitter, while the poll loop pauses the partitions (it reads `blocked`). The wait ends early only
when every partition of the batch has moved to another worker, which replays it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sink.errors import DependencyError
from sink.operations.metrics import Metrics
from sink.operations.vitals import Vitals
from sink.pipeline.batch import Batch
from sink.pipeline.fencing import Abandoned

T = TypeVar("T")


def jitter(delay: float) -> float:
    """`delay` spread over half to one and a half times itself, so retries do not march."""
    return delay * (0.5 + random.random())


class Backoff:
    """Exponential backoff with jitter: each wait doubles, up to `maximum`; `reset` after a
    success starts again from `initial`."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self.delay = initial

    def reset(self) -> None:
        self.delay = self.initial

    def next(self) -> float:
        """The next wait, in seconds."""
        wait = jitter(self.delay)
        self.delay = min(self.delay * 2, self.maximum)
        return wait

    async def wait(self, stop: asyncio.Event | None = None) -> None:
        """Sleep the next wait; with `stop`, return early once it is set."""
        seconds = self.next()
        if stop is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)


class Retry:
    def __init__(
        self,
        initial: float,
        maximum: float,
        *,
        abandoned: Callable[[Batch], bool],
        vitals: Vitals,
        metrics: Metrics,
        log: Any,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.abandoned = abandoned
        self.vitals = vitals
        self.metrics = metrics
        self.log = log
        self.blocked: list[tuple[str, Batch]] = []
        """The dependency each waiting retry loop waits for, and its batch (an entry per
        waiting loop)."""

    async def __call__(
        self, op: Callable[[], Awaitable[T]], batch: Batch, give_up: bool = False
    ) -> T:
        """`op`'s result, once it stops raising DependencyError. With `give_up`, the first
        such error is raised instead; Abandoned when the batch's partitions all moved away."""
        backoff = Backoff(self.initial, self.maximum)
        attempt = 0
        failed = ""
        blocked: tuple[str, Batch] | None = None  # in self.blocked while this loop waits
        try:
            while True:
                try:
                    result = await op()
                except DependencyError as exc:
                    attempt += 1
                    failed = exc.dependency
                    self.vitals.failed(exc.dependency, exc)
                    self.metrics.retries.labels(exc.dependency, type(exc).__name__).inc()
                    if give_up:
                        raise
                    if blocked is None:
                        blocked = (exc.dependency, batch)
                        self.blocked.append(blocked)
                    self._report(exc, attempt)
                    await backoff.wait()
                    if self.abandoned(batch):
                        raise Abandoned from exc
                    continue
                if attempt:
                    self.vitals.ok(failed)
                    self.log.info("dependency recovered", dependency=failed, attempts=attempt)
                return result
        finally:
            if blocked is not None:
                self.blocked.remove(blocked)

    def _report(self, exc: DependencyError, attempt: int) -> None:
        if attempt & (attempt - 1) == 0:  # 1, 2, 4, 8 ...: no log flood
            self.log.warning(
                "dependency failed, retrying",
                dependency=exc.dependency,
                attempt=attempt,
                error=str(exc)[:300],
            )
