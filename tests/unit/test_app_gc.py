"""The worker runs the cyclic garbage collector on a clock, not on allocation counts."""

from __future__ import annotations

import asyncio
import gc
import weakref

from sink.app import _collect_garbage


class _Node:
    other: _Node


async def test_cycles_are_freed_on_the_collectors_clock() -> None:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        a, b = _Node(), _Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        await asyncio.sleep(0.05)
        assert gone() is not None  # a cycle: reference counting alone never frees it
        collector = asyncio.create_task(_collect_garbage(0.05))
        try:
            for _ in range(50):
                await asyncio.sleep(0.02)
                if gone() is None:
                    break
            assert gone() is None
        finally:
            collector.cancel()
    finally:
        if was_enabled:
            gc.enable()
