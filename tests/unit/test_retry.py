"""Retrying a step of the commit order: backoff until the dependency answers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import structlog

from sink.errors import ClickHouseRejected, ClickHouseUnavailable, RedisUnavailable
from sink.operations.metrics import Metrics
from sink.operations.vitals import Vitals
from sink.pipeline.batch import Batch
from sink.pipeline.fencing import Abandoned
from sink.pipeline.retry import Retry, jitter

A = ("om_a_events", 0)


def retry(abandoned: bool = False) -> Retry:
    metrics = Metrics()
    return Retry(
        0.001,
        0.004,
        abandoned=lambda batch: abandoned,
        vitals=Vitals(metrics),
        metrics=metrics,
        log=structlog.get_logger("test"),
    )


def a_batch() -> Batch:
    batch = Batch()
    batch.extend(A, 1, 0, 9)
    return batch


def failing(
    times: int, error: Exception, seen: list[list[str]], r: Retry
) -> Callable[[], Awaitable[str]]:
    """An operation that fails `times` times, then answers "done"; it records what the
    retry loop had blocked at each call."""
    calls = 0

    async def op() -> str:
        nonlocal calls
        seen.append([dependency for dependency, _batch in r.blocked])
        calls += 1
        if calls <= times:
            raise error
        return "done"

    return op


async def test_the_step_is_retried_until_its_dependency_answers() -> None:
    r = retry()
    seen: list[list[str]] = []
    assert await r(failing(3, ClickHouseUnavailable("down"), seen, r), a_batch()) == "done"
    # Blocked on ClickHouse from the first failure until the answer; free afterwards.
    assert seen == [[], ["clickhouse"], ["clickhouse"], ["clickhouse"]]
    assert r.blocked == []
    failures = r.metrics.registry.get_sample_value(
        "sink_retries_total", {"dependency": "clickhouse", "kind": "ClickHouseUnavailable"}
    )
    assert failures == 3
    assert r.vitals.dependencies["clickhouse"].up


async def test_give_up_raises_the_first_failure() -> None:
    r = retry()
    seen: list[list[str]] = []
    with pytest.raises(RedisUnavailable):
        await r(failing(1, RedisUnavailable("down"), seen, r), a_batch(), give_up=True)
    assert len(seen) == 1
    assert r.blocked == []


async def test_a_batch_whose_partitions_moved_away_is_abandoned() -> None:
    r = retry(abandoned=True)
    seen: list[list[str]] = []
    with pytest.raises(Abandoned):
        await r(failing(10, ClickHouseUnavailable("down"), seen, r), a_batch())
    assert len(seen) == 1
    assert r.blocked == []


async def test_errors_that_are_not_dependency_failures_are_not_retried() -> None:
    r = retry()
    seen: list[list[str]] = []
    with pytest.raises(ClickHouseRejected):
        await r(failing(1, ClickHouseRejected("bad row"), seen, r), a_batch())
    assert len(seen) == 1


def test_jitter_stays_within_half_and_one_and_a_half_times_the_delay() -> None:
    delays = [jitter(2.0) for _ in range(1000)]
    assert all(1.0 <= d <= 3.0 for d in delays)
    assert max(delays) - min(delays) > 1.0
