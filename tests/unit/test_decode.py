"""Decoding one record value: every input gives an Event or a Rejection with the right code."""

from __future__ import annotations

import calendar
import json
from typing import Any

import orjson
import pytest

from sink.pipeline import decode as d
from sink.pipeline.decode import Event, Rejection, decode
from tests.items import flat_first

NS = "acme"
LIMIT = 1024 * 1024


def doc(**overrides: Any) -> dict[str, Any]:
    """A valid CloudEvent; `overrides` replace fields, a value of `...` removes the field."""
    base: dict[str, Any] = {
        "specversion": "1.0",
        "id": "evt-1",
        "source": "billing/api",
        "type": "api.calls",
        "subject": "customer-42",
        "time": "2024-03-10T12:34:56Z",
        "data": {"calls": 3, "path": "/v1/x"},
    }
    for key, value in overrides.items():
        if value is ...:
            base.pop(key, None)
        else:
            base[key] = value
    return base


def encode(document: Any) -> bytes:
    return json.dumps(document).encode()


def utc_ms(year: int, month: int, day: int, hh: int = 0, mm: int = 0, ss: int = 0) -> int:
    """Epoch milliseconds of a UTC wall-clock time, computed without datetime arithmetic."""
    return calendar.timegm((year, month, day, hh, mm, ss, 0, 0, 0)) * 1000


def rejected(value: bytes | None, max_bytes: int = LIMIT) -> str:
    result = decode(value, NS, max_bytes)
    assert isinstance(result, Rejection), result
    assert result.code in d.REASONS
    assert result.message
    return result.code


# --- valid events ---------------------------------------------------------------------------


def test_valid_event_has_every_field() -> None:
    event = decode(encode(doc()), NS, LIMIT)
    assert event == Event(
        namespace=NS,
        id="evt-1",
        type="api.calls",
        source="billing/api",
        subject="customer-42",
        time_ms=utc_ms(2024, 3, 10, 12, 34, 56),
        data='{"calls":3,"path":"/v1/x"}',
    )


@pytest.mark.parametrize(
    "data", [{"calls": 3}, {"tags": ["a"], "calls": 3}], ids=["flat", "nested (general path)"]
)
def test_event_carries_the_record_coordinates_given(data: dict[str, Any]) -> None:
    event = decode(encode(doc(data=data)), NS, LIMIT, None, "om_acme_events", 3, 41, 1_700)
    assert isinstance(event, Event)
    assert (event.topic, event.partition, event.offset, event.timestamp_ms) == (
        "om_acme_events",
        3,
        41,
        1_700,
    )
    assert event[:8] == decode(encode(doc(data=data)), NS, LIMIT)[:8]


@pytest.mark.parametrize("data", [..., None], ids=["absent", "null"])
def test_event_without_data_stores_an_empty_object(data: Any) -> None:
    event = decode(encode(doc(data=data)), NS, LIMIT)
    assert isinstance(event, Event)
    assert event.data == "{}"


def test_extension_attributes_are_ignored() -> None:
    event = decode(encode(doc(datacontenttype="application/json", traceparent="00-x")), NS, LIMIT)
    assert isinstance(event, Event)
    assert event.id == "evt-1"


def test_nested_data_is_reserialised_as_compact_json_equal_to_the_input() -> None:
    data = {
        "tokens": 123456789012,
        "ratio": 0.25,
        "ok": True,
        "none": None,
        "tags": ["a", "b", {"deep": [1, 2, 3]}],
        "text": 'quote " backslash \\ unicode é 漢 \u0000 newline \n',
        "nested": {"a": {"b": {"c": -1}}},
        "u64": 2**64 - 1,
        "i64": -(2**63),
    }
    event = decode(encode(doc(data=data)), NS, LIMIT)
    assert isinstance(event, Event)
    assert json.loads(event.data) == data
    # Top-level scalars first (ClickHouse 18.16 reads the first match of a property name).
    assert event.data == json.dumps(flat_first(data), separators=(",", ":"), ensure_ascii=False)
    assert list(json.loads(event.data))[-2:] == ["tags", "nested"]


@pytest.mark.parametrize(
    "data",
    [
        {"usage": {"in": 1, "out": [2, 3]}, "n": 1, "tags": ["a"], "model": "m"},
        {"n": 1, "deep": {"a": {"b": {"c": [None, True, 1.5, "x"]}}}},
        {"u64": [2**64 - 1], "i64": {"min": -(2**63)}, "flag": False},
    ],
)
def test_nested_data_is_read_by_the_typed_path(
    data: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nested `data` costs one typed read, not the general path's parse and checks."""
    general = d._decode_general
    monkeypatch.setattr(d, "_decode_general", None)
    event = decode(encode(doc(data=data)), NS, LIMIT)
    monkeypatch.setattr(d, "_decode_general", general)
    assert event == d._decode_general(encode(doc(data=data)), NS, None)
    assert isinstance(event, Event)
    assert event.data == json.dumps(flat_first(data), separators=(",", ":"))


@pytest.mark.parametrize(
    "data",
    [
        '{"a": [18446744073709551616]}',
        '{"n": 1, "a": {"b": -9223372036854775809}}',
        '{"a": ' * 300 + "1" + "}" * 300,
        '{"a": ' + "[" * 1100 + "]" * 1100 + ', "a": 1}',
        '{"a": [1e400]}',
    ],
    ids=["65-bit", "below int64", "deeper than orjson writes", "deeper than orjson reads", "inf"],
)
def test_nested_data_the_general_path_refuses_is_refused(data: str) -> None:
    raw = json.dumps(doc(data="@")).replace('"@"', data).encode()
    result = decode(raw, NS, LIMIT)
    assert isinstance(result, Rejection)
    assert result == d._decode_general(raw, NS, None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-03-10T12:34:56Z", utc_ms(2024, 3, 10, 12, 34, 56)),
        ("2024-03-10T12:34:56+00:00", utc_ms(2024, 3, 10, 12, 34, 56)),
        ("2024-03-10T12:34:56-00:00", utc_ms(2024, 3, 10, 12, 34, 56)),
        ("2024-03-10T12:34:56+02:00", utc_ms(2024, 3, 10, 10, 34, 56)),
        ("2024-03-10T01:00:00+05:30", utc_ms(2024, 3, 9, 19, 30, 0)),
        ("2024-03-10T23:30:00-08:00", utc_ms(2024, 3, 11, 7, 30, 0)),
        ("2024-03-10T12:34:56.789Z", utc_ms(2024, 3, 10, 12, 34, 56) + 789),
        ("2024-03-10T12:34:56.7Z", utc_ms(2024, 3, 10, 12, 34, 56) + 700),
        ("2024-03-10T12:34:56.123456Z", utc_ms(2024, 3, 10, 12, 34, 56) + 123),
        ("2024-03-10T12:34:56.999999999Z", utc_ms(2024, 3, 10, 12, 34, 56) + 999),
        ("2024-03-10T12:34:56.5+01:00", utc_ms(2024, 3, 10, 11, 34, 56) + 500),
        ("2024-03-10 12:34:56Z", utc_ms(2024, 3, 10, 12, 34, 56)),
        ("2024-03-10t12:34:56Z", utc_ms(2024, 3, 10, 12, 34, 56)),
        ("1970-01-01T00:00:00Z", 0),
        ("1970-01-01T01:00:00+01:00", 0),
        ("2106-02-07T06:28:15Z", (2**32 - 1) * 1000),
    ],
)
def test_time_is_epoch_milliseconds(text: str, expected: int) -> None:
    event = decode(encode(doc(time=text)), NS, LIMIT)
    assert isinstance(event, Event), event
    assert event.time_ms == expected


def test_namespace_comes_from_the_caller() -> None:
    event = decode(encode(doc()), "other-ns", LIMIT)
    assert isinstance(event, Event)
    assert event.namespace == "other-ns"


def test_record_of_exactly_max_bytes_is_accepted() -> None:
    value = encode(doc())
    assert isinstance(decode(value, NS, len(value)), Event)


def test_field_of_exactly_max_chars_is_accepted() -> None:
    long_id = "x" * d.MAX_FIELD_CHARS
    event = decode(encode(doc(id=long_id)), NS, LIMIT)
    assert isinstance(event, Event)
    assert event.id == long_id


# --- rejections -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, b""])
def test_empty_value(value: bytes | None) -> None:
    assert rejected(value) == d.EMPTY


def test_oversized_value() -> None:
    value = encode(doc())
    assert rejected(value, max_bytes=len(value) - 1) == d.TOO_LARGE


@pytest.mark.parametrize(
    "value",
    [
        b"{",
        b"not json",
        b'{"id": "a",}',
        b"{'id': 'a'}",
        b'{"a": NaN}',
        b"NaN",
        b'{"a": Infinity}',
        b'{"a": 1e400}',
        b'{"id": "\xff\xfe"}',
        b"\xff",
        b'{"a": "\\ud800"}',
        b"{} {}",
    ],
    ids=[
        "truncated",
        "garbage",
        "trailing-comma",
        "single-quotes",
        "nan-in-object",
        "nan-literal",
        "infinity",
        "overflowing-float",
        "invalid-utf8-in-string",
        "invalid-utf8",
        "lone-surrogate-escape",
        "two-documents",
    ],
)
def test_invalid_json(value: bytes) -> None:
    assert rejected(value) == d.INVALID_JSON


@pytest.mark.parametrize("value", [b"[]", b"[1, 2]", b'"text"', b"42", b"1.5", b"true", b"null"])
def test_not_an_object(value: bytes) -> None:
    assert rejected(value) == d.NOT_OBJECT


@pytest.mark.parametrize("specversion", [..., "0.3", "1", 1.0, 1, None, "", " 1.0"])
def test_bad_specversion(specversion: Any) -> None:
    assert rejected(encode(doc(specversion=specversion))) == d.BAD_SPECVERSION


@pytest.mark.parametrize("field", d.REQUIRED_FIELDS)
@pytest.mark.parametrize("value", [..., None, ""], ids=["absent", "null", "empty"])
def test_missing_or_empty_required_field(field: str, value: Any) -> None:
    assert rejected(encode(doc(**{field: value}))) == d.MISSING_FIELD


@pytest.mark.parametrize("field", d.REQUIRED_FIELDS)
@pytest.mark.parametrize("value", [42, 0, 1.5, True, False, ["a"], {"a": "b"}, []])
def test_required_field_of_wrong_type(field: str, value: Any) -> None:
    assert rejected(encode(doc(**{field: value}))) == d.WRONG_TYPE


@pytest.mark.parametrize("field", ["id", "source", "type", "subject"])
def test_field_too_long(field: str) -> None:
    value = "x" * (d.MAX_FIELD_CHARS + 1)
    assert rejected(encode(doc(**{field: value}))) == d.FIELD_TOO_LONG


def test_field_length_counts_characters_not_bytes() -> None:
    value = "é" * d.MAX_FIELD_CHARS  # 2 bytes each in UTF-8, still within the char limit
    event = decode(encode(doc(subject=value)), NS, LIMIT)
    assert isinstance(event, Event)
    assert event.subject == value


@pytest.mark.parametrize(
    "text",
    [
        "yesterday",
        "2024-13-01T00:00:00Z",
        "2024-02-30T00:00:00Z",
        "2024-03-10T25:00:00Z",
        "2024-03-10T12:34:56+24:00",
        "2024/03/10 12:34:56Z",
        "1710074096",
        "2024-03-10T12:34:56 UTC",
    ],
)
def test_time_not_rfc3339(text: str) -> None:
    assert rejected(encode(doc(time=text))) == d.BAD_TIME


@pytest.mark.parametrize("text", ["2024-03-10T12:34:56", "2024-03-10T12:34:56.789", "2024-03-10"])
def test_time_without_offset(text: str) -> None:
    assert rejected(encode(doc(time=text))) == d.BAD_TIME


@pytest.mark.parametrize(
    "text",
    [
        "1969-12-31T23:59:59Z",
        "1969-12-31T23:59:59.999Z",
        "1970-01-01T00:30:00+01:00",
        "0001-01-01T00:00:00+01:00",
        "0001-01-01T00:00:00Z",
        "2106-02-07T06:28:15.001Z",
        "2106-02-07T06:28:16Z",
        "2200-01-01T00:00:00Z",
        "9999-12-31T23:59:59-01:00",
    ],
)
def test_time_out_of_range(text: str) -> None:
    assert rejected(encode(doc(time=text))) == d.BAD_TIME


@pytest.mark.parametrize("data", [[], [1, 2], "text", "", 0, 1.5, True, False])
def test_data_not_an_object(data: Any) -> None:
    assert rejected(encode(doc(data=data))) == d.BAD_DATA


def test_checks_run_in_a_fixed_order() -> None:
    """The first failing check decides the code, so dead-letter reasons are stable."""
    assert rejected(encode(doc(specversion="0.3", id=...))) == d.BAD_SPECVERSION
    assert rejected(encode(doc(id=..., time="nope"))) == d.MISSING_FIELD
    assert rejected(encode(doc(time="nope", data=[]))) == d.BAD_TIME


def test_oversized_is_checked_before_parsing() -> None:
    assert rejected(b"not json at all", max_bytes=4) == d.TOO_LARGE


def test_invalid_json_message_is_bounded() -> None:
    result = decode(b"{" + b'"a":1,' * 100_000, NS, 10**7)
    assert isinstance(result, Rejection)
    assert result.code == d.INVALID_JSON
    assert len(result.message) <= 500


# --- numbers beyond 64 bits -----------------------------------------------------------------

# Integers orjson cannot hold in i64/u64; chosen so that no float equals them exactly.
BIG_INTS = [2**64 + 1, -(2**63) - 1, 10**30 + 7]


@pytest.mark.parametrize("number", BIG_INTS)
def test_integer_beyond_64_bits_in_data_is_decoded_or_rejected_never_raises(number: int) -> None:
    result = decode(encode(doc(data={"value": number})), NS, LIMIT)
    assert isinstance(result, (Event, Rejection))
    if isinstance(result, Rejection):
        assert result.code in (d.INVALID_JSON, d.BAD_DATA)
    else:
        json.loads(result.data)  # still valid JSON


@pytest.mark.parametrize("number", BIG_INTS)
def test_integer_beyond_64_bits_in_top_level_field_never_raises(number: int) -> None:
    result = decode(encode(doc(id=number)), NS, LIMIT)
    assert isinstance(result, Rejection)
    assert result.code in (d.INVALID_JSON, d.BAD_DATA, d.WRONG_TYPE)


@pytest.mark.parametrize("number", BIG_INTS)
def test_integer_beyond_64_bits_in_data_is_never_silently_changed(number: int) -> None:
    result = decode(encode(doc(data={"value": number})), NS, LIMIT)
    if isinstance(result, Event):
        assert json.loads(result.data) == {"value": number}


def test_orjson_behaviour_on_big_integers_is_what_decode_relies_on() -> None:
    """Pins the parser behaviour the tests above were written against."""
    assert orjson.loads(str(2**64 - 1)) == 2**64 - 1
    assert orjson.loads(str(-(2**63))) == -(2**63)
    assert isinstance(orjson.loads(str(2**64 + 1)), float)


# --- deep nesting ---------------------------------------------------------------------------


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


@pytest.mark.parametrize("depth", [1, 100, 254])
def test_nested_data_within_serialiser_limit_is_kept(depth: int) -> None:
    raw = json.dumps(doc(data="@")).replace('"@"', nested(depth)).encode()
    event = decode(raw, NS, LIMIT)
    assert isinstance(event, Event)
    assert event.data == nested(depth)


@pytest.mark.parametrize("depth", [1024, 5000])
def test_nesting_beyond_parser_limit_is_invalid_json(depth: int) -> None:
    raw = json.dumps(doc(data="@")).replace('"@"', nested(depth)).encode()
    assert rejected(raw) == d.INVALID_JSON


@pytest.mark.parametrize("depth", [255, 600, 1023])
def test_data_nested_deeper_than_serialiser_limit_is_rejected_not_raised(depth: int) -> None:
    raw = json.dumps(doc(data="@")).replace('"@"', nested(depth)).encode()
    result = decode(raw, NS, LIMIT)
    assert isinstance(result, Rejection)
    assert result.code in (d.BAD_DATA, d.INVALID_JSON)


# --- RFC 3339 conformance -------------------------------------------------------------------


@pytest.mark.parametrize("text", ["2024-03-10T12:34:56z", "2024-03-10t12:34:56z"])
def test_lower_case_z_is_rfc3339(text: str) -> None:
    event = decode(encode(doc(time=text)), NS, LIMIT)
    assert isinstance(event, Event)
    assert event.time_ms == utc_ms(2024, 3, 10, 12, 34, 56)


@pytest.mark.parametrize(
    "text",
    [
        "20240310T123456Z",
        "2024-W10-7T12:34:56Z",
        "2024-03-10T12:34Z",
        "2024-03-10T12:34:56+0200",
        "2024-03-10T12Z",
        "2024-03-10x12:34:56Z",
        "2024-03-10T12:34:56,5Z",
        "2024-03-10T12:34:56+02",
        "2024-03-10T12:34:56+02:00:30",
    ],
)
def test_iso8601_forms_outside_rfc3339_are_rejected(text: str) -> None:
    assert rejected(encode(doc(time=text))) == d.BAD_TIME
