"""Credentials never show in logs, /status or /metrics - also not in the error messages of
failing dependencies and of invalid configuration; Kafka SASL/SSL settings reach aiokafka.

Redis gets a real password (a redis-server of the test's own with `requirepass`); ClickHouse a
password-protected user of the local stack (`sink_writer`, scripts/clickhouse/users.xml.in),
plus fake passwords in URLs that fail: a wrong password against the real server, and a
refused connection."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sink.config import build
from sink.errors import ClickHouseUnavailable
from sink.pipeline.consumer import security
from sink.stores.clickhouse.connection import ClickHouse
from tests.conftest import ROOT, Services
from tests.faults.conftest import (
    Load,
    Proxy,
    RedisServer,
    host_port,
    http_port,
    log_ends,
    log_events,
    next_landed,
    via,
    workload,
)
from tests.integration.conftest import SinkProcess
from tests.integration.test_worker import REGEX, free_port, topics_for
from tests.integration.workload import assert_exact, wait_landed

pytestmark = pytest.mark.faults


def _page(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return str(response.read().decode())


def _assert_hidden(where: dict[str, str], secrets: list[str]) -> None:
    for name, text in where.items():
        for secret in secrets:
            assert secret not in text, f"{name} shows {secret!r}"


async def test_secrets_stay_out_of_logs_status_and_metrics_while_dependencies_fail(
    services: Services,
    make_topics: Callable[..., Any],
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Path],
    run_sink: Callable[..., SinkProcess],
    own_redis: Callable[..., RedisServer],
    proxies: Callable[[str, str], Proxy],
    uid: str,
) -> None:
    redis_password = f"redis-pw-{uid}"
    sasl_password = f"sasl-pw-{uid}"
    redis = own_redis(password=redis_password)
    # Outages go through proxies: the own Redis keeps no data, and killing it would lose the
    # markers (a documented duplicate window, tested in test_processes.py), not the point here.
    redis_proxy = proxies("redis", f"127.0.0.1:{redis.port}")
    redis_url = via(redis.url, redis_proxy)
    ch = proxies("ch", host_port(services.clickhouse))
    base = services.clickhouse.rsplit("/", 1)[0]
    topics, namespaces = await topics_for(make_topics, uid, partitions=2)
    work = workload(topics, namespaces, 2, seed=800, unique=8000)
    port = free_port()
    config = sink_config(
        kafka={
            "topics_regex": REGEX.format(uid=uid),
            "sasl_mechanism": "PLAIN",
            "sasl_username": "sink",
            "sasl_password": sasl_password,
        },
        dedup={"redis_url": redis_url, "socket_timeout": "2s"},
        clickhouse={"url": via(f"{base}/t_{uid}", ch)},
        http={"port": port},
    )
    proc = run_sink(config)
    load = Load(services.kafka, work.records, pace=0.5).start()
    await next_landed(proc, 0, timeout=120)

    # Redis down, then ClickHouse unreachable, while holding the secrets.
    await load.reached(0.3)
    redis_proxy.enabled(False)
    await asyncio.sleep(6)
    during = {"/status (redis down)": _page(port, "/status")}
    redis_proxy.enabled(True)
    ch.enabled(False)
    await asyncio.sleep(6)
    during["/status (clickhouse down)"] = _page(port, "/status")
    ch.enabled(True)
    await load.done()
    await wait_landed(
        clickhouse_db,
        await log_ends(services.kafka, topics),
        timeout=180,
        alive=lambda: proc.running,
    )
    await assert_exact(clickhouse_db, work.expected)
    failures = {
        e.get("dependency")
        for e in log_events(proc)
        if e.get("event") == "dependency failed, retrying"
    }
    assert {"redis", "clickhouse"} <= failures, failures
    exposed = {**during, "/status": _page(port, "/status"), "/metrics": _page(port, "/metrics")}
    assert proc.stop() == 0
    exposed["log"] = proc.logs()
    _assert_hidden(exposed, [redis_password, redis_url, redis.url, sasl_password])
    assert "redis://" not in exposed["log"]


async def test_wrong_and_unreachable_credentials_are_not_echoed(
    services: Services,
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Path],
    run_sink: Callable[..., SinkProcess],
    own_redis: Callable[..., RedisServer],
    uid: str,
) -> None:
    """Workers that cannot authenticate or connect log the failure, not the credential."""
    redis = own_redis(password=f"right-{uid}")
    wrong_redis = f"wrong-redis-pw-{uid}"
    fake_ch = f"fake-ch-pw-{uid}"
    base_host = host_port(services.clickhouse)
    closed = free_port()
    port = free_port()
    (topic,) = await _one_topic(services, uid)
    # 1. Redis with a wrong password: the worker runs (HTTP up), every claim fails.
    wrong = run_sink(
        sink_config(
            "wrong-redis",
            dedup={"redis_url": f"redis://:{wrong_redis}@127.0.0.1:{redis.port}/0"},
            http={"port": port},
        ),
        name="wrong-redis",
    )
    # 2. ClickHouse with a password the server refuses; 3. ClickHouse on a closed port.
    wrong_ch = sink_config(
        "wrong-ch", clickhouse={"url": f"clickhouse://default:{fake_ch}@{base_host}/t_{uid}"}
    )
    refused = run_sink(wrong_ch, name="wrong-ch")
    unreachable = run_sink(
        sink_config(
            "closed-ch",
            clickhouse={"url": f"clickhouse://default:{fake_ch}@127.0.0.1:{closed}/t_{uid}"},
        ),
        name="closed-ch",
    )
    deadline = time.monotonic() + 60
    while not all('"waiting for dependency"' in p.logs() for p in (refused, unreachable)):
        assert time.monotonic() < deadline, "the workers did not report the failing dependency"
        await asyncio.sleep(0.5)
    # The wrong Redis password shows only once a batch needs Redis: give it records.
    await _send_events(services, topic, 20)
    deadline = time.monotonic() + 60
    while True:
        status = _page(http_port(wrong), "/status")
        # While it starts, the worker answers {"state": "starting"} only.
        redis_state = json.loads(status).get("dependencies", {}).get("redis", {"up": True})
        if not redis_state["up"]:
            break
        assert time.monotonic() < deadline, "redis not reported down:\n" + wrong.logs()[-2000:]
        await asyncio.sleep(0.5)
    assert redis_state["error"], status
    exposed = {
        "wrong redis /status": status,
        "wrong redis /metrics": _page(http_port(wrong), "/metrics"),
    }
    for proc in (wrong, refused, unreachable):
        proc.stop(timeout=30)
        exposed[f"log {proc.log_path.name}"] = proc.logs()
    # `sink check` prints each dependency's error.
    check = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "sink", "check", "-c", str(wrong_ch)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert check.returncode == 1 and "clickhouse: FAILED" in check.stdout, check.stdout
    exposed["sink check"] = check.stdout + check.stderr
    _assert_hidden(exposed, [wrong_redis, fake_ch])


# The local stack's password-protected ClickHouse user (scripts/clickhouse/users.xml.in).
CH_WRITER = ("sink_writer", "local-stack-writer-pw")


async def test_a_password_protected_clickhouse_user_lands_events_and_stays_hidden(
    services: Services,
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Path],
    run_sink: Callable[..., SinkProcess],
    uid: str,
) -> None:
    user, password = CH_WRITER
    base_host = host_port(services.clickhouse)
    url = f"clickhouse://{user}:{password}@{base_host}/{clickhouse_db.database}"
    probe = ClickHouse(url, connect_timeout=5, query_timeout=30)
    try:
        await probe.ping()
    except ClickHouseUnavailable as exc:  # 192 unknown user, 193 wrong password, 516 auth
        if "192" in str(exc) or "193" in str(exc) or "516" in str(exc):
            pytest.skip(f"the ClickHouse under test has no user {user} (scripts/stack.sh has)")
        raise
    finally:
        await probe.close()
    (topic,) = await _one_topic(services, uid)
    port = free_port()
    proc = run_sink(
        sink_config("ch-user", clickhouse={"url": url}, http={"port": port}), name="ch-user"
    )
    await _send_events(services, topic, 50)
    deadline = time.monotonic() + 90
    table = clickhouse_db.table("events")
    while True:
        with contextlib.suppress(Exception):
            [(rows,)] = await clickhouse_db.query(f"SELECT count() FROM {table}")
            if rows == 50:
                break
        assert proc.running, proc.logs()[-3000:]
        assert time.monotonic() < deadline, "events not landed as " + user
        await asyncio.sleep(0.5)
    exposed = {"/status": _page(port, "/status"), "/metrics": _page(port, "/metrics")}
    assert proc.stop() == 0
    exposed["log"] = proc.logs()
    _assert_hidden(exposed, [password])


async def _one_topic(services: Services, uid: str) -> tuple[str]:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    name = f"om_sec_{uid}"
    admin = AIOKafkaAdminClient(bootstrap_servers=services.kafka)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 1, 1)])
        for _ in range(100):
            if name in set(await admin.list_topics()):
                break
            await asyncio.sleep(0.2)
    finally:
        await admin.close()
    return (name,)


async def _send_events(services: Services, topic: str, count: int) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=services.kafka)
    await producer.start()
    try:
        for n in range(count):
            await producer.send_and_wait(topic, _event(n))
    finally:
        await producer.stop()


def _event(n: int) -> bytes:
    from tests.integration.conftest import cloud_event

    return cloud_event(f"sec-{n}")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("SINK__CLICKHOUSE__URL", "http://default:{secret}@127.0.0.1:19000/db"),
        ("SINK__CLICKHOUSE__URL", "clickhouse://default:{secret}@127.0.0.1:notaport/db"),
        ("SINK__DEDUP__REDIS_URL", "redis://:{secret}@127.0.0.1:notaport/0"),
        ("SINK__KAFKA__SASL_PASSWORD", "{secret}"),
    ],
    ids=["clickhouse-bad-scheme", "clickhouse-bad-port", "redis-bad-port", "sasl-with-bad-kafka"],
)
def test_invalid_configuration_holding_a_secret_does_not_print_it(
    key: str, value: str, tmp_path: Path
) -> None:
    secret = "s3cr3t-in-config"
    config = tmp_path / "sink.yaml"
    config.write_text("kafka: {session_timeout: -1}\n" if "SASL" in key else "{}\n")
    env = {
        "PATH": "/usr/bin:/bin",
        key: value.format(secret=secret),
        "SINK__KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "SINK__WORKER__LOG_FORMAT": "json",
    }
    result = subprocess.run(
        [sys.executable, "-m", "sink", "check", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert secret not in output, output


def test_kafka_sasl_and_ssl_settings_are_passed_to_aiokafka() -> None:
    """Unit level: `sink.pipeline.consumer.security()` builds the aiokafka keyword arguments
    (the local broker has no SASL/SSL listener to try them against)."""
    plain = build({}, environ={}).kafka
    assert security(plain) == {"security_protocol": "PLAINTEXT"}

    sasl = build(
        {
            "kafka": {
                "security_protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_username": "sink",
            }
        },
        environ={"SINK__KAFKA__SASL_PASSWORD": "pw-from-env"},
    ).kafka
    assert security(sasl) == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "sink",
        "sasl_plain_password": "pw-from-env",
    }
    assert "pw-from-env" not in repr(sasl) and "pw-from-env" not in str(sasl.model_dump())

    tls = build(
        {
            "kafka": {
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "PLAIN",
                "sasl_username": "u",
                "sasl_password": "p",
                "ssl_check_hostname": False,
            }
        },
        environ={},
    ).kafka
    opts = security(tls)
    assert opts["security_protocol"] == "SASL_SSL"
    assert opts["sasl_mechanism"] == "PLAIN" and opts["sasl_plain_password"] == "p"
    context = opts["ssl_context"]
    assert isinstance(context, ssl.SSLContext) and context.check_hostname is False

    only_tls = security(build({"kafka": {"security_protocol": "SSL"}}, environ={}).kafka)
    assert set(only_tls) == {"security_protocol", "ssl_context"}
    assert only_tls["ssl_context"].check_hostname is True
    assert only_tls["ssl_context"].verify_mode == ssl.CERT_REQUIRED
