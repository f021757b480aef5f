"""What a worker reports about itself: dependency health, readiness, a landed batch's counts."""

from __future__ import annotations

from types import SimpleNamespace

from sink.operations.metrics import Metrics
from sink.operations.vitals import Vitals, count_topics
from sink.pipeline.batch import Batch, Item, Reject
from sink.pipeline.decode import Event, Rejection
from tests.items import as_item

A = ("om_a_events", 0)
B = ("om_b_events", 0)


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def item(tp: tuple[str, int], offset: int, problems: str = "", stamp: int = 0) -> Item:
    event = Event("ns", f"id-{offset}", "t", "s", "subj", 0, "{}", problems)
    return as_item(event, tp[0], tp[1], offset, stamp)


def reject(tp: tuple[str, int], offset: int, code: str) -> Reject:
    record = SimpleNamespace(topic=tp[0], partition=tp[1], offset=offset, key=None, value=b"x")
    return Reject(record, Rejection(code, "bad"))


def test_a_failed_dependency_is_down_until_it_answers_again() -> None:
    metrics = Metrics()
    vitals = Vitals(metrics)
    assert sample(metrics, "sink_dependency_up", dependency="redis") == 1
    vitals.failed("redis", ConnectionError("refused"))
    vitals.failed("redis", ConnectionError("refused again"))
    state = vitals.dependencies["redis"]
    assert not state.up and state.error == "refused again"
    assert sample(metrics, "sink_dependency_up", dependency="redis") == 0
    assert [e["error"] for e in vitals.errors] == ["refused", "refused again"]
    down_since = state.since

    vitals.ok("redis")
    assert vitals.dependencies["redis"].up
    assert vitals.dependencies["redis"].since >= down_since
    assert sample(metrics, "sink_dependency_up", dependency="redis") == 1
    assert vitals.dependency_report()["redis"]["error"] == ""


def test_errors_are_kept_short() -> None:
    vitals = Vitals(Metrics())
    vitals.failed("kafka", RuntimeError("x" * 1000))
    assert len(vitals.dependencies["kafka"].error) == 300
    assert len(vitals.errors[-1]["error"]) == 300


def test_not_ready_once_a_dependency_is_down_for_longer_than_the_grace() -> None:
    vitals = Vitals(Metrics())
    vitals.failed("clickhouse", OSError("gone"))
    vitals.dependencies["clickhouse"].since -= 10
    assert vitals.readiness(grace=30, stall_after=60) == (
        True,
        {"dependencies_down": [], "stalled": False, "lag": 0},
    )
    ready, why = vitals.readiness(grace=5, stall_after=60)
    assert not ready and why["dependencies_down"] == ["clickhouse"]


def test_stalled_only_while_records_wait() -> None:
    metrics = Metrics()
    vitals = Vitals(metrics)
    vitals.measured_lag(A, 0)
    vitals.lag_measured()
    assert vitals.readiness(grace=5, stall_after=-1)[0]

    vitals.measured_lag(A, 7)
    vitals.lag_measured()
    assert sample(metrics, "sink_consumer_lag", topic=A[0], partition="0") == 7
    ready, why = vitals.readiness(grace=5, stall_after=-1)
    assert not ready and why == {"dependencies_down": [], "stalled": True, "lag": 7}
    assert vitals.readiness(grace=5, stall_after=3600)[0]

    vitals.forget([A])
    vitals.lag_measured()
    assert vitals.readiness(grace=5, stall_after=-1)[0]


def test_a_landed_batch_is_counted_by_topic_and_reason() -> None:
    metrics = Metrics()
    vitals = Vitals(metrics)
    batch = Batch()
    batch.extend(A, 1, 0, 5)
    batch.extend(B, 1, 0, 2)
    batch.items += [item(A, o) for o in range(5)] + [item(B, 0), item(B, 1)]
    batch.rejects += [reject(A, 5, "invalid_json"), reject(B, 2, "bad_time")]
    batch.nbytes = 900
    # A: 3 landed, 1 refused by ClickHouse, 1 duplicate; B: both landed, one with a meter
    # problem.
    landed = [item(A, 0), item(A, 1), item(A, 3, stamp=1), item(B, 0), item(B, 1, "[tokens] x")]
    poisoned = [item(A, 2)]

    summary = vitals.landed(batch, landed, poisoned, 0.25)

    assert sample(metrics, "sink_events_inserted_total", topic=A[0]) == 3
    assert sample(metrics, "sink_events_inserted_total", topic=B[0]) == 2
    assert sample(metrics, "sink_duplicates_dropped_total", topic=A[0]) == 1
    assert sample(metrics, "sink_duplicates_dropped_total", topic=B[0]) is None
    assert sample(metrics, "sink_dead_letters_total", reason="invalid_json") == 1
    assert sample(metrics, "sink_dead_letters_total", reason="bad_time") == 1
    assert sample(metrics, "sink_meter_invalid_events_total", meter="tokens") == 1
    assert sample(metrics, "sink_landed_offset", topic=A[0], partition="0") == 5
    assert sample(metrics, "sink_batch_rows_sum") == 9
    assert summary == vitals.last_flush
    assert {k: summary[k] for k in ("records", "inserted", "duplicates", "dead_letters")} == {
        "records": 9,
        "inserted": 5,
        "duplicates": 1,
        "dead_letters": 3,
    }


def test_count_topics() -> None:
    assert count_topics([item(A, 0), item(B, 0), item(A, 1)]) == {A[0]: 2, B[0]: 1}
    assert count_topics([]) == {}
