"""The backfill's plan: bounded pieces that cover every counted row once, the same every time."""

from __future__ import annotations

from datetime import UTC, datetime
from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st

from sink.metering.backfill import MAX_BUCKETS, Piece, month_of, plan, staging_tables
from sink.metering.ledger import BackfillRecords, Live, piece_state, plan_state
from sink.metering.meter_sql import MeterSQL, view_cutoff
from sink.metering.meters import Meter
from sink.stores.clickhouse.sql import ServerFeatures

JAN_31_23H = int(datetime(2026, 1, 31, 23, 0, tzinfo=UTC).timestamp()) // 60


def covered(pieces: list[Piece], histogram: list[tuple[int, int]]) -> dict[int, Fraction]:
    """Share of each minute's rows the pieces take (a bucket takes 1/buckets of its minute)."""
    share: dict[int, Fraction] = {}
    for minute, _ in histogram:
        for p in pieces:
            if p.first <= minute < p.end:
                share[minute] = share.get(minute, Fraction(0)) + Fraction(1, p.buckets)
    return share


histograms = st.lists(
    st.tuples(st.integers(0, 90 * 1440), st.integers(1, 5000)),
    max_size=60,
    unique_by=lambda x: x[0],
).map(lambda items: sorted((JAN_31_23H - 45 * 1440 + m, n) for m, n in items))


@given(histograms, st.integers(50, 6000))
def test_every_row_is_in_exactly_one_piece_and_pieces_are_bounded(
    histogram: list[tuple[int, int]], piece_rows: int
) -> None:
    pieces = plan(histogram, piece_rows)
    assert all(share == 1 for share in covered(pieces, histogram).values())
    assert set(covered(pieces, histogram)) == {m for m, _ in histogram}
    for p in pieces:
        assert p.buckets == 1 or p.end == p.first + 1
        inside = sum(n for m, n in histogram if p.first <= m < p.end)
        assert inside / p.buckets <= piece_rows or p.buckets == MAX_BUCKETS
        assert {month_of(m) for m, _ in histogram if p.first <= m < p.end} <= {p.month}
    origins = [(p.month, p.origin) for p in pieces]
    assert len(origins) == len(set(origins))
    assert plan(histogram, piece_rows) == pieces


def test_a_piece_never_spans_two_months() -> None:
    histogram = [(JAN_31_23H + i, 10) for i in range(120)]  # 23:00 Jan 31 to 01:00 Feb 1
    pieces = plan(histogram, 10_000)
    assert [(p.month, p.rows) for p in pieces] == [(202601, 600), (202602, 600)]
    assert pieces[1].first == JAN_31_23H + 60


def test_a_crowded_minute_is_split_by_hash_buckets() -> None:
    pieces = plan([(JAN_31_23H, 10), (JAN_31_23H + 1, 25), (JAN_31_23H + 2, 3)], 10)
    assert [(p.first - JAN_31_23H, p.bucket, p.buckets) for p in pieces] == [
        (0, 0, 1),
        (1, 0, 3),
        (1, 1, 3),
        (1, 2, 3),
        (2, 0, 1),
    ]
    assert len({p.origin for p in pieces}) == len(pieces)


def test_staging_tables_of_one_meter_only() -> None:
    names = [
        "meter_a",
        "meter_a_bf1",
        "_backfill_meter_a",
        "_backfill3_meter_a",
        "_backfill3m_meter_a",
        "_backfill3_meter_a_bf1",
        "_backfill_meter_ab",
    ]
    assert staging_tables(names, "meter_a") == [
        "_backfill_meter_a",
        "_backfill3_meter_a",
        "_backfill3m_meter_a",
    ]


def test_records_round_trip() -> None:
    live = Live(1_790_000_000, 250_000)
    assert Live.parse(live.encode()) == live
    assert Live.parse("applied") is None
    records = BackfillRecords.parse(
        [plan_state(30, 2), piece_state(202601, 7, 10), piece_state(202601, 9, 5), "month 202601"]
    )
    assert (records.rows_total, records.months_total, records.rows_done) == (30, 2, 15)
    assert records.months == {202601}


def test_a_views_cutoff_is_read_back_from_its_sql() -> None:
    meter = Meter(slug="tokens", event_type="t", aggregation="SUM", value_property="n")
    sql = MeterSQL(meter, ServerFeatures((18, 16, 1)), "db", "events")
    assert view_cutoff(sql.create_view(1_796_284_023)) == 1_796_284_023
    shown = "... AND (stored_at >= toDateTime(1796284023)) GROUP BY namespace, subject"
    assert view_cutoff(shown) == 1_796_284_023
    assert view_cutoff("CREATE MATERIALIZED VIEW x AS SELECT 1") is None
