"""Binary content mode through the real `sink run`: the same events sent in structured and in
binary mode, mixed within partitions, land once and as the same rows, duplicates across the
two modes are dropped, and records with hostile headers go to the dead-letter topic with
their reason."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from sink.metering import usage
from sink.metering.meters import Meter
from sink.stores.clickhouse.connection import ClickHouse
from tests.conftest import Services
from tests.integration.test_worker import scrape
from tests.integration.workload import (
    REGEX,
    assert_exact,
    free_port,
    read_topic,
    topics_for,
    wait_landed,
)
from tests.items import flat_first

Headers = list[tuple[str, bytes | None]]
Record = tuple[str, int, bytes, bytes | None, Headers]
"""(topic, partition, key, value, headers) to produce."""

TOKENS = {
    "slug": "tokens",
    "event_type": "api.request",
    "aggregation": "SUM",
    "value_property": "tokens",
    "group_by": {"route": "route"},
}
JSON_TYPES = (None, b"application/json", b"application/json; charset=utf-8", b"a/x+json")
ATTRIBUTES = ("specversion", "id", "source", "type", "subject", "time")
MAX_EVENT_BYTES = 65_536


def event(rng: random.Random, n: int) -> dict[str, Any]:
    document: dict[str, Any] = {
        "specversion": "1.0",
        "id": f"evt-{n}",
        "source": "gateway",
        "type": "api.request",
        "subject": f"customer-{rng.randrange(7)}",
        "time": f"2026-11-{rng.randrange(1, 28):02d}T{rng.randrange(24):02d}:"
        f"{rng.randrange(60):02d}:{rng.randrange(60):02d}.{rng.randrange(1000):03d}Z",
    }
    shape = rng.random()
    tokens: Any = rng.randrange(1000) if rng.random() > 0.05 else "lots"  # "lots": not metered
    if shape < 0.5:
        document["data"] = {"route": rng.choice(["/a", "/b"]), "tokens": tokens}
    elif shape < 0.9:  # nested, scalars after containers: stored reordered in both modes
        document["data"] = {
            "usage": {"in": rng.randrange(9), "out": [1, 2]},
            "route": "/c",
            "tokens": tokens,
            "note": 'quote " é \\ \u0000',
        }
    return document  # else without data


def structured(document: dict[str, Any]) -> tuple[bytes, Headers]:
    return orjson.dumps(document), [("trace", b"t-1")] if len(document) % 2 else []


def binary(document: dict[str, Any], rng: random.Random) -> tuple[bytes | None, Headers]:
    headers: Headers = [(f"ce_{name}", document[name].encode()) for name in ATTRIBUTES]
    rng.shuffle(headers)  # the binding sets no order
    content_type = rng.choice(JSON_TYPES)
    if content_type is not None:
        headers.append(("content-type", content_type))
    if rng.random() < 0.3:
        headers.append(
            ("ce_traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        )
    data = document.get("data")
    return (orjson.dumps(data) if data is not None else rng.choice([None, b""])), headers


def hostile() -> list[tuple[str, bytes | None, Headers]]:
    """(expected reason, value, headers) of binary-mode records that must be dead-lettered;
    each has a `case` header naming it (not a `ce_` header, so not part of the event)."""
    good: dict[str, bytes | None] = {
        "specversion": b"1.0",
        "source": b"gateway",
        "type": b"api.request",
        "subject": b"customer-1",
        "time": b"2026-11-27T10:15:30Z",
    }

    def record(
        case: str, code: str, value: bytes | None = b'{"tokens": 1}', **attrs: bytes | None
    ) -> tuple[str, bytes | None, Headers]:
        merged = {"id": f"bad-{case}".encode()} | good | attrs
        headers: Headers = [(f"ce_{k}", v) for k, v in merged.items() if v != b"<absent>"]
        return code, value, [("case", case.encode()), *headers]

    cases = [
        record("no-id", "missing_field", id=b"<absent>"),
        record("empty-source", "missing_field", source=b""),
        record("null-subject", "missing_field", subject=None),
        record("no-time", "missing_field", time=b"<absent>"),
        record("spec-0.3", "bad_specversion", specversion=b"0.3"),
        record("not-utf8-subject", "bad_header", subject=b"customer-\xff\xfe"),
        record("not-utf8-extension", "bad_header", traceparent=b"\xc3("),
        record("bad-time", "bad_time", time=b"yesterday"),
        record("no-offset", "bad_time", time=b"2026-11-27T10:15:30"),
        record("too-early", "bad_time", time=b"1969-12-31T23:59:59Z"),
        record("long-type", "field_too_long", type=b"t" * 1025),
        record("huge-extension", "too_large", traceparent=b"x" * MAX_EVENT_BYTES),
        record("array-data", "bad_data", value=b"[1, 2]"),
        record("string-data", "bad_data", value=b'"text"'),
        record("cut-json", "invalid_json", value=b'{"tokens": '),
    ]
    code, value, headers = record("id-twice", "bad_header")
    cases.append((code, value, [*headers, ("ce_id", b"bad-id-twice-again")]))
    code, value, headers = record("text-data", "bad_data", value=b"hello")
    cases.append((code, value, [*headers, ("content-type", b"text/plain")]))
    code, value, headers = record("content-type-twice", "bad_header")
    cases.append(
        (code, value, [*headers, ("content-type", b"a/json"), ("Content-Type", b"a/json")])
    )
    return cases


async def send(producer: AIOKafkaProducer, records: Sequence[Record]) -> dict[Any, int]:
    """Produce in order; the end offset of each partition written."""
    futures = [
        await producer.send(topic, value=value, key=key, partition=partition, headers=headers)
        for topic, partition, key, value, headers in records
    ]
    ends: dict[Any, int] = {}
    for meta in await asyncio.gather(*futures):
        tp = (meta.topic, meta.partition)
        ends[tp] = max(ends.get(tp, 0), meta.offset + 1)
    return ends


async def test_both_modes_land_once_alike_and_hostile_headers_are_dead_lettered(
    services: Services,
    make_topics: Callable[..., Any],
    producer: AIOKafkaProducer,
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Any],
    run_sink: Callable[..., Any],
    uid: str,
) -> None:
    (acme, acme_2, globex), namespaces = await topics_for(make_topics, uid, partitions=2)
    rng = random.Random(26)
    records: list[Record] = []
    modes: dict[int, set[str]] = {0: set(), 1: set()}
    documents = [event(rng, n) for n in range(600)]
    duplicates = 0
    for document in documents:
        key = document["subject"].encode()
        # Each event once in each namespace, in opposite modes: the two rows must be alike.
        first = rng.choice(["structured", "binary"])
        second = "binary" if first == "structured" else "structured"
        partition = rng.randrange(2)
        modes[partition].add(first)
        for topic, mode in ((acme, first), (globex, second)):
            value, headers = structured(document) if mode == "structured" else binary(document, rng)
            records.append((topic, partition, key, value, headers))
        if rng.random() < 0.2:  # resent in the other mode: same partition, another, another topic
            topic = rng.choice([acme, acme, acme_2])
            value, headers = (
                structured(document) if second == "structured" else binary(document, rng)
            )
            records.append((topic, rng.randrange(2), key, value, headers))
            duplicates += 1
    assert modes == {0: {"structured", "binary"}, 1: {"structured", "binary"}}
    cases = hostile()
    for n, (_, value, headers) in enumerate(cases):
        records.insert(rng.randrange(len(records)), (acme, n % 2, b"bad", value, headers))

    ends = await send(producer, records)
    port = free_port()
    config = sink_config(
        kafka={"topics_regex": REGEX.format(uid=uid)},
        events={"max_event_bytes": MAX_EVENT_BYTES},
        http={"port": port},
        meters=[TOKENS],
    )
    proc = run_sink(config)
    await wait_landed(clickhouse_db, ends, timeout=120, alive=lambda: proc.running)

    # Exactly once per identity, whichever mode came first.
    expected = {(namespaces[t], "gateway", d["id"]) for t in (acme, globex) for d in documents}
    await assert_exact(clickhouse_db, expected)
    # The same row from either mode, `data` stored as structured mode stores it.
    rows: dict[str, dict[str, tuple[Any, ...]]] = {"acme": {}, "globex": {}}
    for namespace, *row in await clickhouse_db.query(
        "SELECT namespace, id, source, type, subject, time, data, validation_error "
        f"FROM {clickhouse_db.table('events')}"
    ):
        rows[namespace][row[0]] = tuple(row)
    assert rows["acme"] == rows["globex"]
    for document in documents:
        stored = rows["acme"][document["id"]]
        assert stored[5] == orjson.dumps(flat_first(document.get("data", {}))).decode()
        metered = type(document.get("data", {}).get("tokens")) is int
        assert (stored[6] == "") == metered, (document, stored)
    # The same meter values.
    meter = Meter.model_validate(TOKENS)
    by_namespace = [
        sorted(
            (row.subject, row.groups["route"], row.value)
            for row in await usage.query(
                clickhouse_db, meter, namespace=ns, window=None, group_by=["subject", "route"]
            )
        )
        for ns in ("acme", "globex")
    ]
    assert by_namespace[0] == by_namespace[1]
    assert sum(value for *_, value in by_namespace[0]) == sum(
        d["data"]["tokens"] for d in documents if type(d.get("data", {}).get("tokens")) is int
    )

    # Every hostile record dead-lettered once, unchanged, with its reason.
    dlq = await read_topic(services.kafka, f"sink-{uid}.dlq", want=len(cases))
    assert len(dlq) == len(cases)
    by_case = {dict(r.headers)["case"].decode(): r for r in dlq}
    for code, value, headers in cases:
        case = headers[0][1]
        assert headers[0][0] == "case" and case is not None
        letter = by_case[case.decode()]
        meta = dict(letter.headers)
        assert meta["sink.error.code"].decode() == code, (case, meta["sink.error.message"])
        assert letter.value == value
        assert list(letter.headers[: len(headers)]) == headers, case
        assert meta["sink.source.topic"].decode() == acme

    metrics = scrape(port)
    assert metrics["sink_duplicates_dropped_total"] == duplicates
    assert metrics["sink_dead_letters_total"] == len(cases)
    assert metrics["sink_events_inserted_total"] == len(expected)
    assert proc.stop() == 0
