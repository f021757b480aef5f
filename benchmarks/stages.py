"""The worker's steps per event, on one core, without Kafka, Redis or ClickHouse.

`python -m benchmarks.stages` takes generated records (the workload of `benchmarks.run`), and
does to them what the worker does between a fetch and an insert, timing each step:

- per fetch (at most `FETCH_RECORDS` records of one partition, as the poll loop gets them):
  decode each record into a row, and group the rows by identity for dedup;
- per batch (`batch.max_rows` records): frame the claim's Redis commands, keep the rows that
  hold their marker (the markers live in a dict here), build the insert block's columns
  (`event_columns`, then every String column framed as the insert sends it) and do the landed
  batch's bookkeeping (time bounds, tail offsets, rows per topic).

Each round runs the whole workload; rounds are repeated and the minimum and median
microseconds per record of each step are printed. The end-to-end benchmark moves by 10-20%
with the machine's speed from hour to hour; steps timed back to back in one process show a
change of a few percent. Integer columns (written by the driver), the network and the event
loop are not in it.

Two variants change the records: "binary mode" sends the same events in the binary content
mode of the CloudEvents Kafka binding (attributes in `ce_` headers, `data` as the value,
`content-type: application/json`), "nested data" gives each event's `data` an object and an
array, one of them before the scalars (about 150 bytes more); the invalid records stay as
they are. The lines under the table compare their decode step with the first variant's,
round by round.

Another variant, timed in the same rounds, builds each fetch's columns right after the fetch
is decoded, while its rows are still in the CPU's caches, instead of when the batch is
inserted. (It builds them for every valid row, before dedup drops any.) Compare the columns'
share of each variant's total, the table's last row, rather than their microseconds: whole
rounds of the two variants differ by up to 15%, in the steps they share too.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import orjson

from benchmarks.workload import Spec, coordinates
from sink.config import BatchConfig, EventsConfig
from sink.operations.vitals import count_topics
from sink.pipeline.batch import Batch
from sink.pipeline.binary import binary_mode, decode_binary
from sink.pipeline.decode import Event, decode
from sink.pipeline.intake import FETCH_RECORDS
from sink.stores import dedup
from sink.stores.clickhouse.native import string_column
from sink.stores.clickhouse.schema import event_columns
from sink.stores.keys import DedupKeys

FETCH = FETCH_RECORDS
KEYS = DedupKeys(b"stages:")
"""Records per poll, as the worker asks aiokafka for (`max_records`)."""
TIME_DIVISOR = 1000
"""DateTime seconds, as on ClickHouse 18.16."""


class Fetched(NamedTuple):
    """A record as the worker's consumer hands it out (the fields the worker reads)."""

    offset: int
    timestamp: int
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...]


class Fetch(NamedTuple):
    topic: str
    partition: int
    namespace: str
    records: list[Fetched]


STRUCTURED, BINARY, NESTED = "structured", "binary", "nested"


def fetches(events: int, seed: int, form: str = STRUCTURED, base_ms: int = 0) -> list[Fetch]:
    """The workload's records as the poll loop would get them: one partition at a time, at
    most FETCH records each, the partitions taken in turn; in the given form (FORMS). Event
    times and record timestamps follow `base_ms` (default: now)."""
    base_ms = base_ms or int(time.time() * 1000)
    spec = Spec(run="stages", events=events, seed=seed, base_ms=base_ms)
    by_tp: dict[tuple[str, int], list[Fetched]] = {}
    namespace_of = dict(zip(spec.topic_names, spec.namespaces, strict=True))
    for n, (record, topic, offset) in enumerate(coordinates(spec)):
        fetched = Fetched(offset, base_ms + n, record.key, record.value, ())
        by_tp.setdefault((topic, record.partition), []).append(fetched)
    queues = {tp: iter(range(0, len(records), FETCH)) for tp, records in by_tp.items()}
    out: list[Fetch] = []
    while queues:
        for tp in list(queues):
            start = next(queues[tp], None)
            if start is None:
                del queues[tp]
                continue
            # Copied in fetch order: a fetch's records (values and headers) lie together in
            # memory, as aiokafka parses them from one response (not scattered in production
            # order).
            records = [FORMS[form](r) for r in by_tp[tp][start : start + FETCH]]
            out.append(Fetch(tp[0], tp[1], namespace_of[tp[0]], records))
    return out


ATTRIBUTES = ("specversion", "id", "source", "type", "subject", "time")


def copied(record: Fetched) -> Fetched:
    return record._replace(value=bytes(bytearray(record.value)))


def _event(record: Fetched) -> dict[str, Any] | None:
    """The record's event, if it is a structured CloudEvent whose attributes are strings."""
    try:
        document = orjson.loads(record.value)
    except orjson.JSONDecodeError:
        return None
    if isinstance(document, dict) and all(
        isinstance(document.get(name), str) for name in ATTRIBUTES
    ):
        return document
    return None


def as_binary(record: Fetched) -> Fetched:
    """A copy of the record in binary content mode (the workload's invalid records are
    copied as they are)."""
    document = _event(record)
    if document is None:
        return copied(record)
    headers = tuple((f"ce_{name}", document[name].encode()) for name in ATTRIBUTES)
    data = document.get("data")
    value = orjson.dumps(data) if data is not None else b""
    return record._replace(value=value, headers=(*headers, ("content-type", b"application/json")))


def with_nested_data(record: Fetched) -> Fetched:
    """A copy of the record whose `data` also holds objects and arrays, one of them before
    the scalars (about 150 bytes more)."""
    document = _event(record)
    if document is None or not isinstance(document.get("data"), dict):
        return copied(record)
    flat = document["data"]
    tokens, ms = flat.get("tokens", 0), flat.get("ms", 0)
    document["data"] = {
        "usage": {"input_tokens": tokens, "output_tokens": ms, "cache": {"read": 0, "write": 1}},
        **flat,
        "model": "gpt-4o-mini",
        "tags": ["prod", "batch", flat.get("route", "")],
    }
    return record._replace(value=orjson.dumps(document))


FORMS: dict[str, Callable[[Fetched], Fetched]] = {
    STRUCTURED: copied,
    BINARY: as_binary,
    NESTED: with_nested_data,
}
"""The forms of the workload: its events as they are, in binary content mode, with nested
`data`."""


def block(items: Sequence[Any]) -> int:
    """The insert block's columns, String columns framed as the insert sends them."""
    size = 0
    for column in event_columns(items, TIME_DIVISOR):
        if column and type(column[0]) is str:
            size += len(string_column(column))
    return size


class Round:
    """One pass over the workload; seconds spent per step."""

    def __init__(self, early_columns: bool) -> None:
        self.early_columns = early_columns
        self.seconds: dict[str, float] = {}
        self.records = 0
        self.kept = 0
        """Rows that would be inserted: each new valid event once, across batches."""

    def timed(self, step: str, call: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = call()
        self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - start
        return result

    def run(self, work: Sequence[Fetch], max_rows: int, max_bytes: int) -> None:
        markers: dict[bytes, bytes] = {}  # Redis's side of the claims
        batch, grouping, in_batch = Batch(), dedup.Grouping(KEYS), 0
        for fetch in work:
            new = self.timed("decode", partial(self.decode, fetch, batch, max_bytes))
            self.timed("group", partial(grouping.add, new))
            if self.early_columns:
                self.timed("columns", partial(block, new))
            self.records += len(fetch.records)
            in_batch += len(fetch.records)
            if in_batch >= max_rows:
                self.land(batch, grouping, markers)
                batch, grouping, in_batch = Batch(), dedup.Grouping(KEYS), 0
        if batch.ranges:
            self.land(batch, grouping, markers)

    @staticmethod
    def decode(fetch: Fetch, batch: Batch, max_bytes: int) -> list[Event]:
        """What the poll loop does per fetched record (sink.pipeline.intake.Intake.add)."""
        topic, partition, namespace = fetch.topic, fetch.partition, fetch.namespace
        items, rows = batch.items, len(batch.items)
        add, event_type = items.append, Event
        for record in fetch.records:
            offset, stamp, headers = record.offset, record.timestamp, record.headers
            if headers and binary_mode(headers):
                result = decode_binary(
                    headers,
                    record.value,
                    namespace,
                    max_bytes,
                    None,
                    topic,
                    partition,
                    offset,
                    stamp,
                )
            else:
                result = decode(
                    record.value, namespace, max_bytes, None, topic, partition, offset, stamp
                )
            if type(result) is event_type:
                add(result)
        records = fetch.records
        batch.extend((topic, partition), 0, records[0].offset, records[-1].offset)
        return items[rows:]

    def land(self, batch: Batch, grouping: dedup.Grouping, markers: dict[bytes, bytes]) -> None:
        keys, coords = grouping.grouped.keys, grouping.grouped.coords
        self.timed("claim commands", lambda: dedup.claim_commands(keys, coords, b"3600"))
        holders = [markers.setdefault(k, c) for k, c in zip(keys, coords, strict=True)]
        kept = self.timed("keep", lambda: dedup.keep(grouping.grouped, holders, KEYS))
        self.kept += len(kept)
        if not self.early_columns:
            self.timed("columns", lambda: block(kept))
        self.timed("bookkeeping", lambda: bookkeeping(batch, kept))


def bookkeeping(batch: Batch, landed: list[Any]) -> None:
    """The passes over a batch's rows around its insert (time bounds for the pending range,
    tail offsets, rows per topic for the metrics)."""
    batch.time_bounds()
    batch.tail_offsets(landed)
    count_topics(batch.items)
    count_topics(landed)


STEPS = ("decode", "group", "claim commands", "keep", "columns", "bookkeeping")


class Variant(NamedTuple):
    form: str
    """The workload's form (FORMS)."""
    early_columns: bool


VARIANTS = {
    "as the worker": Variant(STRUCTURED, early_columns=False),
    "binary mode": Variant(BINARY, early_columns=False),
    "nested data": Variant(NESTED, early_columns=False),
    "columns per fetch": Variant(STRUCTURED, early_columns=True),
}
SHARE = "columns, % of total"


def measure(
    works: Mapping[str, Sequence[Fetch]], rounds: int
) -> list[tuple[str, dict[str, list[float]]]]:
    """`works`: the workload in each form."""
    batch = BatchConfig()
    max_bytes = EventsConfig().max_event_bytes
    per_record: dict[str, dict[str, list[float]]] = {v: {} for v in VARIANTS}
    gc.collect()
    gc.freeze()
    for n in range(rounds):
        # Alternate which variant goes first, so neither always runs on a warmer machine.
        order = list(VARIANTS.items())
        for name, variant in order if n % 2 == 0 else reversed(order):
            one = Round(variant.early_columns)
            gc.disable()  # the worker runs the cyclic collector on a clock
            try:
                one.run(works[variant.form], batch.max_rows, max_bytes)
            finally:
                gc.enable()
                gc.collect()
            for step, seconds in one.seconds.items():
                per_record[name].setdefault(step, []).append(seconds / one.records * 1e6)
            total = sum(one.seconds.values()) / one.records * 1e6
            per_record[name].setdefault("total", []).append(total)
            share = one.seconds["columns"] / sum(one.seconds.values()) * 100
            per_record[name].setdefault(SHARE, []).append(share)
        print(f"round {n + 1}/{rounds} done", file=sys.stderr, flush=True)
    return list(per_record.items())


def table(results: Sequence[tuple[str, dict[str, list[float]]]]) -> str:
    head = "| step | " + " | ".join(f"{name}: min | median" for name, _ in results) + " |"
    rule = "|---|" + "---:|---:|" * len(results)
    lines = [head, rule]
    for step in (*STEPS, "total", SHARE):
        cells = []
        for _, steps in results:
            values = steps.get(step)
            if values:
                cells += [f"{min(values):.3f}", f"{statistics.median(values):.3f}"]
            else:
                cells += ["n/a", "n/a"]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def decode_ratio(results: Sequence[tuple[str, dict[str, list[float]]]], variant: str) -> str:
    """A variant's decode step against the worker's (structured, flat `data`), round by round
    (the same rounds)."""
    by_name = dict(results)
    ratios = [
        mine / structured
        for mine, structured in zip(
            by_name[variant]["decode"], by_name["as the worker"]["decode"], strict=True
        )
    ]
    return (
        f"decode, {variant} / as the worker, per round: median {statistics.median(ratios):.2f}"
        f" (min {min(ratios):.2f}, max {max(ratios):.2f})"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="records to generate")
    parser.add_argument("--rounds", type=int, default=7, help="passes over them per variant")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.events <= 0 or args.rounds <= 0:
        parser.error("--events and --rounds must be positive")
    now_ms = int(time.time() * 1000)
    works = {form: fetches(args.events, args.seed, form, now_ms) for form in FORMS}
    records = sum(len(f.records) for f in works[STRUCTURED])
    print(
        f"{records:,} records in {len(works[STRUCTURED]):,} fetches; {args.rounds} rounds",
        file=sys.stderr,
    )
    results = measure(works, args.rounds)
    print(f"\nMicroseconds per record, {records:,} records, {args.rounds} rounds:\n")
    print(table(results))
    print()
    for variant in ("binary mode", "nested data"):
        print(decode_ratio(results, variant))


if __name__ == "__main__":
    main()
