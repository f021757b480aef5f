"""`sink serve` on the local stack: how long its answers take, and how fresh they are.

    eval "$(bash scripts/stack.sh env)"
    .venv/bin/python -m benchmarks.api_latency                  # both parts
    .venv/bin/python -m benchmarks.api_latency --only queries --subjects 1000 --activity 0.1
    .venv/bin/python -m benchmarks.api_latency --only freshness --rate 1000 --seconds 60

queries: a month of one-minute windows for one customer with `--subjects` subjects, each with
usage in `--activity` of the minutes (and a second customer as large, so the namespace filter
has work to do), written into a SUM meter's table as its view writes it; then each query,
over HTTP to a real `sink serve`, `--repeat` times after two warm-ups, one at a time. Printed:
p50/p99 of the request (client side), the meter rows the query reads and the rows it answers.

freshness: a real `sink run` and `sink serve`; `--rate` events/s of steady load into one
customer's topic, and every `--probe-every` seconds a probe event of a subject of its own;
the time from producing the probe to the API's first answer that counts it (polled every
20 ms). Printed: p50/p99 of that delay.

Everything is created under `bench_api_<run>` (database, topics, group, Redis prefix) and
deleted at the end. Results: benchmarks/results/api-latency-<run>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml

from benchmarks.common import (
    RESULTS,
    ROOT,
    Services,
    clickhouse,
    code_version,
    create_topics,
    delete_redis_prefix,
    delete_topics,
    drop_database,
    free_port,
    log,
    python,
    quantile,
    server_version,
    shown,
)
from sink.api.auth import digest
from sink.metering.meter_sql import MeterSQL
from sink.metering.meters import Meter
from sink.stores.clickhouse.sql import ServerFeatures, parse_version

TOKEN = "bench-operator-token"
CUSTOMER = "acme"
OTHER = "globex"
MONTH = (datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC))
TOKENS_METER = {
    "slug": "tokens",
    "event_type": "llm.tokens",
    "aggregation": "SUM",
    "value_property": "tokens",
    "group_by": {"model": "model"},
}
CALLS_METER = {"slug": "calls", "event_type": "api.request", "aggregation": "COUNT"}
MODELS = ("small", "medium", "large")


@dataclass(frozen=True)
class Case:
    name: str
    params: dict[str, Any]
    where: str
    """Which meter rows the query reads (for the count printed beside it)."""


def between(start: str, end: str) -> str:
    return f"window_start >= toDateTime('{start}') AND window_start < toDateTime('{end}')"


def cases(subject: str) -> list[Case]:
    start, end = (m.isoformat().replace("+00:00", "Z") for m in MONTH)
    span = {"from": start, "to": end}
    month = between("2026-01-01 00:00:00", "2026-02-01 00:00:00")
    return [
        Case("MINUTE, month, customer total", {**span, "windowSize": "MINUTE"}, month),
        Case(
            "MINUTE, month, one subject",
            {**span, "windowSize": "MINUTE", "subject": subject},
            f"{month} AND subject = '{subject}'",
        ),
        Case("DAY, month, customer total", {**span, "windowSize": "DAY"}, month),
        Case("DAY, month, per subject", {**span, "windowSize": "DAY", "groupBy": "subject"}, month),
        Case(
            "DAY, month in Asia/Kolkata, per model",
            {
                "from": "2025-12-31T18:30:00Z",
                "to": "2026-01-31T18:30:00Z",
                "windowSize": "DAY",
                "windowTimeZone": "Asia/Kolkata",
                "groupBy": "model",
            },
            between("2025-12-31 18:30:00", "2026-01-31 18:30:00"),
        ),
        Case("month total per subject (billing run)", {**span, "groupBy": "subject"}, month),
    ]


# ------------------------------------------------------------------------------ processes


def start(command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    out = log_path.open("ab")
    return subprocess.Popen(
        [python(), "-m", "sink", *command],
        stdout=out,
        stderr=out,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


async def wait_ready(url: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"exited:\n{tail(log_path)}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{url}/readyz")).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} not ready:\n{tail(log_path)}")


def tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:]


def write_config(path: Path, services: Services, run: str, **sections: Any) -> Path:
    data: dict[str, Any] = {
        "meters": [TOKENS_METER, CALLS_METER],
        "kafka": {
            "bootstrap_servers": services.kafka,
            "group_id": f"bench_api_{run}",
            "topics_regex": rf"^bench_api_{run}_(?P<namespace>[a-z]+)_events$",
        },
        "dedup": {"redis_url": services.redis, "key_prefix": f"bench:api{run}:", "ttl": "2h"},
        "clickhouse": {"url": services.ch_url(f"bench_api_{run}")},
        "dlq": {"topic": f"bench_api_{run}.dlq"},
        "http": {"host": "127.0.0.1", "port": free_port()},
        "worker": {"log_format": "json"},
        "api": {
            "host": "127.0.0.1",
            "port": free_port(),
            "tokens": [{"namespace": "*", "sha256": digest(TOKEN)}],
        },
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ------------------------------------------------------------------------------ queries


async def fill(services: Services, database: str, subjects: int, activity: float) -> int:
    """Usage of two customers for a month: each (subject, minute) has usage with probability
    `activity`, in one of three models. Written straight into the meter's table, one state per
    (namespace, subject, minute, model) as the meter's view writes them."""
    ch = clickhouse(services.ch_url(database), timeout=1800)
    try:
        features = ServerFeatures(parse_version(await server_version(services)))
        sql = MeterSQL(Meter.model_validate(TOKENS_METER), features, database, "events")
        await ch.execute(sql.create_table())
        minutes = int((MONTH[1] - MONTH[0]).total_seconds()) // 60
        keep = int(activity * 1_000_000)
        for namespace in (CUSTOMER, OTHER):
            for first in range(0, subjects, 100):  # 100 subjects per INSERT: bounded memory
                count = min(100, subjects - first)
                await ch.execute(
                    f"INSERT INTO {sql.table} ({sql.columns}) "
                    "SELECT namespace, subject, window_start, group_model, sumState(v), "
                    "toUInt32(0) "
                    f"FROM (SELECT '{namespace}' AS namespace, "
                    f"concat('subject-', toString({first} + intDiv(number, {minutes}))) "
                    "AS subject, "
                    f"toDateTime({int(MONTH[0].timestamp())} + (number % {minutes}) * 60) "
                    "AS window_start, "
                    "['small', 'medium', 'large'][1 + cityHash64(number, 7) % 3] AS group_model, "
                    "toFloat64(1 + cityHash64(number, 3) % 1000) AS v "
                    f"FROM numbers({count * minutes}) "
                    f"WHERE cityHash64(number, '{namespace}') % 1000000 < {keep}) "
                    "GROUP BY namespace, subject, window_start, group_model"
                )
            log(f"  {namespace}: {subjects} subjects written")
        await ch.execute(f"OPTIMIZE TABLE {sql.table} FINAL")
        [(rows,)] = await ch.query(f"SELECT count() FROM {sql.table}")
        return int(rows)
    finally:
        await ch.close()


async def rows_read(services: Services, database: str, where: str) -> int:
    ch = clickhouse(services.ch_url(database))
    try:
        [(rows,)] = await ch.query(
            f"SELECT count() FROM `{database}`.meter_tokens "
            f"WHERE namespace = '{CUSTOMER}' AND {where}"
        )
        return int(rows)
    finally:
        await ch.close()


async def measure_queries(
    services: Services, run: str, workdir: Path, subjects: int, activity: float, repeat: int
) -> dict[str, Any]:
    database = f"bench_api_{run}"
    await clickhouse_exec(services, f"CREATE DATABASE IF NOT EXISTS {database}")
    began = time.monotonic()
    total = await fill(services, database, subjects, activity)
    log(f"meter table: {total:,} rows (both customers) in {time.monotonic() - began:.0f} s")
    config = write_config(workdir / "queries.yaml", services, run, api={"max_rows": 1_000_000})
    port = yaml.safe_load(config.read_text())["api"]["port"]
    url = f"http://127.0.0.1:{port}"
    serve = start(["serve", "-c", str(config)], workdir / "serve-queries.log")
    results = []
    try:
        await wait_ready(url, serve, workdir / "serve-queries.log")
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:
            for case in cases("subject-17"):
                params = {**case.params, "namespace": CUSTOMER}
                times, answered, size = [], 0, 0
                for i in range(repeat + 2):
                    t0 = time.perf_counter()
                    response = await client.get("/api/v1/meters/tokens/query", params=params)
                    elapsed = time.perf_counter() - t0
                    if response.status_code != 200:
                        raise RuntimeError(f"{case.name}: {response.status_code} {response.text}")
                    if i >= 2:
                        times.append(elapsed)
                    answered, size = len(response.json()["data"]), len(response.content)
                times.sort()
                read = await rows_read(services, database, case.where)
                results.append(
                    {
                        "case": case.name,
                        "p50_ms": round(quantile(times, 0.5) * 1000, 1),
                        "p99_ms": round(quantile(times, 0.99) * 1000, 1),
                        "meter_rows_read": read,
                        "rows_answered": answered,
                        "response_bytes": size,
                        "n": len(times),
                    }
                )
                log(f"  {results[-1]}")
    finally:
        stop(serve)
    return {"meter_rows_total": total, "subjects": subjects, "activity": activity, "cases": results}


async def clickhouse_exec(services: Services, sql: str) -> None:
    ch = clickhouse(services.ch_url("default"))
    try:
        await ch.execute(sql)
    finally:
        await ch.close()


# ------------------------------------------------------------------------------ freshness


def event(kind: str, subject: str, value: dict[str, Any]) -> bytes:
    return orjson.dumps(
        {
            "specversion": "1.0",
            "id": uuid.uuid4().hex,
            "source": "bench-api",
            "type": kind,
            "subject": subject,
            "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "data": value,
        }
    )


async def measure_freshness(
    services: Services, run: str, workdir: Path, rate: int, seconds: float, probe_every: float
) -> dict[str, Any]:
    from aiokafka import AIOKafkaProducer

    topic = f"bench_api_{run}_{CUSTOMER}_events"
    await create_topics(services.kafka, [topic], 4)
    config = write_config(workdir / "fresh.yaml", services, run)
    settings = yaml.safe_load(config.read_text())
    worker = start(["run", "-c", str(config)], workdir / "worker.log")
    serve: subprocess.Popen[bytes] | None = None
    producer = AIOKafkaProducer(bootstrap_servers=services.kafka, linger_ms=5, acks="all")
    delays: list[float] = []
    try:
        await wait_ready(
            f"http://127.0.0.1:{settings['http']['port']}", worker, workdir / "worker.log"
        )
        url = f"http://127.0.0.1:{settings['api']['port']}"
        serve = start(["serve", "-c", str(config)], workdir / "serve-fresh.log")
        await wait_ready(url, serve, workdir / "serve-fresh.log")
        await producer.start()
        stopping = asyncio.Event()

        async def load() -> None:
            rng = random.Random(1)
            tick = 0.05
            per_tick = max(1, round(rate * tick))
            next_at = time.monotonic()
            while not stopping.is_set():
                for _ in range(per_tick):
                    subject = f"subject-{rng.randrange(1000)}"
                    await producer.send(topic, event("api.request", subject, {"route": "/v1"}))
                next_at += tick
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))

        async def probe(client: httpx.AsyncClient, index: int) -> None:
            subject = f"probe-{run}-{index}"
            sent = time.monotonic()
            await producer.send(topic, event("api.request", subject, {"route": "/probe"}))
            while time.monotonic() - sent < 60:
                response = await client.get(
                    "/api/v1/meters/calls/query",
                    params={"subject": subject, "namespace": CUSTOMER},
                )
                if response.status_code == 200 and response.json()["data"]:
                    delays.append(time.monotonic() - sent)
                    return
                await asyncio.sleep(0.02)
            log(f"probe {index} not seen within 60 s")

        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
            loader = asyncio.create_task(load())
            await asyncio.sleep(5)  # warm up: batches flowing at the steady rate
            probes = []
            ends = time.monotonic() + seconds
            index = 0
            while time.monotonic() < ends:
                probes.append(asyncio.create_task(probe(client, index)))
                index += 1
                await asyncio.sleep(probe_every)
            await asyncio.gather(*probes)
            stopping.set()
            await loader
    finally:
        with contextlib.suppress(Exception):
            await producer.stop()
        stop(serve)
        stop(worker)
        with contextlib.suppress(Exception):
            await delete_topics(services.kafka, [topic, f"bench_api_{run}.dlq"])
        await delete_redis_prefix(services.redis, f"bench:api{run}:")
    delays.sort()
    result = {
        "rate_events_per_s": rate,
        "probes": len(delays),
        "p50_s": round(quantile(delays, 0.5), 3),
        "p99_s": round(quantile(delays, 0.99), 3),
        "max_s": round(delays[-1], 3) if delays else None,
        "batch_max_wait_s": 1.0,
    }
    log(f"freshness: {result}")
    return result


# ------------------------------------------------------------------------------ main


def table(result: dict[str, Any]) -> str:
    lines = []
    queries = result.get("queries")
    if queries:
        lines += [
            f"Queries: one customer, {queries['subjects']:,} subjects, usage in "
            f"{queries['activity']:.0%} of their minutes of January 2026; meter table "
            f"{queries['meter_rows_total']:,} rows (two customers).",
            "",
            "| query | p50 ms | p99 ms | meter rows read | rows answered |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {c['case']} | {c['p50_ms']} | {c['p99_ms']} | {c['meter_rows_read']:,} | "
            f"{c['rows_answered']:,} |"
            for c in queries["cases"]
        ]
    fresh = result.get("freshness")
    if fresh:
        lines += [
            "",
            f"Freshness at {fresh['rate_events_per_s']:,} events/s: produce to counted by the "
            f"API, p50 {fresh['p50_s']} s, p99 {fresh['p99_s']} s, max {fresh['max_s']} s "
            f"({fresh['probes']} probes; worker batch.max_wait {fresh['batch_max_wait_s']} s).",
        ]
    return "\n".join(lines)


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["queries", "freshness"], default=None)
    parser.add_argument("--subjects", type=int, default=1000)
    parser.add_argument("--activity", type=float, default=0.1)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--probe-every", type=float, default=0.5)
    parser.add_argument("--keep", action="store_true", help="keep the database")
    args = parser.parse_args(argv)
    services = Services.from_env()
    run = uuid.uuid4().hex[:8]
    workdir = RESULTS / f"api-latency-{run}"
    workdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "run": run,
        "clickhouse": await server_version(services),
        "code": code_version(),
        "started": datetime.now(UTC).isoformat(),
    }
    steps: list[tuple[str, Callable[[], Any]]] = []
    if args.only in (None, "queries"):
        steps.append(
            (
                "queries",
                lambda: measure_queries(
                    services, run, workdir, args.subjects, args.activity, args.repeat
                ),
            )
        )
    if args.only in (None, "freshness"):
        steps.append(
            (
                "freshness",
                lambda: measure_freshness(
                    services, run, workdir, args.rate, args.seconds, args.probe_every
                ),
            )
        )
    try:
        for name, step in steps:
            log(f"{name} ...")
            result[name] = await step()
    finally:
        if not args.keep:
            await drop_database(services, f"bench_api_{run}")
    out = RESULTS / f"api-latency-{run}.json"
    out.write_text(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    print(table(result))
    print(f"\nresults: {shown(out)}; logs: {shown(workdir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
