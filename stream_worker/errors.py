"""The one exception tree of lookout.

Every error the worker raises on purpose is a ``LookoutError``. Subclasses carry the data
an operator or the dead-letter sink needs, and a ``retriable`` flag that tells the worker
whether to back off and try the same batch again or to stop loudly.
"""

from __future__ import annotations


class LookoutError(Exception):
    """Root of lookout's errors."""

    retriable: bool = False

    def __init__(self, message: str, *, retriable: bool | None = None) -> None:
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable


class ConfigError(LookoutError):
    """A user mistake in flags, env or settings file; the message says what to do."""


class EngineError(LookoutError):
    """The engine is missing, stale, or does not match this runtime."""


class ServiceUnavailable(LookoutError):
    """Kafka or Redis could not be reached; the batch is retried with backoff."""

    retriable = True


class BadFrame(LookoutError):
    """A frame that can never be classified: it goes to the dead-letter topic.

    ``stage`` names where it failed (``guard``, ``decode``, ``headers``), ``reason`` is a
    short machine-readable code (``too_large``, ``magic_mismatch``, ...), the message is
    for humans.
    """

    def __init__(self, stage: str, reason: str, message: str) -> None:
        super().__init__(message, retriable=False)
        self.stage = stage
        self.reason = reason
