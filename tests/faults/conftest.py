# The integration fixtures are imported to be served here too; their names are then reused as
# fixture parameters, which ruff takes for redefinitions.
# ruff: noqa: F811
"""Fault injection against a real `sink run`: toxiproxy in front of Redis and ClickHouse,
process signals, service restarts, hostile records; plus the load that runs through them.

Needs the local stack (`bash scripts/stack.sh up`, `eval "$(bash scripts/stack.sh env)"`) and
toxiproxy (`bash scripts/toxiproxy.sh up`; the fixture starts it when its API does not answer).
Each test records what it measured (recovery times) in `.stack/faults/results.jsonl` and the
terminal summary prints them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

# The integration suite's per-test fixtures (topics, database, worker config and processes).
from tests.integration.conftest import (  # noqa: F401
    SinkProcess,
    admin,
    clickhouse_db,
    make_topics,
    producer,
    run_sink,
    sink_config,
    uid,
)
from tests.integration.workload import Workload

ROOT = Path(__file__).resolve().parents[2]
TOXIPROXY_SCRIPT = ROOT / "scripts" / "toxiproxy.sh"
RESULTS = ROOT / ".stack" / "faults" / "results.jsonl"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wants_slow = "slow" in (config.getoption("markexpr", "") or "")
    for item in items:
        if "tests/faults" not in str(item.fspath).replace(os.sep, "/"):
            continue
        item.add_marker(pytest.mark.faults)
        if item.get_closest_marker("slow") and not wants_slow:
            item.add_marker(pytest.mark.skip(reason="long soak: run with -m slow"))


@pytest.fixture(autouse=True)
async def _services_answer(request: pytest.FixtureRequest) -> None:
    """The stack is shared (other tests restart its services too): before a test that uses
    it starts, wait until the broker accepts a client again, at most two minutes."""
    if "services" not in request.fixturenames:
        return
    from aiokafka.admin import AIOKafkaAdminClient

    services = request.getfixturevalue("services")
    deadline = time.monotonic() + 120
    while True:
        client = AIOKafkaAdminClient(bootstrap_servers=services.kafka, request_timeout_ms=5000)
        try:
            await client.start()
            await client.list_topics()
            return
        except (KafkaError, OSError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(2)
        finally:
            with contextlib.suppress(Exception):
                await client.close()


# ------------------------------------------------------------------------------- results


def record_result(test: str, **values: Any) -> None:
    """Append what a test measured; printed at the end of the session."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as out:
        out.write(json.dumps({"test": test, "at": time.time(), **values}) + "\n")


_SESSION_START = time.time()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS.exists():
        return
    rows = []
    for line in RESULTS.read_text().splitlines():
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if row.get("at", 0) >= _SESSION_START:
                rows.append(row)
    if not rows:
        return
    terminalreporter.section("fault measurements")
    for row in rows:
        values = {k: v for k, v in row.items() if k not in ("test", "at")}
        terminalreporter.write_line(f"{row['test']}: {json.dumps(values)}")


# ------------------------------------------------------------------------------- toxiproxy


class Toxiproxy:
    """The toxiproxy HTTP API (stdlib only)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                text = response.read()
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"toxiproxy {method} {path}: {exc.code} {exc.read()!r}") from exc
        try:
            return json.loads(text) if text else None
        except ValueError:  # /version answers plain text
            return text.decode()

    def answers(self) -> bool:
        try:
            self.call("GET", "/version")
            return True
        except (OSError, AssertionError):
            return False

    def create(self, name: str, upstream: str) -> Proxy:
        with contextlib.suppress(AssertionError):
            self.call("DELETE", f"/proxies/{name}")
        made = self.call(
            "POST", "/proxies", {"name": name, "listen": "127.0.0.1:0", "upstream": upstream}
        )
        return Proxy(self, name, made["listen"], upstream)


@dataclass
class Proxy:
    api: Toxiproxy
    name: str
    listen: str
    upstream: str
    _n: int = 0

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    def add(
        self, kind: str, stream: str = "downstream", toxicity: float = 1.0, **attributes: Any
    ) -> str:
        self._n += 1
        name = f"{kind}_{stream}_{self._n}"
        self.api.call(
            "POST",
            f"/proxies/{self.name}/toxics",
            {
                "name": name,
                "type": kind,
                "stream": stream,
                "toxicity": toxicity,
                "attributes": attributes,
            },
        )
        return name

    def remove(self, toxic: str) -> None:
        self.api.call("DELETE", f"/proxies/{self.name}/toxics/{toxic}")

    def clear(self) -> None:
        for toxic in self.api.call("GET", f"/proxies/{self.name}/toxics") or []:
            with contextlib.suppress(AssertionError):
                self.remove(toxic["name"])

    def enabled(self, on: bool) -> None:
        """Disabling closes the listener and every open connection; enabling listens again on
        the same address."""
        self.api.call(
            "POST",
            f"/proxies/{self.name}",
            {"enabled": on, "listen": self.listen, "upstream": self.upstream},
        )

    @contextlib.contextmanager
    def toxic(self, kind: str, stream: str = "downstream", **attributes: Any) -> Iterator[str]:
        name = self.add(kind, stream, **attributes)
        try:
            yield name
        finally:
            with contextlib.suppress(AssertionError, OSError):
                self.remove(name)


@pytest.fixture(scope="session")
def toxiproxy() -> Toxiproxy:
    api = Toxiproxy(os.environ.get("TOXIPROXY_URL", "http://127.0.0.1:18474"))
    if not api.answers():
        started = subprocess.run(
            ["bash", str(TOXIPROXY_SCRIPT), "up"], capture_output=True, text=True, timeout=600
        )
        if started.returncode != 0 or not api.answers():
            pytest.fail(
                "toxiproxy is needed: `bash scripts/toxiproxy.sh up`\n" + started.stderr[-2000:],
                pytrace=False,
            )
    return api


@pytest.fixture
def proxies(toxiproxy: Toxiproxy, uid: str) -> Iterator[Callable[[str, str], Proxy]]:
    """Proxies of this test's own: `proxy("redis", "127.0.0.1:16379")`; removed afterwards."""
    made: list[Proxy] = []

    def make(role: str, upstream: str) -> Proxy:
        proxy = toxiproxy.create(f"f{uid}-{role}-{len(made)}", upstream)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        with contextlib.suppress(AssertionError, OSError):
            toxiproxy.call("DELETE", f"/proxies/{proxy.name}")


def host_port(url: str) -> str:
    """`host:port` of a redis:// or clickhouse:// URL."""
    netloc = url.split("://", 1)[1].split("/", 1)[0]
    return netloc.rsplit("@", 1)[-1]


def via(url: str, proxy: Proxy) -> str:
    """The same URL with its host:port replaced by the proxy's."""
    scheme, rest = url.split("://", 1)
    netloc, _, path = rest.partition("/")
    auth = netloc.rsplit("@", 1)[0] + "@" if "@" in netloc else ""
    return f"{scheme}://{auth}{proxy.listen}/{path}"


# ------------------------------------------------------------------------------- load


@dataclass
class Load:
    """Sends a workload's records in paced chunks in the background, while faults happen.

    A chunk whose send fails (the broker restarting) is sent again: a resent valid record is
    a duplicate of the same identity (the sink drops it), a resent invalid record is
    dead-lettered again (the dead-letter topic is at-least-once), so the expectations of the
    workload still hold. End offsets are read back from Kafka, not from the send results.
    """

    bootstrap: str
    records: Sequence[tuple[str, int, bytes | None, bytes]]
    chunk: int = 500
    pace: float = 0.2
    sent: int = 0
    resends: int = 0
    task: asyncio.Task[None] | None = None
    started: float = 0.0
    finished: float = 0.0
    errors: list[str] = field(default_factory=list)

    def start(self) -> Load:
        self.started = time.monotonic()
        self.task = asyncio.create_task(self._run())
        return self

    async def _producer(self) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            max_batch_size=256 * 1024,
            request_timeout_ms=20_000,
        )
        await producer.start()
        return producer

    async def _run(self) -> None:
        producer: AIOKafkaProducer | None = None
        try:
            for start in range(0, len(self.records), self.chunk):
                part = self.records[start : start + self.chunk]
                while True:
                    try:
                        if producer is None:
                            producer = await asyncio.wait_for(self._producer(), 30)
                        assert producer is not None
                        futures = [
                            await producer.send(topic, value=value, key=key, partition=partition)
                            for topic, partition, key, value in part
                        ]
                        await asyncio.wait_for(asyncio.gather(*futures), 60)
                        break
                    except (KafkaError, OSError, TimeoutError) as exc:
                        self.resends += 1
                        self.errors.append(repr(exc)[:200])
                        if producer is not None:
                            with contextlib.suppress(Exception):
                                await asyncio.wait_for(producer.stop(), 10)
                            producer = None
                        await asyncio.sleep(1)
                self.sent += len(part)
                if self.pace:
                    await asyncio.sleep(self.pace)
        finally:
            self.finished = time.monotonic()
            if producer is not None:
                with contextlib.suppress(Exception):
                    await producer.stop()

    @property
    def fraction(self) -> float:
        return self.sent / max(1, len(self.records))

    async def reached(self, fraction: float, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while self.fraction < fraction:
            assert self.task is not None
            if self.task.done():
                self.task.result()
                return
            assert time.monotonic() < deadline, f"load stuck at {self.sent}/{len(self.records)}"
            await asyncio.sleep(0.1)

    async def done(self, timeout: float = 300) -> None:
        assert self.task is not None
        await asyncio.wait_for(asyncio.shield(self.task), timeout)


async def log_ends(bootstrap: str, topics: Sequence[str]) -> dict[tuple[str, int], int]:
    """End offset of every non-empty partition of the topics, read from the broker."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [
            TopicPartition(t, p)
            for t in topics
            for p in sorted(consumer.partitions_for_topic(t) or await _partitions(consumer, t))
        ]
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    return {(tp.topic, tp.partition): end for tp, end in ends.items() if end > 0}


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    for _ in range(50):
        await consumer._client.force_metadata_update()
        found = consumer.partitions_for_topic(topic)
        if found:
            return set(found)
        await asyncio.sleep(0.2)
    raise AssertionError(f"no partitions for {topic}")


# ------------------------------------------------------------------------------- the worker


def log_events(proc: SinkProcess) -> list[dict[str, Any]]:
    """The worker's JSON log lines (library lines in plain text are skipped)."""
    events = []
    for line in proc.logs().splitlines():
        if line.startswith("{"):
            with contextlib.suppress(orjson.JSONDecodeError):
                events.append(orjson.loads(line))
    return events


def wall(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


async def next_landed(proc: SinkProcess, after: float, timeout: float = 120) -> float:
    """Seconds from `after` (wall clock) to the first batch the worker landed since then."""
    deadline = time.monotonic() + timeout
    while True:
        for event in log_events(proc):
            if event.get("event") == "batch landed" and wall(event) >= after:
                return round(wall(event) - after, 2)
        if not proc.running:
            raise AssertionError("worker exited:\n" + proc.logs()[-3000:])
        if time.monotonic() > deadline:
            raise AssertionError(f"no batch landed within {timeout}s after the fault ended")
        await asyncio.sleep(0.2)


async def _recovered(
    proc: SinkProcess, after: float, load: Load, ch: Any, topics: Sequence[str]
) -> float | None:
    """Seconds from the end of the fault to the next landed batch; None when everything sent
    had already landed before the fault ended (nothing left to land)."""
    from tests.integration.workload import landed

    deadline = time.monotonic() + 120
    while True:
        try:
            return await next_landed(proc, after, timeout=1)
        except AssertionError:
            if not proc.running:
                raise
        if load.task is not None and load.task.done():
            ends = await log_ends(load.bootstrap, topics)
            now = await landed(ch)
            if all(now.get(tp, -1) >= end - 1 for tp, end in ends.items()):
                return None
        if time.monotonic() > deadline:
            raise AssertionError("no batch landed within 120s after the fault ended")


def count(proc: SinkProcess, event: str) -> int:
    return sum(1 for e in log_events(proc) if e.get("event") == event)


def http_port(proc: SinkProcess) -> int:
    for event in log_events(proc):
        if event.get("event") == "http listening":
            return int(event["port"])
    raise AssertionError("the worker did not log its HTTP port")


def metric(proc: SinkProcess, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`, scraped from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{http_port(proc)}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def workload(
    topics: Sequence[str],
    namespaces: dict[str, str],
    partitions: int,
    seed: int,
    unique: int,
    duplicate_share: float = 0.05,
    invalid_share: float = 0.005,
) -> Workload:
    work = Workload(topics, namespaces, partitions=partitions, seed=seed)
    work.add(unique, duplicate_share=duplicate_share, invalid_share=invalid_share)
    return work


# ------------------------------------------------------------------------------- processes


def stack_pid(service: str) -> int:
    pid_file = {"kafka": "kafka/kafka.pid", "redis": "redis/redis.pid"}[service]
    return int((ROOT / ".stack" / pid_file).read_text().strip())


@dataclass
class RedisServer:
    """A redis-server of the test's own (no persistence unless asked), restartable at will."""

    directory: Path
    port: int
    password: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        command = [binary, "--bind", "127.0.0.1", "--port", str(self.port)]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.directory)]
        if self.password:
            command += ["--requirepass", self.password]
        self.directory.mkdir(parents=True, exist_ok=True)
        log = (self.directory / "redis.log").open("ab")
        self.proc = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._answers():
                return self
            time.sleep(0.1)
        raise AssertionError("own redis-server did not start")

    def _answers(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                if self.password:
                    s.sendall(f"AUTH {self.password}\r\n".encode())
                    s.recv(64)
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[Callable[..., RedisServer]]:
    from tests.integration.test_worker import free_port

    servers: list[RedisServer] = []

    def start(password: str | None = None) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(servers)}", free_port(), password).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


# ------------------------------------------------------------------------------- scenario


@dataclass
class Outcome:
    proc: SinkProcess
    work: Workload
    topics: list[str]
    load: Load
    measured: dict[str, Any]


@pytest.fixture
def scenario(
    services: Any,
    make_topics: Callable[..., Any],
    clickhouse_db: Any,
    sink_config: Callable[..., Path],
    run_sink: Callable[..., SinkProcess],
    uid: str,
) -> Callable[..., Any]:
    """One worker under a continuous load through a fault, then the checks every fault test
    shares: all landed, exactly once, every invalid record dead-lettered, the same process
    still running, no rebalance (unless `rebalance_ok`), and the recovery time.

    `fault(proc, load, measured)` runs the fault while the load is being sent and returns the
    wall-clock time the fault ended."""
    from tests.integration.test_worker import REGEX, free_port, topics_for
    from tests.integration.workload import assert_exact, read_topic, wait_landed

    async def run(
        fault: Callable[[SinkProcess, Load, dict[str, Any]], Any],
        *,
        name: str,
        seed: int,
        unique: int = 20_000,
        partitions: int = 3,
        chunk: int = 500,
        pace: float = 0.5,
        rebalance_ok: bool = False,
        land_timeout: float = 240,
        clickhouse_proxy: Proxy | None = None,
        redis_proxy: Proxy | None = None,
        **sections: Any,
    ) -> Outcome:
        topics, namespaces = await topics_for(make_topics, uid, partitions=partitions)
        work = workload(topics, namespaces, partitions, seed, unique)
        port = free_port()
        kafka = {"topics_regex": REGEX.format(uid=uid), **sections.pop("kafka", {})}
        http = {"port": port, **sections.pop("http", {})}
        if clickhouse_proxy is not None:
            base = services.clickhouse.rsplit("/", 1)[0]
            url = via(f"{base}/t_{uid}", clickhouse_proxy)
            sections["clickhouse"] = {"url": url, **sections.get("clickhouse", {})}
        if redis_proxy is not None:
            url = via(services.redis, redis_proxy)
            sections["dedup"] = {"redis_url": url, **sections.get("dedup", {})}
        proc = run_sink(sink_config(kafka=kafka, http=http, **sections))
        assert proc.proc is not None
        pid = proc.proc.pid
        load = Load(services.kafka, work.records, chunk=chunk, pace=pace).start()
        measured: dict[str, Any] = {"records": len(work.records), "unique": len(work.expected)}
        try:
            await next_landed(proc, 0, timeout=120)  # landing steadily before the fault
            fault_end = await fault(proc, load, measured)
            measured["fault_end_to_next_batch_s"] = await _recovered(
                proc, fault_end, load, clickhouse_db, topics
            )
            await load.done()
            load_done = time.monotonic()
            measured["load_s"] = round(load.finished - load.started, 1)
            ends = await log_ends(services.kafka, topics)
            await wait_landed(clickhouse_db, ends, timeout=land_timeout, alive=lambda: proc.running)
            measured["load_end_to_all_landed_s"] = round(time.monotonic() - load_done, 1)
            measured["fault_end_to_all_landed_s"] = round(time.time() - fault_end, 1)
            await assert_exact(clickhouse_db, work.expected)
            dlq = await read_topic(services.kafka, f"sink-{uid}.dlq", want=len(set(work.invalid)))
            assert {r.value for r in dlq} == set(work.invalid)
            measured["dead_letters"] = len(dlq)
            assert proc.running and proc.proc.pid == pid, "the worker must recover by itself"
            assignments = count(proc, "partitions assigned")
            measured["assignments"] = assignments
            if not rebalance_ok:
                assert assignments == 1, f"the worker was evicted/rebalanced ({assignments})"
            measured["resends"] = load.resends
        finally:
            record_result(name, **measured)
            if load.task is not None and not load.task.done():
                load.task.cancel()
        assert proc.stop() == 0, proc.logs()[-3000:]
        return Outcome(proc, work, topics, load, measured)

    return run
