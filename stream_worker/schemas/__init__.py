"""The published output contracts, as JSON Schema (draft 2020-12) files shipped in the package.

=======================  ===========================================================
name                     what it describes
=======================  ===========================================================
``label-record``         the value of a labels-topic record (JSON)
``window-counts-key``    the key of a counts-topic record (text)
``window-counts-value``  the value of a counts-topic record (JSON)
``camera-trap-event``    the value of an events-topic record (JSON; key: its event_id)
``review-headers``       the headers of a review-topic record (value: the image)
``dead-letter-headers``  the headers of a dead-letter record (value: the original's)
``frame-headers``        the headers a producer puts on a frames-topic record
=======================  ===========================================================

Headers are described as an object of header name to the value decoded as UTF-8.
``stream-worker schema NAME`` prints one; consumers generate their types from them.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from stream_worker.errors import ConfigError

SCHEMAS = (
    "label-record",
    "window-counts-key",
    "window-counts-value",
    "camera-trap-event",
    "review-headers",
    "dead-letter-headers",
    "frame-headers",
)


def schema_text(name: str) -> str:
    """The schema file's text; ``ConfigError`` naming the known schemas for any other name."""
    if name not in SCHEMAS:
        raise ConfigError(f"no schema named {name!r}: one of {', '.join(SCHEMAS)}")
    return resources.files(__name__).joinpath(f"{name}.schema.json").read_text()


def load_schema(name: str) -> dict[str, Any]:
    """The parsed schema."""
    schema: dict[str, Any] = json.loads(schema_text(name))
    return schema
