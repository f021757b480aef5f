"""The sink itself: `sink run -c <generated config>` as a subprocess, from empty state (fresh
consumer group, ClickHouse database and Redis key prefix), until every record landed; the
exactness check of its raw table; end-to-end delay at a fixed offered load; profiling."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import yaml

from benchmarks.common import (
    ROOT,
    ClusterTarget,
    ProcessMonitor,
    ServiceCpu,
    Services,
    clickhouse,
    code_version,
    delete_groups,
    delete_redis_prefix,
    delete_topics,
    drop_database,
    end_offsets,
    free_port,
    http_query,
    log,
    python,
    quantile,
    shown,
)
from benchmarks.workload import Loaded, Spec


class Resources:
    """Names of one sink run's own group, database, Redis prefix and dead-letter topic."""

    def __init__(self, run: str, label: str) -> None:
        self.label = label
        self.group = f"bench_{run}_{label}"
        self.database = f"bench_{run}_{label}"
        self.prefix = f"bench:{run}:{label}:"
        self.dlq = f"{self.group}.dlq"

    async def cleanup(self, services: Services, cluster: ClusterTarget | None = None) -> None:
        if cluster is not None:
            await cluster.drop_database(self.database)
        else:
            await drop_database(services, self.database)
        with contextlib.suppress(Exception):
            await delete_redis_prefix(services.redis, self.prefix)
        with contextlib.suppress(Exception):
            await delete_topics(services.kafka, [self.dlq])
        with contextlib.suppress(Exception):
            await delete_groups(services.kafka, [self.group])


def write_config(
    services: Services,
    spec: Spec,
    res: Resources,
    workdir: Path,
    port: int,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """The worker's defaults, pointed at our topics and our own group/database/prefix.
    `dedup.ttl` is short so that keys left by an interrupted benchmark expire by themselves."""
    data: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": services.kafka,
            "group_id": res.group,
            "client_id": f"bench-{res.label}",
            "topics": spec.topic_names,
            "topics_regex": spec.topics_regex,
        },
        "dedup": {"redis_url": services.redis, "key_prefix": res.prefix, "ttl": "2h"},
        "clickhouse": {"url": services.ch_url(res.database)},
        "dlq": {"topic": res.dlq},
        "http": {"host": "127.0.0.1", "port": port},
        "worker": {"id": f"bench-{res.label}", "log_format": "json", "log_level": "INFO"},
    }
    for section, values in (overrides or {}).items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    path = workdir / f"{res.label}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def start_sink(
    config: Path, workers: int, log_path: Path, profile_out: Path | None = None
) -> subprocess.Popen[bytes]:
    command = [python(), "-m", "sink", "run", "-c", str(config)]
    if workers > 1:
        command += ["--workers", str(workers)]
    if profile_out is not None:
        spy = str(Path(python()).with_name("py-spy"))
        command = [
            spy, "record", "--format", "raw", "--rate", "100", "--subprocesses",
            "-o", str(profile_out), "--", *command,
        ]  # fmt: skip
    log_file = log_path.open("ab")
    return subprocess.Popen(
        command,
        stdout=log_file,
        stderr=log_file,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )


async def migrate_first(config: Path, log_path: Path) -> None:
    """`sink migrate -c config`, its output appended to the run's log."""
    with log_path.open("ab") as log_file:
        done = await asyncio.to_thread(
            subprocess.run,
            [python(), "-m", "sink", "migrate", "-c", str(config)],
            stdout=log_file,
            stderr=log_file,
            cwd=ROOT,
            timeout=300,
        )
    if done.returncode != 0:
        raise RuntimeError(f"sink migrate exited with {done.returncode}; see {log_path}")


async def stop_sink(proc: subprocess.Popen[bytes], limit_s: float = 60) -> int:
    """SIGTERM (the worker drains and leaves its group); SIGKILL the group if it hangs.
    Under py-spy only the worker gets the signal: py-spy writes its profile when it exits."""
    if proc.poll() is None:
        targets = [proc.pid]
        with contextlib.suppress(psutil.Error):
            if "py-spy" in " ".join(psutil.Process(proc.pid).cmdline()[:1]):
                targets = [c.pid for c in psutil.Process(proc.pid).children()]
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                if pid == proc.pid:
                    os.killpg(pid, signal.SIGTERM)
                else:
                    os.kill(pid, signal.SIGTERM)
    try:
        return int(await asyncio.to_thread(proc.wait, limit_s))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        return -9


async def landed(chs: list[Any], database: str) -> dict[tuple[str, int], int]:
    """The highest landed offset per partition, over every server given (on a cluster each
    partition's offsets live on one shard; replicas of it agree or lag)."""
    out: dict[tuple[str, int], int] = {}
    for ch in chs:
        try:
            rows = await ch.query(
                f"SELECT topic, kafka_partition, max(landed_offset) FROM `{database}`."
                "sink_offsets GROUP BY topic, kafka_partition"
            )
        except Exception:
            continue
        for t, p, o in rows:
            key = (str(t), int(p))
            out[key] = max(out.get(key, -1), int(o))
    return out


async def run_sink(
    services: Services,
    loaded: Loaded,
    label: str,
    workers: int,
    workdir: Path,
    limit_s: float,
    profile_out: Path | None = None,
    cluster: ClusterTarget | None = None,
    insert_quorum: int | None = None,
    meters: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """From process start until every partition's landed offset is its end offset - 1.
    With `cluster`, the worker lands into that ClickHouse cluster (its tables made ON CLUSTER,
    each partition on one shard) with `insert_quorum` (None: the worker's default). With
    `meters`, the worker is configured with them (made at start, before the first fetch)."""
    spec = loaded.spec
    res = Resources(spec.run, label)
    await res.cleanup(services, cluster)
    port = free_port(workers)
    overrides: dict[str, Any] = {}
    if meters:
        overrides["meters"] = meters
    if cluster is not None:
        overrides["clickhouse"] = {"url": cluster.url(res.database), "cluster": cluster.name}
        if insert_quorum is not None:
            overrides["clickhouse"]["insert_quorum"] = insert_quorum
    config = write_config(services, spec, res, workdir, port, overrides)
    log_path = workdir / f"{label}.log"
    ends = {tp: e for tp, e in loaded.ends.items() if e}
    total = sum(ends.values())
    urls = (
        [cluster.url("default", i) for i in range(len(cluster.nodes))]
        if cluster is not None
        else [services.ch_url("default")]
    )
    chs = [clickhouse(url) for url in urls]
    stack = ServiceCpu()
    result_code = code_version()
    # The schema and meters are made first, untimed (`sink migrate`), as a deployment has
    # them before its workers run: a new meter's view waits out its cutoff once, at creation.
    await migrate_first(config, log_path)
    t0 = time.monotonic()
    proc = start_sink(config, workers, log_path, profile_out)
    monitor = ProcessMonitor(proc.pid).start()
    first_t = None
    first_records = 0
    samples: list[tuple[float, int]] = []
    result: dict[str, Any] = {
        "label": label,
        "workers": workers,
        "records": total,
        "code": result_code,
    }
    if cluster is not None:
        result["cluster"] = {"name": cluster.name, "nodes": len(cluster.nodes)}
        result["insert_quorum"] = insert_quorum
    try:
        while True:
            now = await landed(chs, res.database)
            t = time.monotonic()
            done_records = sum(min(o + 1, ends.get(tp, 0)) for tp, o in now.items())
            if done_records and first_t is None:
                first_t, first_records = t, done_records
            samples.append((round(t - t0, 3), done_records))
            if all(now.get(tp, -1) >= end - 1 for tp, end in ends.items()):
                break
            if proc.poll() is not None:
                raise RuntimeError(f"sink exited with {proc.returncode}; see {log_path}")
            if t - t0 > limit_s:
                raise TimeoutError(f"{label}: {done_records}/{total} landed after {limit_s:.0f}s")
            await asyncio.sleep(0.2)
        end = time.monotonic()
        monitor.sample()
        cpu = monitor.cpu_seconds(exclude=("py-spy",))
        result["worker_metrics"] = await worker_metrics([port + i for i in range(workers)])
        result.update(
            wall_s=end - t0,
            startup_s=first_t - t0 if first_t else None,
            steady_s=end - first_t if first_t else None,
            steady_records=total - first_records,
            cpu_s=cpu,
            peak_rss_total=monitor.peak_rss_total,
            peak_rss_single=monitor.peak_rss_single,
            services_cpu=stack.delta(),
            progress=samples[:: max(1, len(samples) // 200)],
        )
    finally:
        await monitor.stop()
        result["exit_code"] = await stop_sink(proc)
        for ch in chs:
            await ch.close()
    try:
        result["exact"] = await exactness(services, res.database, loaded, res.dlq, cluster)
    finally:
        await res.cleanup(services, cluster)
    result["log"] = shown(log_path)
    result["batches"] = batches_from_log(log_path)
    return result


_SUMMED = (
    "sink_flush_seconds",
    "sink_insert_seconds",
    "sink_dedup_seconds",
    "sink_batch_rows",
    "sink_events_inserted",
    "sink_duplicates_dropped",
    "sink_dead_letters",
    "sink_batches",
    "sink_batches_dropped",
    "sink_rebalances",
    "sink_retries",
)


async def worker_metrics(ports: list[int]) -> dict[str, float]:
    """Counters and histogram sums/counts of the workers' /metrics, summed over workers:
    how the flush time splits into dedup (Redis) and insert (ClickHouse)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for port in ports:
        text = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
        for family in text_string_to_metric_families(text):
            if family.name not in _SUMMED:
                continue
            for sample in family.samples:
                if sample.name.endswith("_bucket") or sample.name.endswith("_created"):
                    continue
                out[sample.name] = round(out.get(sample.name, 0.0) + sample.value, 4)
    return out


def batches_from_log(path: Path) -> list[dict[str, Any]]:
    """Per landed batch: worker, records, inserted, flush seconds (from the JSON log)."""
    import json

    out = []
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            if '"batch landed"' not in line:
                continue
            with contextlib.suppress(ValueError):
                d = json.loads(line)
                out.append(
                    {
                        "at": d.get("timestamp"),
                        "worker": d.get("worker"),
                        "records": d.get("records"),
                        "inserted": d.get("inserted"),
                        "seconds": d.get("seconds"),
                    }
                )
    return out


_COUNTS = (
    "SELECT count(), uniqExact(namespace, source, id), uniqExact(_topic, _partition, _offset), "
    "countIf(validation_error != '') FROM {table}"
)
_IDENTITIES = "SELECT namespace, source, id FROM {table}"


async def exactness(
    services: Services,
    database: str,
    loaded: Loaded,
    dlq: str | None,
    cluster: ClusterTarget | None = None,
) -> dict[str, Any]:
    """The raw table holds every unique valid event once: count, identities, offsets, and
    the identity set itself compared with what was produced. On a cluster: through the
    Distributed table over every shard, once every replica has fetched what its shard holds."""
    if cluster is None:
        table = f"`{database}`.events"
        row = http_query(services, _COUNTS.format(table=table))
        count, identities, offsets, flagged = (int(x) for x in row.split())
        tsv = http_query(services, _IDENTITIES.format(table=table) + " FORMAT TSV")
        got = set(tsv.splitlines())
    else:
        count, identities, offsets, flagged, got = await _cluster_counts(cluster, database)
    expected = loaded.expected
    missing = len(expected - got) if expected else None
    extra = len(got - expected) if expected else None
    out: dict[str, Any] = {
        "rows": count,
        "expected": loaded.new,
        "distinct_identities": identities,
        "distinct_offsets": offsets,
        "missing": missing,
        "unexpected": extra,
        "validation_errors": flagged,
    }
    if dlq:
        with contextlib.suppress(Exception):
            out["dead_letters"] = sum((await end_offsets(services.kafka, [dlq])).values())
            out["invalid_sent"] = loaded.invalid
    out["ok"] = (
        count == identities == offsets == loaded.new
        and missing in (0, None)
        and extra in (0, None)
        and out.get("dead_letters", loaded.invalid) >= loaded.invalid
    )
    return out


async def _cluster_counts(
    cluster: ClusterTarget, database: str
) -> tuple[int, int, int, int, set[bytes]]:
    chs = [clickhouse(cluster.url(database, i)) for i in range(len(cluster.nodes))]
    try:
        for ch in chs:
            await ch.execute(f"SYSTEM SYNC REPLICA `{database}`.events")
        table = f"`{database}`.events_all"
        rows = await chs[0].query(_COUNTS.format(table=table))
        count, identities, offsets, flagged = (int(x) for x in rows[0])
        got = {
            f"{n}\t{s}\t{i}".encode()
            for n, s, i in await chs[0].query(_IDENTITIES.format(table=table))
        }
    finally:
        for ch in chs:
            await ch.close()
    return count, identities, offsets, flagged, got


# ------------------------------------------------------------------------------ latency


_BUCKET = re.compile(r'^sink_end_to_end_delay_seconds_bucket\{le="([^"]+)"\} (\S+)$', re.M)


def _histogram_quantiles(metrics: str) -> dict[str, float] | None:
    """p50/p99 of the worker's delay histogram (bucket upper bounds, so coarse)."""
    buckets = [(float(le), float(c)) for le, c in _BUCKET.findall(metrics)]
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    out = {}
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        for le, count in buckets:
            if count >= q * total:
                out[name] = le
                break
    out["batches"] = total
    return out


async def run_latency(
    services: Services,
    spec: Spec,
    rate: float,
    seconds: float,
    workdir: Path,
    poll_interval: float = 0.05,
) -> dict[str, Any]:
    """Produce at `rate` records/s for `seconds` into fresh topics while one worker runs;
    delay of a record = first poll of `sink_offsets` that shows its offset landed minus the
    wall-clock time it was appended to its producer batch (also its Kafka timestamp)."""
    from aiokafka import AIOKafkaProducer

    from benchmarks.common import create_topics
    from benchmarks.workload import DUP, NEW, generate

    records = list(generate(spec))
    await create_topics(services.kafka, spec.topic_names, spec.partitions)
    topics = spec.topic_names
    res = Resources(spec.run, spec.kind)
    await res.cleanup(services)
    port = free_port(1)
    config = write_config(services, spec, res, workdir, port)
    loaded = Loaded(spec)
    loaded.new = sum(1 for r in records if r.kind == NEW)
    loaded.duplicates = sum(1 for r in records if r.kind == DUP)
    loaded.invalid = len(records) - loaded.new - loaded.duplicates
    loaded.expected = {r.identity for r in records if r.identity is not None}  # type: ignore[misc]
    code = code_version()
    proc = start_sink(config, 1, workdir / f"{spec.kind}.log")
    ch = clickhouse(services.ch_url("default"))
    producer = AIOKafkaProducer(
        bootstrap_servers=services.kafka, acks=1, linger_ms=0, max_batch_size=1024 * 1024
    )
    result: dict[str, Any] = {
        "rate": rate,
        "seconds": seconds,
        "records": len(records),
        "code": code,
    }
    try:
        await _wait_positioned(port, len(topics) * spec.partitions, proc, 120)
        await producer.start()
        # Per partition: (base offset future, count, append time) of each produced batch.
        sent: dict[tuple[str, int], list[tuple[Any, int, float]]] = {}
        query_times: list[float] = []
        delays: list[float] = []
        landed_at: dict[tuple[str, int], int] = {}
        done_producing = asyncio.Event()

        async def produce() -> None:
            tick = 0.02
            t_start = time.time()
            i = 0
            while i < len(records):
                due = min(len(records), int((time.time() - t_start) * rate))
                builders: dict[tuple[int, int], Any] = {}
                counts: dict[tuple[int, int], int] = {}
                stamp = time.time()
                stamp_ms = int(stamp * 1000)
                while i < due:
                    r = records[i]
                    tp = (r.topic, r.partition)
                    b = builders.get(tp)
                    if b is None:
                        b = builders[tp] = producer.create_batch()
                    added = b.append(
                        key=r.key, value=r.value, timestamp=stamp_ms, headers=list(r.headers)
                    )
                    if added is None:
                        break  # full: the rest goes with the next tick
                    counts[tp] = counts.get(tp, 0) + 1
                    i += 1
                for tp, b in builders.items():
                    fut = await producer.send_batch(b, topics[tp[0]], partition=tp[1])
                    sent.setdefault((topics[tp[0]], tp[1]), []).append((fut, counts[tp], stamp))
                await asyncio.sleep(max(0.0, tick - (time.time() - stamp)))
            done_producing.set()

        async def watch() -> None:
            """Poll landed offsets; resolve every produced batch against them."""
            pointer: dict[tuple[str, int], int] = {}  # next unresolved batch per partition
            partial: dict[tuple[str, int], int] = {}  # records of that batch already counted
            while True:
                q0 = time.time()
                now = await landed([ch], res.database)
                seen = time.time()
                query_times.append(seen - q0)
                landed_at.update(now)
                for tp, batches in sent.items():
                    top = now.get(tp, -1)
                    k = pointer.get(tp, 0)
                    while k < len(batches):
                        fut, count, stamp = batches[k]
                        if not fut.done():
                            break
                        base = fut.result().offset
                        upto = min(count, top - base + 1)  # records of this batch landed
                        already = partial.get(tp, 0)
                        if upto > already:
                            delays.extend([seen - stamp] * (upto - already))
                            partial[tp] = upto
                        if upto < count:
                            break
                        k += 1
                        partial[tp] = 0
                    pointer[tp] = k
                if done_producing.is_set() and len(delays) >= len(records):
                    return
                await asyncio.sleep(max(0.0, poll_interval - (time.time() - q0)))

        stack = ServiceCpu()
        monitor = ProcessMonitor(proc.pid).start()
        t0 = time.monotonic()
        watcher = asyncio.create_task(watch())
        await produce()
        produce_s = time.monotonic() - t0
        try:
            await asyncio.wait_for(watcher, 120)
        except TimeoutError:
            result["error"] = f"only {len(delays)} of {len(records)} records landed"
        monitor.sample()
        await monitor.stop()
        delays.sort()
        metrics = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
        stored = http_query(
            services,
            "SELECT quantileExact(0.5)(d), quantileExact(0.99)(d) FROM (SELECT "
            f"toInt64(stored_at) - toInt64(ingested_at) AS d FROM `{res.database}`.events)",
        ).split()
        result.update(
            offered_rate=len(records) / produce_s,
            measured=len(delays),
            p50_s=quantile(delays, 0.5),
            p90_s=quantile(delays, 0.9),
            p99_s=quantile(delays, 0.99),
            max_s=delays[-1] if delays else None,
            mean_s=sum(delays) / len(delays) if delays else None,
            poll_interval_s=poll_interval,
            poll_query_s_median=quantile(sorted(query_times), 0.5),
            worker_histogram=_histogram_quantiles(metrics),
            stored_at_minus_kafka_ts_s={"p50": float(stored[0]), "p99": float(stored[1])},
            cpu_s=monitor.cpu_seconds(),
            peak_rss_total=monitor.peak_rss_total,
            peak_rss_single=monitor.peak_rss_single,
            services_cpu=stack.delta(),
        )
    finally:
        with contextlib.suppress(Exception):
            await producer.stop()
        result["exit_code"] = await stop_sink(proc)
        await ch.close()
    try:
        result["exact"] = await exactness(services, res.database, loaded, res.dlq)
    finally:
        await res.cleanup(services)
        await delete_topics(services.kafka, topics)
    return result


async def _wait_positioned(
    port: int, partitions: int, proc: subprocess.Popen[bytes], limit_s: float
) -> None:
    """Until the worker holds every partition and has positioned them (its /status)."""
    import json

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sink exited with {proc.returncode}")
        with contextlib.suppress(Exception):
            status = json.loads(await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/status"))
            parts = status.get("partitions", [])
            if len(parts) == partitions and not any(p["positioning"] for p in parts):
                return
        await asyncio.sleep(0.2)
    raise TimeoutError("worker did not take its partitions")


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())
    except OSError:
        return ""


def log_tail(path: str, lines: int = 20) -> str:
    with contextlib.suppress(Exception):
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    return ""


__all__ = ["exactness", "log", "run_latency", "run_sink"]
