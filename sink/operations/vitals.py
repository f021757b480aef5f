"""What a worker knows about its own health: its dependencies, its recent errors, its lag
and its last landed batch. `/ready`, `/status` and the metrics read it; the worker only
tells it what happened."""

from __future__ import annotations

import re
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sink.coordinates import TopicPartition
from sink.operations.metrics import Metrics
from sink.pipeline.batch import FIELD_OF, TOPIC_OF, Batch, Item

DEPENDENCIES = ("kafka", "redis", "clickhouse")

_VALIDATION_ERROR = FIELD_OF["validation_error"]
_TIMESTAMP_MS = FIELD_OF["timestamp_ms"]
_METER_SLUG = re.compile(r"\[([a-z][a-z0-9_]*)\]")
_ERROR_CHARS = 300


@dataclass
class DependencyState:
    up: bool = True
    since: float = field(default_factory=time.monotonic)
    error: str = ""


class Vitals:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.dependencies = {name: DependencyState() for name in DEPENDENCIES}
        for name in self.dependencies:
            metrics.up.labels(name).set(1)
        self.errors: deque[dict[str, Any]] = deque(maxlen=20)
        self.lag: dict[TopicPartition, int] = {}
        self.last_flush: dict[str, Any] = {}
        """The last landed batch, as /status shows it."""
        self._last_landed = time.monotonic()
        self._lagging_since: float | None = None

    # ---------------------------------------------------------------- dependencies

    def ok(self, name: str) -> None:
        if not self.dependencies[name].up:
            self.dependencies[name] = DependencyState(up=True)
        self.metrics.up.labels(name).set(1)

    def failed(self, name: str, exc: BaseException) -> None:
        error = str(exc)[:_ERROR_CHARS]
        state = self.dependencies[name]
        if state.up:
            self.dependencies[name] = DependencyState(up=False, error=error)
        else:
            state.error = error
        self.metrics.up.labels(name).set(0)
        self.errors.append({"at": time.time(), "dependency": name, "error": error})

    # ---------------------------------------------------------------- progress

    def landed(
        self, batch: Batch, landed: list[Item], poisoned: list[Item], seconds: float
    ) -> dict[str, Any]:
        """Count a landed batch into the metrics; returns its summary (`last_flush`)."""
        m = self.metrics
        now_ms = time.time() * 1000
        valid, inserted = count_topics(batch.items), count_topics(landed)
        dropped = count_topics(poisoned)
        duplicates = 0
        for topic, count in valid.items():
            m.inserted.labels(topic).inc(inserted.get(topic, 0))
            dups = count - inserted.get(topic, 0) - dropped.get(topic, 0)
            if dups > 0:
                m.duplicates.labels(topic).inc(dups)
                duplicates += dups
        for reason, count in Counter(r.reason.code for r in batch.rejects).items():
            m.dead_letters.labels(reason).inc(count)
        for problems in filter(None, map(_VALIDATION_ERROR, landed)):
            for slug in _METER_SLUG.findall(problems):
                m.meter_invalid.labels(slug).inc()
        m.batches.inc()
        m.batch_rows.observe(batch.records)
        m.batch_bytes.observe(batch.nbytes)
        m.flush_seconds.observe(seconds)
        if landed:
            newest = max(map(_TIMESTAMP_MS, landed))
            m.end_to_end.observe(max(0.0, (now_ms - newest) / 1000))
        for (topic, partition), offsets in batch.ranges.items():
            m.landed_offset.labels(topic, str(partition)).set(offsets.last)
        self._last_landed = time.monotonic()
        self.last_flush = {
            "at": time.time(),
            "records": batch.records,
            "inserted": len(landed),
            "duplicates": duplicates,
            "dead_letters": len(batch.rejects) + len(poisoned),
            "seconds": round(seconds, 4),
        }
        return self.last_flush

    def measured_lag(self, tp: TopicPartition, lag: int) -> None:
        self.lag[tp] = lag
        self.metrics.lag.labels(tp[0], str(tp[1])).set(lag)

    def lag_measured(self) -> None:
        """A round of lag measurements is done: note since when records have been waiting."""
        if sum(self.lag.values()) == 0:
            self._lagging_since = None
        elif self._lagging_since is None:
            self._lagging_since = time.monotonic()

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self.lag.pop(tp, None)

    # ---------------------------------------------------------------- reports

    def readiness(self, grace: float, stall_after: float) -> tuple[bool, dict[str, Any]]:
        """Ready unless a dependency has been down for longer than `grace`, or records have
        been waiting while nothing landed for longer than `stall_after`."""
        now = time.monotonic()
        down = [n for n, s in self.dependencies.items() if not s.up and now - s.since > grace]
        lagging = sum(self.lag.values())
        since = self._lagging_since
        stalled = (
            lagging > 0 and since is not None and now - max(self._last_landed, since) > stall_after
        )
        return not down and not stalled, {
            "dependencies_down": down,
            "stalled": stalled,
            "lag": lagging,
        }

    def dependency_report(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        return {
            n: {"up": s.up, "since_seconds": round(now - s.since, 1), "error": s.error}
            for n, s in self.dependencies.items()
        }


def count_topics(items: Sequence[Item]) -> dict[str, int]:
    return Counter(map(TOPIC_OF, items))
