"""Generated usage events with known duplicates and invalid records, and the checks that the
raw table, the landed offsets and the dead-letter topic hold exactly what they should."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from sink.stores.clickhouse.connection import ClickHouse

INVALID_SAMPLES: tuple[bytes, ...] = (
    b"not json at all",
    b"[1, 2, 3]",
    b'{"specversion": "1.0", "id": "x"}',
    b'{"specversion": "1.0", "id": "b", "source": "s", "type": "t", "subject": "u",'
    b' "time": "yesterday"}',
    b'{"specversion": "1.0", "id": 7, "source": "s", "type": "t", "subject": "u",'
    b' "time": "2026-01-01T00:00:00Z"}',
    b"\xff\xfe\x00garbage",
)


@dataclass
class Workload:
    """Records to send and what must come out of them."""

    topics: Sequence[str]
    namespaces: dict[str, str]
    partitions: int
    seed: int = 7
    records: list[tuple[str, int, bytes | None, bytes]] = field(default_factory=list)
    expected: set[tuple[str, str, str]] = field(default_factory=set)
    invalid: list[bytes] = field(default_factory=list)
    ends: dict[tuple[str, int], int] = field(default_factory=dict)
    _rng: random.Random = field(init=False)
    _n: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def add(self, unique: int, duplicate_share: float = 0.05, invalid_share: float = 0.01) -> None:
        """`unique` valid events; a share of them sent again to another place (same
        partition, another partition, or another topic of the same namespace); a share of
        invalid records."""
        rng = self._rng
        for _ in range(unique):
            self._n += 1
            topic = rng.choice(self.topics)
            subject = f"customer-{rng.randrange(50)}"
            value = orjson.dumps(
                {
                    "specversion": "1.0",
                    "id": f"evt-{self.seed}-{self._n}",
                    "source": "gateway",
                    "type": "api.request",
                    "subject": subject,
                    "time": f"2026-11-{rng.randrange(1, 28):02d}T{rng.randrange(24):02d}:"
                    f"{rng.randrange(60):02d}:{rng.randrange(60):02d}.{rng.randrange(1000):03d}Z",
                    "data": {
                        "route": rng.choice(["/a", "/b", "/c"]),
                        "tokens": rng.randrange(1000),
                    },
                }
            )
            partition = rng.randrange(self.partitions)
            self.records.append((topic, partition, subject.encode(), value))
            self.expected.add((self.namespaces[topic], "gateway", f"evt-{self.seed}-{self._n}"))
            if rng.random() < duplicate_share:
                same_ns = [t for t in self.topics if self.namespaces[t] == self.namespaces[topic]]
                where = rng.choice(["same", "partition", "topic"])
                dup_topic = rng.choice(same_ns) if where == "topic" else topic
                dup_part = partition if where == "same" else rng.randrange(self.partitions)
                self.records.append((dup_topic, dup_part, subject.encode(), value))
            if rng.random() < invalid_share:
                bad = rng.choice(INVALID_SAMPLES) + f" #{self._n}".encode()
                self.records.append((topic, partition, b"bad", bad))
                self.invalid.append(bad)

    async def send(
        self,
        producer: AIOKafkaProducer,
        records: Sequence[Any] | None = None,
        pace: float = 0.0,
        chunk: int = 500,
    ) -> None:
        todo = self.records if records is None else records
        for start in range(0, len(todo), chunk):
            futures = [
                await producer.send(topic, value=value, key=key, partition=partition)
                for topic, partition, key, value in todo[start : start + chunk]
            ]
            for meta in await asyncio.gather(*futures):
                tp = (meta.topic, meta.partition)
                self.ends[tp] = max(self.ends.get(tp, 0), meta.offset + 1)
            if pace:
                await asyncio.sleep(pace)


async def landed(ch: ClickHouse) -> dict[tuple[str, int], int]:
    try:
        rows = await ch.query(
            f"SELECT topic, kafka_partition, max(landed_offset) FROM {ch.table('sink_offsets')} "
            "GROUP BY topic, kafka_partition"
        )
    except Exception:
        return {}
    return {(t, p): o for t, p, o in rows}


async def wait_landed(
    ch: ClickHouse, ends: dict[tuple[str, int], int], timeout: float, alive: Any = None
) -> None:
    """Until every partition's landed offset reached its end offset - 1."""
    deadline = time.monotonic() + timeout
    while True:
        now = await landed(ch)
        missing = {tp: end - 1 for tp, end in ends.items() if now.get(tp, -1) < end - 1}
        if not missing:
            return
        if alive is not None and not alive():
            raise AssertionError(f"worker exited; not landed: {missing} (landed {now})")
        if time.monotonic() > deadline:
            raise AssertionError(f"not landed within {timeout}s: want {missing}, have {now}")
        await asyncio.sleep(0.5)


async def assert_exact(ch: ClickHouse, expected: set[tuple[str, str, str]]) -> None:
    """The raw table holds every expected identity exactly once and no offset twice."""
    table = ch.table("events")
    [(rows, identities, coords)] = await ch.query(
        f"SELECT count(), uniqExact(namespace, source, id), "
        f"uniqExact(_topic, _partition, _offset) FROM {table}"
    )
    got = {(n, s, i) for n, s, i in await ch.query(f"SELECT namespace, source, id FROM {table}")}
    missing = expected - got
    extra = got - expected
    assert not missing, f"{len(missing)} events missing, e.g. {sorted(missing)[:5]}"
    assert not extra, f"{len(extra)} unexpected events, e.g. {sorted(extra)[:5]}"
    assert rows == identities == coords == len(expected), (
        f"rows={rows} identities={identities} offsets={coords} expected={len(expected)}"
    )


async def landed_exactly(
    ch: ClickHouse, work: Workload, alive: Callable[[], bool], timeout: float = 180
) -> None:
    """Everything sent landed, and the raw table holds each unique valid event once."""
    await wait_landed(ch, work.ends, timeout=timeout, alive=alive)
    await assert_exact(ch, work.expected)


async def read_topic(bootstrap: str, topic: str, want: int, timeout: float = 60) -> list[Any]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                got.extend(records)
            if len(got) >= want and not batch:
                break
    finally:
        await consumer.stop()
    return got


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


REGEX = r"^om_(?P<namespace>[a-z]+)(?:-[0-9]+)?_{uid}$"


async def topics_for(
    make_topics: Callable[..., Any], uid: str, partitions: int = 3
) -> tuple[list[str], dict[str, str]]:
    """Three topics: two of namespace `acme` (cross-topic duplicates), one of `globex`."""
    names = [f"om_acme_{uid}", f"om_acme-2_{uid}", f"om_globex_{uid}"]
    await make_topics(*names, partitions=partitions)
    return names, {names[0]: "acme", names[1]: "acme", names[2]: "globex"}
