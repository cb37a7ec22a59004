"""A Kafka broker or Redis of one test's own, for faults that take the service away.

Driven through ``scripts/services`` with env overrides (its own ports and state dir), so that
killing it does not disturb the other tests on the shared services.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from tests.conftest import SERVICES, services_env


@dataclass(frozen=True, slots=True)
class PrivateServices:
    """A broker or Redis of one test's own, driven through scripts/services with env overrides."""

    env: dict[str, str]

    def run(self, *args: str, timeout_s: float = 180) -> None:
        """``scripts/services ARGS`` against this private instance."""
        result = subprocess.run(
            [str(SERVICES), *args],
            env=services_env(**self.env),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if result.returncode != 0:
            raise AssertionError(f"scripts/services {' '.join(args)} failed:\n{result.stderr}")
