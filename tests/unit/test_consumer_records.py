"""The worker's consumer hands out records as aiokafka parsed them; other consumers do not."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from aiokafka.consumer import fetcher
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import ConsumerRecord, TopicPartition

from sink.pipeline import binary
from sink.pipeline import decode as decoding
from sink.pipeline.consumer import adapt_fetcher, as_parsed, full_record

TP = TopicPartition("usage", 3)


def _builder() -> DefaultRecordBatchBuilder:
    """A record batch as a producer writes it (magic 2, uncompressed, not transactional)."""
    return DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )


def _fetched(value_deserializer: Any) -> list[Any]:
    assert adapt_fetcher(), "aiokafka's fetcher no longer has the hook the worker adapts"
    builder = _builder()
    builder.append(0, timestamp=1_000, key=b"k0", value=b"v0", headers=[("h", b"1")])
    builder.append(1, timestamp=1_001, key=None, value=None, headers=[])
    builder.append(2, timestamp=1_002, key=b"k2", value=b'{"a":1}', headers=[])
    records = MemoryRecords(bytes(builder.build()))
    # The class the fetcher builds for each fetched partition (as aiokafka's fetcher does).
    partition = fetcher.PartitionRecords(TP, records, [], 1, None, value_deserializer, True, 0)
    return list(partition)


def test_the_marked_consumer_gets_records_as_parsed() -> None:
    records = _fetched(as_parsed)
    assert [r.offset for r in records] == [1, 2]  # from the fetch offset on
    assert not any(isinstance(r, ConsumerRecord) for r in records)
    assert [(r.key, r.value, r.timestamp) for r in records] == [
        (None, None, 1_001),
        (b"k2", b'{"a":1}', 1_002),
    ]


def test_other_consumers_still_get_consumer_records() -> None:
    records = _fetched(None)
    assert all(isinstance(r, ConsumerRecord) for r in records)
    assert [(r.topic, r.partition, r.offset) for r in records] == [("usage", 3, 1), ("usage", 3, 2)]


def test_full_record_is_what_aiokafka_would_have_built() -> None:
    raw = _fetched(as_parsed)
    stock = _fetched(None)
    assert [full_record("usage", 3, r) for r in raw] == stock
    assert full_record("usage", 3, stock[0]) is stock[0]


def test_full_record_keeps_headers() -> None:
    builder = _builder()
    builder.append(7, timestamp=5, key=b"k", value=b"v", headers=[("ns", b"acme"), ("x", None)])
    batch = MemoryRecords(bytes(builder.build())).next_batch()
    (record,) = list(batch)
    full = full_record("t", 0, record)
    assert full.headers == (("ns", b"acme"), ("x", None))
    assert (full.offset, full.serialized_key_size, full.serialized_value_size) == (7, 1, 1)


def test_a_fetch_read_in_parts_resumes_where_it_stopped() -> None:
    # aiokafka's getmany reads a fetch up to max_records, notes the position, and reads the
    # rest on a later call: the position must follow the last record handed out.
    for deserializer in (as_parsed, None):
        builder = _builder()
        for offset in range(5):
            builder.append(offset, timestamp=1_000 + offset, key=None, value=b"v", headers=[])
        records = MemoryRecords(bytes(builder.build()))
        partition = fetcher.PartitionRecords(TP, records, [], 0, None, deserializer, True, 0)
        first = []
        for record in partition:
            first.append(record.offset)
            if len(first) == 2:
                break
        assert partition.next_fetch_offset == 2
        assert [r.offset for r in partition] == [2, 3, 4]
        assert partition.next_fetch_offset == 5
        assert first == [0, 1]


def test_importing_the_consumer_module_changes_nothing_in_aiokafka() -> None:
    code = (
        "import aiokafka.consumer.fetcher as f; stock = f.PartitionRecords; "
        "import sink.pipeline.consumer as c; assert f.PartitionRecords is stock; "
        "assert c.adapt_fetcher() and f.PartitionRecords is not stock"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_binary_mode_record_as_parsed_decodes_like_its_structured_twin() -> None:
    assert adapt_fetcher()
    attributes = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"e-1"),
        ("ce_source", b"//gw"),
        ("ce_type", b"api.request"),
        ("ce_subject", b"c-1"),
        ("ce_time", b"2024-05-01T12:00:00Z"),
    ]
    structured = b'{"specversion":"1.0","id":"e-1","source":"//gw","type":"api.request",'
    structured += b'"subject":"c-1","time":"2024-05-01T12:00:00Z","data":{"n":3}}'
    builder = _builder()
    builder.append(0, timestamp=9, key=b"c-1", value=b'{"n":3}', headers=attributes)
    builder.append(1, timestamp=9, key=b"c-1", value=structured, headers=[])
    builder.append(2, timestamp=9, key=b"c-1", value=b"{}", headers=[*attributes[:5]])
    records = MemoryRecords(bytes(builder.build()))
    partition = fetcher.PartitionRecords(TP, records, [], 0, None, as_parsed, True, 0)
    headed, plain, no_time = list(partition)

    assert headed.headers and binary.binary_mode(headed.headers)
    event = binary.decode_binary(headed.headers, headed.value, "ns", 1 << 20)
    assert event == decoding.decode(plain.value, "ns", 1 << 20)
    assert not plain.headers
    assert binary.decode_binary(no_time.headers, no_time.value, "ns", 1 << 20) == (
        decoding.Rejection(decoding.MISSING_FIELD, "header 'ce_time' is missing or empty")
    )
    # A dead letter keeps the headers it came with.
    assert full_record("usage", 3, no_time).headers == tuple(attributes[:5])
