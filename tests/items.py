"""What tests build the way the worker does: a batch row from an event, and the order in
which the worker stores `data`'s members."""

from __future__ import annotations

from typing import Any

from sink.pipeline.batch import Item
from sink.pipeline.decode import Event


def as_item(event: Event, topic: str, partition: int, offset: int, timestamp_ms: int) -> Item:
    """The event as a row of the given record."""
    return event._replace(
        topic=topic, partition=partition, offset=offset, timestamp_ms=timestamp_ms
    )


def flat_first(data: dict[str, Any]) -> dict[str, Any]:
    """`data` as the worker stores it: top-level scalars first, then objects and arrays, each
    in the producer's order (what meters on servers without JSONExtract rely on)."""
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict | list)}
    return scalars | {k: v for k, v in data.items() if isinstance(v, dict | list)}
