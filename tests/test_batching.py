"""The batching front-end with the tiny real engine: who shares a batch, who runs alone, who sees an error."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import CancelledError

import numpy as np
import pytest

from boson_multimodal.batching import BatchingEngine
from boson_multimodal.engine import HiggsAudioEngine, SamplingConfig, Speech, SpeechRequest
from boson_multimodal.prompt import Voice
from tests.conftest import TinyCheckpoint

FRAME_SAMPLES = 960
STEPS = 16  # decode steps per request: 16 − 8 = at most 8 frames, to keep the tests quick
SAMPLED = SamplingConfig(temperature=0.8, max_new_tokens=STEPS)
POISON = "poison"  # a request whose text holds this makes the spy engine fail


class SpyEngine(HiggsAudioEngine):
    """The real engine, recording the texts of every batch it is asked for and failing on ``POISON``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[list[str]] = []
        self.gate = threading.Event()  # cleared by a test to hold the engine inside its next batch
        self.gate.set()
        self.entered = threading.Event()

    def generate_batch(self, requests: Sequence[SpeechRequest], on_rows=None) -> list[Speech]:
        self.batches.append([r.text for r in requests])
        self.entered.set()
        self.gate.wait()
        if any(POISON in r.text for r in requests):
            raise RuntimeError("the engine refuses this request")
        return super().generate_batch(requests, on_rows)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: TinyCheckpoint) -> SpyEngine:
    return SpyEngine.load(tiny_checkpoint.model_dir, tiny_checkpoint.codec_dir, device="cpu")


@pytest.fixture
def spy(engine: SpyEngine) -> Iterator[SpyEngine]:
    engine.batches.clear()
    engine.entered.clear()
    yield engine
    engine.gate.set()


def sampled(text: str) -> SpeechRequest:
    return SpeechRequest(text, sampling=SAMPLED)


def voiced(text: str) -> SpeechRequest:
    seconds = np.arange(24_000, dtype=np.float32) / 24_000
    voice = Voice(0.3 * np.sin(2 * np.pi * 220 * seconds), 24_000, "A reference sentence.")
    return SpeechRequest(text, voices=(voice,), sampling=SAMPLED)


def assert_valid_speech(speech: Speech) -> None:
    assert speech.sample_rate == 24_000
    assert 0 <= speech.num_frames <= STEPS - 8
    assert speech.waveform.shape == (speech.num_frames * FRAME_SAMPLES,)


def test_compatible_requests_share_one_batch(spy: SpyEngine) -> None:
    texts = [f"Sentence number {i} for the batch." for i in range(4)]
    # A long window: the batch closes because it is full, not because time passed.
    with BatchingEngine(spy, max_batch=4, max_wait_ms=10_000) as batcher:
        futures = [batcher.submit(sampled(text)) for text in texts]
        speeches = [future.result(timeout=120) for future in futures]
    assert spy.batches == [texts]
    for speech in speeches:
        assert_valid_speech(speech)


def test_incompatible_requests_are_not_batched_together(spy: SpyEngine) -> None:
    requests = [
        sampled("sampled one"),
        voiced("cloned one"),
        SpeechRequest("greedy one", sampling=SamplingConfig(temperature=0, max_new_tokens=STEPS)),
        sampled("sampled two"),
        SpeechRequest("seeded one", sampling=SamplingConfig(temperature=0.8, max_new_tokens=STEPS, seed=3)),
        voiced("cloned two"),
        SpeechRequest("seeded two", sampling=SamplingConfig(temperature=0.8, max_new_tokens=STEPS, seed=3)),
        SpeechRequest("other config", sampling=SamplingConfig(temperature=0.5, max_new_tokens=STEPS)),
    ]
    with BatchingEngine(spy, max_batch=len(requests), max_wait_ms=10_000) as batcher:
        futures = [batcher.submit(request) for request in requests]
        for future in futures:
            assert_valid_speech(future.result(timeout=120))
    assert spy.batches == [
        ["sampled one", "sampled two"],
        ["cloned one", "cloned two"],
        ["greedy one"],
        ["seeded one"],
        ["seeded two"],
        ["other config"],
    ]


def test_batches_are_capped_at_max_batch(spy: SpyEngine) -> None:
    texts = [f"capped {i}" for i in range(5)]
    spy.gate.clear()  # hold the first batch so that all five are queued behind it
    with BatchingEngine(spy, max_batch=2, max_wait_ms=0) as batcher:
        futures = [batcher.submit(sampled(texts[0]))]
        assert spy.entered.wait(timeout=30)
        futures += [batcher.submit(sampled(text)) for text in texts[1:]]
        spy.gate.set()
        for future in futures:
            assert_valid_speech(future.result(timeout=120))
    assert spy.batches == [["capped 0"], ["capped 1", "capped 2"], ["capped 3", "capped 4"]]


def test_a_failing_request_fails_only_its_own_future(spy: SpyEngine) -> None:
    texts = ["fine before", f"{POISON} in the middle", "fine after"]
    with BatchingEngine(spy, max_batch=3, max_wait_ms=10_000) as batcher:
        futures = [batcher.submit(sampled(text)) for text in texts]
        assert_valid_speech(futures[0].result(timeout=120))
        with pytest.raises(RuntimeError, match="refuses this request"):
            futures[1].result(timeout=120)
        assert_valid_speech(futures[2].result(timeout=120))
    # The failed batch was retried one request at a time.
    assert spy.batches == [texts, [texts[0]], [texts[1]], [texts[2]]]


def test_a_lone_failing_request_is_not_retried(spy: SpyEngine) -> None:
    with BatchingEngine(spy, max_batch=4, max_wait_ms=0) as batcher:
        with pytest.raises(RuntimeError, match="refuses this request"):
            batcher.submit(sampled(f"{POISON} alone")).result(timeout=120)
        assert_valid_speech(batcher.submit(sampled("the next one works")).result(timeout=120))
    assert spy.batches == [[f"{POISON} alone"], ["the next one works"]]


def test_a_request_cancelled_while_queued_is_never_generated(spy: SpyEngine) -> None:
    spy.gate.clear()
    with BatchingEngine(spy, max_batch=4, max_wait_ms=0) as batcher:
        first = batcher.submit(sampled("running"))
        assert spy.entered.wait(timeout=30)
        cancelled = batcher.submit(sampled("cancelled"))
        kept = batcher.submit(sampled("kept"))
        assert cancelled.cancel()
        spy.gate.set()
        assert_valid_speech(first.result(timeout=120))
        assert_valid_speech(kept.result(timeout=120))
    with pytest.raises(CancelledError):
        cancelled.result()
    assert spy.batches == [["running"], ["kept"]]


def test_awaiting_from_asyncio_leaves_the_event_loop_free(spy: SpyEngine) -> None:
    """The handler awaits ``asyncio.wrap_future``; heartbeats and job-taking must keep running meanwhile.

    The engine holds its batch until a coroutine on the loop releases it: that can only happen if the loop
    keeps running while the requests are being generated.
    """
    released_by_loop = threading.Event()

    async def release_when_engine_is_busy() -> None:
        while not spy.entered.is_set():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)
        released_by_loop.set()
        spy.gate.set()

    async def main(batcher: BatchingEngine) -> list[Speech]:
        releaser = asyncio.create_task(release_when_engine_is_busy())
        futures = [asyncio.wrap_future(batcher.submit(sampled(f"async {i}"))) for i in range(3)]
        speeches = await asyncio.gather(*futures)
        await releaser
        return speeches

    spy.gate.clear()
    fell_back = threading.Event()  # never hang the suite if the loop were blocked
    fallback = threading.Timer(60, lambda: (fell_back.set(), spy.gate.set()))
    fallback.start()
    try:
        with BatchingEngine(spy, max_batch=3, max_wait_ms=10_000) as batcher:
            speeches = asyncio.run(main(batcher))
    finally:
        fallback.cancel()
    assert released_by_loop.is_set() and not fell_back.is_set()
    assert len(speeches) == 3
    assert spy.batches == [["async 0", "async 1", "async 2"]]


def test_close_generates_what_was_submitted_then_refuses_more(spy: SpyEngine) -> None:
    batcher = BatchingEngine(spy, max_batch=2, max_wait_ms=10_000)
    future = batcher.submit(sampled("submitted before close"))
    batcher.close()
    assert_valid_speech(future.result(timeout=0))
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(sampled("too late"))
    batcher.close()  # closing twice is harmless


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_batch": 0}, "max_batch must be at least 1"), ({"max_wait_ms": -1}, "max_wait_ms must not be")],
)
def test_bad_limits_are_refused(spy: SpyEngine, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchingEngine(spy, **kwargs)
