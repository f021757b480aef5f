"""The groups layout's encodings: how claims are framed, where an identity lives, and which
fields the sweep drops."""

from __future__ import annotations

import hiredis
from pydantic import SecretStr

from sink.config import DedupConfig
from sink.stores.dedup_groups import GroupedDedup, command, expired, hsetnx_commands
from sink.stores.keys import (
    compact_coordinates,
    group_key,
    group_number,
    group_value,
    identity_key,
)

PREFIX = b"p:"


def _store(groups: int) -> GroupedDedup:
    config = DedupConfig(
        redis_url=SecretStr("redis://localhost:1/0"), key_prefix="p:", groups=groups
    )
    return GroupedDedup(config, links=None, close=None)  # type: ignore[arg-type]


def test_an_identity_lives_in_the_group_and_field_its_digest_names() -> None:
    store = _store(1000)
    keys = [identity_key(PREFIX, "ns", "src", str(i)) for i in range(500)]
    groups, fields = store.address(keys)
    assert groups == [group_key(PREFIX, group_number(k, 1000)) for k in keys]
    assert fields == [k[-8:] for k in keys]
    assert len(set(groups)) > 300  # spread over the groups
    assert len({len(g) for g in groups}) == 1


def test_claims_are_framed_as_one_hsetnx_each() -> None:
    groups = [group_key(PREFIX, n) for n in (0, 7, 2**32 - 1)]
    fields = [b"\x00" * 8, b"\r\n$-1\r\n!", b"abcdefgh"]
    values = [group_value(1_700_000_000 + i, compact_coordinates("t", i, i)) for i in range(3)]
    framed = hsetnx_commands(groups, fields, values)
    assert framed == [
        command(b"HSETNX", g, f, v) for g, f, v in zip(groups, fields, values, strict=True)
    ]
    reader = hiredis.Reader()
    reader.feed(b"".join(framed))
    assert reader.gets() == [b"HSETNX", groups[0], fields[0], values[0]]
    # Values of several widths are framed one by one, alike.
    mixed = [values[0], b"short", values[2]]
    assert hsetnx_commands(groups, fields, mixed) == [
        command(b"HSETNX", g, f, v) for g, f, v in zip(groups, fields, mixed, strict=True)
    ]
    assert hsetnx_commands([], [], []) == []


def test_the_sweep_drops_fields_claimed_before_the_limit_and_reads_the_version() -> None:
    old, new = group_value(100, b"c" * 16), group_value(200, b"d" * 16)
    fields = [b"a" * 8, old, b"b" * 8, new, b"~v", b"3", b"c" * 8, group_value(199, b"e" * 16)]
    assert expired(fields, 200) == (b"3", [b"a" * 8, b"c" * 8])
    assert expired(fields, 100) == (b"3", [])
    assert expired(fields[:4], 201) == (b"", [b"a" * 8, b"b" * 8])
