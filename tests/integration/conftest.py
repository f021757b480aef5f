"""Per-test isolated resources on the real services, and a handle on a real `sink run`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from sink.stores.clickhouse.connection import ClickHouse
from tests.conftest import ROOT, Services
from tests.integration.workload import REGEX, Workload, topics_for

pytestmark = pytest.mark.integration


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
async def admin(services: Services) -> AsyncIterator[AIOKafkaAdminClient]:
    client = AIOKafkaAdminClient(bootstrap_servers=services.kafka)
    await client.start()
    yield client
    await client.close()


@pytest.fixture
async def make_topics(
    admin: AIOKafkaAdminClient,
) -> AsyncIterator[Callable[..., Any]]:
    created: list[str] = []

    async def make(*names: str, partitions: int = 1) -> list[str]:
        await admin.create_topics([NewTopic(n, partitions, 1) for n in names])
        created.extend(names)
        await wait_for_topics(admin, names)
        return list(names)

    yield make
    if created:
        with contextlib.suppress(Exception):
            await admin.delete_topics(created)


async def wait_for_topics(admin: AIOKafkaAdminClient, names: tuple[str, ...] | list[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if set(names) <= set(await admin.list_topics()):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"topics {names} did not appear")


@pytest.fixture
async def clickhouse_db(services: Services, uid: str) -> AsyncIterator[ClickHouse]:
    """A ClickHouse database of the test's own; the handle points at it."""
    base = services.clickhouse.rsplit("/", 1)[0]
    root = ClickHouse(base + "/default", connect_timeout=5, query_timeout=60)
    name = f"t_{uid}"
    await root.execute(f"CREATE DATABASE IF NOT EXISTS {name}")
    db = ClickHouse(f"{base}/{name}", connect_timeout=5, query_timeout=60)
    yield db
    await db.close()
    await root.execute(f"DROP DATABASE IF EXISTS {name}")
    await root.close()


@pytest.fixture
async def producer(services: Services) -> AsyncIterator[AIOKafkaProducer]:
    p = AIOKafkaProducer(
        bootstrap_servers=services.kafka, acks="all", linger_ms=5, max_batch_size=256 * 1024
    )
    await p.start()
    yield p
    await p.stop()


def cloud_event(
    event_id: str,
    subject: str = "customer-1",
    *,
    source: str = "test",
    type_: str = "api.request",
    time_: str = "2026-11-27T10:15:30.250Z",
    data: dict[str, Any] | None = None,
) -> bytes:
    return orjson.dumps(
        {
            "specversion": "1.0",
            "id": event_id,
            "source": source,
            "type": type_,
            "subject": subject,
            "time": time_,
            "data": data if data is not None else {"n": 1},
        }
    )


class SinkProcess:
    """The real worker as a subprocess (`python -m sink run -c FILE`), logs to a file."""

    def __init__(self, config_path: Path, log_path: Path, workers: int = 1) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.workers = workers
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SinkProcess:
        log = self.log_path.open("ab")
        command = [sys.executable, "-m", "sink", "run", "-c", str(self.config_path)]
        if self.workers > 1:
            command += ["--workers", str(self.workers)]
        self.proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=log,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group (the supervisor and its workers)."""
        if self.running:
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 60) -> int:
        if self.proc is None:
            return 0
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def sink_config(services: Services, tmp_path: Path, uid: str) -> Callable[..., Path]:
    """Write a worker configuration for this test; keyword sections override defaults."""

    def write(name: str = "sink", **sections: Any) -> Path:
        base = services.clickhouse.rsplit("/", 1)[0]
        data: dict[str, Any] = {
            "kafka": {
                "bootstrap_servers": services.kafka,
                "group_id": f"sink-{uid}",
                "topics_regex": rf"^om_(?P<namespace>.+)_{uid}$",
                "session_timeout": "6s",
                "heartbeat_interval": "1s",
            },
            "dedup": {"redis_url": services.redis, "key_prefix": f"t{uid}:"},
            "clickhouse": {"url": f"{base}/t_{uid}"},
            "batch": {"max_rows": 2000, "max_wait": "300ms", "max_in_flight": 20000},
            "http": {"port": 0},
            "worker": {"drain_timeout": "20s", "log_format": "json", "retry_max": "2s"},
        }
        for section, values in sections.items():
            if isinstance(values, dict):
                data.setdefault(section, {}).update(values)
            else:
                data[section] = values
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return write


@pytest.fixture
def run_sink(tmp_path: Path) -> Iterator[Callable[..., SinkProcess]]:
    started: list[SinkProcess] = []

    def start(config_path: Path, workers: int = 1, name: str = "sink") -> SinkProcess:
        proc = SinkProcess(config_path, tmp_path / f"{name}-{len(started)}.log", workers).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


@pytest.fixture
def scenario(
    make_topics: Callable[..., Any], sink_config: Callable[..., Path], uid: str
) -> Callable[..., Any]:
    """Topics (two namespaces, cross-topic duplicates possible), a generated workload on
    them, and a worker configuration with small batches (many batches, many chances to
    crash between them)."""

    async def make(
        seed: int,
        events: int,
        partitions: int = 3,
        duplicate_share: float = 0.05,
        invalid_share: float = 0.0,
        **batch: Any,
    ) -> tuple[Workload, Path]:
        topics, namespaces = await topics_for(make_topics, uid, partitions=partitions)
        work = Workload(topics, namespaces, partitions=partitions, seed=seed)
        work.add(events, duplicate_share=duplicate_share, invalid_share=invalid_share)
        config = sink_config(
            kafka={"topics_regex": REGEX.format(uid=uid)},
            batch={"max_rows": 1000, "max_wait": "200ms", "max_in_flight": 4000, **batch},
        )
        return work, config

    return make
