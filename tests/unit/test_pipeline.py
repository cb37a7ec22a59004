"""The pipeline without Kafka or Redis: records in, labelled frames, dead letters and counted frames out.

The engine is a stand-in that answers with a fixed ImageNet class per batch row, so the test
sees what the pipeline does around it: header guards, decoding into slots, the taxonomy bound
to the engine's class names, counted frames per partition, drift per source. Sinks are
list-backed fakes, and delivery is checked to retry only the sink that failed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from stream_worker.backends.base import EngineInfo
from stream_worker.codec import frame_headers
from stream_worker.errors import ConfigError, EngineError, LookoutError, ServiceUnavailable
from stream_worker.faust_agent import EventRecord
from stream_worker.frames import SourceKind
from stream_worker.observability import Metrics
from stream_worker.pipeline import Batch, Pipeline, cgroup_cpu_quota_cores, inference_layout
from stream_worker.preprocess import PreprocessSpec
from stream_worker.settings import LabelSettings, Settings, load_settings
from stream_worker.sinks import Retrier, deliver
from stream_worker.taxonomy import load_class_names
from tests.unit import images

CLASSES = load_class_names()
SPORTS_CAR, TABBY = CLASSES.index("sports car"), CLASSES.index("tabby")
T0 = 1_700_000_000_000


def frame_record(
    offset: int, source: str, *, partition: int = 0, kind: SourceKind = SourceKind.TRAFFIC
) -> EventRecord:
    headers = frame_headers(source, kind, f"{source}/{offset}", T0 + offset, "image/jpeg")
    return EventRecord("frames", partition, offset, T0, source.encode(), JPEG, headers)


JPEG = images.jpeg(images.bikes_frame())


class StandInEngine:
    """Answers every row with the class of its position in ``answers`` (cycled)."""

    def __init__(
        self, answers: list[int], class_names: tuple[str, ...] = CLASSES, max_batch: int = 8
    ) -> None:
        self.answers = answers
        self.calls: list[int] = []
        self.info = EngineInfo(
            path=Path("stand-in.onnx"),
            backend="onnxruntime",
            precision="fp32",
            model_name="stand-in",
            model_version="1",
            max_batch=max_batch,
            opt_batch=max_batch,
            input_name="input",
            output_name="probs",
            spec=PreprocessSpec(height=32, width=32),
            class_names=class_names,
            onnx_sha256="0" * 64,
            taxonomy_version="1.0.0",
        )

    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        self.calls.append(len(batch))
        probs = np.zeros((len(batch), len(self.info.class_names)), np.float32)
        for row in range(len(batch)):
            probs[row, self.answers[row % len(self.answers)]] = 1.0
        return probs

    def close(self) -> None:
        pass


async def opened(engine: StandInEngine) -> Pipeline:
    pipeline = Pipeline(Settings(), lambda: engine, metrics=Metrics())
    await pipeline.open()
    engine.calls.clear()  # the warm-up batches (test_every_session_runs_a_full_batch_before_the_first_frame)
    return pipeline


async def test_every_session_runs_a_full_batch_before_the_first_frame() -> None:
    # The engine's working memory is allocated at start-up, not during the first busy minute.
    engines: list[StandInEngine] = []

    def factory() -> StandInEngine:
        engines.append(StandInEngine([TABBY], max_batch=4))
        return engines[-1]

    settings = load_settings(flags={"inference_sessions": "2"}, env={})
    pipeline = Pipeline(settings, factory, metrics=Metrics())
    await pipeline.open()
    await pipeline.close()
    assert [e.calls for e in engines] == [[4, 4], [4, 4]]


async def test_records_become_labelled_frames_counted_per_partition() -> None:
    engine = StandInEngine([SPORTS_CAR, TABBY])
    pipeline = await opened(engine)
    batch = Batch(opened_at=0.0)
    records = [frame_record(0, "cam-1"), frame_record(7, "trap-1", partition=1, kind=SourceKind.WILDLIFE)]
    for record in records:
        pipeline.add(batch, record)
    await pipeline.classify(batch)
    await pipeline.close()

    assert engine.calls == [2]
    assert [p.result.labels[0].label for p in batch.predictions] == ["car", "cat"]
    assert batch.offsets == {("frames", 0): 0, ("frames", 1): 7}
    car, cat = batch.counted[("frames", 0)][0], batch.counted[("frames", 1)][0]
    assert (car.offset, car.source_id, car.labels, car.event_labels) == (0, "cam-1", ("car", "vehicle"), None)
    assert cat.event_labels == ("cat",)  # a wildlife source's species open camera-trap events
    assert set(batch.drift) == {"cam-1", "trap-1"}
    assert batch.buffer is None and pipeline.can_take(None)  # the buffer went back to the pool


async def test_bad_headers_and_undecodable_images_become_dead_letters_and_the_rest_is_labelled() -> None:
    engine = StandInEngine([SPORTS_CAR])
    pipeline = await opened(engine)
    batch = Batch(opened_at=0.0)
    no_headers = EventRecord("frames", 0, 1, T0, b"raw-key", JPEG, [])
    # Cut short, and keyed by something other than its source id.
    truncated = dataclasses.replace(frame_record(2, "cam-1"), value=JPEG[: len(JPEG) // 3], key=b"gate-7")
    for record in (frame_record(0, "cam-1"), no_headers, truncated, frame_record(3, "cam-1")):
        pipeline.add(batch, record)
    await pipeline.classify(batch)
    await pipeline.close()

    assert [(d.offset, d.error.stage) for d in batch.dead] == [(1, "headers"), (2, "decode")]
    assert batch.dead[0].key == b"raw-key" and batch.dead[0].value == JPEG  # kept byte for byte
    assert batch.dead[1].key == b"gate-7"  # the record's own key, not its source id
    assert [p.frame.offset for p in batch.predictions] == [0, 3]
    assert engine.calls == [3]  # the slot of the undecodable frame is dropped after inference
    assert [f.offset for f in batch.counted[("frames", 0)]] == [0, 3]
    assert batch.records == 4 and batch.offsets == {("frames", 0): 3}


async def test_a_header_name_that_is_not_utf8_makes_a_dead_letter_of_its_record_alone() -> None:
    # As stream_worker.record_batches reads "caméra" written in Latin-1 by a C producer.
    unreadable = b"cam\xe9ra".decode("utf-8", "surrogateescape")
    engine = StandInEngine([SPORTS_CAR])
    pipeline = await opened(engine)
    batch = Batch(opened_at=0.0)
    named = frame_record(1, "cam-1")
    named = dataclasses.replace(named, headers=[*named.headers, (unreadable, b"north")], key=b"gate-7")
    for record in (frame_record(0, "cam-1"), named, frame_record(2, "cam-1")):
        pipeline.add(batch, record)
    await pipeline.classify(batch)
    await pipeline.close()

    [dead] = batch.dead
    assert (dead.offset, dead.error.stage, dead.error.reason) == (1, "headers", "header_name_not_utf8")
    assert (dead.key, dead.value, dead.headers) == (b"gate-7", JPEG, tuple(named.headers))
    assert [p.frame.offset for p in batch.predictions] == [0, 2]
    assert batch.offsets == {("frames", 0): 2}


async def test_the_taxonomy_follows_the_engines_class_order() -> None:
    # An engine whose output classes are reversed: row j is class CLASSES[-1 - j].
    reversed_names = tuple(reversed(CLASSES))
    engine = StandInEngine([reversed_names.index("tabby")], class_names=reversed_names)
    pipeline = await opened(engine)
    batch = Batch(opened_at=0.0)
    pipeline.add(batch, frame_record(0, "cam-1"))
    await pipeline.classify(batch)
    await pipeline.close()
    assert batch.predictions[0].result.labels[0].label == "cat"


async def test_a_batch_holds_at_most_the_engines_profile_and_buffers_are_bounded() -> None:
    engine = StandInEngine([SPORTS_CAR], max_batch=2)
    pipeline = await opened(engine)
    batches = []
    while pipeline.can_take(None):
        batch = Batch(opened_at=0.0)
        while pipeline.can_take(batch) and not pipeline.full(batch):
            pipeline.add(batch, frame_record(len(batches) * 2 + batch.slots, "cam-1"))
        batches.append(batch)
    # One buffer per engine session in inference, one filling, one spare; no more.
    assert pipeline.sessions == 2
    assert [b.slots for b in batches] == [2, 2, 2, 2]
    for batch in batches:
        await pipeline.classify(batch)
    assert pipeline.can_take(None)
    await pipeline.close()


class GatedEngine(StandInEngine):
    """Holds every call until released, recording which thread ran it and how many overlapped."""

    def __init__(self) -> None:
        super().__init__([SPORTS_CAR])
        self.release = threading.Event()
        self.threads: list[str] = []
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.threads.append(threading.current_thread().name)
        self.release.wait(timeout=10)
        with self._lock:
            self.running -= 1
        return super().infer(batch)


async def test_two_engine_sessions_classify_consecutive_batches_side_by_side() -> None:
    engines: list[GatedEngine] = []

    def open_session() -> GatedEngine:
        engines.append(GatedEngine())
        return engines[-1]

    pipeline = Pipeline(Settings(), open_session, metrics=Metrics())
    await pipeline.open()
    assert pipeline.sessions == 2 and len(engines) == 2  # auto: two sessions for ONNX Runtime
    batches = []
    for b in range(3):
        batch = Batch(opened_at=0.0)
        pipeline.add(batch, frame_record(b, "cam-1"))
        batches.append(batch)
    tasks = [asyncio.create_task(pipeline.classify(batch)) for batch in batches]
    # Both sessions take a batch at once; the third batch waits for the first session free.
    while sum(e.running for e in engines) < 2:
        await asyncio.sleep(0.01)
    assert not any(t.done() for t in tasks)
    for engine in engines:
        engine.release.set()
    await asyncio.gather(*tasks)
    await pipeline.close()
    assert [len(b.predictions) for b in batches] == [1, 1, 1]
    assert all(e.most_at_once == 1 for e in engines)  # a session never runs two batches at once
    threads = {name for e in engines for name in e.threads}
    assert len(threads) == 2  # each session on its own thread


async def test_one_session_when_asked_for_or_when_the_backend_cannot_have_more() -> None:
    settings = Settings(engine=dataclasses.replace(Settings().engine, inference_sessions=1))
    pipeline = Pipeline(settings, lambda: StandInEngine([SPORTS_CAR]), metrics=Metrics())
    await pipeline.open()
    assert pipeline.sessions == 1
    await pipeline.close()
    assert inference_layout(0, 0, "onnxruntime", cores=2) == (2, 1)
    assert inference_layout(0, 0, "onnxruntime", cores=1) == (1, 1)
    assert inference_layout(0, 0, "onnxruntime", cores=16) == (2, 8)
    assert inference_layout(3, 2, "onnxruntime", cores=2) == (3, 2)  # the user's layout wins
    assert inference_layout(0, 0, "tensorrt", cores=16) == (1, 0)


@dataclass
class ListSink:
    """A list-backed sink that fails its first ``failures`` writes."""

    name: str
    failures: int = 0
    written: list[int] = field(default_factory=list)
    attempts: int = 0

    async def write(self, batch: Batch) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise ServiceUnavailable(f"{self.name} is down")
        self.written.append(batch.records)


@dataclass
class StandInOutputs:
    before_commit: list[ListSink]


async def test_delivery_retries_only_the_sink_that_failed() -> None:
    labels, counts, windows = ListSink("labels"), ListSink("counts", failures=2), ListSink("windows")
    retrier = Retrier(retry_max_s=0.01, metrics=Metrics())
    batch = Batch(opened_at=0.0, records=5)
    await deliver(batch, StandInOutputs([labels, counts, windows]), retrier)  # type: ignore[arg-type]
    assert (labels.attempts, counts.attempts, windows.attempts) == (1, 3, 1)
    assert labels.written == counts.written == windows.written == [5]


async def test_a_failure_that_cannot_be_retried_stops_delivery() -> None:
    class Refused(ListSink):
        async def write(self, batch: Batch) -> None:
            raise LookoutError("refused")

    after = ListSink("windows")
    retrier = Retrier(retry_max_s=0.01, metrics=Metrics())
    with pytest.raises(LookoutError, match="refused"):
        await deliver(Batch(opened_at=0.0), StandInOutputs([Refused("labels"), after]), retrier)  # type: ignore[arg-type]
    assert after.attempts == 0


async def test_a_threshold_for_a_label_the_engines_taxonomy_lacks_is_refused_when_it_opens() -> None:
    # Settings built in code (a Faust app, a harness) skip load_settings' checks: the taxonomy the
    # engine binds still refuses the label at open, not on the first batch hours later.
    own = {
        "version": "pets-1",
        "labels": [{"label": "feline", "parent": None}],
        "mapping": {"feline": {"classes": [[0, "tabby"]]}},
    }
    engine = StandInEngine([0], class_names=("tabby", "Chihuahua"))
    engine.info = dataclasses.replace(engine.info, taxonomy=own)
    settings = Settings(labels=LabelSettings(label_mode="multi", label_thresholds={"cat": 0.4}))
    pipeline = Pipeline(settings, lambda: engine, metrics=Metrics())
    try:
        with pytest.raises(ConfigError, match=r"names 'cat', which is no label of taxonomy pets-1 of engine"):
            await pipeline.open()
    finally:
        await pipeline.close()


async def test_batches_merged_for_one_delivery_keep_their_order_and_last_offsets() -> None:
    engine = StandInEngine([SPORTS_CAR])
    pipeline = await opened(engine)
    batches = []
    for offsets in ([(0, 0), (1, 5)], [(0, 1), (0, 2)], [(1, 6)]):
        batch = Batch(opened_at=0.0)
        for partition, offset in offsets:
            pipeline.add(batch, frame_record(offset, f"cam-{partition}", partition=partition))
        await pipeline.classify(batch)
        batches.append(batch)
    await pipeline.close()
    merged = Batch.merged(batches)
    assert merged.offsets == {("frames", 0): 2, ("frames", 1): 6}  # what the commit takes
    assert [c.offset for c in merged.counted[("frames", 0)]] == [0, 1, 2]  # watermark order
    assert [c.offset for c in merged.counted[("frames", 1)]] == [5, 6]
    assert merged.records == 5 and len(merged.predictions) == 5
    assert merged.bytes == sum(b.bytes for b in batches)


def test_a_container_cpu_limit_caps_the_cores_threads_are_sized_by() -> None:
    # A 2-CPU pod on a 64-core node sees 64 cores; its threads must be sized by the 2.
    assert cgroup_cpu_quota_cores("200000 100000\n", None, None) == 2
    assert cgroup_cpu_quota_cores("150000 100000", None, None) == 2  # 1.5 CPUs: round up
    assert cgroup_cpu_quota_cores("50000 100000", None, None) == 1
    assert cgroup_cpu_quota_cores("max 100000", None, None) is None
    assert cgroup_cpu_quota_cores(None, "400000\n", "100000\n") == 4  # cgroup v1
    assert cgroup_cpu_quota_cores(None, "-1", "100000") is None
    assert cgroup_cpu_quota_cores(None, None, None) is None
    assert cgroup_cpu_quota_cores("garbage", None, None) is None


async def test_the_poll_stage_wakes_when_a_batch_buffer_frees_not_at_its_timeout() -> None:
    engine = StandInEngine([TABBY])
    settings = load_settings(flags={"inference_sessions": "1"}, env={})
    pipeline = Pipeline(settings, lambda: engine, metrics=Metrics())
    await pipeline.open()
    batches = []
    while pipeline.can_take(None):  # one session: three buffers, each taken by a batch
        batches.append(Batch(opened_at=0.0))
        pipeline.add(batches[-1], frame_record(len(batches), "cam-1"))
    assert len(batches) == 3
    waiting = asyncio.create_task(pipeline.wait_for_buffer(timeout_s=60))
    await asyncio.sleep(0)
    assert not waiting.done()  # every buffer is taken: it waits
    await pipeline.classify(batches[0])
    assert await asyncio.wait_for(waiting, timeout=5) is True  # woken by the freed buffer, not the 60 s
    await pipeline.close()


async def test_a_session_that_fails_to_open_closes_the_ones_already_open() -> None:
    closed: list[int] = []

    class Closing(StandInEngine):
        def close(self) -> None:
            closed.append(id(self))

    first = Closing([TABBY])
    engines = iter([first])

    def factory() -> StandInEngine:
        engine = next(engines, None)
        if engine is None:
            raise EngineError("the second session ran out of memory")
        return engine

    settings = load_settings(flags={"inference_sessions": "2"}, env={})
    pipeline = Pipeline(settings, factory, metrics=Metrics())
    with pytest.raises(EngineError):
        await pipeline.open()
    assert closed == [id(first)]


async def test_a_batchs_decodes_wake_the_event_loop_once_not_once_per_frame() -> None:
    # Each wake-up from a decode thread is a self-pipe write, a select return and a callback on
    # the event loop; at 100+ frames/s one per frame was a measurable share of the loop's CPU.
    engine = StandInEngine([SPORTS_CAR], max_batch=8)
    pipeline = await opened(engine)
    loop = asyncio.get_running_loop()
    wakeups_from_other_threads = 0
    call_soon_threadsafe = loop.call_soon_threadsafe

    def counting(*args: object, **kwargs: object) -> asyncio.Handle:
        nonlocal wakeups_from_other_threads
        if threading.current_thread() is not threading.main_thread():
            wakeups_from_other_threads += 1
        return call_soon_threadsafe(*args, **kwargs)  # type: ignore[arg-type]

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    try:
        batch = Batch(opened_at=0.0)
        for offset in range(8):
            pipeline.add(batch, frame_record(offset, "cam-1"))
        await pipeline.classify(batch)
    finally:
        loop.call_soon_threadsafe = call_soon_threadsafe  # type: ignore[method-assign]
        await pipeline.close()
    assert len(batch.predictions) == 8 and engine.calls == [8]
    # The last decode to finish may wake the loop; the inference thread's result wakes it once.
    assert wakeups_from_other_threads <= 2


async def test_cancelling_a_sink_write_cancels_the_write_itself() -> None:
    # When the worker stops on a fatal error, its sink stage is cancelled in the middle of a
    # write. Left running, the write ended unwatched once the clients closed under it, and its
    # failure was printed as "Task exception was never retrieved" with a traceback.
    cancelled, started = asyncio.Event(), asyncio.Event()

    class Hanging(ListSink):
        async def write(self, batch: Batch) -> None:
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

    retrier = Retrier(retry_max_s=0.01, metrics=Metrics())
    delivery = asyncio.ensure_future(
        deliver(Batch(opened_at=0.0), StandInOutputs([Hanging("labels")]), retrier)
    )  # type: ignore[arg-type]
    await started.wait()
    delivery.cancel()
    with pytest.raises(asyncio.CancelledError):
        await delivery
    assert cancelled.is_set()
