"""Where the real services come from.

1. `KAFKA_BOOTSTRAP_SERVERS`, `REDIS_URL` and `CLICKHOUSE_URL` set: use those
   (`scripts/stack.sh up` starts them locally; `eval "$(scripts/stack.sh env)"` sets them).
2. Else, a Docker engine answers: start them with testcontainers.
3. Else: integration tests fail with a message that says how to start the stack.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STACK = ROOT / "scripts" / "stack.sh"


@dataclass(frozen=True)
class Services:
    kafka: str
    redis: str
    clickhouse: str
    control: str | None
    """Command that can stop/start/kill each service (`scripts/stack.sh`), if we own them."""


def _from_env() -> Services | None:
    names = ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL", "CLICKHOUSE_URL")
    values = [os.environ.get(n) for n in names]
    if not all(values):
        return None
    control = os.environ.get("SINK_STACK_CONTROL")
    if control is None and shutil.which("bash") and (ROOT / ".stack").is_dir():
        control = str(STACK)
    return Services(values[0], values[1], values[2], control)  # type: ignore[arg-type]


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


HOW_TO = (
    "integration tests need Kafka, Redis and ClickHouse. Start the local stack with\n"
    '    bash scripts/stack.sh up && eval "$(bash scripts/stack.sh env)"\n'
    "or run `make test`, which does both; or make a Docker engine available for "
    "testcontainers."
)


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    given = _from_env()
    if given is not None:
        yield given
        return
    if not _docker_answers():
        pytest.fail(HOW_TO, pytrace=False)
    yield from _containers()


def _containers() -> Iterator[Services]:
    from testcontainers.clickhouse import ClickHouseContainer
    from testcontainers.kafka import KafkaContainer
    from testcontainers.redis import RedisContainer

    with (
        KafkaContainer("confluentinc/cp-kafka:7.6.0").with_kraft() as kafka,
        RedisContainer("redis:7.2") as redis,
        ClickHouseContainer("clickhouse/clickhouse-server:24.8") as ch,
    ):
        ch_host = ch.get_container_host_ip()
        ch_port = ch.get_exposed_port(9000)
        yield Services(
            kafka=kafka.get_bootstrap_server(),
            redis=f"redis://{redis.get_container_host_ip()}:{redis.get_exposed_port(6379)}/0",
            clickhouse=f"clickhouse://{ch.username}:{ch.password}@{ch_host}:{ch_port}/default",
            control=None,
        )
