"""The loop a user writes first: one message at a time, full-size decode, batch-1 inference,
produce, commit. Run as its own process against the same broker and frames as lookout.

    python -m bench.naive --topic T --bootstrap B --count N --engine PATH
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path

import cv2
import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from stream_worker.backends.registry import open_backend
from stream_worker.preprocess import preprocess_into


async def run(args: argparse.Namespace) -> dict[str, float]:
    """Consume ``count`` frames the naive way; returns the throughput."""
    backend = open_backend(Path(args.engine))
    spec = backend.info.spec
    consumer = AIOKafkaConsumer(
        args.topic,
        bootstrap_servers=args.bootstrap,
        group_id=f"naive-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=30_000_000,
    )
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap, acks="all")
    await consumer.start()
    await producer.start()
    done = 0
    first = 0.0
    try:
        async for record in consumer:
            if not done:
                first = time.monotonic()
            image = np.asarray(
                cv2.imdecode(np.frombuffer(record.value, np.uint8), cv2.IMREAD_COLOR), np.uint8
            )
            batch = np.empty((1, 3, spec.height, spec.width), np.float32)
            preprocess_into(image, batch[0], spec)
            probs = backend.infer(batch)[0]
            label = {"offset": record.offset, "class": int(probs.argmax()), "score": float(probs.max())}
            await producer.send_and_wait(args.out_topic, json.dumps(label).encode(), key=record.key)
            await consumer.commit()
            done += 1
            if done >= args.count:
                break
    finally:
        await consumer.stop()
        await producer.stop()
        backend.close()
    elapsed = time.monotonic() - first
    return {"frames": done, "seconds": elapsed, "fps": done / elapsed if elapsed else 0.0}


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--topic", required=True)
    parser.add_argument("--out-topic", required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--engine", required=True)
    print(json.dumps(asyncio.run(run(parser.parse_args()))), flush=True)


if __name__ == "__main__":
    main()
