"""The worker process hides its start-up objects from the garbage collector once it has started."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

from stream_worker.service import freeze_when_started


class Node:
    other: Any = None


async def test_objects_built_at_start_up_leave_the_collectors_walk_once_the_worker_has_started() -> None:
    was_enabled = gc.isenabled()
    gc.disable()  # no automatic collection: only the one before the freeze may free the cycle
    built_at_start_up = {"engine": ["session"]}  # a container: the collector tracks it
    cycle = Node()
    cycle.other = cycle  # start-up garbage only a collection frees
    garbage = weakref.ref(cycle)
    del cycle
    started = asyncio.Event()
    freezing = asyncio.create_task(freeze_when_started(started))
    try:
        assert any(o is built_at_start_up for o in gc.get_objects())
        started.set()
        await asyncio.wait_for(freezing, timeout=10)
        # A full collection no longer walks it (gc.get_objects lists every generation it walks).
        assert not any(o is built_at_start_up for o in gc.get_objects())
        assert gc.get_freeze_count() > 0
        assert garbage() is None, "start-up's garbage was frozen, not freed"
    finally:
        freezing.cancel()
        gc.unfreeze()
        if was_enabled:
            gc.enable()
