"""Meters: declared aggregations of usage events into one-minute windows.

Each meter is a materialized view from the raw `events` table into its own
AggregatingMergeTree table holding aggregate-function states per
(namespace, subject, minute, group-by values). This module defines meters and validates
events against them in the worker; `sink.metering.meter_sql` builds their SQL.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Aggregation = Literal["SUM", "COUNT", "MIN", "MAX", "UNIQUE_COUNT", "LATEST", "AVG"]
NUMERIC = frozenset({"SUM", "MIN", "MAX", "LATEST", "AVG"})
RESERVED = frozenset({"namespace", "subject", "window_start", "window_end", "value"})
_SLUG = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class Meter(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    slug: str
    event_type: str = Field(min_length=1)
    aggregation: Aggregation
    value_property: str | None = None
    group_by: dict[str, str] = Field(default_factory=dict)
    description: str = ""

    @field_validator("aggregation", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("slug")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _SLUG.match(value):
            raise ValueError("a slug: lower-case letters, digits and _, starting with a letter")
        return value

    @field_validator("group_by")
    @classmethod
    def _groups(cls, value: dict[str, str]) -> dict[str, str]:
        for name, path in value.items():
            if not _NAME.match(name) or name in RESERVED:
                raise ValueError(
                    f"group name {name!r} must be an identifier and not one of {sorted(RESERVED)}"
                )
            if not path or any(not part for part in path.split(".")):
                raise ValueError(f"group {name!r} needs a property path such as 'model'")
        return value

    @model_validator(mode="after")
    def _value_property(self) -> Meter:
        if self.aggregation == "COUNT":
            if self.value_property:
                raise ValueError("COUNT takes no value_property")
        elif not self.value_property or any(not p for p in self.value_property.split(".")):
            raise ValueError(f"{self.aggregation} needs a value_property (a property of data)")
        return self

    @property
    def table(self) -> str:
        return f"meter_{self.slug}"

    @property
    def view(self) -> str:
        return f"meter_{self.slug}_mv"

    def checksum(self) -> str:
        """Identity of the definition: a changed meter is a different meter."""
        body = self.model_dump(exclude={"description"})
        return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def path(text: str) -> tuple[str, ...]:
    return tuple(text.split("."))


def lookup(data: Mapping[str, Any], where: Sequence[str]) -> Any:
    node: Any = data
    for part in where:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def group_value(value: Any) -> str:
    """How a group-by property becomes a group key: strings as they are, other JSON values as
    their JSON text, a missing property as ''. The SQL below computes the same."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


class _Read(NamedTuple):
    """What the check reads of an event for one meter, and its answers made in advance."""

    key: str | None
    """The property's name when it is top-level (read with one `dict.get`), else None."""
    where: tuple[str, ...]
    numeric: bool
    missing: str
    not_number: str
    not_scalar: str


class MeterIndex:
    """The meters of each event type that read a property, for the worker's per-event check
    (a meter without `value_property`, COUNT, reads nothing and can always count)."""

    def __init__(self, meters: Sequence[Meter]) -> None:
        self.by_type: dict[str, list[_Read]] = {}
        for meter in meters:
            if not meter.value_property:
                continue
            where = path(meter.value_property)
            named = f"[{meter.slug}] '{meter.value_property}'"
            self.by_type.setdefault(meter.event_type, []).append(
                _Read(
                    where[0] if len(where) == 1 else None,
                    where,
                    meter.aggregation in NUMERIC,
                    f"{named} is missing",
                    f"{named} is not a number",
                    f"{named} is not a scalar",
                )
            )

    def __bool__(self) -> bool:
        return bool(self.by_type)

    def check(self, event_type: str, data: Mapping[str, Any]) -> str:
        """'' if every meter of this type can read the event, else `[slug] why; ...`."""
        reads = self.by_type.get(event_type)
        if not reads:
            return ""
        problems = None
        for key, where, numeric, missing, not_number, not_scalar in reads:
            value: Any = data.get(key) if key is not None else lookup(data, where)
            kind = type(value)
            if kind is int or (kind is float and math.isfinite(value)):
                continue  # a number suits every meter
            if value is None:
                problem = missing
            elif numeric:
                problem = not_number
            elif kind is dict or kind is list:
                problem = not_scalar
            else:
                continue
            if problems is None:
                problems = [problem]
            else:
                problems.append(problem)
        return "; ".join(problems) if problems else ""
