"""`make demo`: send usage events to the local stack, run the worker until they landed, and
print what landed per customer. Reads KAFKA_BOOTSTRAP_SERVERS / REDIS_URL / CLICKHOUSE_URL
(from `scripts/stack.sh env`) and `config/local.yaml`."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from sink import config
from sink.metering import usage
from sink.stores.clickhouse.connection import ClickHouse

ROOT = Path(__file__).resolve().parent.parent
CUSTOMERS = ("acme", "globex", "initech")
EVENTS_PER_CUSTOMER = 5_000


async def ensure_topics(bootstrap: str, topics: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        missing = set(topics) - set(await admin.list_topics())
        if missing:
            await admin.create_topics([NewTopic(t, 3, 1) for t in sorted(missing)])
    finally:
        await admin.close()


def event(customer: str, rng: random.Random) -> tuple[bytes, bytes]:
    subject = f"{customer}-user-{rng.randrange(20)}"
    kind = rng.choice(["api.request", "llm.tokens"])
    data = (
        {
            "route": rng.choice(["/v1/search", "/v1/items", "/v1/orders"]),
            "user": f"{customer}-u{rng.randrange(40)}",
            "status": 200,
        }
        if kind == "api.request"
        else {"model": rng.choice(["small", "large"]), "tokens": rng.randrange(10, 4000)}
    )
    value = orjson.dumps(
        {
            "specversion": "1.0",
            "id": str(uuid.uuid4()),
            "source": f"{customer}-gateway",
            "type": kind,
            "subject": subject,
            "time": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - rng.randrange(7200))
            ),
            "data": data,
        }
    )
    return subject.encode(), value


async def produce(bootstrap: str) -> tuple[int, int, int]:
    rng = random.Random()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=10)
    await producer.start()
    sent = duplicates = invalid = 0
    try:
        for customer in CUSTOMERS:
            topic = f"om_{customer}_events"
            for _ in range(EVENTS_PER_CUSTOMER):
                key, value = event(customer, rng)
                await producer.send(topic, value, key=key)
                sent += 1
                if rng.random() < 0.05:  # a client retry: the same event again
                    await producer.send(topic, value, key=key)
                    duplicates += 1
            for n in range(10):
                await producer.send(topic, b'{"specversion": "1.0", "oops": %d}' % n)
                invalid += 1
        await producer.flush()
    finally:
        await producer.stop()
    return sent, duplicates, invalid


async def wait_and_report(url: str, expected_new: int, before: int) -> None:
    ch = ClickHouse(url, connect_timeout=5, query_timeout=30)
    table = ch.table("events")
    deadline = time.monotonic() + 180
    try:
        while True:
            try:
                [(count,)] = await ch.query(f"SELECT count() FROM {table}")
            except Exception:
                count = 0
            if count - before >= expected_new or time.monotonic() > deadline:
                break
            await asyncio.sleep(1)
        print(f"\nlanded {count - before} new events (sent {expected_new} unique)\n")
        await print_usage(ch)
    finally:
        await ch.close()


async def print_usage(ch: ClickHouse) -> None:
    """Per-customer usage today (UTC), from the meters in config/meters.yaml."""
    cfg = config.load(ROOT / "config" / "local.yaml")
    for meter in cfg.meters:
        rows = await usage.query(ch, meter, window="MONTH", group_by=list(meter.group_by))
        print(
            f"{meter.slug} ({meter.aggregation} of {meter.event_type}"
            f"{', ' + meter.value_property if meter.value_property else ''}), this month:"
        )
        print(usage.render(rows, "table") + "\n")


async def landed_count(url: str) -> int:
    ch = ClickHouse(url, connect_timeout=5, query_timeout=30)
    try:
        [(count,)] = await ch.query(f"SELECT count() FROM {ch.table('events')}")
        return int(count)
    except Exception:
        return 0
    finally:
        await ch.close()


def main() -> int:
    logging.getLogger("aiokafka").setLevel(logging.ERROR)  # leader elections of new topics
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
    url = "clickhouse://default:@127.0.0.1:19000/sink"
    topics = [f"om_{c}_events" for c in CUSTOMERS]
    asyncio.run(ensure_topics(bootstrap, topics))
    before = asyncio.run(landed_count(url))
    worker = subprocess.Popen(
        [sys.executable, "-m", "sink", "run", "-c", "config/local.yaml"],
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
    )
    try:
        sent, duplicates, invalid = asyncio.run(produce(bootstrap))
        print(f"sent {sent} events, {duplicates} duplicates, {invalid} invalid records")
        asyncio.run(wait_and_report(url, sent, before))
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
    print("\nmetrics: http://127.0.0.1:8080/metrics while `sink run -c config/local.yaml` runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
