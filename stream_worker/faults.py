"""Fault injection for lookout's own fault tests (``tests/faults``): wrappers, never branches.

``LOOKOUT_FAULT_KILL_AT=STAGE:N`` SIGKILLs the process the N-th time it passes STAGE;
``LOOKOUT_FAULT_INFER_DELAY_MS`` slows every inference call. The stages sit in the gaps that
matter for exactly-once: after inference, after the labels are on their topics, after the
counts are in Redis (not yet on the counts topic), and just before the offset commit. With no
fault set, every wrapper hands back what it was given.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from stream_worker.backends.base import Backend, EngineInfo
from stream_worker.settings import FaultSettings

if TYPE_CHECKING:
    from stream_worker.pipeline import Batch
    from stream_worker.sinks import Sink

log = logging.getLogger("lookout.faults")


class Faults:
    """The configured faults; ``reached(stage)`` counts down and kills."""

    def __init__(self, settings: FaultSettings) -> None:
        stage, _, nth = settings.fault_kill_at.partition(":")
        self._kill_stage, self._countdown = (stage, int(nth)) if stage else ("", 0)
        self._infer_delay_s = settings.fault_infer_delay_ms / 1000

    def reached(self, stage: str) -> None:
        """Passing ``stage``: SIGKILL this process when it is the configured stage's N-th pass."""
        if stage != self._kill_stage:
            return
        self._countdown -= 1
        if self._countdown == 0:
            log.warning("fault injection: SIGKILL at %s", stage)
            os.kill(os.getpid(), signal.SIGKILL)

    def backend(self, backend: Backend) -> Backend:
        """The backend, slowed and killable at ``inference`` when a fault asks for it."""
        if not self._infer_delay_s and self._kill_stage != "inference":
            return backend
        return _FaultyBackend(backend, self)

    def sink(self, sink: Sink, stage: str) -> Sink:
        """The sink, killable at ``stage`` right after a successful write."""
        if self._kill_stage != stage:
            return sink
        return _FaultySink(sink, self, stage)


class _FaultyBackend:
    def __init__(self, inner: Backend, faults: Faults) -> None:
        self._inner = inner
        self._faults = faults
        self.info: EngineInfo = inner.info

    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        probs = self._inner.infer(batch)
        if self._faults._infer_delay_s:
            time.sleep(self._faults._infer_delay_s)
        self._faults.reached("inference")
        return probs

    def close(self) -> None:
        self._inner.close()


class _FaultySink:
    def __init__(self, inner: Sink, faults: Faults, stage: str) -> None:
        self._inner = inner
        self._faults = faults
        self._stage = stage
        self.name = inner.name

    async def write(self, batch: Batch) -> None:
        await self._inner.write(batch)
        self._faults.reached(self._stage)
