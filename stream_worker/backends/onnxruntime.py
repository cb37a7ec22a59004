"""ONNX Runtime on the CPU: one session per backend, created once, reused for every batch."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from stream_worker.backends.base import EngineInfo, check_batch
from stream_worker.errors import EngineError


def session_options(threads: int | None, *, spin: bool = False) -> ort.SessionOptions:
    """Session options shared by serving, calibration checks and the benchmark.

    Graph optimisation runs at ``ORT_ENABLE_ALL`` at load time even for engines saved
    already optimised: the saved graph holds only the portable levels, and the layout
    (NCHWc) transforms that need this very CPU are applied here.
    ``spin=False`` stops idle intra-op threads from busy-waiting, which would otherwise
    steal the cores the decode pool needs between batches.
    ``WeightBiasQuantization`` is switched off: it rounds the float weights of any Conv that
    sits between a DequantizeLinear and a QuantizeLinear to *per-tensor* int8, which silently
    undoes an int8 engine's choice to keep a convolution in fp32 (for a depthwise convolution
    that cost half the top-1 agreement with fp32, ``bench/int8_variants.py``). Engines that
    quantise every convolution, and fp32 engines, have no such node and are unaffected.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    options.intra_op_num_threads = threads or 0
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.add_session_config_entry("optimization.disable_specified_optimizers", "WeightBiasQuantization")
    options.log_severity_level = 3
    return options


class OnnxRuntimeBackend:
    """Runs an ONNX Runtime engine (fp32 or QDQ int8) on the CPU execution provider.

    Owned by one thread; not thread-safe by contract (see ``Backend``).
    """

    def __init__(self, info: EngineInfo, *, threads: int | None = None, spin: bool = False) -> None:
        """Load ``info.path`` into a session; ``threads`` = intra-op threads (None: all cores)."""
        self.info = info
        try:
            self._session: ort.InferenceSession | None = ort.InferenceSession(
                str(info.path), session_options(threads, spin=spin), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own untyped Fail/InvalidGraph exceptions
            raise EngineError(f"ONNX Runtime could not load {info.path}: {exc}") from exc
        self._feed_name = info.input_name
        self._fetch = [info.output_name]

    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Probabilities for a batch of 1..max_batch preprocessed images."""
        if self._session is None:
            raise EngineError("backend is closed")
        check_batch(batch, self.info)
        # A plain run() with the caller's contiguous array is zero-copy on input, and it hands
        # back a fresh output array (4 KB per image) that the caller may keep. On the CPU
        # provider IOBinding could only save that small output allocation.
        outputs = self._session.run(self._fetch, {self._feed_name: np.ascontiguousarray(batch)})
        probs: npt.NDArray[np.float32] = outputs[0]
        return probs

    def close(self) -> None:
        """Drop the session; ONNX Runtime frees its memory with it."""
        self._session = None
