"""Property tests: decode never raises, whatever the input, and keeps what it accepts."""

from __future__ import annotations

import calendar
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sink.pipeline import binary
from sink.pipeline import decode as d
from sink.pipeline.decode import Event, Rejection, decode
from tests.items import flat_first

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


# The typed fast path and the general path must agree on every input. Documents are built
# near the common shape (where the two could part) and then varied: other member types,
# bounds, unknown members, repeated members, lone surrogates, numbers beyond 64 bits, cut or
# corrupted bytes.
any_text = st.text(alphabet=st.characters(codec=None, categories=None), max_size=12)
near_keys = (
    identifiers.filter(lambda s: len(s) < 40)
    | st.text(min_size=d.MAX_FIELD_CHARS, max_size=d.MAX_FIELD_CHARS + 1)
    | st.just("")
    | any_text
)
near_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1])
    | st.floats()
    | any_text
)
near_values = near_keys | near_leaves | st.lists(near_leaves, max_size=2)
near_data = (
    st.none()
    | st.dictionaries(any_text, near_leaves, max_size=5)
    | st.dictionaries(st.text(max_size=4), near_values, max_size=3)
    | near_leaves
)
near_times = moments.map(lambda m: m.isoformat()) | st.sampled_from(
    [
        "",
        "2024-01-01T00:00:00",
        "2024-01-01 00:00:00Z",
        "2024-02-30T00:00:00Z",
        "1969-12-31T23:59:59.9Z",
    ]
)
flat_data = st.dictionaries(
    st.text(max_size=8),
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(-1e300, 1e300)
    | st.text(max_size=12),
    max_size=5,
)
common = st.fixed_dictionaries(
    {
        "specversion": st.just("1.0"),
        "id": identifiers.filter(lambda s: len(s) < 40),
        "source": st.sampled_from(["//gw/eu", "s"]),
        "type": st.sampled_from(["api.request", "llm.tokens"]),
        "subject": st.text(min_size=1, max_size=8),
        "time": moments.map(lambda m: m.isoformat()),
    },
    optional={"data": st.none() | flat_data, "datacontenttype": st.just("application/json")},
)
# Variations: a member set to a value near the bounds of the fast path, or removed.
variations = st.lists(
    st.tuples(
        st.sampled_from(
            [*d.REQUIRED_FIELDS, "specversion", "data", "datacontenttype", "dataschema", "ext"]
        ),
        st.none()
        | st.tuples(
            near_keys | near_values | near_times | near_data | st.sampled_from(["1.0", "0.3", 1.0])
        ),
    ),
    max_size=2,
)
# Member values written as JSON text: numbers and escapes that one parser might read and the
# other refuse, or that a parser skipping an unknown member might not look at.
SNIPPETS = [
    "1e400",
    "-1e400",
    "NaN",
    '"\\ud800"',
    '"x\\udc00"',
    '"\\u0000"',
    "123456789012345678901234567890",
    "18446744073709551616",
    "18446744073709551615",
    "9223372036854775808",
    "-9223372036854775809",
    '{"a": 1e400}',
    '{"a": 18446744073709551616}',
    '{"a": 18446744073709551615, "b": 1}',
    '{"a": 9223372036854775808}',
    '{"a": -9223372036854775809}',
    '{"a": -9223372036854775808, "b": 1.5e300}',
    '{"a": "\\ud800"}',
    '{"a": {"b": 1}}',
    '{"a": [1e400]}',
    '{"a": 1, "a": 2}',
    "[1e400]",
    '""',
    "null",
    "true",
    '"1.0"',
    "1.0",
    "-0",
    "1E+2",
    # Nested data, read whole by the typed path: numbers orjson reads or writes otherwise,
    # nesting beyond what orjson writes (254) or reads (1024), or what msgspec reads.
    '{"a": [18446744073709551616]}',
    '{"a": {"b": -9223372036854775809}}',
    '[{"a": 18446744073709551615}, -9223372036854775808]',
    '{"a": [1e19, 1.0e19, 10000000000000000000]}',
    '{"a": [9223372036854775808.0, -9223372036854775808.5]}',
    '{"a": [1e-400, 4.9e-324, 2.2250738585072011e-308]}',
    '{"a": [{"b": "\\u0000\\ud83d\\ude00"}]}',
    "[" * 20 + "1" + "]" * 20,
    '{"a": ' * 254 + "1" + "}" * 254,
    '{"a": ' * 255 + "1" + "}" * 255,
    "[" * 1100 + "]" * 1100,
    '{"a": ' * 3000 + "1" + "}" * 3000,
]
snippets = st.sampled_from(SNIPPETS)
raw_members = st.lists(
    st.tuples(st.sampled_from(["ext", "data", "data", "id", "time", "datacontenttype"]), snippets),
    max_size=2,
)


def general(value: bytes, check: d.MeterCheck) -> Event | Rejection:
    if not value or len(value) > LIMIT:
        return decode(value, NS, LIMIT)
    return d._decode_general(value, NS, check)


def meters(event_type: str, data: dict[str, Any]) -> str:
    return f"[{event_type[:3]}] {sorted(data)!r}"


@settings(PROPERTY, max_examples=1500)
@given(
    document=common,
    changes=variations,
    raw=raw_members,
    repeat=st.sampled_from([None, "id", "data", "time"]),
    ascii_only=st.booleans(),
    damage=st.none() | st.tuples(st.integers(min_value=0), st.binary(min_size=0, max_size=2)),
)
def test_fast_path_agrees_with_the_general_path(
    document: dict[str, Any],
    changes: list[tuple[str, tuple[Any] | None]],
    raw: list[tuple[str, str]],
    repeat: str | None,
    ascii_only: bool,
    damage: tuple[int, bytes] | None,
) -> None:
    for member, change in changes:
        if change is None:
            document.pop(member, None)
        else:
            document[member] = change[0]
    text = json.dumps(document, ensure_ascii=ascii_only)
    if repeat is not None and repeat in document:
        # The same member twice; the general path keeps the last.
        text = text[:-1] + f", {json.dumps(repeat)}: {json.dumps(document[repeat])}}}"
        text = "{" + f"{json.dumps(repeat)}: 5, " + text[1:]
    for member, snippet in raw:
        # Written last, so it is the value both parsers keep.
        text = text[:-1] + f', "{member}": {snippet}}}'
    value = text.encode("utf-8", "surrogatepass")
    if damage is not None:
        at = damage[0] % (len(value) + 1)
        value = value[:at] + damage[1] + value[at + len(damage[1]) :]
    assert decode(value, NS, LIMIT, meters) == general(value, meters)


BASE = (
    '{"specversion": "1.0", "id": "e-1", "source": "//gw/eu", "type": "api.request", '
    '"subject": "c-1", "time": "2024-05-01T12:00:00.5Z", "data": {"route": "/v1", "n": 3}}'
)


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[snippet[:32] for snippet in SNIPPETS])
@pytest.mark.parametrize(
    "member", ["ext", "data", "data.a", "id", "time", "specversion", "datacontenttype"]
)
def test_fast_path_agrees_on_every_edge_value_in_every_member(member: str, snippet: str) -> None:
    if member == "data.a":
        text = BASE[:-2] + f', "a": {snippet}}}}}'
    else:
        text = BASE[:-1] + f', "{member}": {snippet}}}'
    value = text.encode()
    assert decode(value, NS, LIMIT, meters) == general(value, meters)


# Binary content mode: an event whose attributes are headers and whose value is `data` must
# decode to what the same event decodes to in structured mode.
json_content_types = st.sampled_from(
    [None, b"application/json", b"application/json; charset=utf-8", b"application/x+json"]
)
extension_headers = st.lists(
    st.tuples(st.sampled_from(["ce_traceparent", "ce_x", "traceparent", "key"]), st.binary()),
    max_size=3,
    unique_by=lambda header: header[0],
)


@PROPERTY
@given(
    id_=identifiers,
    source=identifiers,
    type_=identifiers,
    subject=identifiers,
    moment=moments,
    data=st.none() | data_objects,
    content_type=json_content_types,
    extensions=extension_headers,
    ascii_only=st.booleans(),
)
def test_a_binary_event_decodes_as_its_structured_twin(
    id_: str,
    source: str,
    type_: str,
    subject: str,
    moment: datetime,
    data: dict[str, Any] | None,
    content_type: bytes | None,
    extensions: list[tuple[str, bytes]],
    ascii_only: bool,
) -> None:
    attributes = {
        "specversion": "1.0",
        "id": id_,
        "source": source,
        "type": type_,
        "subject": subject,
        "time": moment.isoformat(),
    }
    headers = [(f"ce_{name}", text.encode()) for name, text in attributes.items()]
    headers += [("content-type", content_type)] if content_type is not None else []
    headers += [(name, value) for name, value in extensions if not name.startswith("ce_")]
    value = b"" if data is None else json.dumps(data, ensure_ascii=ascii_only).encode()
    structured = json.dumps(attributes | ({} if data is None else {"data": data})).encode()
    coordinates = ("om_ns_events", 1, 7, 99)
    event = binary.decode_binary(headers, value, NS, 10 * LIMIT, meters, *coordinates)
    assert isinstance(event, Event), event
    assert event == decode(structured, NS, 10 * LIMIT, meters, *coordinates)


header_names = st.sampled_from(
    [f"ce_{name}" for name in ("specversion", *d.REQUIRED_FIELDS, "x")]
    + ["content-type", "Content-Type", "x"]
) | st.text(max_size=6)
header_values = (
    st.none()
    | st.binary(max_size=12)
    | st.sampled_from(["1.0", "", "2024-01-01T00:00:00Z", "application/json", "text/plain"]).map(
        str.encode
    )
    | st.text(max_size=12).map(lambda s: s.encode("utf-8", "surrogatepass"))
)


@PROPERTY
@given(
    headers=st.lists(st.tuples(header_names, header_values), max_size=10),
    value=st.none() | st.binary(max_size=40) | json_values.map(lambda v: json.dumps(v).encode()),
    limit=st.integers(min_value=1, max_value=400),
)
def test_arbitrary_headers_never_raise(
    headers: list[tuple[str, bytes | None]], value: bytes | None, limit: int
) -> None:
    headers = [("ce_specversion", b"1.0"), *headers]
    result = binary.decode_binary(headers, value, NS, limit)
    assert_decoded(result)
    if isinstance(result, Event):
        assert json.loads(result.data) == json.loads(value or b"null") or result.data == "{}"


@settings(PROPERTY, max_examples=1000)
@given(
    data=near_data | json_values,
    raw=st.lists(st.tuples(st.sampled_from(["a", "b"]), snippets), max_size=2),
    damage=st.none() | st.tuples(st.integers(min_value=0), st.binary(min_size=0, max_size=2)),
)
def test_binary_data_fast_path_agrees_with_the_general_path(
    data: Any, raw: list[tuple[str, str]], damage: tuple[int, bytes] | None
) -> None:
    text = json.dumps(data)
    if text.startswith("{"):
        for member, snippet in raw:
            text = text[:-1] + (", " if text != "{}" else "") + f'"{member}": {snippet}}}'
    value = text.encode("utf-8", "surrogatepass")
    if damage is not None:
        at = damage[0] % (len(value) + 1)
        value = value[:at] + damage[1] + value[at + len(damage[1]) :]
    if value:
        assert binary._binary_data(value, None) == binary._binary_data_general(value)
