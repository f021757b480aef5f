"""A meter query's parameters, with OpenMeter's semantics, checked before anything is read.

Where OpenMeter and `sink usage` differ, the API follows OpenMeter:

- `from` and `to` must be aligned to the window (`windowSize` in `windowTimeZone`; whole
  minutes without a window) and `from < to`; `sink usage` rounds down to the minute instead.
- `subject` filters *and* groups by subject.
- Without `windowSize` there is one row per subject and group for the whole period, whose
  window is the period asked for.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sink.api.auth import Grant
from sink.api.problems import Problem, bad_parameter
from sink.metering.meters import Meter
from sink.metering.usage import Window

FILTER_PREFIX = "filterGroupBy["
UNSUPPORTED = {
    "filterGroupBy": "give each filter as filterGroupBy[NAME]=VALUE (deepObject)",
    "filterCustomerId": "customers are not modelled; filter by subject",
    "advancedMeterGroupByFilters": "only equality filters (filterGroupBy[NAME]=VALUE)",
}


@dataclass(frozen=True)
class UsageQuery:
    """What one query reads, checked: every name exists, the range is aligned and bounded."""

    namespace: str | None
    """None: every namespace, merged (operator tokens only)."""
    window: Window | None
    tz: str
    start: datetime | None = None
    end: datetime | None = None
    subjects: tuple[str, ...] = ()
    group_by: tuple[str, ...] = ()
    """`subject` and the meter's group names, in the order asked; `subject` when filtered."""
    filters: dict[str, str] = field(default_factory=dict)
    limit: int = 100_000
    """Rows the answer may have; a query that has more is refused."""

    @property
    def groups(self) -> list[str]:
        """The meter's groups of the answer (`groupBy` of each row), without `subject`."""
        return [g for g in self.group_by if g != "subject"]


def scope(grant: Grant, asked: str | None) -> str | None:
    """The namespace a request reads. A namespace token reads its own namespace only; any
    other is refused the same way whether it exists or not."""
    if grant.namespace is None:
        return asked
    if asked is not None and asked != grant.namespace:
        raise Problem(403, "this token may not read that namespace", "namespace")
    return grant.namespace


def parse(
    meter: Meter,
    namespace: str | None,
    *,
    start: str | None,
    end: str | None,
    window: Window | None,
    tz: str,
    subjects: Sequence[str],
    group_by: Sequence[str],
    raw: Iterable[tuple[str, str]],
    max_rows: int,
) -> UsageQuery:
    """Check a query's parameters (`raw`: the query string's pairs, for the deepObject
    `filterGroupBy[NAME]` and the parameters sink does not support)."""
    filters = _filters(meter, raw)
    zone = _zone(tz)
    began = _moment("from", start)
    ended = _moment("to", end)
    if began is not None and ended is not None and began >= ended:
        raise bad_parameter("to", "must be later than from")
    for name, moment in (("from", began), ("to", ended)):
        if moment is not None and not aligned(moment, window, zone):
            raise bad_parameter(
                name, f"must start a window: whole {_unit(window)} in {tz} (OpenMeter's rule)"
            )
    groups = _group_by(meter, group_by)
    if subjects and "subject" not in groups:
        groups.append("subject")  # OpenMeter: a subject filter groups by subject too
    if (
        began is not None
        and ended is not None
        and window is not None
        and windows_between(began, ended, window, zone) > max_rows
    ):
        raise bad_parameter(
            "windowSize", f"more than {max_rows} windows between from and to; use a larger one"
        )
    return UsageQuery(
        namespace=namespace,
        window=window,
        tz=tz,
        start=began,
        end=ended,
        subjects=tuple(dict.fromkeys(subjects)),
        group_by=tuple(groups),
        filters=filters,
        limit=max_rows,
    )


def _filters(meter: Meter, raw: Iterable[tuple[str, str]]) -> dict[str, str]:
    filters: dict[str, str] = {}
    for key, value in raw:
        if key in UNSUPPORTED:
            raise bad_parameter(key, f"not supported: {UNSUPPORTED[key]}")
        if not key.startswith(FILTER_PREFIX):
            continue
        name = key[len(FILTER_PREFIX) : -1] if key.endswith("]") else ""
        if name not in meter.group_by:
            raise bad_parameter(
                "filterGroupBy", f"meter {meter.slug} has no group {name!r}{_groups_of(meter)}"
            )
        if name in filters:
            raise bad_parameter("filterGroupBy", f"give filterGroupBy[{name}] once")
        filters[name] = value
    return filters


def _group_by(meter: Meter, group_by: Sequence[str]) -> list[str]:
    for group in group_by:
        if group != "subject" and group not in meter.group_by:
            raise bad_parameter(
                "groupBy",
                f"meter {meter.slug} has no group {group!r}; subject{_groups_of(meter, ', ')}",
            )
    return list(dict.fromkeys(group_by))


def _groups_of(meter: Meter, lead: str = "; its groups: ") -> str:
    if not meter.group_by:
        return "" if lead.startswith(",") else "; it has none"
    return lead + ", ".join(meter.group_by)


def _zone(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise bad_parameter(
            "windowTimeZone", "not an IANA time zone name (such as UTC or Europe/Paris)"
        ) from None


def _moment(name: str, text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        raise bad_parameter(name, "not an RFC 3339 date-time") from None
    if moment.tzinfo is None:
        raise bad_parameter(name, "needs a UTC offset (RFC 3339), such as Z or +02:00")
    return moment.astimezone(UTC)


def _unit(window: Window | None) -> str:
    return {None: "minutes", "MINUTE": "minutes", "HOUR": "hours", "DAY": "days"}.get(
        window, "months"
    )


def aligned(moment: datetime, window: Window | None, zone: ZoneInfo) -> bool:
    """Whether `moment` starts a window (a minute without one) in `zone`."""
    local = moment.astimezone(zone)
    if local.second or local.microsecond:
        return False
    if window in (None, "MINUTE"):
        return True
    if local.minute:
        return False
    return window == "HOUR" or (local.hour == 0 and (window == "DAY" or local.day == 1))


def windows_between(start: datetime, end: datetime, window: Window, zone: ZoneInfo) -> int:
    """How many windows an aligned range holds."""
    a, b = start.astimezone(zone), end.astimezone(zone)
    if window == "MONTH":
        return (b.year - a.year) * 12 + b.month - a.month
    if window == "DAY":
        return (b.date() - a.date()).days
    step = 60 if window == "MINUTE" else 3600
    return -(-((end - start) // timedelta(seconds=1)) // step)
