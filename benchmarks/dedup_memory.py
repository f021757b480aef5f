"""Redis memory and CPU per remembered identity, keys layout against groups layout.

Starts a redis-server of its own on a free port (no persistence), claims N identities in
batches of 10,000 through the store classes the worker uses, and reports at each checkpoint the
growth of `used_memory` over the identities remembered, then the redis-server CPU
(`used_cpu_sys` + `used_cpu_user`) per million claims: new identities, the same claims again
(duplicates: for the groups layout the second round trip), and for the groups layout one sweep
round over every group, also per million identities amortised at the default sweep period
(ttl / 2: an identity is swept about twice in its life).

    PYTHONPATH=. .venv/bin/python benchmarks/dedup_memory.py            # 1M and 10M
    PYTHONPATH=. .venv/bin/python benchmarks/dedup_memory.py --at 1000000

The keys layout is measured with the text coordinates it held before coordinates were binary
(`topic:partition:offset`, the topic's storage key), as deployments run it today.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import redis.asyncio as redis_async
from pydantic import SecretStr

from sink.config import DedupConfig
from sink.stores.dedup import RedisDedup, open_store
from sink.stores.dedup_groups import GroupedDedup
from sink.stores.keys import compact_coordinates, coordinates, identity_key

BATCH = 10_000
TOPIC = "om_customer_events~5f1d3c9a2b7e"
"""A topic's storage key as the worker writes it (name and incarnation)."""
PARTITIONS = 12
START = time.time()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def scratch_redis() -> Iterator[str]:
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="dedup-memory-")
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(workdir, ignore_errors=True)


async def info(client: redis_async.Redis) -> tuple[int, float]:
    """used_memory, and the server's CPU seconds so far."""
    memory, cpu = await client.info("memory"), await client.info("cpu")
    return int(memory["used_memory"]), float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


def batches(total: int, start: int, text: bool) -> Iterator[tuple[list[bytes], list[bytes]]]:
    for first in range(start, total, BATCH):
        ids = range(first, min(total, first + BATCH))
        keys = [identity_key(b"sink:dedup:", "acme", "billing-api", f"evt-{i:012d}") for i in ids]
        coords = [
            coordinates(TOPIC, i % PARTITIONS, 10**9 + i // PARTITIONS)
            if text
            else compact_coordinates(TOPIC, i % PARTITIONS, 10**9 + i // PARTITIONS)
            for i in ids
        ]
        yield keys, coords


async def claim_all(
    store: Any, total: int, start: int, text: bool, client: redis_async.Redis
) -> float:
    """Claims identities start..total; the server's CPU seconds it took."""
    _, cpu0 = await info(client)
    for at, (keys, coords) in enumerate(batches(total, start, text)):
        if isinstance(store, GroupedDedup):
            # Claimed over one TTL, as in a steady state.
            claimed = START + store._ttl * (start + at * BATCH) / total
            store._clock = partial(float, claimed)
        await store.claim(keys, coords)
    _, cpu1 = await info(client)
    return cpu1 - cpu0


async def sweep_round(config: DedupConfig, client: redis_async.Redis, at: float) -> float:
    """The server's CPU seconds of one sweep round over every group, at time `at`."""
    store = open_store(config, 30.0)
    assert isinstance(store, GroupedDedup)
    store._clock = lambda: at
    _, cpu0 = await info(client)
    while (await store.sweep(1024)).groups:
        pass
    _, cpu1 = await info(client)
    await store.close()
    return cpu1 - cpu0


async def expiry_cost(url: str, count: int) -> float:
    """The server's CPU seconds per million keys-layout markers to expire them: `count` claims
    with a TTL just past their claiming, then the CPU until they are gone, less what the idle
    server spends in that time."""
    client = redis_async.Redis.from_url(url)
    _, idle0 = await info(client)
    await asyncio.sleep(2)
    _, idle1 = await info(client)
    idle = (idle1 - idle0) / 2
    started = time.monotonic()
    store = RedisDedup(url, 1)
    for keys, coords in batches(count, 0, True):
        store._ttl = str(max(1, 40 - int(time.monotonic() - started))).encode()
        await store.claim(keys, coords)
    await store.close()
    # All expire within a few seconds of one another, some 40 s after the claims began.
    await asyncio.sleep(max(0.0, started + 38 - time.monotonic()))
    _, cpu0 = await info(client)
    t0 = time.monotonic()
    while await client.dbsize():  # noqa: ASYNC110 (another process empties it)
        await asyncio.sleep(0.2)
    _, cpu1 = await info(client)
    await client.aclose()
    return (cpu1 - cpu0 - idle * (time.monotonic() - t0)) * 1e6 / count


def redis_version() -> str:
    done = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
    return done.stdout.strip()


def say(line: str) -> None:
    print(line, flush=True)


async def measure(layout: str, checkpoints: list[int], groups: int) -> None:
    with scratch_redis() as url:
        client = redis_async.Redis.from_url(url)
        config = DedupConfig(redis_url=SecretStr(url), layout=layout, groups=groups)  # type: ignore[arg-type]
        store: Any = RedisDedup(url, config.ttl) if layout == "keys" else open_store(config, 30.0)
        base, _ = await info(client)
        done, cpu_new = 0, 0.0
        for at in checkpoints:
            cpu_new += await claim_all(store, at, done, layout == "keys", client)
            done = at
            memory, _ = await info(client)
            say(
                f"{layout:6} {at:>11,} identities: {(memory - base) / at:6.1f} bytes/identity "
                f"(used_memory +{(memory - base) / 2**20:,.0f} MiB)"
            )
        per_million = 1e6 / done
        say(f"{layout:6} new claims:       {cpu_new * per_million:5.2f} CPU s per million")
        sample = min(done, 1_000_000)
        cpu_again = await claim_all(store, sample, 0, layout == "keys", client)
        say(f"{layout:6} duplicate claims: {cpu_again * 1e6 / sample:5.2f} CPU s per million")
        if isinstance(store, GroupedDedup):
            # Claim times were spread over one TTL (`claim_all`). A round at its end drops
            # nothing: what visiting costs. A round half a TTL later (the default sweep period)
            # drops the older half: in a steady state each round drops the claims of one
            # period, so its cost over those claims is the sweep's cost per claim.
            visit = await sweep_round(config, client, START + config.ttl) * per_million
            half = await sweep_round(config, client, START + config.ttl * 1.5)
            per_claim = half * 1e6 / (done * config.sweep_every / config.ttl)
            memory, _ = await info(client)
            say(
                f"{layout:6} sweep: a round over {done:,} identities {visit:.2f} CPU s per "
                f"million; one dropping the older half {half:.2f} s (used_memory then "
                f"+{(memory - base) / 2**20:,.0f} MiB): {per_claim:.2f} s per million claims "
                f"at sweep_every = ttl/2; new claims + sweep "
                f"{cpu_new * per_million + per_claim:.2f}"
            )
            stats = await client.info("commandstats")
            say(f"{layout:6} commandstats hsetnx: {stats.get('cmdstat_hsetnx', {})}")
        else:
            stats = await client.info("commandstats")
            say(f"{layout:6} commandstats set: {stats.get('cmdstat_set', {})}")
            with scratch_redis() as fresh:
                expiry = await expiry_cost(fresh, min(done, 1_000_000))
            say(
                f"{layout:6} expiry: {expiry:.2f} CPU s per million keys (Redis' active expiry); "
                f"new claims + expiry {cpu_new * per_million + expiry:.2f}"
            )
        await store.close()
        await client.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--at", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument(
        "--groups", type=int, default=None, help="dedup.groups (default: the last checkpoint / 32)"
    )
    args = parser.parse_args()
    checkpoints = sorted(args.at)
    groups = args.groups or max(1, checkpoints[-1] // 32)
    print(redis_version())
    print(f"groups layout with dedup.groups = {groups:,}")
    for layout in ("keys", "groups"):
        await measure(layout, checkpoints, groups)


if __name__ == "__main__":
    asyncio.run(main())
