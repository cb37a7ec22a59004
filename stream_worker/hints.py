"""What a one-line error tells the user to do, worded for where lookout runs.

In a source checkout, ``scripts/services up`` starts the Kafka broker and Redis server the
tests and the demo use; in a container, a wheel or on Kubernetes there is no such script, and
pointing at it would send the operator looking for a file that is not there. There, a hint
names the setting to change and says to check that the service is up and reachable.
"""

from __future__ import annotations

from pathlib import Path

SERVICES_SCRIPT = Path("scripts") / "services"


def source_checkout() -> Path | None:
    """The repository root when lookout runs from a source checkout, else None.

    A checkout has ``scripts/services`` beside the package; an installed wheel (the container
    images install one) has only the package.
    """
    root = Path(__file__).resolve().parent.parent
    return root if (root / SERVICES_SCRIPT).is_file() else None


def start_hint(service: str, setting: str) -> str:
    """How to get past an unreachable ``service`` (``Kafka``, ``Redis``) whose address is ``setting``."""
    if source_checkout() is not None:
        return f"start it (scripts/services up) or fix {setting}"
    return f"check that {service} is up and reachable from here, or fix {setting}"
