"""A separate producer process: pre-encoded frames to a topic, at a fixed rate or flat out.

    python -m bench.producer --frames FILE.pkl --topic T --bootstrap B --rate 20 --seconds 30 --sources 4
    (--rate 0: as fast as possible, --count N frames)

captured-at is stamped at send time, so labels' processed_at - captured_at is the end-to-end
latency through the broker and the worker. Prints one JSON line with what it sent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pickle
import time
from pathlib import Path

from aiokafka import AIOKafkaProducer

from stream_worker import codec


async def produce(args: argparse.Namespace) -> dict[str, float]:
    """Send frames; returns counts and the achieved rate."""
    frames: list[bytes] = pickle.loads(Path(args.frames).read_bytes())
    producer = AIOKafkaProducer(
        bootstrap_servers=args.bootstrap, linger_ms=5, max_request_size=30_000_000, acks=1
    )
    await producer.start()
    sent = 0
    started = time.monotonic()
    pending = []
    try:
        while True:
            if args.rate > 0:
                if time.monotonic() - started >= args.seconds:
                    break
                delay = started + sent / args.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif sent >= args.count:
                break
            source = f"{args.prefix}-{sent % args.sources}"
            now_ms = int(time.time() * 1000)
            headers = codec.frame_headers(source, "traffic", f"{args.prefix}/{sent}", now_ms, "image/jpeg")
            pending.append(
                await producer.send(
                    args.topic, frames[sent % len(frames)], key=source.encode(), headers=headers
                )
            )
            sent += 1
            if len(pending) >= 256:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    elapsed = time.monotonic() - started
    return {"sent": sent, "seconds": elapsed, "rate": sent / elapsed if elapsed else 0.0}


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--sources", type=int, default=4)
    parser.add_argument("--prefix", default="bench-cam")
    print(json.dumps(asyncio.run(produce(parser.parse_args()))), flush=True)


if __name__ == "__main__":
    main()
