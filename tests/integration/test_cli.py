"""The command line against the real services: check, bad configuration, migrate --dry-run."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


async def sink(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    import os

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sink",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_check_reaches_every_dependency(sink_config: Callable[..., Path]) -> None:
    code, out, _ = await sink("check", "-c", str(sink_config()))
    assert code == 0, out
    assert "clickhouse: ok" in out and "redis: ok" in out and "kafka: ok" in out


async def test_check_names_the_dependency_that_is_down(sink_config: Callable[..., Path]) -> None:
    config = sink_config(dedup={"redis_url": "redis://127.0.0.1:1/0", "socket_timeout": "1s"})
    code, out, _ = await sink("check", "-c", str(config))
    assert code == 1
    assert "redis: FAILED" in out
    assert "clickhouse: ok" in out and "kafka: ok" in out


async def test_invalid_configuration_stops_with_key_value_and_expectation(
    sink_config: Callable[..., Path],
) -> None:
    config = sink_config(batch={"max_rows": "many"})
    code, _, err = await sink("run", "-c", str(config))
    assert code == 2
    assert "batch.max_rows = 'many'" in err and "integer" in err
    code, _, err = await sink(
        "check", "-c", str(config), env={"SINK__KAFKA__AUTO_OFFSET_RESET": "middle"}
    )
    assert code == 2 and "kafka.auto_offset_reset = 'middle'" in err


async def test_migrate_dry_run_prints_sql_and_creates_nothing(
    sink_config: Callable[..., Path],
    clickhouse_db: Any,
) -> None:
    code, out, err = await sink("migrate", "-c", str(sink_config()), "--dry-run")
    assert code == 0, err
    assert "CREATE TABLE IF NOT EXISTS" in out and "MergeTree" in out
    tables = await clickhouse_db.query(
        f"SELECT name FROM system.tables WHERE database = '{clickhouse_db.database}'"
    )
    assert tables == []
