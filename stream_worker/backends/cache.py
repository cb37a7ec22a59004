"""The one default of where lookout keeps what it builds or fetches: ``~/.cache/lookout``.

Default engines live under ``engines/`` in it, the benchmark's engines and frames under
``bench/``, and ``scripts/services`` keeps Kafka's jars there. ``LOOKOUT_CACHE_DIR`` (read by
the settings, like every environment variable) overrides it. Kept free of heavy imports, so
the settings can take their default from here.
"""

from __future__ import annotations

from pathlib import Path


def default_cache_dir() -> Path:
    """Where engines and other build products are cached when nothing names a directory."""
    return Path.home() / ".cache" / "lookout"
