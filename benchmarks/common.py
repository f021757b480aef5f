"""Shared plumbing: where the services are, names of our own resources, cleanup, process
sampling. Everything the benchmark creates is named `bench_<run>_...` (Kafka topics, consumer
groups, ClickHouse databases) or `bench:<run>:...` (Redis keys) and is deleted again."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import statistics
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
REPORT = ROOT / "benchmarks" / "report"


def shown(path: Path) -> str:
    """A path as the results name it: from the project's root when it is inside, so that a
    published report holds no path of the machine it ran on."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ services


@dataclass(frozen=True)
class Services:
    kafka: str
    redis: str
    clickhouse: str
    """Native URL, clickhouse://user:password@host:port/database."""
    clickhouse_http: str
    """http://host:port of the same server (for bulk reads as TSV)."""
    cluster: ClusterTarget | None = None
    """A ClickHouse cluster for the cluster variant (CLICKHOUSE_CLUSTER, CLICKHOUSE_NODES)."""

    @classmethod
    def from_env(cls) -> Services:
        """The variables `scripts/stack.sh env` prints; the local stack's ports otherwise."""
        clickhouse = os.environ.get(
            "CLICKHOUSE_URL", "clickhouse://default:@127.0.0.1:19000/default"
        )
        host = urllib.parse.urlsplit(clickhouse).hostname or "127.0.0.1"
        http_port = os.environ.get("SINK_CLICKHOUSE_HTTP_PORT", "18123")
        return cls(
            kafka=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092"),
            redis=os.environ.get("REDIS_URL", "redis://127.0.0.1:16379/0"),
            clickhouse=clickhouse,
            clickhouse_http=os.environ.get("CLICKHOUSE_HTTP_URL", f"http://{host}:{http_port}"),
            cluster=ClusterTarget.from_env(clickhouse),
        )

    def ch_url(self, database: str) -> str:
        return self.clickhouse.rsplit("/", 1)[0] + "/" + database

    def ch_credentials(self) -> tuple[str, str]:
        parts = urllib.parse.urlsplit(self.clickhouse)
        return urllib.parse.unquote(parts.username or "default"), urllib.parse.unquote(
            parts.password or ""
        )


@dataclass(frozen=True)
class ClusterTarget:
    """A replicated, sharded ClickHouse cluster: its name and every node's `host:port`, shard-
    major (`scripts/stack.sh env --cluster`). The credentials are those of CLICKHOUSE_URL."""

    name: str
    nodes: tuple[str, ...]
    base: str
    """clickhouse://user:password@ without host, port and database."""

    @classmethod
    def from_env(cls, clickhouse_url: str) -> ClusterTarget | None:
        name, nodes = os.environ.get("CLICKHOUSE_CLUSTER"), os.environ.get("CLICKHOUSE_NODES")
        if not name or not nodes:
            return None
        base = clickhouse_url.split("@", 1)[0] + "@" if "@" in clickhouse_url else "clickhouse://"
        return cls(name, tuple(n.strip() for n in nodes.split(",") if n.strip()), base)

    def url(self, database: str, node: int = 0) -> str:
        return f"{self.base}{self.nodes[node]}/{database}"

    async def drop_database(self, name: str) -> None:
        assert name.startswith("bench_"), name
        ch = clickhouse(self.url("default"))
        try:
            with contextlib.suppress(Exception):
                await ch.execute(f"DROP DATABASE IF EXISTS `{name}` ON CLUSTER {self.name}")
        finally:
            await ch.close()


def clickhouse(url: str, timeout: float = 300) -> Any:
    from sink.stores.clickhouse.connection import ClickHouse

    return ClickHouse(url, connect_timeout=10, query_timeout=timeout)


def http_query(services: Services, sql: str, timeout: float = 300) -> bytes:
    """One query over ClickHouse's HTTP interface (large result sets as TSV, fast)."""
    user, password = services.ch_credentials()
    query = urllib.parse.urlencode({"user": user, "password": password})
    request = urllib.request.Request(
        f"{services.clickhouse_http}/?{query}", data=sql.encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body: bytes = response.read()
    return body


async def ch_exec(services: Services, *statements: str) -> None:
    ch = clickhouse(services.ch_url("default"))
    try:
        for sql in statements:
            await ch.execute(sql)
    finally:
        await ch.close()


async def drop_database(services: Services, name: str) -> None:
    assert name.startswith("bench_"), name
    with contextlib.suppress(Exception):
        await ch_exec(services, f"DROP DATABASE IF EXISTS `{name}`")


async def server_version(services: Services) -> str:
    ch = clickhouse(services.ch_url("default"))
    try:
        rows = await ch.query("SELECT version()")
        return str(rows[0][0])
    finally:
        await ch.close()


# ------------------------------------------------------------------------------ kafka


async def create_topics(bootstrap: str, names: Sequence[str], partitions: int) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, partitions, 1) for n in names])
        deadline = time.monotonic() + 30
        while not set(names) <= set(await admin.list_topics()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"topics {names} did not appear")
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def delete_topics(bootstrap: str, names: Iterable[str]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    names = [n for n in names if n.startswith("bench_")]
    if not names:
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        present = set(await admin.list_topics())
        gone = [n for n in names if n in present]
        if gone:
            await admin.delete_topics(gone)
    finally:
        await admin.close()


async def delete_groups(bootstrap: str, groups: Iterable[str]) -> None:
    """Delete empty consumer groups (aiokafka's admin client has no call for it)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.protocol.admin import DeleteGroupsRequest

    groups = [g for g in groups if g.startswith("bench_")]
    if not groups:
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        for group in groups:
            with contextlib.suppress(Exception):
                node = await admin.find_coordinator(group)
                await admin._send_request(DeleteGroupsRequest([group]), node)
    finally:
        await admin.close()


async def end_offsets(bootstrap: str, topics: Sequence[str]) -> dict[tuple[str, int], int]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        tps = [
            TopicPartition(t, p)
            for t in topics
            for p in sorted(consumer.partitions_for_topic(t) or await _partitions(consumer, t))
        ]
        ends = await consumer.end_offsets(tps)
        return {(tp.topic, tp.partition): int(o) for tp, o in ends.items()}
    finally:
        await consumer.stop()


async def _partitions(consumer: Any, topic: str) -> set[int]:
    for _ in range(50):
        await consumer._client.force_metadata_update()
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return set(parts)
        await asyncio.sleep(0.1)
    raise RuntimeError(f"no metadata for topic {topic}")


async def commit_offsets(bootstrap: str, group: str, offsets: dict[tuple[str, int], int]) -> None:
    """Give a fresh group committed offsets (the Kafka engine of 18.16 starts at the end
    of a partition when its group has none)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = {TopicPartition(t, p): o for (t, p), o in offsets.items()}
        consumer.assign(list(tps))
        await consumer.commit(tps)
    finally:
        await consumer.stop()


# ------------------------------------------------------------------------------ redis


async def delete_redis_prefix(url: str, prefix: str, attempts: int = 10) -> int:
    """Delete our keys. Redis is shared and other people's tests restart it: retry a while."""
    import redis.asyncio as redis_async
    from redis.exceptions import ConnectionError as RedisConnectionError

    assert prefix.startswith("bench:"), prefix
    for attempt in range(attempts):
        client = redis_async.Redis.from_url(url)
        deleted = 0
        try:
            chunk: list[bytes] = []
            async for key in client.scan_iter(match=prefix + "*", count=10_000):
                chunk.append(key)
                if len(chunk) >= 10_000:
                    deleted += await client.unlink(*chunk)
                    chunk = []
            if chunk:
                deleted += await client.unlink(*chunk)
            return deleted
        except (RedisConnectionError, OSError) as exc:
            if attempt == attempts - 1:
                log(f"could not delete Redis keys {prefix}*: {exc} (they expire within 2 h)")
                return deleted
            await asyncio.sleep(2)
        finally:
            await client.aclose()
    return 0


# ------------------------------------------------------------------------------ processes


def free_port(count: int = 1) -> int:
    """A port p such that p .. p+count-1 are free right now."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + count > 65535:
            continue
        ok = True
        for port in range(base + 1, base + count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port range")


@dataclass
class ProcessMonitor:
    """Samples a process and all its descendants: RSS (peak of the sum and of the largest)
    and CPU seconds (user + system, last value seen per pid, so exited children count)."""

    pid: int
    interval: float = 0.2
    peak_rss_total: int = 0
    peak_rss_single: int = 0
    cpu: dict[int, float] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        total = 0
        for proc in procs:
            try:
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    times = proc.cpu_times()
                    cmd = " ".join(proc.cmdline()[:6])
            except psutil.Error:
                continue
            total += rss
            self.peak_rss_single = max(self.peak_rss_single, rss)
            self.cpu[proc.pid] = times.user + times.system
            self.names[proc.pid] = cmd
        self.peak_rss_total = max(self.peak_rss_total, total)

    def cpu_seconds(self, exclude: Iterable[str] = ()) -> float:
        return sum(
            c for pid, c in self.cpu.items() if not any(x in self.names[pid] for x in exclude)
        )

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)

    def start(self) -> ProcessMonitor:
        self.sample()
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class ServiceCpu:
    """CPU seconds used by the local stack's Kafka, Redis and ClickHouse during a
    measurement. These servers are shared with other work on the machine: context only."""

    def __init__(self) -> None:
        stack = Path(os.environ.get("SINK_STACK_DIR", ROOT / ".stack"))
        self.pidfiles = {
            "kafka": stack / "kafka" / "kafka.pid",
            "redis": stack / "redis" / "redis.pid",
            "clickhouse": stack / "clickhouse" / "clickhouse.pid",
        }
        # The cluster's servers and ZooKeeper (`stack.sh up --cluster`), when they run.
        for pidfile in sorted((stack / "cluster").glob("*/*.pid")):
            self.pidfiles[pidfile.parent.name] = pidfile
        self.procs: dict[str, psutil.Process] = {}
        for name, pidfile in self.pidfiles.items():
            with contextlib.suppress(Exception):
                self.procs[name] = psutil.Process(int(pidfile.read_text().split()[0]))
        self._start = self._read()
        self._system = psutil.cpu_times()
        self._identity = {n: self._ident(p) for n, p in self.procs.items()}

    @staticmethod
    def _ident(proc: psutil.Process) -> tuple[int, float] | None:
        try:
            return proc.pid, proc.create_time()
        except psutil.Error:
            return None

    def restarted(self) -> list[str]:
        """Services that were stopped, killed or restarted since the start (other people's
        tests restart them): a measurement that saw this is disturbed."""
        out = []
        for name, ident in self._identity.items():
            try:
                pid = int(self.pidfiles[name].read_text().split()[0])
                now = psutil.Process(pid)
                if ident is None or (now.pid, now.create_time()) != ident:
                    out.append(name)
            except (OSError, ValueError, psutil.Error):
                out.append(name)
        return out

    def _read(self) -> dict[str, float]:
        out = {}
        for name, proc in self.procs.items():
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                out[name] = t.user + t.system
        return out

    def delta(self) -> dict[str, Any]:
        now = self._read()
        result = {n: round(now[n] - self._start[n], 2) for n in now if n in self._start}
        sys_now = psutil.cpu_times()
        busy = lambda t: t.user + t.nice + t.system + t.irq + t.softirq + t.steal  # noqa: E731
        total = lambda t: busy(t) + t.idle + t.iowait  # noqa: E731
        span = total(sys_now) - total(self._system)
        if span > 0:
            result["machine_busy_pct"] = round(100 * (busy(sys_now) - busy(self._system)) / span, 1)
        restarted = self.restarted()
        if restarted:
            result["restarted"] = restarted
        return result


# ------------------------------------------------------------------------------ stats


def summary(values: Sequence[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def quantile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def python() -> str:
    return sys.executable


def code_version() -> dict[str, str]:
    """Which worker code is measured: git HEAD, whether sink/ has local changes, and a
    digest of sink/*.py as it is on disk now (each worker process loads it at its start)."""
    import hashlib
    import subprocess

    digest = hashlib.sha1()
    for path in sorted((ROOT / "sink").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    out = {"sink_digest": digest.hexdigest()[:12]}
    with contextlib.suppress(Exception):
        out["git_head"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "sink", "pyproject.toml", "constraints.txt"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        out["sink_dirty"] = "yes" if dirty else "no"
    return out
