"""ClickHouse SQL text and server features: what a statement may use on the connected server.

No driver here: configuration and meter definitions use it without a database connection.
The schema works on ClickHouse 18.16 and on current servers; newer features are used only
where the server version has them (`ServerFeatures`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerFeatures:
    """What the connected server supports, derived from its version."""

    version: tuple[int, ...]

    @property
    def datetime64(self) -> bool:
        return self.version >= (20, 1)

    @property
    def low_cardinality(self) -> bool:
        return self.version >= (20, 1)

    @property
    def json_extract(self) -> bool:
        return self.version >= (20, 1)


def parse_version(text: str) -> tuple[int, ...]:
    parts = re.findall(r"\d+", text)[:3]
    return tuple(int(p) for p in parts) or (0,)


def quote(value: str) -> str:
    """A ClickHouse string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
