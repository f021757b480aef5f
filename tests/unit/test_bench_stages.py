"""The steps benchmark (benchmarks/stages.py) runs the worker's steps on real data."""

from __future__ import annotations

import pytest

from benchmarks import stages
from benchmarks.workload import NEW, Spec, generate


@pytest.fixture(scope="module")
def work() -> list[stages.Fetch]:
    return stages.fetches(6_000, seed=7)


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


@pytest.mark.parametrize("early_columns", [False, True])
def test_a_round_keeps_each_new_event_once(work: list[stages.Fetch], early_columns: bool) -> None:
    new_events = sum(r.kind == NEW for r in generate(Spec(run="stages", events=6_000, seed=7)))
    one = stages.Round(early_columns)
    # Small batches, so that duplicates also meet their first copy in an earlier batch.
    one.run(work, max_rows=1_000, max_bytes=1024**2)
    assert one.records == 6_000
    assert one.kept == new_events
    assert set(one.seconds) == set(stages.STEPS)


def test_the_table_has_every_step_for_both_variants(capsys: pytest.CaptureFixture[str]) -> None:
    stages.main(["--events", "2000", "--rounds", "2"])
    rows = {
        line.split("|")[1].strip(): line.split("|")[2:-1]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| ") and not line.startswith("| step")
    }
    assert set(rows) == {*stages.STEPS, "total", stages.SHARE}
    for cells in rows.values():
        assert len(cells) == 2 * len(stages.VARIANTS)
        assert all(float(cell) > 0 for cell in cells)
