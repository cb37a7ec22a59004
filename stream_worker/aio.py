"""Small asyncio helpers shared by the service and the sinks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any


async def unless_set(event: asyncio.Event, step: Awaitable[Any]) -> bool:
    """Run ``step`` unless ``event`` is set first; then cancel it. Whether ``step`` finished.

    A step that finished re-raises its own exception here; a cancelled one's outcome is dropped
    (whoever set the event has given up on it). Cancelling the caller cancels the step as well,
    and drops its outcome: a step left running would end unwatched (a failure that nobody reads
    is logged with its traceback when it is collected).
    """
    task = asyncio.ensure_future(step)
    waiting = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise
    finally:
        waiting.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return False
    task.result()
    return True
