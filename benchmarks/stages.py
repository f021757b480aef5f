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

A second variant, timed in the same rounds, builds each fetch's columns right after the fetch
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
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

from benchmarks.workload import Spec, coordinates
from sink.config import BatchConfig, EventsConfig
from sink.operations.vitals import count_topics
from sink.pipeline.batch import Batch
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


def fetches(events: int, seed: int) -> list[Fetch]:
    """The workload's records as the poll loop would get them: one partition at a time, at
    most FETCH records each, the partitions taken in turn."""
    spec = Spec(run="stages", events=events, seed=seed)
    by_tp: dict[tuple[str, int], list[Fetched]] = {}
    namespace_of = dict(zip(spec.topic_names, spec.namespaces, strict=True))
    base_ms = int(time.time() * 1000)
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
            # Copied in fetch order: a fetch's records lie together in memory, as aiokafka
            # parses them from one response (not scattered in production order).
            records = [
                r._replace(value=bytes(bytearray(r.value)))
                for r in by_tp[tp][start : start + FETCH]
            ]
            out.append(Fetch(tp[0], tp[1], namespace_of[tp[0]], records))
    return out


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
        """What the poll loop does per fetched record (sink.pipeline.worker.Worker._add)."""
        topic, partition, namespace = fetch.topic, fetch.partition, fetch.namespace
        items, rows = batch.items, len(batch.items)
        add, event_type = items.append, Event
        for record in fetch.records:
            offset, stamp = record.offset, record.timestamp
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
VARIANTS = {"as the worker": False, "columns per fetch": True}
SHARE = "columns, % of total"


def measure(work: Sequence[Fetch], rounds: int) -> list[tuple[str, dict[str, list[float]]]]:
    batch = BatchConfig()
    max_bytes = EventsConfig().max_event_bytes
    per_record: dict[str, dict[str, list[float]]] = {v: {} for v in VARIANTS}
    gc.collect()
    gc.freeze()
    for n in range(rounds):
        # Alternate which variant goes first, so neither always runs on a warmer machine.
        order = list(VARIANTS.items())
        for name, early in order if n % 2 == 0 else reversed(order):
            one = Round(early)
            gc.disable()  # the worker runs the cyclic collector on a clock
            try:
                one.run(work, batch.max_rows, max_bytes)
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="records to generate")
    parser.add_argument("--rounds", type=int, default=7, help="passes over them per variant")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.events <= 0 or args.rounds <= 0:
        parser.error("--events and --rounds must be positive")
    work = fetches(args.events, args.seed)
    records = sum(len(f.records) for f in work)
    print(f"{records:,} records in {len(work):,} fetches; {args.rounds} rounds", file=sys.stderr)
    results = measure(work, args.rounds)
    print(f"\nMicroseconds per record, {records:,} records, {args.rounds} rounds:\n")
    print(table(results))


if __name__ == "__main__":
    main()
