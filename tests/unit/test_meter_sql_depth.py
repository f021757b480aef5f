"""Without JSONExtract a meter reads a property through `member_pattern`: whatever the stored
`data` text, the pattern in the view's SQL captures exactly the top-level scalar member of the
property, or nothing; never a nested member and never text inside a string."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sink.metering.meter_sql import MeterSQL, member_pattern
from sink.metering.meters import Meter
from sink.pipeline.decode import Event, decode
from sink.stores.clickhouse.sql import ServerFeatures

OLD = ServerFeatures((18, 16, 1))
PROPERTY = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Few names, so that data often holds the metered name at several depths; among them names
# that need escaping in JSON (quote, backslash, control character) or in a regex, and non-ASCII.
NAMES = st.sampled_from(
    [
        "tokens",
        "model",
        'to"ken',
        "back\\slash",
        "tab\tkey",
        "日本語",
        "it's",
        "a b#&~-*+?()[]{}|^$",
    ]
)
keys = NAMES | st.text(max_size=4)
# Strings that look like members of the metered names, inside a string value.
member_texts = st.builds(
    lambda name, value: f'x","{name}":{value},"y":"', NAMES, st.integers()
) | st.builds(lambda name: orjson.dumps({name: 1}).decode(), NAMES)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | member_texts
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(keys, children, max_size=3),
    max_leaves=10,
)
datas = st.dictionaries(keys, scalars | values, max_size=6)


def _with_a_name(data: dict[str, Any]) -> st.SearchStrategy[tuple[dict[str, Any], str]]:
    """`data` and a name to read: one of its own keys (a meter's property has no dot) or not."""
    own = sorted(k for k in data if k and "." not in k)
    return st.tuples(st.just(data), st.sampled_from(own) | NAMES if own else NAMES)


cases = datas.flatmap(_with_a_name)


def pattern_in_sql(name: str) -> str:
    """The pattern as the view's SQL holds it, read back from its string literal."""
    meter = Meter(slug="m", event_type="e", aggregation="SUM", value_property=name)
    sql = MeterSQL(meter, OLD, "db", "events").create_view(0)
    literals = {
        re.sub(r"\\(.)", r"\1", text)
        for text in re.findall(r"extract\(data, '((?:[^'\\]|\\.)*)'\)", sql)
    }
    assert literals == {member_pattern(name)}
    return literals.pop()


def stored(data: dict[str, Any]) -> str:
    """`data` as the worker stores it."""
    event = {
        "specversion": "1.0",
        "id": "1",
        "source": "s",
        "type": "e",
        "subject": "c",
        "time": "2026-01-01T00:00:00Z",
        "data": data,
    }
    result = decode(orjson.dumps(event), "ns", 1 << 20)
    assert isinstance(result, Event), result
    return result.data


def top_level_member(text: str, name: str) -> tuple[int, int] | None:
    """Where the top-level member `name` of a data text is, with the character that ends it,
    if its value is a scalar."""
    data = orjson.loads(text)
    parts = [orjson.dumps({k: v}).decode()[1:-1] for k, v in data.items()]
    assert text == "{" + ",".join(parts) + "}"
    start = 1
    for (key, value), part in zip(data.items(), parts, strict=True):
        if key == name:
            return None if isinstance(value, dict | list) else (start, start + len(part) + 1)
        start += len(part) + 1
    return None


def assert_reads_top_level_only(data: dict[str, Any], name: str) -> None:
    text = stored(data)
    found = re.search(pattern_in_sql(name), text)
    where = top_level_member(text, name)
    if where is None:
        assert found is None, (text, found)
        return
    assert found is not None, text
    assert found.span(1) == where
    member = found.group(1)
    assert member[-1] in ",}"
    assert orjson.loads("{" + member[:-1] + "}") == {name: data[name]}


@PROPERTY
@given(cases)
def test_the_member_is_the_top_level_scalar_or_nothing(case: tuple[dict[str, Any], str]) -> None:
    assert_reads_top_level_only(*case)


@pytest.mark.parametrize(
    "data",
    [
        {"model": "m", "meta": {"tokens": 999999}},
        {"meta": {"tokens": 999999}, "tokens": 5},
        {"tokens": 5, "meta": {"tokens": 999999}},
        {"list": [{"tokens": 9}], "model": "m"},
        {"note": 'x","tokens":999999,"y":"'},
        {"note": '"tokens":999', "tokens": 5},
        {"note": "ends in a backslash\\", "tokens": 5},
        {"model": "m"},
        {"tokens": {"tokens": 5}},
        {"tokens": [5]},
        {"tokens": None},
        {"tokens": "lots"},
        {},
    ],
)
def test_named_cases(data: dict[str, Any]) -> None:
    assert_reads_top_level_only(data, "tokens")


@pytest.mark.parametrize("name", ['to"ken', "back\\slash", "tab\tkey", "日本語", "it's"])
def test_names_that_need_escaping(name: str) -> None:
    assert_reads_top_level_only({"a": 1, name: "v", "meta": {name: 2}}, name)
    assert_reads_top_level_only({"meta": {name: 2}}, name)
