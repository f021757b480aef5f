"""What the API answers, in OpenMeter's shapes: meters, and usage as JSON or CSV.

The models describe the answers in the OpenAPI document; answers are rendered with orjson
straight from the rows (a month of minutes is tens of thousands of rows).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

from sink.api.query import UsageQuery
from sink.api.store import MeterRecord
from sink.metering.meters import Aggregation, Meter
from sink.metering.usage import UsageRow, Window

STATE_ANNOTATION = "sink.meter.state"


class MeterDocument(BaseModel):
    """A configured meter (OpenMeter's `Meter`)."""

    id: str = Field(description="The checksum of the meter's definition; stable while it is.")
    slug: str
    name: str = Field(description="The slug: sink meters have no display name.")
    description: str | None = None
    aggregation: Aggregation
    eventType: str
    valueProperty: str | None = Field(None, description="JSONPath into the event's data.")
    groupBy: dict[str, str] = Field(description="Group name to JSONPath into the event's data.")
    createdAt: datetime | None = Field(None, description="When the meter went live; null before.")
    updatedAt: datetime | None = Field(None, description="Its last change of state.")
    annotations: dict[str, str] = Field(
        description=f"`{STATE_ANNOTATION}`: `applied` (complete), `live` (counting new events "
        "while older ones are backfilled: totals may still grow), `pending` (not created yet)."
    )


class UsageRowDocument(BaseModel):
    """One window of one subject and group (OpenMeter's `MeterQueryRow`)."""

    value: float
    windowStart: datetime
    windowEnd: datetime
    subject: str | None = Field(description="Null unless grouped (or filtered) by subject.")
    groupBy: dict[str, str] = Field(
        description="The value of each group asked for; '' where events had no such property."
    )


class UsageDocument(BaseModel):
    """A meter query's answer (OpenMeter's `MeterQueryResult`)."""

    model_config = ConfigDict(populate_by_name=True)

    from_: datetime | None = Field(None, alias="from")
    to: datetime | None = None
    windowSize: Window | None = None
    data: list[UsageRowDocument]


def meter_document(meter: Meter, record: MeterRecord) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": meter.checksum(),
        "slug": meter.slug,
        "name": meter.slug,
        "description": meter.description or None,
        "aggregation": meter.aggregation,
        "eventType": meter.event_type,
        "valueProperty": _jsonpath(meter.value_property) if meter.value_property else None,
        "groupBy": {name: _jsonpath(p) for name, p in meter.group_by.items()},
        "createdAt": record.created_at,
        "updatedAt": record.updated_at,
        "annotations": {STATE_ANNOTATION: record.state},
    }
    return doc


def _jsonpath(path: str) -> str:
    return "$." + path


def usage_json(query: UsageQuery, rows: Sequence[UsageRow]) -> bytes:
    data = [
        {
            "value": r.value,
            "windowStart": r.window_start.astimezone(UTC),
            "windowEnd": r.window_end.astimezone(UTC),
            "subject": r.subject,
            "groupBy": r.groups,
        }
        for r in rows
    ]
    doc = {"from": query.start, "to": query.end, "windowSize": query.window, "data": data}
    return dumps(doc)


def usage_csv(query: UsageQuery, rows: Sequence[UsageRow]) -> str:
    """OpenMeter's CSV: window_start, window_end, subject, the groups asked for, value. The
    value is written exactly (shortest round-trip text), not rounded to six decimals."""
    groups = query.groups
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["window_start", "window_end", "subject", *groups, "value"])
    for r in rows:
        writer.writerow(
            [
                _rfc3339(r.window_start),
                _rfc3339(r.window_end),
                r.subject or "",
                *(r.groups.get(g, "") for g in groups),
                repr(r.value),
            ]
        )
    return out.getvalue()


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_UTC_Z)
