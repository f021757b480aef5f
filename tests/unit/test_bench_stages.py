"""The steps benchmark (benchmarks/stages.py) runs the worker's steps on real data."""

from __future__ import annotations

import json

import pytest

from benchmarks import stages
from benchmarks.workload import NEW, Spec, generate
from sink.pipeline.batch import Batch

BASE_MS = 1_796_300_000_000


@pytest.fixture(scope="module")
def work() -> list[stages.Fetch]:
    return stages.fetches(6_000, seed=7, base_ms=BASE_MS)


def test_fetches_are_runs_of_one_partition_in_offset_order(work: list[stages.Fetch]) -> None:
    assert sum(len(f.records) for f in work) == 6_000
    seen: dict[tuple[str, int], int] = {}
    for fetch in work:
        assert 0 < len(fetch.records) <= stages.FETCH
        offsets = [r.offset for r in fetch.records]
        assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))
        tp = (fetch.topic, fetch.partition)
        assert offsets[0] == seen.get(tp, 0)
        seen[tp] = offsets[-1] + 1


@pytest.fixture(scope="module")
def binary_work() -> list[stages.Fetch]:
    return stages.fetches(6_000, seed=7, form=stages.BINARY, base_ms=BASE_MS)


def test_binary_fetches_are_the_same_events_in_binary_mode(
    work: list[stages.Fetch], binary_work: list[stages.Fetch]
) -> None:
    structured = [r for f in work for r in f.records]
    binary = [r for f in binary_work for r in f.records]
    assert [r.offset for r in binary] == [r.offset for r in structured]
    in_binary_mode = [r for r in binary if r.headers]
    # Every valid event is in binary mode; the invalid records (about 0.5%) are as they were.
    assert len(in_binary_mode) >= 0.98 * len(binary)
    for fetch, twin in zip(work, binary_work, strict=True):
        assert stages.Round.decode(fetch, Batch(), 1024**2) == stages.Round.decode(
            twin, Batch(), 1024**2
        )


@pytest.fixture(scope="module")
def nested_work() -> list[stages.Fetch]:
    return stages.fetches(6_000, seed=7, form=stages.NESTED, base_ms=BASE_MS)


def test_nested_fetches_are_the_same_events_with_nested_data(
    work: list[stages.Fetch], nested_work: list[stages.Fetch]
) -> None:
    for fetch, twin in zip(work, nested_work, strict=True):
        events = stages.Round.decode(fetch, Batch(), 1024**2)
        twins = stages.Round.decode(twin, Batch(), 1024**2)
        assert [e._replace(data="") for e in events] == [e._replace(data="") for e in twins]
        for event, nested in zip(events, twins, strict=True):
            data = json.loads(nested.data)
            assert data.pop("usage") and data.pop("tags") and data.pop("model")
            assert data == json.loads(event.data)
            assert list(json.loads(nested.data))[-2:] == ["usage", "tags"]  # scalars first


@pytest.mark.parametrize("variant", stages.VARIANTS.values(), ids=list(stages.VARIANTS))
def test_a_round_keeps_each_new_event_once(
    work: list[stages.Fetch],
    binary_work: list[stages.Fetch],
    nested_work: list[stages.Fetch],
    variant: stages.Variant,
) -> None:
    new_events = sum(r.kind == NEW for r in generate(Spec(run="stages", events=6_000, seed=7)))
    one = stages.Round(variant.early_columns)
    # Small batches, so that duplicates also meet their first copy in an earlier batch.
    works = {stages.STRUCTURED: work, stages.BINARY: binary_work, stages.NESTED: nested_work}
    one.run(works[variant.form], max_rows=1_000, max_bytes=1024**2)
    assert one.records == 6_000
    assert one.kept == new_events
    assert set(one.seconds) == set(stages.STEPS)


def test_the_table_has_every_step_for_both_variants(capsys: pytest.CaptureFixture[str]) -> None:
    stages.main(["--events", "2000", "--rounds", "2"])
    out = capsys.readouterr().out
    assert "decode, binary mode / as the worker, per round: median" in out
    assert "decode, nested data / as the worker, per round: median" in out
    rows = {
        line.split("|")[1].strip(): line.split("|")[2:-1]
        for line in out.splitlines()
        if line.startswith("| ") and not line.startswith("| step")
    }
    assert set(rows) == {*stages.STEPS, "total", stages.SHARE}
    for cells in rows.values():
        assert len(cells) == 2 * len(stages.VARIANTS)
        assert all(float(cell) > 0 for cell in cells)
