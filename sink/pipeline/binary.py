"""The binary content mode of the CloudEvents Kafka binding: the event's attributes in `ce_`
headers, its `data` as the record value (with a `content-type` header). A record is in binary
mode when it has a `ce_specversion` header; sink.pipeline.intake sends it here, any other
record to sink.pipeline.decode (structured mode).

The same event gives the same Event in either mode, and is held to the same rules: the
attributes by the checks of structured mode's fields, `data` by those of structured mode's
`data` (read the same two ways: typed, else general). Property tests hold the modes together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from sys import intern
from typing import Any, cast

import msgspec
import orjson

from sink.pipeline.decode import (
    BAD_DATA,
    BAD_HEADER,
    BAD_SPECVERSION,
    FIELD_TOO_LONG,
    INVALID_JSON,
    MAX_FIELD_CHARS,
    MISSING_FIELD,
    NOT_TYPED,
    REQUIRED_FIELDS,
    TOO_LARGE,
    Event,
    FlatData,
    MeterCheck,
    Rejection,
    checked_data,
    parse_time,
    shallow,
    typed_data,
)

BINARY_MARKER = "ce_specversion"
"""The header that puts a record in binary content mode (the binding's rule)."""
_PREFIX = "ce_"
_CONTENT_TYPE = "content-type"
_READ = (BINARY_MARKER, *(_PREFIX + name for name in REQUIRED_FIELDS), _CONTENT_TYPE)
"""The headers an event is read from, in the order of the checks."""
_ONLY_READ = frozenset(_READ)
_ATTRIBUTE_HEADERS = _READ[1:-1]
_new_tuple = tuple.__new__
_utf8 = cast(Callable[[bytes | None], str], bytes.decode)
"""A header value as text; TypeError for a header without a value, UnicodeDecodeError for
one that is not UTF-8."""

# A binary record's `data`, read as the typed path reads `data` in structured mode: flat, else
# with objects and arrays, else by the general path.
_read_flat_data = msgspec.json.Decoder(FlatData | None).decode
_read_nested_data = msgspec.json.Decoder(dict[str, Any]).decode


def binary_mode(headers: Sequence[tuple[str, bytes | None]]) -> bool:
    """Whether a record with these (non-empty) headers is in binary content mode."""
    # A plain loop: any() over a generator costs a structured record with headers twice as much.
    for name, _ in headers:  # noqa: SIM110
        if name == BINARY_MARKER:
            return True
    return False


def decode_binary(
    headers: Sequence[tuple[str, bytes | None]],
    value: bytes | None,
    namespace: str,
    max_bytes: int,
    check: MeterCheck | None = None,
    topic: str = "",
    partition: int = 0,
    offset: int = 0,
    timestamp_ms: int = 0,
) -> Event | Rejection:
    """Parse and validate a binary-mode record: the attributes from its `ce_` headers, `data`
    from its value, read as JSON when `content-type` says JSON or is absent. The same event
    in structured mode gives the same Event. The checks run in a fixed order, the first
    failing one decides: the size (the value and the event's header values), each `ce_`
    header and `content-type` present once, the extensions in UTF-8, specversion, each
    required attribute (missing or empty, not UTF-8, too long), time, the content type, data."""
    value_bytes = len(value) if value else 0
    named = dict(headers)
    if len(named) != len(headers) or not _ONLY_READ.issuperset(named):
        # Repeated names, extensions, other headers: sorted out header by header.
        event_headers = _event_headers(headers, value_bytes, max_bytes)
        if isinstance(event_headers, Rejection):
            return event_headers
        named = event_headers
    size = value_bytes + sum(map(len, filter(None, named.values())))
    if size > max_bytes:
        return Rejection(TOO_LARGE, f"event is {size} bytes with its headers, limit is {max_bytes}")
    get = named.get
    if get(BINARY_MARKER) != b"1.0":
        return Rejection(BAD_SPECVERSION, f"header '{BINARY_MARKER}' must be '1.0'")
    try:
        event_id, source, type_, subject, time_text = map(_utf8, map(get, _ATTRIBUTE_HEADERS))
    except (TypeError, UnicodeDecodeError):  # a header missing, without a value, or not UTF-8
        return _attribute_problem(named)
    if not (
        event_id
        and source
        and type_
        and subject
        and time_text
        and len(event_id) <= MAX_FIELD_CHARS
        and len(source) <= MAX_FIELD_CHARS
        and len(type_) <= MAX_FIELD_CHARS
        and len(subject) <= MAX_FIELD_CHARS
    ):
        return _attribute_problem(named)
    time_ms = parse_time(time_text)
    if isinstance(time_ms, Rejection):
        return time_ms
    read = _binary_data(value, get(_CONTENT_TYPE))
    if isinstance(read, Rejection):
        return read
    data_text, data = read
    return _new_tuple(
        Event,
        (
            namespace,
            event_id,
            intern(type_),
            intern(source),
            intern(subject),
            time_ms,
            data_text,
            check(type_, data) if check is not None else "",
            topic,
            partition,
            offset,
            timestamp_ms,
        ),
    )


def _event_headers(
    headers: Sequence[tuple[str, bytes | None]], value_bytes: int, max_bytes: int
) -> dict[str, bytes | None] | Rejection:
    """The headers that make the event (every `ce_` header and `content-type`, in any case),
    after the size check, each present once and, for the extensions, UTF-8 (the attributes
    read are decoded by the caller)."""
    named: dict[str, bytes | None] = {}
    repeated = ""
    size = value_bytes
    for name, header in headers:
        if not name.startswith(_PREFIX):
            if name.lower() != _CONTENT_TYPE:
                continue
            name = _CONTENT_TYPE
        if name in named and not repeated:
            repeated = name
        named[name] = header
        size += len(header) if header else 0
    if size > max_bytes:
        return Rejection(TOO_LARGE, f"event is {size} bytes with its headers, limit is {max_bytes}")
    if repeated:
        return Rejection(BAD_HEADER, f"header '{repeated}' appears more than once")
    for name, header in named.items():
        if name not in _ONLY_READ and header is not None:
            try:
                header.decode()
            except UnicodeDecodeError:
                return Rejection(BAD_HEADER, f"header '{name}' is not UTF-8 text")
    return named


def _attribute_problem(named: dict[str, bytes | None]) -> Rejection:
    """The first required attribute whose header is missing, empty, not UTF-8 or too long."""
    for name in REQUIRED_FIELDS:
        header = named.get(_PREFIX + name)
        if not header:
            return Rejection(MISSING_FIELD, f"header '{_PREFIX}{name}' is missing or empty")
        try:
            text = header.decode()
        except UnicodeDecodeError:
            return Rejection(BAD_HEADER, f"header '{_PREFIX}{name}' is not UTF-8 text")
        if len(text) > MAX_FIELD_CHARS and name != "time":
            return Rejection(
                FIELD_TOO_LONG, f"header '{_PREFIX}{name}' is longer than {MAX_FIELD_CHARS} chars"
            )
    raise AssertionError("called only for a bad attribute")  # pragma: no cover


def _binary_data(
    value: bytes | None, content_type: bytes | None
) -> tuple[str, dict[str, Any]] | Rejection:
    """`data` from a binary record's value: (stored JSON text, the object). An empty value is
    no data; otherwise it must be JSON (by its content type) holding an object, or null."""
    if content_type:
        is_json = _JSON_TYPES.get(content_type)
        if is_json is None:
            judged = _media_type(content_type)
            if isinstance(judged, Rejection):
                return judged
            is_json = judged
        if value and not is_json:
            text = content_type.decode()[:100]
            return Rejection(
                BAD_DATA, f"content type '{text}' is not JSON; 'data' must be an object"
            )
    if not value:
        return "{}", {}
    try:
        data = _read_flat_data(value)
    except NOT_TYPED:
        return _binary_nested_data(value)
    if data is None:
        return "{}", {}
    return orjson.dumps(data).decode(), data


def _binary_nested_data(value: bytes) -> tuple[str, dict[str, Any]] | Rejection:
    """`data` with objects or arrays, or anything else for the general path."""
    if shallow(value):
        try:
            data = _read_nested_data(value)
            return typed_data(data), data
        except (*NOT_TYPED, orjson.JSONEncodeError):
            pass
    return _binary_data_general(value)


def _binary_data_general(value: bytes) -> tuple[str, dict[str, Any]] | Rejection:
    """Any JSON value, parsed whole, then held to the rules of structured mode's `data`."""
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return Rejection(INVALID_JSON, f"'data' is not valid JSON: {exc}"[:500])
    if data is None:
        data = {}
    text = checked_data(data, value)
    if isinstance(text, Rejection):
        return text
    return text, data


_JSON_TYPES: dict[bytes, bool] = {b"application/json": True}
"""Content types seen, and whether they are JSON (a producer sends few; the cache is bounded)."""


def _media_type(content_type: bytes) -> bool | Rejection:
    """Whether a `content-type` header not yet seen says JSON."""
    try:
        known = json_content_type(content_type.decode())
    except UnicodeDecodeError:
        return Rejection(BAD_HEADER, f"header '{_CONTENT_TYPE}' is not UTF-8 text")
    if len(_JSON_TYPES) < 64 and len(content_type) <= 200:
        _JSON_TYPES[content_type] = known
    return known


def json_content_type(content_type: str) -> bool:
    """application/json or any `+json` type, with no charset but UTF-8 (JSON's own)."""
    media, _, parameters = content_type.partition(";")
    media = media.strip().lower()
    verdict = media == "application/json" or ("/" in media and media.endswith("+json"))
    for parameter in parameters.split(";"):
        name, _, setting = parameter.partition("=")
        charset = name.strip().lower() == "charset"
        if charset and setting.strip().strip('"').lower() not in ("utf-8", "utf8"):
            verdict = False
    return verdict
