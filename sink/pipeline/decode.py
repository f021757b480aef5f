"""Decode and validate one Kafka record value as a CloudEvents 1.0 JSON event (the structured
content mode of the CloudEvents Kafka binding; the binary mode is sink.pipeline.binary's).

Every input gives either an `Event` or a `Rejection` (the dead-letter reason); decoding never
raises. One parse per record in the usual case: a typed msgspec decoder reads the common shape
(the CloudEvents fields as strings, a flat `data` object) straight into a struct, and a second
one the same shape with objects and arrays in `data`; anything else, valid or not, is read
again by the general path (orjson), which alone decides rejections. The typed path accepts
only documents that the general path accepts, with the same result (property tests hold the
two together).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from sys import intern
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
import orjson
from ciso8601 import parse_rfc3339

REQUIRED_FIELDS = ("id", "source", "type", "subject", "time")
MAX_FIELD_CHARS = 1024
"""id, source, type and subject are keys and labels, not payload: bounded."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# DateTime on every supported ClickHouse version stores unsigned 32-bit seconds.
_MIN_TIME_MS = 0
_MAX_TIME_MS = (2**32 - 1) * 1000


class Event(NamedTuple):
    """A valid event, ready to be a row, with the Kafka coordinates of its record (zero and
    empty when it was decoded without them)."""

    namespace: str
    id: str
    type: str
    source: str
    subject: str
    time_ms: int
    data: str
    """The `data` object as compact JSON text, top-level scalars first. (Text, not the
    serialiser's bytes: orjson's bytes objects keep a buffer of about 4 KB each.)"""
    validation_error: str = ""
    """Why a meter of this event's type cannot read it (`[slug] reason; ...`), else ''."""
    topic: str = ""
    partition: int = 0
    offset: int = 0
    timestamp_ms: int = 0
    """The record's Kafka timestamp."""


class Rejection(NamedTuple):
    """Why a record cannot be stored; becomes dead-letter headers."""

    code: str
    message: str


# Dead-letter reason codes; metric label values come only from this set.
TOO_LARGE = "too_large"
EMPTY = "empty"
INVALID_JSON = "invalid_json"
NOT_OBJECT = "not_object"
BAD_SPECVERSION = "bad_specversion"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
FIELD_TOO_LONG = "field_too_long"
BAD_TIME = "bad_time"
BAD_DATA = "bad_data"
BAD_HEADER = "bad_header"
REJECTED_BY_CLICKHOUSE = "rejected_by_clickhouse"
REASONS = (
    TOO_LARGE,
    EMPTY,
    INVALID_JSON,
    NOT_OBJECT,
    BAD_SPECVERSION,
    MISSING_FIELD,
    WRONG_TYPE,
    FIELD_TOO_LONG,
    BAD_TIME,
    BAD_DATA,
    BAD_HEADER,
    REJECTED_BY_CLICKHOUSE,
)


MeterCheck = Callable[[str, dict[str, Any]], str]
"""(event type, data) -> '' or the reasons meters cannot read the event."""


_Key = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_FIELD_CHARS)]
# orjson reads integers beyond 64 bits as floats, and the general path rejects them (msgspec
# bounds stop at int64: the rare unsigned ones beyond it go the general way too).
_Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
FlatData = dict[str, str | _Int64 | float | bool | None]
"""The usual `data`, as the typed path reads it first."""


class _Common(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """The usual event, checked while it is read: every member is typed and bounded, so
    nothing is skipped unparsed (an unknown member, which the general path would parse,
    sends the record there, as does any value out of these bounds)."""

    specversion: Literal["1.0"]
    id: _Key
    source: _Key
    type: _Key
    subject: _Key
    time: Annotated[str, msgspec.Meta(min_length=1)]
    data: FlatData | None = None
    datacontenttype: str | None = None
    dataschema: str | None = None


class _Nested(_Common, forbid_unknown_fields=True, gc=False):
    """The usual event with objects or arrays in `data`, read whole into the values orjson
    reads, except integers beyond 64 bits: msgspec keeps them exact where orjson makes floats
    (which the general path refuses). orjson cannot write such integers back, nor nesting
    deeper than it writes: an event holding either goes to the general path, which decides."""

    data: dict[str, Any] | None = None


_read_common = msgspec.json.Decoder(_Common).decode
_read_nested = msgspec.json.Decoder(_Nested).decode
_BRACKETS = 1000
_new_tuple = tuple.__new__
NOT_TYPED = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)
"""What a typed decoder raises for a document it leaves to the general path (msgspec reads
nesting by recursion, and stops deep nesting with RecursionError)."""


def decode(
    value: bytes | None,
    namespace: str,
    max_bytes: int,
    check: MeterCheck | None = None,
    topic: str = "",
    partition: int = 0,
    offset: int = 0,
    timestamp_ms: int = 0,
) -> Event | Rejection:
    """Parse and validate one record value; the event carries the record's coordinates."""
    if not value:
        return Rejection(EMPTY, "record has no value")
    if len(value) > max_bytes:
        return Rejection(TOO_LARGE, f"record is {len(value)} bytes, limit is {max_bytes}")
    # A flat event has two braces at most (its own and data's) and no bracket: anything more
    # is most likely nested data, read by the second decoder without trying the first (a
    # brace inside a string only sends a flat event the longer way, to the same result).
    # `find` and `in` scan with memchr; `count` would walk the bytes one by one.
    second = value.find(b"{", 1)
    flat = (second < 0 or value.find(b"{", second + 1) < 0) and b"[" not in value
    try:
        if not flat:
            raise msgspec.DecodeError
        doc: _Common = _read_common(value)
    except NOT_TYPED:
        # Not the usual flat `data`: nested data, or anything else for the general path.
        if not shallow(value):
            return _general(value, namespace, check, topic, partition, offset, timestamp_ms)
        try:
            doc = _read_nested(value)
        except NOT_TYPED:
            return _general(value, namespace, check, topic, partition, offset, timestamp_ms)
        flat = False
    time_ms = parse_time(doc.time)
    if isinstance(time_ms, Rejection):
        return time_ms
    data: dict[str, Any] | None = doc.data
    if data is None:
        data = {}
    if flat:
        data_text = orjson.dumps(data).decode()
    else:
        try:
            data_text = typed_data(data)
        except orjson.JSONEncodeError:
            return _general(value, namespace, check, topic, partition, offset, timestamp_ms)
    type_ = doc.type
    # Event(...) without the namedtuple's Python-level __new__ (the hot path).
    return _new_tuple(
        Event,
        (
            namespace,
            doc.id,
            intern(type_),
            intern(doc.source),
            intern(doc.subject),
            time_ms,
            data_text,
            check(type_, data) if check is not None else "",
            topic,
            partition,
            offset,
            timestamp_ms,
        ),
    )


def shallow(value: bytes) -> bool:
    """Whether a document cannot nest deeper than orjson reads (1024 levels). msgspec reads
    deeper, and a value too deep for orjson that a repeated key then replaces would pass."""
    return len(value) <= _BRACKETS or value.count(b"[") + value.count(b"{") <= _BRACKETS


def _general(
    value: bytes,
    namespace: str,
    check: MeterCheck | None,
    topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int,
) -> Event | Rejection:
    """`_decode_general`, the event with the record's coordinates."""
    result = _decode_general(value, namespace, check)
    if type(result) is Event:
        return result._replace(
            topic=topic, partition=partition, offset=offset, timestamp_ms=timestamp_ms
        )
    return result


def _decode_general(value: bytes, namespace: str, check: MeterCheck | None) -> Event | Rejection:
    """Any JSON document: parse it whole, then validate."""
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return Rejection(INVALID_JSON, f"not valid JSON: {exc}"[:500])
    if not isinstance(doc, dict):
        return Rejection(NOT_OBJECT, f"expected a JSON object, got {type(doc).__name__}")
    return validate(doc, namespace, check, value)


def _holds_wide_int(value: bytes) -> bool:
    """orjson turns integers beyond 64 bits into floats; the stdlib parser keeps them."""
    try:
        stack = [json.loads(value)]
    except (ValueError, RecursionError):
        return False
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, int) and not -(2**63) <= node < 2**64:
            return True
    return False


def validate(
    doc: dict[str, Any],
    namespace: str,
    check: MeterCheck | None = None,
    raw: bytes | None = None,
) -> Event | Rejection:
    """Check a parsed document against CloudEvents 1.0 and our required fields."""
    get = doc.get
    if get("specversion") != "1.0":
        return Rejection(BAD_SPECVERSION, "specversion must be the string '1.0'")
    event_id, source, type_, subject, time_text = (
        get("id"),
        get("source"),
        get("type"),
        get("subject"),
        get("time"),
    )
    if not (
        type(event_id) is str
        and type(source) is str
        and type(type_) is str
        and type(subject) is str
        and type(time_text) is str
        and 0 < len(event_id) <= MAX_FIELD_CHARS
        and 0 < len(source) <= MAX_FIELD_CHARS
        and 0 < len(type_) <= MAX_FIELD_CHARS
        and 0 < len(subject) <= MAX_FIELD_CHARS
        and time_text
    ):
        return _field_problem(doc)
    time_ms = parse_time(time_text)
    if isinstance(time_ms, Rejection):
        return time_ms
    data = doc.get("data")
    if data is None:
        data = {}
    data_text = checked_data(data, raw)
    if isinstance(data_text, Rejection):
        return data_text
    problems = check(type_, data) if check is not None else ""
    # Types, sources and subjects repeat across events: one string each keeps batches small.
    return Event(
        namespace,
        event_id,
        intern(type_),
        intern(source),
        intern(subject),
        time_ms,
        data_text,
        problems,
    )


def checked_data(data: Any, raw: bytes | None) -> str | Rejection:
    """`data` (parsed from `raw`) as the stored JSON text, if it is an object that can be."""
    if not isinstance(data, dict):
        return Rejection(BAD_DATA, f"'data' must be a JSON object, got {type(data).__name__}")
    ordered, suspicious = _inspect(data)
    if suspicious and raw is not None and _holds_wide_int(raw):
        return Rejection(BAD_DATA, "an integer is outside the 64-bit range")
    try:
        return orjson.dumps(ordered).decode()
    except orjson.JSONEncodeError:
        return Rejection(BAD_DATA, "'data' is nested too deeply")


def _field_problem(doc: dict[str, Any]) -> Rejection:
    """The first required field that is missing, empty, not a string or too long."""
    for name in REQUIRED_FIELDS:
        field = doc.get(name)
        if field is None or field == "":
            return Rejection(MISSING_FIELD, f"'{name}' is missing or empty")
        if not isinstance(field, str):
            return Rejection(WRONG_TYPE, f"'{name}' must be a string")
        if len(field) > MAX_FIELD_CHARS:
            return Rejection(FIELD_TOO_LONG, f"'{name}' is longer than {MAX_FIELD_CHARS} chars")
    raise AssertionError("called only for a document with a bad field")  # pragma: no cover


_CONTAINERS = (dict, list)
_WIDE = 2.0**63


def typed_data(data: dict[str, Any]) -> str:
    """`data` read by the typed path as the stored JSON text, top-level scalars first (see
    `_inspect`); JSONEncodeError for what orjson cannot write."""
    return orjson.dumps(_scalars_first(data)).decode()


def _scalars_first(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with its top-level scalars before its objects and arrays (the same object if
    they are already); its values are exactly dicts, lists and scalars."""
    container = False
    for v in data.values():
        if type(v) is dict or type(v) is list:
            container = True
        elif container:
            break
    else:
        return data
    scalars: dict[str, Any] = {}
    containers: dict[str, Any] = {}
    for k, v in data.items():
        if type(v) is dict or type(v) is list:
            containers[k] = v
        else:
            scalars[k] = v
    scalars.update(containers)
    return scalars


def _inspect(data: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """`data` with its top-level scalars first, and whether it holds a float that may have been
    an integer beyond 64 bits (orjson reads those as floats; they are then checked exactly).

    Scalars first: on servers without JSONExtract a meter reaches a top-level property by
    stepping over the scalar members before it (`sink.metering.meter_sql.member_pattern`), so
    every top-level scalar must come before any object or array."""
    nested = False
    suspicious = False
    for v in data.values():
        if type(v) is float:
            suspicious = suspicious or (abs(v) >= _WIDE and v.is_integer())
        elif isinstance(v, _CONTAINERS):
            nested = True
    if not nested:
        return data, suspicious
    flat = {k: v for k, v in data.items() if not isinstance(v, _CONTAINERS)}
    rest = {k: v for k, v in data.items() if isinstance(v, _CONTAINERS)}
    suspicious = suspicious or _deep_wide(rest)
    flat.update(rest)
    return flat, suspicious


def _deep_wide(node: Any) -> bool:
    stack = [node]
    while stack:
        item = stack.pop()
        if type(item) is float:
            if abs(item) >= _WIDE and item.is_integer():
                return True
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def parse_time(text: str) -> int | Rejection:
    """RFC 3339 timestamp with an explicit offset -> epoch milliseconds."""
    try:
        moment = parse_rfc3339(text)
    except ValueError:
        return Rejection(BAD_TIME, "'time' is not an RFC 3339 timestamp")
    if moment.tzinfo is None:
        return Rejection(BAD_TIME, "'time' has no UTC offset (RFC 3339 requires one)")
    try:
        since = moment - _EPOCH
    except OverflowError:
        return Rejection(BAD_TIME, "'time' is out of range")
    # Whole milliseconds, floored: exact, as days and seconds are whole milliseconds (and
    # cheaper than `since // timedelta(milliseconds=1)`, which goes through microseconds).
    time_ms = since.days * 86_400_000 + since.seconds * 1000 + since.microseconds // 1000
    if not _MIN_TIME_MS <= time_ms <= _MAX_TIME_MS:
        return Rejection(BAD_TIME, "'time' is outside 1970-01-01..2106-02-07")
    return time_ms
