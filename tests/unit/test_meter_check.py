"""The worker's per-event meter check (`MeterIndex.check`) against its plain definition, for
any JSON-shaped `data`: a meter can read an event when its property is there and, for the
numeric aggregations, a finite number that is not a boolean; for the others, any scalar."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from sink.metering.meters import NUMERIC, Meter, MeterIndex, lookup, path

AGGREGATIONS = ("SUM", "COUNT", "MIN", "MAX", "UNIQUE_COUNT", "LATEST", "AVG")

METERS = [
    Meter(slug=f"m_{agg.lower()}_{i}", event_type="t", aggregation=agg, value_property=prop)
    for i, prop in enumerate(("v", "u.v", "u.w.v"))
    for agg in AGGREGATIONS
    if agg != "COUNT"
] + [Meter(slug="m_count", event_type="t", aggregation="COUNT")]


def expected(meters: list[Meter], data: dict[str, Any]) -> str:
    problems = []
    for meter in meters:
        if not meter.value_property:
            continue
        value = lookup(data, path(meter.value_property))
        named = f"[{meter.slug}] '{meter.value_property}'"
        number = (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        )
        if value is None:
            problems.append(f"{named} is missing")
        elif meter.aggregation in NUMERIC and not number:
            problems.append(f"{named} is not a number")
        elif isinstance(value, dict | list):
            problems.append(f"{named} is not a scalar")
    return "; ".join(problems)


scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=3)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.sampled_from("uvw"), inner),
    max_leaves=6,
)
datas = st.dictionaries(st.sampled_from("uvw"), values, max_size=3)


@given(datas)
def test_the_check_is_its_definition(data: dict[str, Any]) -> None:
    assert MeterIndex(METERS).check("t", data) == expected(METERS, data)


def test_types_without_reading_meters_are_not_looked_at() -> None:
    index = MeterIndex(METERS)
    assert index.check("other", {"v": "x"}) == ""
    assert not MeterIndex([Meter(slug="c", event_type="t", aggregation="COUNT")])
    assert MeterIndex([Meter(slug="c", event_type="t", aggregation="COUNT")]).check("t", {}) == ""
