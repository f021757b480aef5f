"""Prometheus metrics. Updated once per batch, never per record.

Label cardinality is bounded: topics and partitions come from the assignment, reasons from a
fixed set, dependencies from three names.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from sink import __version__

_LATENCY = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_DELAY = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600)
_ROWS = (10, 100, 500, 1000, 5000, 10_000, 25_000, 50_000, 100_000, 250_000)
_BYTES = (1e3, 1e4, 1e5, 1e6, 4e6, 16e6, 64e6, 256e6)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.consumed = Counter(
            "sink_records_consumed", "Kafka records consumed", ["topic"], registry=r
        )
        self.inserted = Counter(
            "sink_events_inserted", "Events landed in the raw table", ["topic"], registry=r
        )
        self.duplicates = Counter(
            "sink_duplicates_dropped", "Duplicate events dropped", ["topic"], registry=r
        )
        self.dead_letters = Counter(
            "sink_dead_letters", "Records sent to the dead-letter topic", ["reason"], registry=r
        )
        self.meter_invalid = Counter(
            "sink_meter_invalid_events",
            "Events stored with a validation error, excluded from the meter",
            ["meter"],
            registry=r,
        )
        self.backfill_done = Gauge(
            "sink_backfill_rows_done",
            "Raw rows a meter's backfill has counted (this process's backfills)",
            ["meter"],
            registry=r,
        )
        self.backfill_total = Gauge(
            "sink_backfill_rows_total",
            "Raw rows a meter's backfill counts in all",
            ["meter"],
            registry=r,
        )
        self.batches = Counter("sink_batches", "Batches landed", registry=r)
        self.batches_dropped = Counter(
            "sink_batches_dropped",
            "Batches (or parts) not inserted because ownership was lost",
            registry=r,
        )
        self.batch_rows = Histogram(
            "sink_batch_rows", "Records per batch", buckets=_ROWS, registry=r
        )
        self.batch_bytes = Histogram(
            "sink_batch_bytes", "Record bytes per batch", buckets=_BYTES, registry=r
        )
        self.flush_seconds = Histogram(
            "sink_flush_seconds", "Time to land one batch", buckets=_LATENCY, registry=r
        )
        self.insert_seconds = Histogram(
            "sink_insert_seconds", "ClickHouse insert latency", buckets=_LATENCY, registry=r
        )
        self.dedup_seconds = Histogram(
            "sink_dedup_seconds",
            "A batch's Redis claim, retries included",
            buckets=_LATENCY,
            registry=r,
        )
        self.end_to_end = Histogram(
            "sink_end_to_end_delay_seconds",
            "Kafka record timestamp to landed, newest record of each batch",
            buckets=_DELAY,
            registry=r,
        )
        self.retries = Counter(
            "sink_retries",
            "Retries after a dependency failure",
            ["dependency", "kind"],
            registry=r,
        )
        self.views_in_doubt = Counter(
            "sink_views_in_doubt_rows",
            "Rows of an insert with an unknown outcome found landed in the raw table: the "
            "views (meters) may not have seen them (README, 'Meters after a 319')",
            registry=r,
        )
        self.dedup_bypassed = Counter(
            "sink_dedup_bypassed",
            "Events landed without dedup because Redis failed (on_error=allow-duplicates)",
            registry=r,
        )
        self.lag = Gauge(
            "sink_consumer_lag",
            "High watermark minus position",
            ["topic", "partition"],
            registry=r,
        )
        self.landed_offset = Gauge(
            "sink_landed_offset",
            "Last offset landed in ClickHouse",
            ["topic", "partition"],
            registry=r,
        )
        self.rebalances = Counter("sink_rebalances", "Partition assignments", registry=r)
        self.assigned = Gauge("sink_assigned_partitions", "Partitions held", registry=r)
        self.paused = Gauge("sink_paused_partitions", "Partitions paused", registry=r)
        self.in_flight_rows = Gauge("sink_in_flight_rows", "Records held in memory", registry=r)
        self.in_flight_bytes = Gauge(
            "sink_in_flight_bytes", "Record bytes held in memory", registry=r
        )
        self.up = Gauge(
            "sink_dependency_up", "1 while the dependency answers", ["dependency"], registry=r
        )
        Info("sink_build", "Build information", registry=r).info({"version": __version__})

    def forget_partition(self, topic: str, partition: int) -> None:
        for gauge in (self.lag, self.landed_offset):
            with contextlib.suppress(KeyError):
                gauge.remove(topic, str(partition))
