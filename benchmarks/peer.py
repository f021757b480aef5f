"""The peer: ClickHouse's own Kafka table engine plus a materialized view into a MergeTree,
consuming the same topics.

What ClickHouse 18.16 offers here (probed on the CI server, not assumed):
- Kafka engine settings: kafka_broker_list, kafka_topic_list, kafka_group_name, kafka_format,
  kafka_row_delimiter, kafka_schema, kafka_num_consumers. No kafka_skip_broken_messages, no
  kafka_max_block_size; no virtual columns (_topic, _partition, _offset, _key, _timestamp).
- Input formats: no JSONAsString, no RawBLOB, no JSONExtract*. JSONEachRow cannot read the
  nested `data` object into a String column.
- A fresh consumer group starts at the end of each partition (librdkafka's default reset);
  so we commit offset 0 for every partition of the group before creating the table.
- A failed push to the view loses the block (offsets were committed anyway): the records
  must all parse.

So each message is read whole as one String column with `kafka_format = 'TSV'` and
`kafka_row_delimiter = '\\n'` (the generated records contain no tab, newline or backslash),
and the view extracts the CloudEvents fields with `visitParam*` and
`parseDateTimeBestEffortOrZero`, writing every record (invalid ones flagged in
`validation_error`) into a MergeTree shaped like the worker's raw table, less the Kafka
coordinates and the namespace (18.16 cannot tell which topic a row came from).
It does no de-duplication and is at-least-once. One Kafka table, one consumer (the
default `kafka_num_consumers = 1`), like one sink worker.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from benchmarks.common import (
    ServiceCpu,
    Services,
    ch_exec,
    clickhouse,
    commit_offsets,
    delete_groups,
    drop_database,
)
from benchmarks.workload import Loaded


def statements(db: str, services: Services, topics: list[str], group: str) -> list[str]:
    return [
        f"CREATE DATABASE IF NOT EXISTS `{db}`",
        f"""CREATE TABLE `{db}`.events (
    namespace String,
    id String,
    type String,
    source String,
    subject String,
    time DateTime('UTC'),
    data String,
    ingested_at DateTime('UTC'),
    stored_at DateTime('UTC') DEFAULT now(),
    validation_error String
) ENGINE = MergeTree()
PARTITION BY toYYYYMM(time)
ORDER BY (namespace, type, subject, time)""",
        f"""CREATE TABLE `{db}`.queue (msg String) ENGINE = Kafka SETTINGS
    kafka_broker_list = '{services.kafka}',
    kafka_topic_list = '{",".join(topics)}',
    kafka_group_name = '{group}',
    kafka_format = 'TSV',
    kafka_row_delimiter = '\\n',
    kafka_num_consumers = 1""",
        f"""CREATE MATERIALIZED VIEW `{db}`.consume TO `{db}`.events AS
SELECT
    '' AS namespace,
    visitParamExtractString(msg, 'id') AS id,
    visitParamExtractString(msg, 'type') AS type,
    visitParamExtractString(msg, 'source') AS source,
    visitParamExtractString(msg, 'subject') AS subject,
    parseDateTimeBestEffortOrZero(visitParamExtractString(msg, 'time')) AS time,
    visitParamExtractRaw(msg, 'data') AS data,
    now() AS ingested_at,
    now() AS stored_at,
    if(visitParamExtractString(msg, 'specversion') = '1.0' AND id != '' AND source != ''
       AND type != '' AND subject != '' AND toUInt32(time) != 0, '', 'invalid')
       AS validation_error
FROM `{db}`.queue""",
    ]


LOST_SHARE = 0.999
STALLED_S = 30.0
"""The peer is done when every record arrived, or when at least LOST_SHARE of them did and no
row arrived for STALLED_S seconds."""


async def run_peer(
    services: Services, loaded: Loaded, label: str, limit_s: float
) -> dict[str, Any]:
    spec = loaded.spec
    db = f"bench_{spec.run}_{label}"
    group = f"bench_{spec.run}_{label}"
    total = loaded.total
    await drop_database(services, db)
    await commit_offsets(services.kafka, group, {tp: 0 for tp in loaded.ends})
    create_db, create_target, create_queue, create_view = statements(
        db, services, spec.topic_names, group
    )
    await ch_exec(services, create_db, create_target)
    ch = clickhouse(services.ch_url("default"))
    stack = ServiceCpu()
    result: dict[str, Any] = {"label": label, "records": total}
    try:
        t0 = time.monotonic()
        await ch.execute(create_queue)
        await ch.execute(create_view)  # consumption starts once a view depends on the queue
        first_t = None
        first_rows = 0
        rows = 0
        moved_t, moved_rows = t0, 0
        while True:
            [(rows,)] = await ch.query(f"SELECT count() FROM `{db}`.events")
            t = time.monotonic()
            if rows and first_t is None:
                first_t, first_rows = t, int(rows)
            if rows != moved_rows:
                moved_t, moved_rows = t, int(rows)
            if rows >= total:
                end = t
                break
            if rows >= LOST_SHARE * total and t - moved_t > STALLED_S:
                # 18.16's engine has been seen to drop a record now and then: it never
                # arrives. Timed until the last rows arrived; what was lost is reported.
                end = moved_t
                result["lost"] = total - int(rows)
                break
            if t - t0 > limit_s:
                result["error"] = f"{rows} of {total} rows after {limit_s:.0f}s"
                end = t
                break
            await asyncio.sleep(0.2)
        result.update(
            rows=int(rows),
            wall_s=end - t0,
            startup_s=(first_t - t0) if first_t else None,
            steady_s=(end - first_t) if first_t else None,
            steady_records=int(rows) - first_rows,
            services_cpu=stack.delta(),
        )
        [(invalid,)] = await ch.query(f"SELECT countIf(validation_error != '') FROM `{db}`.events")
        result["flagged_invalid"] = int(invalid)
        if "error" in result:
            result["wall_s"] = result["steady_s"] = None
    finally:
        # The view first: dropping it stops consumption.
        for sql in (f"DROP TABLE IF EXISTS `{db}`.consume", f"DROP TABLE IF EXISTS `{db}`.queue"):
            try:
                await ch.execute(sql)
            except Exception as exc:  # keep cleaning up
                result.setdefault("cleanup_errors", []).append(str(exc)[:200])
        await ch.close()
        await drop_database(services, db)
        await asyncio.sleep(1)
        await delete_groups(services.kafka, [group])
    return result
