"""Usage queries: read a meter's table with the matching -Merge function, per window.

    rows = await usage.query(ch, meter, namespace="acme", window="HOUR", tz="Europe/Paris",
                             start=..., end=..., group_by=["model"])

Windows are aligned in the given time zone and computed from the stored one-minute windows.
`start` and `end` select one-minute windows (`start <= window_start < end`), so they are
rounded down to whole minutes. `window=None` gives one aggregate for the whole period per
namespace and group; its window is the period asked for (`start`, `end`), or else the first
and last minute that had usage.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

from sink.metering.meter_sql import MeterSQL
from sink.metering.meters import Meter
from sink.stores.clickhouse.connection import ClickHouse
from sink.stores.clickhouse.sql import Replication, ServerFeatures, quote

Window = Literal["MINUTE", "HOUR", "DAY", "MONTH"]
WINDOWS: tuple[Window, ...] = ("MINUTE", "HOUR", "DAY", "MONTH")


ALL_NAMESPACES = "*"
"""`UsageRow.namespace` of a row merged over every namespace (`merge_namespaces`)."""


class UsageError(ValueError):
    """The query asks for something the meter or the server cannot give."""


@dataclass(frozen=True)
class UsageRow:
    window_start: datetime
    window_end: datetime
    namespace: str
    value: float
    subject: str | None = None
    groups: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "window_start": self.window_start.isoformat(),
            "window_end": self.window_end.isoformat(),
            "namespace": self.namespace,
        }
        if self.subject is not None:
            row["subject"] = self.subject
        row.update(self.groups)
        row["value"] = self.value
        return row


def _window_expr(window: Window, tz: str) -> str:
    zone = quote(tz)
    return {
        "MINUTE": "toUInt32(window_start)",
        "HOUR": f"toUInt32(toStartOfHour(window_start, {zone}))",
        "DAY": f"toUInt32(toStartOfDay(window_start, {zone}))",
        "MONTH": f"toUInt32(toDateTime(toStartOfMonth(window_start, {zone}), {zone}))",
    }[window]


_FIXED_STEP = {"MINUTE": 60, "HOUR": 3600}


def _window_end(start: datetime, window: Window) -> datetime:
    """The next window start in the window's time zone (months and DST days vary)."""
    if window == "MONTH":
        year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
        return start.replace(year=year, month=month)
    if window == "DAY":
        return start + timedelta(days=1)  # wall-clock arithmetic: the next local midnight
    step = timedelta(minutes=1) if window == "MINUTE" else timedelta(hours=1)
    return (start.astimezone(UTC) + step).astimezone(start.tzinfo)


def _minute(moment: datetime) -> int:
    return int(moment.timestamp()) // 60 * 60


def build_sql(
    meter: Meter,
    features: ServerFeatures,
    database: str,
    events_table: str,
    *,
    namespace: str | None,
    subjects: Sequence[str],
    start: datetime | None,
    end: datetime | None,
    window: Window | None,
    tz: str,
    group_by: Sequence[str],
    filters: Mapping[str, str] | None = None,
    limit: int | None = None,
    merge_namespaces: bool = False,
    cluster: str | None = None,
) -> tuple[str, list[str]]:
    """The SELECT, and the names of the group columns it returns. Its columns: the window
    (`w`; or `first`, `last` minute for `window=None`), `namespace` (unless merged), the
    groups, the value. `filters` keeps the rows whose group has the given value."""
    if window is not None and window not in WINDOWS:
        raise UsageError(f"window must be one of {', '.join(WINDOWS)}")
    filters = filters or {}
    unknown = [g for g in [*group_by, *filters] if g != "subject" and g not in meter.group_by]
    if unknown:
        raise UsageError(
            f"meter {meter.slug} cannot group by {', '.join(unknown)}; it groups by "
            f"{', '.join(['subject', *meter.group_by])}"
        )
    # On a cluster the meter is read through its Distributed table: every shard's windows.
    replication = Replication(cluster, "") if cluster is not None else None
    sql = MeterSQL(meter, features, database, events_table, replication)
    keys = [] if merge_namespaces else ["namespace"]
    names: list[str] = []
    for group in group_by:
        keys.append(_column(group))
        names.append(group)
    where = []
    if namespace is not None:
        where.append(f"namespace = {quote(namespace)}")
    if subjects:
        where.append(f"subject IN ({', '.join(quote(s) for s in subjects)})")
    where += [f"{_column(name)} = {quote(value)}" for name, value in sorted(filters.items())]
    if start is not None:
        where.append(f"window_start >= toDateTime({_minute(start)})")
    if end is not None:
        where.append(f"window_start < toDateTime({_minute(end)})")
    if window is None:
        # One row per group over the period; without groups an aggregate still answers one
        # row when nothing matched, which HAVING drops.
        head = "toUInt32(min(window_start)) AS first, toUInt32(max(window_start)) AS last"
        tail = (f"GROUP BY {', '.join(keys)}\n" if keys else "") + "HAVING count() > 0\n"
        order = keys or ["first"]
    else:
        head = f"{_window_expr(window, tz)} AS w"
        keys.insert(0, "w")
        tail = f"GROUP BY {', '.join(keys)}\n"
        order = keys
    text = (
        f"SELECT {', '.join([head, *keys[1 if window else 0 :]])}, {sql.merge()} AS v\n"
        f"FROM {sql.table_all}\n"
        + (f"WHERE {' AND '.join(where)}\n" if where else "")
        + tail
        + f"ORDER BY {', '.join(order)}"
        + (f"\nLIMIT {int(limit)}" if limit is not None else "")
    )
    return text, names


def _column(group: str) -> str:
    return "subject" if group == "subject" else f"`group_{group}`"


async def query(
    ch: ClickHouse,
    meter: Meter,
    *,
    events_table: str = "events",
    namespace: str | None = None,
    subjects: Sequence[str] = (),
    start: datetime | None = None,
    end: datetime | None = None,
    window: Window | None = "HOUR",
    tz: str = "UTC",
    group_by: Sequence[str] = (),
    filters: Mapping[str, str] | None = None,
    limit: int | None = None,
    merge_namespaces: bool = False,
    features: ServerFeatures | None = None,
    cluster: str | None = None,
) -> list[UsageRow]:
    """One row per window (and group), oldest first; with `window=None` one row per group
    for the whole period. `limit` caps the rows read; `merge_namespaces` aggregates every
    namespace selected into one (`namespace` of the rows: `ALL_NAMESPACES`). `features`
    saves asking the server for its version."""
    try:
        zone = ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise UsageError(f"unknown time zone {tz!r}") from None
    for moment in (start, end):
        if moment is not None and moment.tzinfo is None:
            raise UsageError("start and end need a UTC offset (RFC 3339)")
    features = features or await ch.features()
    sql, names = build_sql(
        meter,
        features,
        ch.database,
        events_table,
        namespace=namespace,
        subjects=subjects,
        start=start,
        end=end,
        window=window,
        tz=tz,
        group_by=group_by,
        filters=filters,
        limit=limit,
        merge_namespaces=merge_namespaces,
        cluster=cluster,
    )
    rows = []
    step = _FIXED_STEP.get(window or "")  # windows whose length no zone changes
    for record in await ch.query(sql):
        if window is None:
            first, last, *rest = record
            began = _period_bound(start, first, zone)
            ended = _period_bound(end, last, zone, after=True)
        else:
            w, *rest = record
            began = datetime.fromtimestamp(int(w), zone)
            ended = (
                datetime.fromtimestamp(int(w) + step, zone) if step else _window_end(began, window)
            )
        ns = ALL_NAMESPACES if merge_namespaces else str(rest.pop(0))
        *group_values, value = rest
        values = dict(zip(names, (str(v) for v in group_values), strict=True))
        subject = values.pop("subject", None)
        rows.append(UsageRow(began, ended, ns, _number(value), subject, values))
    return rows


def _period_bound(
    given: datetime | None, minute: Any, zone: ZoneInfo, after: bool = False
) -> datetime:
    """A bound of a whole-period row: the bound asked for (to the minute), else the first
    minute with usage (or the end of the last one)."""
    seconds = _minute(given) if given is not None else int(minute) + (60 if after else 0)
    return datetime.fromtimestamp(seconds, zone)


def _number(value: Any) -> float:
    number = float(value)
    return int(number) if number.is_integer() and abs(number) < 2**53 else number


def render(rows: Sequence[UsageRow], fmt: Literal["table", "json", "csv"]) -> str:
    records = [r.as_dict() for r in rows]
    if fmt == "json":
        return orjson.dumps(records, option=orjson.OPT_INDENT_2).decode()
    columns = list(records[0]) if records else ["window_start", "window_end", "namespace", "value"]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        return out.getvalue().rstrip("\n")
    table = [columns, *([str(r.get(c, "")) for c in columns] for r in records)]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
