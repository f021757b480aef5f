"""Binary content mode: the attributes in `ce_` headers, `data` in the value. Each event gives
what the same event gives in structured mode; each hostile header gives a Rejection."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sink.pipeline import binary
from sink.pipeline import decode as d
from sink.pipeline.binary import binary_mode, decode_binary
from sink.pipeline.decode import Event, Rejection, decode

NS = "acme"
LIMIT = 1024 * 1024
Headers = list[tuple[str, bytes | None]]

ATTRIBUTES = {
    "specversion": "1.0",
    "id": "evt-1",
    "source": "billing/api",
    "type": "api.calls",
    "subject": "customer-42",
    "time": "2024-03-10T12:34:56Z",
}
DATA = {"calls": 3, "path": "/v1/x"}


def headers(**overrides: Any) -> Headers:
    """The `ce_` headers of a valid event; an override replaces an attribute's value (text or
    raw bytes, None for a header without a value), `...` removes its header."""
    out: Headers = []
    for name, value in (ATTRIBUTES | overrides).items():
        if value is ...:
            continue
        out.append((f"ce_{name}", value.encode() if isinstance(value, str) else value))
    return out


def twin(hs: Headers, value: bytes | None) -> bytes:
    """The structured-mode record of the same event."""
    document: dict[str, Any] = {name[3:]: v.decode() for name, v in hs if v is not None}
    if value:
        document["data"] = json.loads(value)
    return json.dumps(document).encode()


def rejected(hs: Headers, value: bytes | None = b"{}", max_bytes: int = LIMIT) -> str:
    result = decode_binary(hs, value, NS, max_bytes)
    assert isinstance(result, Rejection), result
    assert result.code in d.REASONS
    assert result.message
    return result.code


# --- the mode ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hs", "binary"),
    [
        (headers(), True),
        ([("traceparent", b"00-x"), ("ce_specversion", b"0.3")], True),
        ([("ce_specversion", None)], True),
        ([("content-type", b"application/cloudevents+json")], False),
        ([("ce_id", b"x"), ("ce_type", b"t")], False),
        ([("CE_SPECVERSION", b"1.0"), ("specversion", b"1.0")], False),
    ],
)
def test_a_ce_specversion_header_means_binary_mode(hs: Headers, binary: bool) -> None:
    assert binary_mode(hs) is binary


# --- the same event as in structured mode ---------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        {"calls": 3, "path": "/v1/x"},
        {"tags": ["a", {"b": 1}], "calls": 3, "nested": {"x": None}, "ok": True},
        {"text": 'quote " backslash \\ unicode é 漢 \u0000', "ratio": 0.25, "none": None},
        {"u64": 2**64 - 1, "i64": -(2**63), "float": 1.5e300},
        {},
    ],
    ids=["flat", "nested", "escapes", "number edges", "empty object"],
)
def test_binary_event_equals_its_structured_twin(data: dict[str, Any]) -> None:
    hs, value = headers(), json.dumps(data).encode()
    coordinates = ("om_acme_events", 3, 41, 1_700)
    event = decode_binary(hs, value, NS, LIMIT, None, *coordinates)
    assert isinstance(event, Event)
    assert event == decode(twin(hs, value), NS, LIMIT, None, *coordinates)
    assert (event.id, event.source, event.type, event.subject) == (
        "evt-1",
        "billing/api",
        "api.calls",
        "customer-42",
    )
    assert json.loads(event.data) == data


def test_meter_check_sees_what_it_sees_in_structured_mode() -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    def check(event_type: str, data: dict[str, Any]) -> str:
        seen.append((event_type, data))
        return "[m] 'calls' is not a number"

    for data in (DATA, {"nested": [1], "calls": "x"}):
        value = json.dumps(data).encode()
        binary = decode_binary(headers(), value, NS, LIMIT, check)
        structured = decode(twin(headers(), value), NS, LIMIT, check)
        assert binary == structured
        assert isinstance(binary, Event)
        assert binary.validation_error == "[m] 'calls' is not a number"
    assert seen[0] == seen[1] and seen[2] == seen[3]


@pytest.mark.parametrize("value", [None, b"", b"null", b" null "])
@pytest.mark.parametrize("content_type", [None, b"application/json", b"text/plain"])
def test_no_data_is_an_empty_object(value: bytes | None, content_type: bytes | None) -> None:
    hs = headers() + ([("content-type", content_type)] if content_type else [])
    if content_type == b"text/plain" and value:
        assert rejected(hs, value) == d.BAD_DATA  # "null" as text is data, and not JSON
        return
    event = decode_binary(hs, value, NS, LIMIT)
    assert isinstance(event, Event)
    assert event.data == "{}"
    assert event == decode(twin(headers(), None), NS, LIMIT)


@pytest.mark.parametrize(
    "content_type",
    [
        b"application/json",
        b"Application/JSON",
        b"application/json; charset=utf-8",
        b'application/json;charset="UTF-8"',
        b"application/json; charset=utf8",
        b"application/cloudevents+json",
        b"application/vnd.acme.usage+json; charset=utf-8",
        b" application/json ",
        b"",
        None,
    ],
)
@pytest.mark.parametrize("header", ["content-type", "Content-Type"])
def test_json_content_types_are_read_as_json(header: str, content_type: bytes | None) -> None:
    value = json.dumps(DATA).encode()
    event = decode_binary([*headers(), (header, content_type)], value, NS, LIMIT)
    assert event == decode(twin(headers(), value), NS, LIMIT)


@pytest.mark.parametrize(
    "content_type",
    [
        b"text/plain",
        b"application/octet-stream",
        b"application/avro",
        b"text/json",
        b"application/jsonx",
        b"+json",
        b"application/json; charset=iso-8859-1",
        b"application/json; charset=utf-16",
    ],
)
def test_data_that_is_not_json_is_dead_lettered(content_type: bytes) -> None:
    result = decode_binary([*headers(), ("content-type", content_type)], b'{"a": 1}', NS, LIMIT)
    assert isinstance(result, Rejection)
    assert result.code == d.BAD_DATA
    assert content_type.decode().strip() in result.message


def test_other_headers_and_extensions_are_ignored() -> None:
    value = json.dumps(DATA).encode()
    extra: Headers = [
        ("traceparent", b"00-x"),
        ("x-hostile", b"\xff\xfe"),
        ("namespace", None),
        ("ce_traceparent", b"00-y"),
        ("ce_datacontenttype", b"text/plain"),
        ("ce_partitionkey", None),
    ]
    assert decode_binary(extra + headers(), value, NS, LIMIT) == decode(
        twin(headers(), value), NS, LIMIT
    )


def test_field_of_exactly_max_chars_is_accepted() -> None:
    long_id = "é" * d.MAX_FIELD_CHARS  # characters, not bytes
    event = decode_binary(headers(id=long_id), b"", NS, LIMIT)
    assert isinstance(event, Event)
    assert event.id == long_id


# --- rejections -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "specversion", ["0.3", "1", "", " 1.0", "1.0 ", None, b"1.0\x00", b"\xff", b"1.0\xc3"]
)
def test_bad_specversion(specversion: Any) -> None:
    assert rejected(headers(specversion=specversion)) == d.BAD_SPECVERSION


@pytest.mark.parametrize("field", d.REQUIRED_FIELDS)
@pytest.mark.parametrize("value", [..., None, ""], ids=["absent", "no value", "empty"])
def test_missing_or_empty_attribute_header(field: str, value: Any) -> None:
    assert rejected(headers(**{field: value})) == d.MISSING_FIELD


@pytest.mark.parametrize("field", ["id", "source", "type", "subject"])
def test_attribute_header_too_long(field: str) -> None:
    assert rejected(headers(**{field: "x" * (d.MAX_FIELD_CHARS + 1)})) == d.FIELD_TOO_LONG


@pytest.mark.parametrize(
    "text",
    [
        "yesterday",
        "2024-02-30T00:00:00Z",
        "2024-03-10T12:34:56",
        "2024-03-10T12:34:56+0200",
        "1969-12-31T23:59:59Z",
        "2106-02-07T06:28:16Z",
        "1710074096",
    ],
)
def test_bad_time_header(text: str) -> None:
    assert rejected(headers(time=text)) == d.BAD_TIME


@pytest.mark.parametrize("field", [*d.REQUIRED_FIELDS, "traceparent"])
@pytest.mark.parametrize(
    "raw",
    [b"\xff", b"evt-\xc3", b"\xed\xa0\x80", b"\xc0\xaf"],
    ids=["ff", "cut", "surrogate", "overlong"],
)
def test_attribute_header_not_utf8(field: str, raw: bytes) -> None:
    result = decode_binary(headers(**{field: raw}), b"{}", NS, LIMIT)
    assert result == Rejection(d.BAD_HEADER, f"header 'ce_{field}' is not UTF-8 text")


def test_content_type_not_utf8() -> None:
    assert rejected([*headers(), ("content-type", b"application/\xffjson")]) == d.BAD_HEADER


@pytest.mark.parametrize("field", [*ATTRIBUTES, "traceparent"])
@pytest.mark.parametrize("second", [b"other", b"same", None])
def test_attribute_header_twice(field: str, second: bytes | None) -> None:
    hs = headers(traceparent="same") if field == "traceparent" else headers()
    first = dict(hs)[f"ce_{field}"]
    repeat = first if second == b"same" else second
    result = decode_binary([*hs, (f"ce_{field}", repeat)], b"{}", NS, LIMIT)
    assert result == Rejection(d.BAD_HEADER, f"header 'ce_{field}' appears more than once")


def test_content_type_twice_in_any_case() -> None:
    hs = [*headers(), ("content-type", b"application/json"), ("Content-Type", b"application/json")]
    assert rejected(hs) == d.BAD_HEADER


def test_size_counts_the_value_and_the_event_headers() -> None:
    hs, value = headers(), json.dumps(DATA).encode()
    size = len(value) + sum(len(v or b"") for _, v in hs)
    assert isinstance(decode_binary(hs, value, NS, size), Event)
    assert rejected(hs, value, max_bytes=size - 1) == d.TOO_LARGE
    # Other headers are not part of the event.
    assert isinstance(decode_binary([("x", b"y" * 100), *hs], value, NS, size), Event)


def test_oversized_header_is_too_large_whatever_else_is_wrong() -> None:
    huge = "x" * (2 * LIMIT)
    assert rejected(headers(traceparent=huge, id=...)) == d.TOO_LARGE
    assert rejected(headers(id=huge)) == d.TOO_LARGE
    assert rejected([*headers(), ("ce_id", b"\xff" * LIMIT)]) == d.TOO_LARGE


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (b"{", d.INVALID_JSON),
        (b"not json", d.INVALID_JSON),
        (b'{"a": NaN}', d.INVALID_JSON),
        (b'{"a": 1e400}', d.INVALID_JSON),
        (b'{"a": "\xff"}', d.INVALID_JSON),
        (b'{"a": "\\ud800"}', d.INVALID_JSON),
        (b"{} {}", d.INVALID_JSON),
        (b"[1, 2]", d.BAD_DATA),
        (b'"text"', d.BAD_DATA),
        (b"42", d.BAD_DATA),
        (b"true", d.BAD_DATA),
        (b'{"a": 18446744073709551616}', d.BAD_DATA),
        (b'{"a":' * 300 + b"1" + b"}" * 300, d.BAD_DATA),
    ],
)
def test_json_data_follows_the_rules_of_structured_mode(value: bytes, code: str) -> None:
    assert rejected(headers(), value) == code


def test_invalid_json_message_is_bounded() -> None:
    result = decode_binary(headers(), b"{" + b'"a":1,' * 100_000, NS, 10**7)
    assert isinstance(result, Rejection)
    assert result.code == d.INVALID_JSON
    assert len(result.message) <= 500


def test_checks_run_in_a_fixed_order() -> None:
    """The first failing check decides the code, as in structured mode."""
    bad = [("ce_id", b"\xff"), ("ce_id", b"x")]
    assert rejected([*headers(specversion="0.3"), *bad], max_bytes=10) == d.TOO_LARGE
    assert rejected([*headers(specversion="0.3"), ("ce_x", b"1"), ("ce_x", b"2")]) == d.BAD_HEADER
    assert rejected(headers(specversion="0.3", x=b"\xff")) == d.BAD_HEADER
    assert rejected(headers(specversion="0.3", id=b"\xff")) == d.BAD_SPECVERSION
    assert rejected(headers(id=..., source=b"\xff", time="nope")) == d.MISSING_FIELD
    assert rejected(headers(id=b"\xff", source="x" * 2000)) == d.BAD_HEADER
    assert rejected(headers(source="x" * 2000, time="nope")) == d.FIELD_TOO_LONG
    ct = [("content-type", b"\xff")]
    assert rejected([*headers(time="nope"), *ct], b"[]") == d.BAD_TIME
    assert rejected([*headers(), *ct], b"[]") == d.BAD_HEADER
    assert rejected([*headers(), ("content-type", b"text/plain")], b"[") == d.BAD_DATA


def test_nested_data_is_read_by_the_typed_path(monkeypatch: pytest.MonkeyPatch) -> None:
    data = {"usage": {"in": 1, "out": [2, 3]}, "n": 1, "tags": ["a"]}
    value = json.dumps(data).encode()
    monkeypatch.setattr(binary, "_binary_data_general", None)
    event = decode_binary(headers(), value, NS, LIMIT)
    assert isinstance(event, Event)
    assert event.data == '{"n":1,"usage":{"in":1,"out":[2,3]},"tags":["a"]}'
