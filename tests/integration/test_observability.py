"""What an operator sees of a real `sink run`: /metrics, /healthz, /readyz, /status and the
logs, read over HTTP while it lands known workloads on the real services and while a
dependency fails or a partition stalls."""

from __future__ import annotations

import asyncio
import itertools
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import pytest
import redis.asyncio as redis_async
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from sink import __version__
from sink.stores.clickhouse.connection import ClickHouse
from tests.conftest import Services
from tests.integration.test_failures import _stack
from tests.integration.test_worker import REGEX, free_port, topics_for
from tests.integration.workload import Workload, assert_exact, wait_landed

T = TypeVar("T")
DEPENDENCIES = ("kafka", "redis", "clickhouse")

# ---------------------------------------------------------------------------- HTTP helpers


def get(port: int, path: str) -> tuple[int, bytes]:
    """Status code and body of a GET on the worker's HTTP port (also for 4xx/5xx)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def get_json(port: int, path: str) -> tuple[int, dict[str, Any]]:
    code, body = get(port, path)
    return code, orjson.loads(body)


@dataclass
class Scrape:
    """One /metrics page, parsed by Prometheus's own text parser."""

    text: str
    samples: list[tuple[str, dict[str, str], float]]

    @classmethod
    def of(cls, port: int) -> Scrape:
        code, body = get(port, "/metrics")
        assert code == 200, body
        text = body.decode()
        samples = [
            (s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]
        return cls(text, samples)

    def value(self, name: str, **labels: str) -> float | None:
        """Sum of the samples of `name` whose labels include `labels`; None if there is none."""
        found = [v for n, lab, v in self.samples if n == name and labels.items() <= lab.items()]
        return sum(found) if found else None

    def by(self, name: str, *keys: str) -> dict[tuple[str, ...], float]:
        """Samples of `name` keyed by the values of the given labels."""
        return {tuple(lab[k] for k in keys): v for n, lab, v in self.samples if n == name}


async def eventually(check: Callable[[], T], timeout: float, interval: float = 0.25) -> T:
    """`check()`'s result once it stops raising AssertionError (or a connection error)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (AssertionError, OSError) as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout}s: {exc}") from exc
        await asyncio.sleep(interval)


def log_lines(proc: Any) -> list[dict[str, Any]]:
    """The worker's log as JSON objects; a line that is not JSON fails the test."""
    lines = []
    for line in proc.logs().splitlines():
        if not line.strip():
            continue
        try:
            lines.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            raise AssertionError(f"log line is not JSON: {line!r}") from None
    return lines


def two_free_ports() -> int:
    """A port p with p + 1 free as well (`--workers 2` serves on both)."""
    for _ in range(50):
        port = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise AssertionError("no two consecutive free ports")


# ------------------------------------------------------------------------- rejected records


def _event(**fields: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": "bad",
        "source": "gateway",
        "type": "api.request",
        "subject": "customer-1",
        "time": "2026-11-27T10:15:30Z",
        "data": {},
    } | fields


# One record per dead-letter reason the decoder gives (with `events.max_event_bytes: 4KiB`).
REJECTS: dict[str, list[bytes]] = {
    "empty": [b""],
    "too_large": [orjson.dumps(_event(data={"pad": "x" * 5000}))],
    "invalid_json": [b"not json at all", b'{"id": "cut'],
    "not_object": [b"[1, 2, 3]"],
    "bad_specversion": [orjson.dumps(_event(specversion="0.3"))],
    "missing_field": [orjson.dumps({"specversion": "1.0", "id": "x"})],
    "wrong_type": [orjson.dumps(_event(id=7))],
    "field_too_long": [orjson.dumps(_event(subject="s" * 2000))],
    "bad_time": [orjson.dumps(_event(time="yesterday"))],
    "bad_data": [orjson.dumps(_event(data=[1, 2]))],
}


def add_rejects(work: Workload, topic: str) -> dict[str, int]:
    """Append the REJECTS records to the workload; the expected dead letters per reason."""
    for values in REJECTS.values():
        for i, value in enumerate(values):
            work.records.append((topic, i % work.partitions, b"bad", value))
            work.invalid.append(value)
    return {reason: len(values) for reason, values in REJECTS.items()}


def _base_config(uid: str, port: int, **http: Any) -> dict[str, Any]:
    return {
        "kafka": {"topics_regex": REGEX.format(uid=uid)},
        "http": {"port": port, **http},
    }


# ---------------------------------------------------------------------------------- tests


async def test_metrics_count_a_known_workload_exactly(
    make_topics: Callable[..., Any],
    producer: AIOKafkaProducer,
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Any],
    run_sink: Callable[..., Any],
    uid: str,
) -> None:
    topics, namespaces = await topics_for(make_topics, uid, partitions=3)
    work = Workload(topics, namespaces, partitions=3, seed=31)
    work.add(3000, duplicate_share=0.1, invalid_share=0.0)
    reasons = add_rejects(work, topics[0])
    await work.send(producer)
    port = free_port()
    proc = run_sink(
        sink_config(
            **_base_config(uid, port),
            events={"max_event_bytes": "4KiB"},
            batch={"max_rows": 500, "max_wait": "200ms", "max_in_flight": 5000},
        )
    )

    await wait_landed(clickhouse_db, work.ends, timeout=120, alive=lambda: proc.running)
    await assert_exact(clickhouse_db, work.expected)

    def lag_settled() -> Scrape:
        # The lag gauge is refreshed every 2 s; it must reach 0 on every held partition.
        m = Scrape.of(port)
        lag = m.by("sink_consumer_lag", "topic", "partition")
        assert len(lag) == 9 and not any(lag.values()), f"lag {lag}"
        return m

    m = await eventually(lag_settled, timeout=15)

    sent_per_topic = {t: sum(1 for r in work.records if r[0] == t) for t in topics}
    assert m.value("sink_records_consumed_total") == len(work.records)
    for topic, count in sent_per_topic.items():
        assert m.value("sink_records_consumed_total", topic=topic) == count
    duplicates = len(work.records) - len(work.expected) - len(work.invalid)
    assert duplicates > 0
    assert m.value("sink_events_inserted_total") == len(work.expected)
    assert m.value("sink_duplicates_dropped_total") == duplicates
    assert m.by("sink_dead_letters_total", "reason") == {
        (reason,): float(count) for reason, count in reasons.items()
    }

    # Per batch, not per record: every consumed record is in exactly one observed batch.
    batches = m.value("sink_batches_total")
    assert batches is not None and batches > 0
    assert m.value("sink_batch_rows_count") == batches
    assert m.value("sink_batch_rows_sum") == len(work.records)
    assert m.value("sink_flush_seconds_count") == batches
    for histogram in ("sink_insert_seconds", "sink_dedup_seconds", "sink_end_to_end_delay_seconds"):
        observed = m.value(f"{histogram}_count")
        assert observed is not None and observed > 0, histogram
    assert m.value("sink_batches_dropped_total") == 0

    assert m.by("sink_landed_offset", "topic", "partition") == {
        (t, str(p)): float(end - 1) for (t, p), end in work.ends.items()
    }
    assert m.value("sink_assigned_partitions") == 9
    assert m.value("sink_paused_partitions") == 0
    assert m.value("sink_in_flight_rows") == 0
    rebalances = m.value("sink_rebalances_total")
    assert rebalances is not None and rebalances >= 1
    assert m.by("sink_dependency_up", "dependency") == {(d,): 1.0 for d in DEPENDENCIES}
    assert m.value("sink_build_info", version=__version__) == 1
    assert proc.stop() == 0


async def test_a_backlog_lands_within_max_in_flight_without_pausing(
    make_topics: Callable[..., Any],
    producer: AIOKafkaProducer,
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Any],
    run_sink: Callable[..., Any],
    uid: str,
) -> None:
    """A backlog far larger than max_in_flight: the rows held never exceed the limit by more
    than one poll, and the worker waits for room instead of pausing partitions (a pause
    throws away what the consumer fetched ahead)."""
    topics, namespaces = await topics_for(make_topics, uid, partitions=3)
    work = Workload(topics, namespaces, partitions=3, seed=37)
    work.add(12_000, duplicate_share=0.05, invalid_share=0.0)
    await work.send(producer)
    port = free_port()
    max_rows, max_in_flight = 200, 1000
    proc = run_sink(
        sink_config(
            **_base_config(uid, port),
            batch={"max_rows": max_rows, "max_wait": "200ms", "max_in_flight": max_in_flight},
        )
    )
    held: list[float] = []
    paused: list[float] = []
    landed = asyncio.create_task(
        wait_landed(clickhouse_db, work.ends, timeout=180, alive=lambda: proc.running)
    )
    while not landed.done():
        try:
            m = await asyncio.to_thread(Scrape.of, port)
        except OSError:  # not listening yet
            await asyncio.sleep(0.05)
            continue
        held.append(m.value("sink_in_flight_rows") or 0.0)
        paused.append(m.value("sink_paused_partitions") or 0.0)
        await asyncio.sleep(0.02)
    await landed
    await assert_exact(clickhouse_db, work.expected)
    # One poll takes at most max_rows records.
    assert len(held) > 20 and max(held) <= max_in_flight - 1 + max_rows, (len(held), max(held))
    assert max(held) >= max_in_flight - max_rows, "the backlog never filled the worker"
    # (Partitions are paused at start, until positioned from the landed offsets.)
    full = [p for h, p in zip(held, paused, strict=True) if h >= max_in_flight - max_rows]
    assert full and max(full) == 0, full
    assert proc.stop() == 0


async def test_healthz_and_status_report_the_worker_without_its_secrets(
    services: Services,
    make_topics: Callable[..., Any],
    producer: AIOKafkaProducer,
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Any],
    run_sink: Callable[..., Any],
    uid: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Secrets come in the way the Helm chart passes them: environment overrides. Redis gets
    # a user of its own with a password, so the URL holds a real secret; the local
    # ClickHouse `default` user has an empty password, so its URL is checked as a whole.
    # SASL settings are ignored by the client on PLAINTEXT, but the worker still holds them.
    redis_user, redis_password = f"sink_{uid}", f"redis-pw-{uid}"
    kafka_password = f"kafka-pw-{uid}"
    admin_redis = redis_async.from_url(services.redis)
    await admin_redis.execute_command(
        "ACL", "SETUSER", redis_user, "on", f">{redis_password}", "~*", "&*", "+@all"
    )
    url = urllib.parse.urlsplit(services.redis)
    redis_url = url._replace(netloc=f"{redis_user}:{redis_password}@{url.hostname}:{url.port}")
    redis_url_text = urllib.parse.urlunsplit(redis_url)
    clickhouse_url = f"{services.clickhouse.rsplit('/', 1)[0]}/t_{uid}"
    monkeypatch.setenv("SINK__DEDUP__REDIS_URL", redis_url_text)
    monkeypatch.setenv("SINK__CLICKHOUSE__URL", clickhouse_url)
    monkeypatch.setenv("SINK__KAFKA__SASL_PASSWORD", kafka_password)
    try:
        topics, namespaces = await topics_for(make_topics, uid, partitions=2)
        work = Workload(topics, namespaces, partitions=2, seed=32)
        work.add(1500, duplicate_share=0.05, invalid_share=0.0)
        await work.send(producer)
        port = free_port()
        worker_id = f"obs-{uid}"
        config = sink_config(
            kafka={
                "topics_regex": REGEX.format(uid=uid),
                "sasl_mechanism": "PLAIN",
                "sasl_username": "sink",
            },
            http={"port": port},
            worker={"id": worker_id},
        )
        proc = run_sink(config)

        code, body = await eventually(lambda: get(port, "/healthz"), timeout=60)
        assert (code, body) == (200, b"ok\n")
        await wait_landed(clickhouse_db, work.ends, timeout=120, alive=lambda: proc.running)

        def settled() -> dict[str, Any]:
            code, status = get_json(port, "/status")
            assert code == 200
            held = {(p["topic"], p["partition"]): p for p in status["partitions"]}
            assert held.keys() == {(t, p) for t in topics for p in range(2)}
            for tp, part in held.items():
                assert part["landed_offset"] == work.ends.get(tp, 0) - 1, part
                assert part["lag"] == 0, part
                assert part["paused"] is False, part
                assert part["positioning"] is False, part
                assert part["epoch"] >= 1, part
            return status

        status = await eventually(settled, timeout=15)
        assert status["worker"] == worker_id
        assert status["state"] == "running"
        assert status["in_flight"] == {"rows": 0, "bytes": 0}
        flush = status["last_flush"]
        assert flush["records"] > 0 and flush["at"] > time.time() - 120
        assert {"inserted", "duplicates", "dead_letters", "seconds"} <= flush.keys()
        assert {n: d["up"] for n, d in status["dependencies"].items()} == dict.fromkeys(
            DEPENDENCIES, True
        )
        assert get_json(port, "/readyz") == (
            200,
            {"ready": True, "dependencies_down": [], "stalled": False, "lag": 0},
        )
        assert get(port, "/nope")[0] == 404
        # A request whose head is larger than the server reads is dropped, quietly: the
        # endpoints keep answering and the log stays JSON (checked below).
        with socket.create_connection(("127.0.0.1", port), timeout=5) as oversized:
            oversized.sendall(b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n")
            oversized.recv(100)
        assert get(port, "/healthz") == (200, b"ok\n")

        exposed = {
            "/status": get(port, "/status")[1].decode(),
            "/metrics": Scrape.of(port).text,
        }
        assert proc.stop() == 0
        exposed["log"] = proc.logs()
        assert [line for line in log_lines(proc) if line.get("worker") != worker_id] == []
        for where, text in exposed.items():
            for secret in (redis_url_text, redis_password, clickhouse_url, kafka_password):
                assert secret not in text, f"{where} shows {secret!r}"
    finally:
        await admin_redis.execute_command("ACL", "DELUSER", redis_user)
        await admin_redis.aclose()


async def test_readiness_fails_while_redis_is_down_and_recovers_with_it(
    services: Services,
    make_topics: Callable[..., Any],
    producer: AIOKafkaProducer,
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Any],
    run_sink: Callable[..., Any],
    uid: str,
) -> None:
    """Redis stops while events arrive: after `ready_dependency_grace` /readyz names it, the
    metrics show it down and retried, the partitions pause; once it is back the worker
    resumes by itself, becomes ready again and the table is exact."""
    topics, namespaces = await topics_for(make_topics, uid, partitions=2)
    work = Workload(topics, namespaces, partitions=2, seed=33)
    work.add(4000, duplicate_share=0.05, invalid_share=0.0)
    half = len(work.records) // 2
    port = free_port()
    proc = run_sink(sink_config(**_base_config(uid, port, ready_dependency_grace="3s")))
    await work.send(producer, work.records[:half])
    await wait_landed(clickhouse_db, dict(work.ends), timeout=120, alive=lambda: proc.running)
    assert get(port, "/readyz")[0] == 200

    def redis_down_seen() -> tuple[dict[str, Any], Scrape]:
        code, ready = get_json(port, "/readyz")
        assert code == 503 and "redis" in ready["dependencies_down"], ready
        m = Scrape.of(port)
        assert m.value("sink_dependency_up", dependency="redis") == 0
        retries = m.value("sink_retries_total", dependency="redis")
        assert retries is not None and retries > 0
        _, status = get_json(port, "/status")
        assert status["dependencies"]["redis"]["up"] is False
        assert status["dependencies"]["redis"]["error"]
        paused = [p for p in status["partitions"] if p["paused"]]
        assert paused and m.value("sink_paused_partitions") == len(paused), status
        return ready, m

    sender = None
    try:
        await asyncio.to_thread(_stack, services, "down", "redis")
        sender = asyncio.create_task(work.send(producer, work.records[half:], pace=0.05))
        started = time.monotonic()
        ready, first = await eventually(redis_down_seen, timeout=20)
        # Ready fails after the 3 s grace, not at the first failed call.
        assert time.monotonic() - started >= 3
        assert ready["stalled"] is False  # ready_stall_after (60 s) has not passed
        before = first.value("sink_retries_total", dependency="redis") or 0

        def retried_again() -> Scrape:
            again = Scrape.of(port)
            retries = again.value("sink_retries_total", dependency="redis") or 0
            assert retries > before, "the worker keeps retrying with backoff"
            return again

        # The backoff doubles from retry_initial (0.2 s) with up to 1.5x jitter, so the next
        # retry may be seconds away; up to retry_max (10 s) and its jitter it must come.
        again = await eventually(retried_again, timeout=20)
        assert again.value("sink_batches_total") == first.value("sink_batches_total")
    finally:
        await asyncio.to_thread(_stack, services, "up", "redis")
    assert sender is not None
    await sender

    def ready_again() -> None:
        code, ready = get_json(port, "/readyz")
        assert code == 200, ready
        assert Scrape.of(port).value("sink_dependency_up", dependency="redis") == 1

    await wait_landed(clickhouse_db, work.ends, timeout=120, alive=lambda: proc.running)
    await eventually(ready_again, timeout=15)
    await assert_exact(clickhouse_db, work.expected)
    assert proc.running, "the worker must recover by itself"
    assert proc.stop() == 0


async def test_readiness_fails_on_a_stall_while_every_dependency_is_up(
    services: Services,
    make_topics: Callable[..., Any],
    producer: AIOKafkaProducer,
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Any],
    run_sink: Callable[..., Any],
    uid: str,
) -> None:
    """A producer opens a Kafka transaction and hangs (crashed, or stuck) without committing.

    The worker reads `read_committed`, so nothing at or after the transaction's first offset
    can be fetched until the transaction ends (or `transaction.timeout.ms` aborts it): the
    partition's high watermark keeps moving, the worker holds it with lag, fetches nothing and
    lands nothing, and Kafka, Redis and ClickHouse all answer. No error is raised anywhere;
    only the stall check sees it (the case OpenMeter's readiness could not). Once the
    transaction commits, its records and everything behind them land and readiness returns.
    """
    (topic,) = await make_topics(f"om_acme_{uid}", partitions=1)
    work = Workload([topic], {topic: "acme"}, partitions=1, seed=34)
    work.add(600, duplicate_share=0.05, invalid_share=0.0)
    n = len(work.records)
    before, in_txn, behind, after = (
        work.records[: n // 4],
        work.records[n // 4 : n // 2],
        work.records[n // 2 : 3 * n // 4],
        work.records[3 * n // 4 :],
    )
    port = free_port()
    proc = run_sink(sink_config(**_base_config(uid, port, ready_stall_after="3s")))
    await work.send(producer, before)
    await wait_landed(clickhouse_db, dict(work.ends), timeout=120, alive=lambda: proc.running)
    landed_before = work.ends[(topic, 0)] - 1

    def ready() -> None:
        code, body = get_json(port, "/readyz")
        assert code == 200, body

    await eventually(ready, timeout=10)

    txn = AIOKafkaProducer(bootstrap_servers=services.kafka, transactional_id=f"obs-{uid}")
    await txn.start()
    try:
        await txn.begin_transaction()
        await work.send(txn, in_txn)
        await work.send(producer, behind)
        hung_at = time.monotonic()

        def stalled() -> dict[str, Any]:
            code, body = get_json(port, "/readyz")
            assert code == 503 and body["stalled"] is True, body
            return body

        body = await eventually(stalled, timeout=20)
        # Not before ready_stall_after: the idle time before the records arrived is no stall.
        waited = time.monotonic() - hung_at
        assert waited >= 3, f"stalled {waited:.1f}s after the lag appeared (stall_after 3s)"
        assert body["dependencies_down"] == [] and body["lag"] > 0
        _, status = get_json(port, "/status")
        [part] = status["partitions"]
        assert part["landed_offset"] == landed_before
        assert part["lag"] > 0 and part["paused"] is False
        assert all(d["up"] for d in status["dependencies"].values()), status
        m = Scrape.of(port)
        assert m.value("sink_consumer_lag", topic=topic, partition="0") == part["lag"]
        assert m.value("sink_landed_offset", topic=topic, partition="0") == landed_before
        assert 0 not in m.by("sink_dependency_up", "dependency").values()
        assert m.value("sink_retries_total") is None  # nothing failed: a stall, not an outage

        await txn.commit_transaction()
    finally:
        await txn.stop()
    # More plain records after the commit marker (see the transaction-marker test below for
    # a partition whose last record is a marker).
    await work.send(producer, after)
    await wait_landed(clickhouse_db, work.ends, timeout=120, alive=lambda: proc.running)
    await eventually(ready, timeout=15)
    await assert_exact(clickhouse_db, work.expected)
    assert proc.stop() == 0


async def test_lag_reaches_zero_after_a_transaction_commit_marker(
    services: Services,
    make_topics: Callable[..., Any],
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Any],
    run_sink: Callable[..., Any],
    uid: str,
) -> None:
    """A committed transaction ends with a commit marker: it takes an offset but is never
    delivered to the consumer, so it can never be landed. A partition whose last record is a
    marker is caught up all the same: lag 0, ready, not stalled."""
    (topic,) = await make_topics(f"om_acme_{uid}", partitions=1)
    work = Workload([topic], {topic: "acme"}, partitions=1, seed=35)
    work.add(200, duplicate_share=0.0, invalid_share=0.0)
    port = free_port()
    proc = run_sink(sink_config(**_base_config(uid, port, ready_stall_after="3s")))
    txn = AIOKafkaProducer(bootstrap_servers=services.kafka, transactional_id=f"obs-{uid}")
    await txn.start()
    try:
        async with txn.transaction():
            await work.send(txn)
    finally:
        await txn.stop()
    await wait_landed(clickhouse_db, work.ends, timeout=120, alive=lambda: proc.running)
    await asyncio.sleep(5)  # past ready_stall_after and two lag refreshes

    m = Scrape.of(port)
    assert m.value("sink_landed_offset", topic=topic, partition="0") == work.ends[(topic, 0)] - 1
    assert m.value("sink_consumer_lag", topic=topic, partition="0") == 0
    assert get_json(port, "/readyz") == (
        200,
        {"ready": True, "dependencies_down": [], "stalled": False, "lag": 0},
    )
    await assert_exact(clickhouse_db, work.expected)
    assert proc.stop() == 0


async def test_two_worker_processes_serve_consecutive_ports_and_share_the_partitions(
    make_topics: Callable[..., Any],
    producer: AIOKafkaProducer,
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Any],
    run_sink: Callable[..., Any],
    uid: str,
) -> None:
    topics, namespaces = await topics_for(make_topics, uid, partitions=2)
    partitions = {(t, p) for t in topics for p in range(2)}
    work = Workload(topics, namespaces, partitions=2, seed=36)
    work.add(3000, duplicate_share=0.05, invalid_share=0.0)
    await work.send(producer)
    port = two_free_ports()
    worker_id = f"obs-{uid}"
    proc = run_sink(sink_config(**_base_config(uid, port), worker={"id": worker_id}), workers=2)
    await wait_landed(clickhouse_db, work.ends, timeout=120, alive=lambda: proc.running)

    def settled() -> list[Scrape]:
        scrapes = []
        for index in (0, 1):
            assert get(port + index, "/healthz") == (200, b"ok\n")
            scrapes.append(Scrape.of(port + index))
        held = [m.value("sink_assigned_partitions") or 0 for m in scrapes]
        assert all(held) and sum(held) == len(partitions), held
        lag = [m.by("sink_consumer_lag", "topic", "partition") for m in scrapes]
        assert sum(len(x) for x in lag) == len(partitions), lag
        assert not any(v for x in lag for v in x.values()), lag
        return scrapes

    scrapes = await eventually(settled, timeout=45)
    held_by = []
    for index in (0, 1):
        code, status = get_json(port + index, "/status")
        assert code == 200 and status["worker"] == f"{worker_id}-{index}"
        held_by.append({(p["topic"], p["partition"]) for p in status["partitions"]})
    assert not held_by[0] & held_by[1] and held_by[0] | held_by[1] == partitions
    # Each landed event is counted once, by whichever process landed it.
    inserted = sum(m.value("sink_events_inserted_total") or 0 for m in scrapes)
    assert inserted == len(work.expected)
    await assert_exact(clickhouse_db, work.expected)
    assert proc.stop() == 0


RANGE = re.compile(r"^(?P<topic>[^/]+)/(?P<partition>\d+):(?P<first>\d+)-(?P<last>\d+)$")


async def test_logs_are_json_lines_with_the_worker_and_one_line_per_batch(
    make_topics: Callable[..., Any],
    producer: AIOKafkaProducer,
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Any],
    run_sink: Callable[..., Any],
    uid: str,
) -> None:
    topics, namespaces = await topics_for(make_topics, uid, partitions=2)
    work = Workload(topics, namespaces, partitions=2, seed=37)
    work.add(4000, duplicate_share=0.05, invalid_share=0.01)
    await work.send(producer)
    port = free_port()
    worker_id = f"obs-{uid}"
    proc = run_sink(
        sink_config(
            **_base_config(uid, port),
            batch={"max_rows": 500, "max_wait": "200ms", "max_in_flight": 5000},
            worker={"id": worker_id},
        )
    )
    await wait_landed(clickhouse_db, work.ends, timeout=120, alive=lambda: proc.running)
    batches = Scrape.of(port).value("sink_batches_total")
    assert proc.stop() == 0

    lines = log_lines(proc)
    assert [line for line in lines if line.get("worker") != worker_id] == []
    assert {"starting", "partitions assigned", "drained", "stopped"} <= {
        line["event"] for line in lines
    }
    landed = [line for line in lines if line["event"] == "batch landed"]
    # One line per batch, not per record.
    assert len(landed) == batches
    assert 8 <= len(landed) < len(work.records) / 50
    assert sum(line["records"] for line in landed) == len(work.records)
    assert sum(line["inserted"] for line in landed) == len(work.expected)
    assert sum(line["dead_letters"] for line in landed) == len(work.invalid)
    # The ranges of the batch lines tile every partition's offsets exactly once.
    seen: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for line in landed:
        assert line["ranges"], line
        for text in line["ranges"]:
            match = RANGE.match(text)
            assert match, text
            tp = (match["topic"], int(match["partition"]))
            seen.setdefault(tp, []).append((int(match["first"]), int(match["last"])))
    assert seen.keys() == work.ends.keys()
    for tp, spans in seen.items():
        spans.sort()
        assert spans[0][0] == 0 and spans[-1][1] == work.ends[tp] - 1, (tp, spans)
        for (_, last), (first, _) in itertools.pairwise(spans):
            assert first == last + 1, (tp, spans)


async def test_lag_reads_no_high_watermark_of_a_partition_the_consumer_let_go(
    services: Services, make_topics: Callable[..., Any], producer: AIOKafkaProducer, uid: str
) -> None:
    """A deleted topic leaves the consumer's assignment before the rebalance listener tells
    the worker; the lag task must skip such a partition, not die on aiokafka's assertion."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from sink.pipeline.worker import highwater

    (topic,) = await make_topics(f"om_acme_{uid}")
    for n in range(3):
        await producer.send_and_wait(topic, b"%d" % n, partition=0)
    tp = TopicPartition(topic, 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=services.kafka, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.getmany(tp, timeout_ms=5_000)
        assert highwater(consumer, tp) == 3
        consumer.assign([])
        with pytest.raises(AssertionError):
            consumer.highwater(tp)  # what aiokafka does; highwater() must absorb it
        assert highwater(consumer, tp) is None
    finally:
        await consumer.stop()
