"""Property tests: decode never raises, whatever the input, and keeps what it accepts."""

from __future__ import annotations

import calendar
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sink import decode as d
from sink.decode import Event, Rejection, decode, flat_first

NS = "ns"
LIMIT = 1024 * 1024
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON values as Python objects, including integers beyond 64 bits and non-finite floats
# (json.dumps writes those as NaN / Infinity, which are not JSON).
json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63 - 2, max_value=2**200)
    | st.integers(min_value=-(2**200), max_value=-(2**63) + 2)
    | st.floats()
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=12,
)
required_texts = st.text(max_size=40) | st.just("")


def assert_decoded(result: object) -> None:
    assert isinstance(result, (Event, Rejection))
    if isinstance(result, Rejection):
        assert result.code in d.REASONS
    else:
        assert isinstance(json.loads(result.data), dict)


@PROPERTY
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(value: bytes) -> None:
    assert_decoded(decode(value, NS, LIMIT))


@PROPERTY
@given(json_values)
def test_arbitrary_json_values_never_raise(value: Any) -> None:
    assert_decoded(decode(json.dumps(value).encode(), NS, LIMIT))


@settings(PROPERTY, max_examples=200)
@given(json_values, st.integers(min_value=1, max_value=200))
def test_any_size_limit_is_respected(value: Any, limit: int) -> None:
    raw = json.dumps(value).encode()
    result = decode(raw, NS, limit)
    assert_decoded(result)
    if len(raw) > limit:
        assert isinstance(result, Rejection)
        assert result.code == d.TOO_LARGE


@PROPERTY
@given(
    fields=st.fixed_dictionaries({name: required_texts for name in d.REQUIRED_FIELDS}),
    extra=st.dictionaries(st.text(max_size=10), json_leaves, max_size=3),
    data=st.none() | json_values,
)
def test_documents_with_required_keys_never_raise_and_keep_their_fields(
    fields: dict[str, str], extra: dict[str, Any], data: Any
) -> None:
    document = {**extra, "specversion": "1.0", **fields, "data": data}
    result = decode(json.dumps(document).encode(), NS, LIMIT)
    assert_decoded(result)
    if isinstance(result, Event):
        assert result.namespace == NS
        assert (result.id, result.source, result.type, result.subject) == (
            fields["id"],
            fields["source"],
            fields["type"],
            fields["subject"],
        )


# Times: aware datetimes with whole-minute offsets, inside the storable range.
offsets = st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
moments = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2105, 12, 31), timezones=offsets
)
identifiers = st.text(min_size=1, max_size=d.MAX_FIELD_CHARS).filter(lambda s: s != "")
data_objects = st.dictionaries(
    st.text(max_size=10),
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=10,
    )
    | st.floats(allow_nan=False, allow_infinity=False),
    max_size=6,
)


def expected_ms(moment: datetime) -> int:
    utc = moment.astimezone(UTC)
    return calendar.timegm(utc.utctimetuple()) * 1000 + utc.microsecond // 1000


@PROPERTY
@given(
    id_=identifiers,
    source=identifiers,
    type_=identifiers,
    subject=identifiers,
    moment=moments,
    data=data_objects,
)
def test_valid_events_round_trip(
    id_: str, source: str, type_: str, subject: str, moment: datetime, data: dict[str, Any]
) -> None:
    document = {
        "specversion": "1.0",
        "id": id_,
        "source": source,
        "type": type_,
        "subject": subject,
        "time": moment.isoformat(),
        "data": data,
    }
    result = decode(json.dumps(document).encode(), NS, 10 * LIMIT)
    assert isinstance(result, Event), result
    assert result == Event(NS, id_, type_, source, subject, expected_ms(moment), result.data)
    assert json.loads(result.data) == data
    assert result.data == orjson.dumps(flat_first(data)).decode()
