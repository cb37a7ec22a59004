"""The worker's thread pools, named where the operating system shows them.

Python names its threads for Python only: ``top -H``, ``ps -L``, ``py-spy`` without symbols and
``/proc/<pid>/task/<tid>/comm`` all show every thread as ``python``. Each pool's threads here
also carry their name in the kernel (``lk-decode``, ``lk-infer-0``...; 15 bytes at most), so an
operator can see which stage takes the cores, and the benchmark can split the worker's CPU by
stage while it runs (``bench.host.thread_cpu``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from concurrent.futures import ThreadPoolExecutor

_PR_SET_NAME = 15
_libc: ctypes.CDLL | None = None


def name_this_thread(name: str) -> None:
    """Set the calling thread's kernel name (Linux; elsewhere nothing happens)."""
    global _libc
    if not sys.platform.startswith("linux"):
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):  # no libc or no prctl: names are a convenience
        return


def named_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose threads are named ``name`` for Python and for the kernel."""
    return ThreadPoolExecutor(
        workers, thread_name_prefix=name, initializer=name_this_thread, initargs=(name,)
    )


__all__ = ["name_this_thread", "named_pool"]
