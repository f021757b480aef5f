"""Benchmark harness (issue 6): one command, every contender on the same preloaded topics.

    .venv/bin/python -m benchmarks.run                      # 1,000,000 events, 3 runs
    .venv/bin/python -m benchmarks.run --events 100000 --runs 1
    .venv/bin/python -m benchmarks.run --profile --publish

Reads KAFKA_BOOTSTRAP_SERVERS, REDIS_URL, CLICKHOUSE_URL (`eval "$(bash scripts/stack.sh
env)"`), defaulting to the local stack's ports; ClickHouse's HTTP port from
SINK_CLICKHOUSE_HTTP_PORT (18123) or CLICKHOUSE_HTTP_URL. Everything it creates is named
`bench_<run>_...` / `bench:<run>:...` and is deleted at the end (also on Ctrl-C).
See benchmarks/README.md for what each measurement does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.common import (
    RESULTS,
    ROOT,
    ProcessMonitor,
    ServiceCpu,
    Services,
    code_version,
    delete_groups,
    delete_redis_prefix,
    delete_topics,
    drop_database,
    http_query,
    log,
    python,
    server_version,
    shown,
    summary,
)
from benchmarks.contenders import PREFIX
from benchmarks.workload import MIXED_METERS, SHAPES, Loaded, Spec, load

ALL = ("consume", "insert", "sink", "cluster", "peer", "naive", "latency")
QUORUMS = {"sink_cluster": None, "sink_cluster_q0": 0}
"""The cluster variant's runs: the worker's default insert_quorum (2 on a cluster whose
shards have 2 replicas), and none: what quorum inserts cost."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=1_000_000, help="records to preload")
    p.add_argument("--runs", type=int, default=3, help="repetitions of each measurement")
    p.add_argument("--topics", type=int, default=3, help="customer topics (namespaces)")
    p.add_argument("--partitions", type=int, default=4, help="partitions per topic")
    p.add_argument("--subjects", type=int, default=1000)
    p.add_argument("--dup-share", type=float, default=0.05)
    p.add_argument("--invalid-share", type=float, default=0.005)
    p.add_argument("--workers", default="1,2", help="sink worker counts to measure")
    p.add_argument("--naive-events", type=int, default=50_000, help="subset for the naive run")
    p.add_argument(
        "--batch-rows",
        type=int,
        default=None,
        help="insert ceiling block size (default: the worker's batch.max_rows)",
    )
    p.add_argument("--latency-seconds", type=float, default=25.0)
    p.add_argument(
        "--latency-rate",
        type=float,
        default=None,
        help="offered load for the delay test (default: half the measured 1-worker rate)",
    )
    p.add_argument(
        "--only", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}"
    )
    p.add_argument(
        "--workloads",
        default=",".join(SHAPES),
        help=f"comma-separated event shapes to measure, of {','.join(SHAPES)}",
    )
    p.add_argument("--profile", action="store_true", help="also profile one worker (py-spy)")
    p.add_argument("--publish", action="store_true", help="copy table+chart to benchmarks/report")
    p.add_argument("--timeout", type=float, default=None, help="per measurement, seconds")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--retries",
        type=int,
        default=1,
        help="measure again when a run failed or a service restart disturbed it",
    )
    args = p.parse_args(argv)
    args.only = {x.strip() for x in args.only.split(",") if x.strip()}
    unknown = args.only - set(ALL)
    if unknown:
        p.error(f"unknown --only entries: {sorted(unknown)}")
    args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not args.workloads or set(args.workloads) - set(SHAPES):
        p.error(f"--workloads takes a subset of {','.join(SHAPES)}")
    if args.timeout is None:
        args.timeout = max(300.0, args.events / 1000)
    if args.batch_rows is None:
        from sink.config import BatchConfig

        args.batch_rows = BatchConfig().max_rows
    return args


async def run_contender(
    name: str, params: dict[str, Any], limit_s: float, workdir: Path, rss: bool = True
) -> dict[str, Any]:
    """A contender in its own process; its result is the `RESULT {json}` line it prints."""
    log_path = workdir / f"{name}.log"
    stack = ServiceCpu()
    with log_path.open("ab") as err:
        proc = await asyncio.create_subprocess_exec(
            python(), "-m", "benchmarks.contenders", name, json.dumps(params),
            stdout=asyncio.subprocess.PIPE, stderr=err, cwd=ROOT,
        )  # fmt: skip
        monitor = ProcessMonitor(proc.pid).start()
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), limit_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return {"error": f"timeout after {limit_s:.0f}s", "log": shown(log_path)}
        finally:
            await monitor.stop()
    for line in out.decode(errors="replace").splitlines():
        if line.startswith(PREFIX):
            result: dict[str, Any] = json.loads(line[len(PREFIX) :])
            result["services_cpu"] = stack.delta()
            if rss:
                result["peak_rss_total"] = monitor.peak_rss_total
                result["peak_rss_single"] = monitor.peak_rss_single
            return result
    tail = log_path.read_text(errors="replace").splitlines()[-5:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail), "log": shown(log_path)}


def headline(name: str, result: dict[str, Any]) -> str:
    if result.get("error"):
        return f"{name}: FAILED: {result['error']}"
    if "p50_s" in result:
        return (
            f"{name}: p50 {result['p50_s']:.3f}s p99 {result['p99_s']:.3f}s at "
            f"{result.get('offered_rate', 0):,.0f}/s offered"
            + (", exact" if result.get("exact", {}).get("ok") else ", NOT EXACT")
        )
    r = report.rates(result)
    fmt = lambda v: "n/a" if v is None else f"{v:,.0f}/s"  # noqa: E731
    text = f"{name}: steady {fmt(r.get('steady'))}, wall {fmt(r.get('wall'))}"
    if "cpu_s_per_m" in r:
        text += f", {r['cpu_s_per_m']:.1f} CPU s/M"
    if "exact" in result:
        text += ", exact" if result["exact"]["ok"] else ", NOT EXACT"
    return text


async def main(args: argparse.Namespace) -> int:
    services = Services.from_env()
    tag = uuid.uuid4().hex[:6]
    workdir = RESULTS / "work" / tag
    if (RESULTS / "work").exists():
        for old in (RESULTS / "work").iterdir():
            shutil.rmtree(old, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    version = await server_version(services)
    specs = [
        Spec(
            run=tag,
            kind="events" if shape == "flat" else shape,
            events=args.events,
            topics=args.topics,
            partitions=args.partitions,
            subjects=args.subjects,
            dup_share=args.dup_share,
            invalid_share=args.invalid_share,
            seed=args.seed,
            base_ms=int(time.time() * 1000),
            shape=shape,
        )
        for shape in args.workloads
    ]
    m = Measurements(services, attempts=1 + args.retries)
    notes: list[str] = []
    doc: dict[str, Any] = {
        "meta": {
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "tag": tag,
            "runs": args.runs,
            "naive_events": args.naive_events,
            "cpus": os.cpu_count(),
            "loadavg": os.getloadavg(),
            "python": platform.python_version(),
            "clickhouse": version,
            "code": code_version(),
            "worker_defaults": worker_defaults(),
            "services": {"kafka": services.kafka, "redis": services.redis},
            "cluster": (
                {"name": services.cluster.name, "nodes": list(services.cluster.nodes)}
                if services.cluster
                else None
            ),
            "args": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()},
        }
    }
    try:
        workloads: list[Loaded] = []
        for spec in specs:
            log(
                f"run {tag}: generating and loading {args.events:,} {spec.shape} records into "
                f"{spec.topic_names} x {spec.partitions} partitions"
            )
            loaded = await load(spec, services.kafka)
            doc["meta"].setdefault("loads", {})[spec.shape] = loaded.stats()
            log(
                f"loaded in {loaded.load_seconds:.1f}s "
                f"({loaded.records / loaded.load_seconds:,.0f} records/s; generation "
                f"{loaded.generate_seconds:.1f}s of it): {loaded.new:,} unique valid, "
                f"{loaded.duplicates:,} duplicates, {loaded.invalid:,} invalid, "
                f"{loaded.nbytes / loaded.records:.0f} bytes average"
            )
            workloads.append(loaded)
        doc["meta"]["load"] = doc["meta"]["loads"][specs[0].shape]
        # The workloads take turns within each run, so that they meet the same machine.
        for r in range(args.runs):
            log(f"--- run {r + 1}/{args.runs}")
            for loaded in workloads:
                await throughput(args, services, loaded, workdir, m, r)
        spec = specs[0]
        if "latency" in args.only:
            doc["latency"] = await latency(args, services, spec, workdir, m, notes)
        if args.profile:
            # The mixed workload when it runs: the shape the worker sees in production.
            shapes = [w.spec.shape for w in workloads]
            profiled = workloads[shapes.index("mixed") if "mixed" in shapes else -1]
            doc["profile_md"], doc["profile"] = await profile(args, services, profiled, workdir)
    finally:
        log("cleaning up")
        await cleanup(services, tag)
        raw = {k: v for k, v in m.raw.items() if k != "latency"}
        doc["raw"] = raw
        doc["discarded"] = m.discarded
        doc["aggregate"] = report.aggregate(raw)
        doc["ratios"] = report.ratios(doc["aggregate"])
        doc["exactness"] = m.exact
        end_code = code_version()
        if end_code.get("sink_digest") != doc["meta"]["code"].get("sink_digest"):
            notes.append(
                f"The worker's code (sink/*.py) changed during this benchmark "
                f"({doc['meta']['code']} -> {end_code}): each sink run records the version "
                "it started with (`code` in the JSON)."
            )
        doc["meta"]["code_at_end"] = end_code
        doc["notes"] = notes + NOTES
        if "load" in doc["meta"]:
            paths = report.write(doc, args.publish)
            print(report.markdown(doc))
            log(f"wrote {', '.join(str(p.relative_to(ROOT)) for p in paths.values())}")
    return 0 if all(e["exact"]["ok"] for e in m.exact) else 1


def worker_defaults() -> dict[str, Any]:
    from sink.config import BatchConfig, KafkaConfig

    b, k = BatchConfig(), KafkaConfig()
    return {
        "batch.max_rows": b.max_rows,
        "batch.max_bytes": b.max_bytes,
        "batch.max_wait": b.max_wait,
        "batch.max_in_flight": b.max_in_flight,
        "kafka.fetch_max_bytes": k.fetch_max_bytes,
        "kafka.max_partition_fetch_bytes": k.max_partition_fetch_bytes,
    }


NOTES = [
    "The peer reads each message as one TSV String column (18.16 has no JSONAsString/RawBLOB "
    "and its JSONEachRow cannot put the nested `data` object into a String) and extracts the "
    "fields with visitParam* in the view; it keeps every record (invalid ones flagged), does "
    "no de-duplication, is at-least-once, and on 18.16 cannot record topic/partition/offset "
    "or the namespace (no virtual columns). Its group gets committed offsets 0 first, since "
    "18.16's engine starts a fresh group at the end of the partitions.",
    "The peer's rows become visible in blocks of up to max_block_size (65,536) rows or after "
    "stream_flush_interval_ms (7.5 s), which coarsens its timing on small N.",
    "Each sink run starts on a schema made just before, untimed, by `sink migrate` (with "
    "the workload's meters), as a deployment's workers start on theirs: a new meter waits out "
    "its cutoff once, at creation (about 5 s), which is not the worker's throughput.",
    "Sink runs use the worker's defaults (see `worker_defaults` in the JSON; JSON logs at INFO "
    "to a file) except dedup.ttl = 2h so that keys of an interrupted benchmark expire by "
    "themselves. The consume ceiling uses the same fetch sizes and max_records = batch.max_rows; "
    "the insert ceiling inserts blocks of batch.max_rows.",
    "Landed offsets are polled every 0.2 s; wall and steady times carry that resolution.",
]


# The services each measurement depends on: a restart of another one does not disturb it.
USES = {
    "consume": {"kafka"},
    "insert": {"clickhouse"},
    "peer": {"kafka", "clickhouse"},
}


def disturbance(result: dict[str, Any], key: str = "") -> list[str]:
    """Why a measurement cannot be trusted: the stack's services are shared, and other
    people's tests kill and restart them."""
    reasons = []
    for shape in SHAPES:  # `mixed_sink_w1` uses what `sink_w1` uses
        key = key.removeprefix(f"{shape}_")
    uses = USES.get(key, {"kafka", "redis", "clickhouse"})
    if key.startswith("sink_cluster"):  # the cluster's servers and ZooKeeper, not the single one
        uses = {"kafka", "redis", "zookeeper"}
    restarted = [
        x
        for x in (result.get("services_cpu") or {}).get("restarted", [])
        if x in uses or (key.startswith("sink_cluster") and x.startswith("clickhouse-"))
    ]
    if restarted:
        reasons.append("restarted: " + ",".join(restarted))
    retries = (result.get("worker_metrics") or {}).get("sink_retries_total", 0)
    if retries:
        reasons.append(f"worker retried a dependency {retries:.0f} times")
    error = str(result.get("error", ""))
    if any(x in error for x in ("Connection", "NodeNotReady", "unreachable", "refused")):
        reasons.append("dependency error")
    return reasons


async def wait_services(services: Services, limit_s: float = 180) -> None:
    """Until Kafka, Redis and ClickHouse all answer (after someone else restarted one)."""
    import redis.asyncio as redis_async
    from aiokafka.admin import AIOKafkaAdminClient

    deadline = time.monotonic() + limit_s
    while True:
        try:
            admin = AIOKafkaAdminClient(bootstrap_servers=services.kafka, request_timeout_ms=5000)
            await asyncio.wait_for(admin.start(), 10)
            try:
                await asyncio.wait_for(admin.list_topics(), 10)
            finally:
                await admin.close()
            client = redis_async.Redis.from_url(services.redis, socket_timeout=5)
            try:
                await client.ping()
            finally:
                await client.aclose()
            await server_version(services)
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"services not answering: {exc}") from exc
            await asyncio.sleep(2)


class Measurements:
    """Runs each measurement, once more if it failed or a service restart disturbed it;
    keeps every attempt (the last in `raw`, earlier ones in `discarded`)."""

    def __init__(self, services: Services, attempts: int) -> None:
        self.services = services
        self.attempts = attempts
        self.raw: dict[str, list[dict[str, Any]]] = {}
        self.discarded: list[dict[str, Any]] = []
        self.exact: list[dict[str, Any]] = []

    async def run(self, key: str, title: str, attempt_fn: Any) -> dict[str, Any]:
        res: dict[str, Any] = {}
        for attempt in range(self.attempts):
            await wait_services(self.services)
            try:
                res = await attempt_fn(attempt)
            except Exception as exc:
                res = {"error": f"{type(exc).__name__}: {exc}"}
            reasons = disturbance(res, key)
            if reasons:
                res["disturbed"] = reasons
            if "exact" in res:
                label = res.get("label", key) + (f" (attempt {attempt + 1})" if attempt else "")
                self.exact.append({"label": label, "exact": res["exact"], "disturbed": reasons})
            log(headline(title, res) + (f" [disturbed: {'; '.join(reasons)}]" if reasons else ""))
            if not res.get("error") and not reasons:
                break
            if attempt < self.attempts - 1:
                self.discarded.append({"key": key, "attempt": attempt, **res})
                log(f"{title}: measuring again")
        self.raw.setdefault(key, []).append(res)
        return res


async def throughput(
    args: argparse.Namespace,
    services: Services,
    loaded: Loaded,
    workdir: Path,
    m: Measurements,
    r: int,
) -> None:
    """Run `r` of every contender on one workload. The flat workload's keys are the
    contenders' names (`sink_w1`); the others' carry the shape (`mixed_sink_w1`), as do the
    resources each makes."""
    from benchmarks.peer import run_peer
    from benchmarks.sinkbench import run_sink

    spec = loaded.spec
    pre = "" if spec.shape == "flat" else f"{spec.shape}_"
    shown_as = "" if spec.shape == "flat" else f"[{spec.shape}] "
    meters = MIXED_METERS if spec.shape == "mixed" else None
    topics = spec.topic_names
    total = loaded.total
    if "consume" in args.only:

        async def consume(attempt: int, r: int = r) -> dict[str, Any]:
            group = f"bench_{spec.run}_{pre}consume_{r}_{attempt}"
            params = {"bootstrap": services.kafka, "topics": topics, "total": total,
                      "group": group, "max_records": args.batch_rows,
                      "timeout": args.timeout}  # fmt: skip
            try:
                return await run_contender("consume", params, args.timeout + 60, workdir)
            finally:
                await delete_groups(services.kafka, [group])

        await m.run(pre + "consume", shown_as + "consume ceiling", consume)
    # The Kafka engine (18.16) reads no headers, and the insert ceiling decodes the values
    # alone: binary content mode is measured by the sink and the consume ceiling.
    structured = spec.shape != "binary"
    if "insert" in args.only and structured:

        async def insert(attempt: int, r: int = r) -> dict[str, Any]:
            db = f"bench_{spec.run}_{pre}insert_{r}_{attempt}"
            params = {"spec": spec.to_json(), "clickhouse": services.ch_url(db),
                      "batch_rows": args.batch_rows,
                      "timestamp_ms": loaded.produce_ms}  # fmt: skip
            try:
                return await run_contender("insert", params, args.timeout * 2, workdir, rss=False)
            finally:
                await drop_database(services, db)

        await m.run(pre + "insert", shown_as + "insert ceiling", insert)
    if "sink" in args.only:
        for workers in args.workers:

            async def sink(attempt: int, r: int = r, workers: int = workers) -> dict[str, Any]:
                label = f"{pre}sink_w{workers}_{r}" + (f"_{attempt}" if attempt else "")
                return await run_sink(
                    services, loaded, label, workers, workdir, args.timeout, meters=meters
                )

            await m.run(f"{pre}sink_w{workers}", f"{shown_as}sink {workers} worker(s)", sink)
    if "cluster" in args.only and services.cluster is not None:
        for key, quorum in QUORUMS.items():

            async def on_cluster(
                attempt: int, r: int = r, key: str = key, quorum: int | None = quorum
            ) -> dict[str, Any]:
                label = f"{pre}{key}_{r}" + (f"_{attempt}" if attempt else "")
                return await run_sink(
                    services, loaded, label, 1, workdir, args.timeout,
                    cluster=services.cluster, insert_quorum=quorum, meters=meters,
                )  # fmt: skip

            title = (
                shown_as
                + "sink 1 worker, 2x2 cluster, insert_quorum "
                + ("default" if quorum is None else str(quorum))
            )
            await m.run(pre + key, title, on_cluster)
    if "peer" in args.only and structured:

        async def peer(attempt: int, r: int = r) -> dict[str, Any]:
            label = f"{pre}peer_{r}_{attempt}"
            return await run_peer(services, loaded, label, args.timeout)

        await m.run(pre + "peer", shown_as + "ClickHouse Kafka engine", peer)
    if "naive" in args.only and not pre:

        async def naive(attempt: int, r: int = r) -> dict[str, Any]:
            db = f"bench_{spec.run}_naive_{r}_{attempt}"
            prefix = f"bench:{spec.run}:naive_{r}_{attempt}:"
            group = f"bench_{spec.run}_naive_{r}_{attempt}"
            params = {"bootstrap": services.kafka, "topics": topics, "group": group,
                      "limit": min(args.naive_events, total), "redis": services.redis,
                      "redis_prefix": prefix, "clickhouse": services.ch_url(db),
                      "topics_regex": spec.topics_regex}  # fmt: skip
            try:
                return await run_contender("naive", params, args.timeout, workdir)
            finally:
                await drop_database(services, db)
                await delete_redis_prefix(services.redis, prefix)
                await delete_groups(services.kafka, [group])

        await m.run("naive", "naive", naive)


async def latency(
    args: argparse.Namespace,
    services: Services,
    spec: Spec,
    workdir: Path,
    m: Measurements,
    notes: list[str],
) -> dict[str, Any]:
    from benchmarks.sinkbench import run_latency

    rate = args.latency_rate
    if rate is None:
        key = report.prefix(spec.shape) + "sink_w1"
        per_run = [report.rates(r) for r in m.raw.get(key, []) if not r.get("error")]
        measured = summary([x.get("steady") or x.get("wall") for x in per_run])
        if measured:
            rate = measured["median"] / 2
        else:
            rate = 5000.0
            notes.append("No 1-worker rate measured in this run: delay test offered 5,000/s.")
    for r in range(args.runs):

        async def one(attempt: int, r: int = r) -> dict[str, Any]:
            lat_spec = Spec(
                run=spec.run,
                kind=f"lat{r}x{attempt}",
                events=int(rate * args.latency_seconds),
                topics=spec.topics,
                partitions=spec.partitions,
                subjects=spec.subjects,
                dup_share=spec.dup_share,
                invalid_share=spec.invalid_share,
                seed=spec.seed + 100 + r,
                base_ms=int(time.time() * 1000),
                shape=spec.shape,
            )
            log(f"delay at {rate:,.0f} records/s for {args.latency_seconds:.0f}s (run {r + 1})")
            res = await run_latency(services, lat_spec, rate, args.latency_seconds, workdir)
            res["label"] = f"latency_{r}"
            return res

        await m.run("latency", "end-to-end delay", one)
    runs = m.raw.get("latency", [])
    ok = [x for x in runs if x.get("p50_s") is not None]
    return {
        "rate": rate,
        "seconds": args.latency_seconds,
        "runs": runs,
        "summary": {
            "p50_s": summary([x["p50_s"] for x in ok]),
            "p99_s": summary([x["p99_s"] for x in ok]),
        },
    }


async def profile(
    args: argparse.Namespace, services: Services, loaded: Loaded, workdir: Path
) -> tuple[str, dict[str, Any]]:
    from benchmarks import profiling as prof
    from benchmarks.sinkbench import run_sink

    out = RESULTS / "profile.txt"
    out.unlink(missing_ok=True)
    log("profiling one worker under py-spy (100 Hz, on-CPU samples)")
    meters = MIXED_METERS if loaded.spec.shape == "mixed" else None
    res = await run_sink(
        services, loaded, "profile", 1, workdir, args.timeout * 2, out, meters=meters
    )
    for _ in range(50):  # py-spy writes its file once the worker exited
        if out.exists():
            break
        await asyncio.sleep(0.2)
    if not out.exists():
        return f"py-spy wrote no profile (see {res.get('log')})\n", {"run": res}
    summary_ = prof.summarise(out)
    md = prof.markdown(summary_, res.get("wall_s"))
    md += (
        f"\nProfiled run: {headline('sink 1 worker under py-spy', res)}. Raw collapsed stacks: "
        "`benchmarks/results/profile.txt` (open in https://www.speedscope.app or flamegraph.pl).\n"
    )
    (RESULTS / "profile.md").write_text(md)
    return md, {"run": res, "summary": summary_}


async def cleanup(services: Services, tag: str) -> None:
    """Everything named after this run: topics, groups, databases, Redis keys."""
    from aiokafka.admin import AIOKafkaAdminClient

    prefix = f"bench_{tag}_"
    with contextlib.suppress(Exception):
        admin = AIOKafkaAdminClient(bootstrap_servers=services.kafka)
        await admin.start()
        try:
            topics = [t for t in await admin.list_topics() if t.startswith(prefix)]
            groups = [
                g[0] if isinstance(g, tuple) else g for g in await admin.list_consumer_groups()
            ]
        finally:
            await admin.close()
        await delete_topics(services.kafka, topics)
        await delete_groups(services.kafka, [g for g in groups if str(g).startswith(prefix)])
    with contextlib.suppress(Exception):
        names = http_query(
            services, f"SELECT name FROM system.databases WHERE startsWith(name, '{prefix}')"
        ).split()
        for name in names:
            await drop_database(services, name.decode())
    with contextlib.suppress(Exception):
        await delete_redis_prefix(services.redis, f"bench:{tag}:")


def entry(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loop = asyncio.new_event_loop()
    task = loop.create_task(main(args))
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return loop.run_until_complete(task)
    except asyncio.CancelledError:
        log("interrupted; resources were cleaned up")
        return 130
    finally:
        loop.close()


if __name__ == "__main__":
    sys.exit(entry())


__all__ = ["entry"]
