"""A Faust app running lookout's agent, for tests/integration/test_faust_agent.py.

Configured entirely from the environment (the settings tree's env names plus LOOKOUT_FAUST_APP).
"""

from __future__ import annotations

import os

import faust

from stream_worker.faust_agent import frames_agent
from stream_worker.settings import load_settings

settings = load_settings()
app = faust.App(
    os.environ["LOOKOUT_FAUST_APP"],
    broker=f"kafka://{settings.kafka.bootstrap}",
    store="memory://",
    web_enabled=False,
    topic_replication_factor=1,
    topic_partitions=2,
    producer_acks=-1,
    broker_commit_every=50,
    broker_commit_interval=1.0,
)
agent = frames_agent(app, settings)
