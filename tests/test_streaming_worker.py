"""Streaming mode and long-form speech as a client sees them: the local API and the production loop."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from boson_multimodal.engine import GenerationCancelled
from higgs_worker.errors import JobAbandoned
from higgs_worker.pipeline import Pipeline
from higgs_worker.settings import load_settings
from tests.support.checkpoints import complete_store
from tests.support.engine_spy import record_submissions
from tests.support.hub_server import HubServer
from tests.support.runpod_queue import ProductionWorker, RunPodQueue
from tests.support.worker_process import LocalWorker, worker_env

pytestmark = pytest.mark.slow

HOP = 960
STREAM_CHUNK_CAP = 1024 * 1024  # RunPod's limit on one stream message
LONG_TEXT = (
    "The first sentence is short. The second sentence is a little longer than the first one! "
    "Does the third one ask a question? The fourth closes the paragraph."
)


def decode(item: dict) -> tuple[np.ndarray, int]:
    return sf.read(io.BytesIO(base64.b64decode(item["audio_base64"])), dtype="float32")


def check_chunks(chunks: list[dict]) -> np.ndarray:
    """Consecutive, self-describing, individually playable chunks; the last one final with a summary."""
    assert [c["index"] for c in chunks] == list(range(len(chunks)))
    assert [c["final"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    pieces = []
    for chunk in chunks:
        assert len(str(chunk).encode()) < STREAM_CHUNK_CAP
        if "audio_base64" in chunk:
            audio, rate = decode(chunk)
            assert rate == chunk["sample_rate"] == 24000 and chunk["format"] == "wav"
            assert len(audio) / rate == pytest.approx(chunk["duration_s"], abs=1e-3)
            assert chunk["start_s"] == pytest.approx(sum(len(p) for p in pieces) / rate, abs=1e-3)
            pieces.append(audio)
    summary = chunks[-1]["summary"]
    assert {"timings_ms", "model", "num_frames", "truncated"} <= set(summary)
    assert "first_chunk" in summary["timings_ms"]
    return np.concatenate(pieces)


@pytest.fixture(scope="module")
def streaming_worker(hub: HubServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalWorker]:
    root = tmp_path_factory.mktemp("streaming")
    env = worker_env(root / "volume", hub.url, STREAMING="true", LONGFORM_CHUNK_CHARS="60")
    with LocalWorker(env, root / "worker.log") as worker:
        yield worker


def test_runsync_returns_the_aggregated_chunks(streaming_worker: LocalWorker) -> None:
    result = streaming_worker.runsync({"transcript": "Streaming in chunks.", "max_new_tokens": 60, "seed": 4})
    assert result["status"] == "COMPLETED", result
    chunks = result["output"]
    assert len(chunks) >= 2  # 52 frames at most: a first chunk of 12 frames, then more
    audio = check_chunks(chunks)
    assert len(audio) == chunks[-1]["summary"]["num_frames"] * HOP


def test_stream_endpoint_yields_chunks(streaming_worker: LocalWorker) -> None:
    submitted = streaming_worker.post(
        "/run", {"input": {"transcript": "Over /stream.", "max_new_tokens": 40}}
    )
    streamed = streaming_worker.post(f"/stream/{submitted['id']}")
    assert streamed["status"] == "COMPLETED", streamed
    check_chunks([item["output"] for item in streamed["stream"]])


def test_streaming_applies_speed_to_the_whole_clip_and_reports_bad_input(
    streaming_worker: LocalWorker,
) -> None:
    """A tempo change needs the whole clip: it is generated first, then sent in chunks 1.5 times shorter."""
    job = {"transcript": "Faster.", "max_new_tokens": 40, "seed": 9}
    normal = check_chunks(streaming_worker.runsync(job)["output"])
    result = streaming_worker.runsync(job | {"speed": 1.5})
    assert result["status"] == "COMPLETED", result
    faster = check_chunks(result["output"])
    assert len(faster) == pytest.approx(len(normal) / 1.5, abs=2)
    result = streaming_worker.runsync({"transcript": "x", "top_p": 7})
    assert result["output"][0]["error"].startswith("top_p:")


def test_a_repeated_seeded_stream_is_answered_from_the_cache_as_one_final_chunk(
    streaming_worker: LocalWorker,
) -> None:
    job = {"transcript": "Cached stream.", "max_new_tokens": 40, "seed": 21}
    first = streaming_worker.runsync(job)["output"]
    streamed = check_chunks(first)
    assert len(first) >= 2 and "cache_hit" not in first[-1]["summary"]
    [again] = streaming_worker.runsync(job)["output"]
    assert again["final"] is True and again["index"] == 0 and again["summary"]["cache_hit"] is True
    assert again["summary"]["num_frames"] == first[-1]["summary"]["num_frames"]
    audio, rate = decode(again)  # one playable file: the whole clip
    assert rate == again["sample_rate"] == 24000 and again["duration_s"] == pytest.approx(
        len(audio) / rate, abs=1e-3
    )
    np.testing.assert_array_equal(audio, streamed)


def test_long_text_in_streaming_mode_arrives_whole(streaming_worker: LocalWorker) -> None:
    result = streaming_worker.runsync({"transcript": LONG_TEXT, "max_new_tokens": 20, "seed": 2})
    assert result["status"] == "COMPLETED", result
    audio = check_chunks(result["output"])
    assert len(audio) > 0


@pytest.fixture(scope="module")
def queue() -> Iterator[RunPodQueue]:
    with RunPodQueue() as loopback:
        yield loopback


def test_production_loop_streams_and_reports_long_form_progress(
    queue: RunPodQueue, hub: HubServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp("production-streaming")
    streaming = worker_env(root / "volume", hub.url, STREAMING="true", MAX_INLINE_BYTES="60000")
    with ProductionWorker(queue, streaming, root / "streaming.log"):
        outcome = queue.wait(queue.enqueue({"transcript": "Streamed in production.", "max_new_tokens": 24}))
        assert outcome.status == "COMPLETED", outcome.error
        assert outcome.output == outcome.stream  # /run and /runsync get the aggregated list
        check_chunks(outcome.stream)
        # 72 frames of WAV (~140 KB of base64) cannot all fit one /run result: fail saying so, never drop it
        too_big = queue.wait(queue.enqueue({"transcript": "A longer stream.", "max_new_tokens": 80}))
    assert too_big.status == "FAILED" and "s3_bucket" in too_big.error, too_big.error
    assert too_big.stream and all("audio_base64" in chunk for chunk in too_big.stream)

    plain = worker_env(root / "volume", hub.url, LONGFORM_CHUNK_CHARS="60")
    with ProductionWorker(queue, plain, root / "long.log"):
        outcome = queue.wait(queue.enqueue({"transcript": LONG_TEXT, "max_new_tokens": 20}))
    assert outcome.status == "COMPLETED", outcome.error
    total = outcome.progress[-1]["pieces_total"]
    assert total >= 3
    # every piece but the last, which the result itself reports
    assert [p["pieces_done"] for p in outcome.progress] == list(range(1, total))
    audio, _ = decode(outcome.output)
    assert len(audio) > 0 and outcome.output["num_frames"] <= total * 12


def test_cancelling_a_streaming_job_stops_its_generation(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RunPod cancels a job by cancelling the handler's task: the generation must stop, not run to the end."""
    from queue_api.worker import QueueDoor

    settings = load_settings({"RUNPOD_VOLUME_PATH": str(tmp_path / "volume"), "STREAMING": "true"})
    complete_store(settings, hub.url)
    pipeline = Pipeline(settings)
    door = QueueDoor(pipeline)
    engine, _ = pipeline.runtime.engine()
    handles = record_submissions(engine, monkeypatch)
    steps = settings.max_new_tokens_limit

    async def cancel_after_the_first_chunk() -> dict:
        chunks = door.stream_handler(
            {"id": "cancel-me", "input": {"transcript": "A long one.", "max_new_tokens": steps}}
        )
        first = await anext(chunks)
        pending = asyncio.ensure_future(anext(chunks))
        await asyncio.sleep(0)  # the next chunk is now being produced on the job thread
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        return first

    first = asyncio.run(cancel_after_the_first_chunk())
    assert first["index"] == 0 and "audio_base64" in first
    [handle] = handles
    with pytest.raises(GenerationCancelled):  # stopped by the cancellation, not run to its 4096 steps
        handle.result(timeout=60)


def test_a_stream_that_makes_its_whole_clip_first_stops_when_nobody_waits(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a tempo change the whole clip comes before the first chunk: a consumer that leaves meanwhile
    (RunPod's cancel, an HTTP client) sets the job's cancel, and the generation stops at its next step."""
    settings = load_settings({"RUNPOD_VOLUME_PATH": str(tmp_path / "volume"), "STREAMING": "true"})
    complete_store(settings, hub.url)
    pipeline = Pipeline(settings)
    engine, _ = pipeline.runtime.engine()
    handles = record_submissions(engine, monkeypatch)
    steps = settings.max_new_tokens_limit
    cancel = threading.Event()
    job = {"transcript": "A long one, faster.", "max_new_tokens": steps, "speed": 1.5}
    stream = pipeline.stream("leaves-early", job, cancel)
    threading.Timer(1.0, cancel.set).start()  # the consumer goes away while the clip is being made
    with pytest.raises(JobAbandoned):
        next(stream)
    [handle] = handles
    with pytest.raises(GenerationCancelled):  # stopped, not run to its thousands of steps
        handle.result(timeout=60)


def test_cancelling_while_a_chunk_is_being_produced_closes_the_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A generator cannot be closed while it runs on a job thread: the close must wait for the chunk."""
    from queue_api.worker import QueueDoor

    settings = load_settings({"RUNPOD_VOLUME_PATH": str(tmp_path / "volume"), "CONCURRENCY": "2"})
    pipeline = Pipeline(settings)
    door = QueueDoor(pipeline)
    producing, release, closed = threading.Event(), threading.Event(), []

    def slow_stream(job_id: str, _raw_input: object, _cancel: object) -> Iterator[dict]:
        try:
            yield {"index": 0}
            producing.set()
            release.wait(10)
            yield {"index": 1}
        finally:
            closed.append(job_id)

    monkeypatch.setattr(pipeline, "stream", slow_stream)

    async def cancel_mid_chunk() -> None:
        chunks = door.stream_handler({"id": "mid-chunk", "input": {}})
        assert await anext(chunks) == {"index": 0}
        pending = asyncio.ensure_future(anext(chunks))
        await asyncio.get_running_loop().run_in_executor(None, producing.wait, 10)
        pending.cancel()
        threading.Timer(0.2, release.set).start()
        with pytest.raises(asyncio.CancelledError):
            await pending

    asyncio.run(cancel_mid_chunk())
    assert closed == ["mid-chunk"]
