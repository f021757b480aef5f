"""Which parts count as landed (`sink.stores.clickhouse.quorum.lasting_parts`), given what
ZooKeeper says through `system.zookeeper` and `system.replicas`. The answers below are the
shapes ClickHouse 18.16 gives (`quorum/status` text as it stores it); `quorum/parallel` is
where newer servers keep each pending part of a parallel quorum."""

from __future__ import annotations

import re
from typing import Any

import pytest

from sink.stores.clickhouse.quorum import Undecided, lasting_parts

ZK = "/clickhouse/tables/db/1/events"
REPLICA = f"{ZK}/replicas/r1"

STATUS = (
    "version: 1\npart_name: 202612_5_5_0\nrequired_number_of_replicas: 2\n"
    "actual_number_of_replicas: 1\nreplicas:\nr1\n"
)


class Keeper:
    """Answers the queries `lasting_parts` makes, from a dict of ZooKeeper children."""

    def __init__(self, nodes: dict[str, dict[str, str]], replicated: bool = True) -> None:
        self.database = "db"
        self.nodes = nodes
        self.replicated = replicated

    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        if "system.replicas" in sql:
            return [(ZK, REPLICA)] if self.replicated else []
        path = re.search(r"path = '([^']*)'", sql)
        assert path, sql
        children = self.nodes[path.group(1)]
        names = re.search(r"name IN \(([^)]*)\)", sql)
        wanted = set(re.findall(r"'([^']*)'", names.group(1))) if names else None
        return [
            (n, v) if wanted is None else (n,)
            for n, v in children.items()
            if wanted is None or n in wanted
        ]


def keeper(
    parts: list[str],
    status: str | None = None,
    failed: list[str] | None = None,
    parallel: list[str] | None = None,
) -> Keeper:
    quorum = {"last_part": "version: 2\nparts count: 0\n", "failed_parts": ""}
    if status:
        quorum["status"] = status
    nodes = {
        f"{ZK}/quorum": quorum,
        f"{ZK}/quorum/failed_parts": dict.fromkeys(failed or [], ""),
        f"{REPLICA}/parts": dict.fromkeys(parts, ""),
    }
    if parallel is not None:
        quorum["parallel"] = ""
        nodes[f"{ZK}/quorum/parallel"] = dict.fromkeys(parallel, "")
    return Keeper(nodes)


async def test_committed_parts_without_a_quorum_in_doubt_count() -> None:
    db = keeper(["202612_1_1_0", "202612_2_2_0", "202612_3_3_0"])
    assert await lasting_parts(db, "events", {"202612_1_1_0", "202612_3_3_0"}) == {
        "202612_1_1_0",
        "202612_3_3_0",
    }


async def test_a_pending_quorum_part_is_undecided() -> None:
    db = keeper(["202612_1_1_0", "202612_5_5_0"], status=STATUS)
    with pytest.raises(Undecided, match="202612_5_5_0"):
        await lasting_parts(db, "events", {"202612_1_1_0", "202612_5_5_0"})
    # Another part's quorum in doubt does not hold up these parts.
    assert await lasting_parts(db, "events", {"202612_1_1_0"}) == {"202612_1_1_0"}


async def test_a_pending_part_of_a_parallel_quorum_is_undecided() -> None:
    db = keeper(["202612_1_1_0", "202612_6_6_0"], parallel=["202612_6_6_0"])
    with pytest.raises(Undecided, match="202612_6_6_0"):
        await lasting_parts(db, "events", {"202612_6_6_0"})


async def test_rows_of_a_failed_quorum_part_do_not_count() -> None:
    # The failed part is still listed (its replica has not dropped it yet): it does not count.
    db = keeper(["202612_1_1_0", "202612_5_5_0"], failed=["202612_5_5_0"])
    assert await lasting_parts(db, "events", {"202612_1_1_0", "202612_5_5_0"}) == {"202612_1_1_0"}
    assert await lasting_parts(db, "events", {"202612_5_5_0"}) == set()


async def test_a_part_zookeeper_does_not_list_is_undecided() -> None:
    # An interrupted commit, or a part merged away between the two reads: ask again.
    db = keeper(["202612_1_1_0"])
    with pytest.raises(Undecided, match="202612_7_7_0"):
        await lasting_parts(db, "events", {"202612_1_1_0", "202612_7_7_0"})


async def test_a_table_that_is_not_replicated_keeps_every_part() -> None:
    db = Keeper({}, replicated=False)
    assert await lasting_parts(db, "events", {"all_1_1_0"}) == {"all_1_1_0"}
    assert await lasting_parts(db, "events", set()) == set()
