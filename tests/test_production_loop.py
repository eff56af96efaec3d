"""The worker under the runpod SDK's production loop, against the loopback job queue: what a client would see.

The local ``--rp_serve_api`` server (tests/test_worker_api.py) is not what runs on RunPod; this is: jobs are
taken (in batches when CONCURRENCY > 1), run by the async handler and their results POSTed back.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Iterator

import numpy as np
import pytest
import soundfile as sf

from tests.support.hub_server import HubServer
from tests.support.runpod_queue import API_KEY, ProductionWorker, RunPodQueue
from tests.support.worker_process import worker_env

pytestmark = pytest.mark.slow

FRAME_SECONDS = 0.04
MAX_INLINE_BYTES = 30_000  # fits a clip of 16 decode steps (≤ 8 frames, ≤ 16 KB of WAV), not one of 64
SHORT = {"max_new_tokens": 16}


@pytest.fixture(scope="module")
def queue() -> Iterator[RunPodQueue]:
    with RunPodQueue() as loopback:
        yield loopback


@pytest.fixture(scope="module")
def worker(
    queue: RunPodQueue, hub: HubServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProductionWorker]:
    root = tmp_path_factory.mktemp("production")
    env = worker_env(root / "volume", hub.url, CONCURRENCY="2", MAX_INLINE_BYTES=str(MAX_INLINE_BYTES))
    with ProductionWorker(queue, env, root / "worker.log") as production:
        yield production


def short_wav_data_uri(samples: int) -> str:
    buffer = io.BytesIO()
    sf.write(buffer, np.full(samples, 0.1, dtype=np.float32), 24_000, format="WAV")
    return "data:audio/wav;base64," + base64.b64encode(buffer.getvalue()).decode()


def assert_completed_with_audio(queue: RunPodQueue, job_id: str) -> dict:
    outcome = queue.wait(job_id)
    assert outcome.status == "COMPLETED", outcome.error
    assert outcome.done_posts == 1
    audio, rate = sf.read(io.BytesIO(base64.b64decode(outcome.output["audio_base64"])), dtype="float32")
    assert rate == outcome.output["sample_rate"] == 24_000
    assert len(audio) / rate == pytest.approx(outcome.output["duration_s"], abs=1e-3)
    assert outcome.output["num_frames"] * FRAME_SECONDS == pytest.approx(outcome.output["duration_s"])
    return outcome.output


def test_a_job_completes_with_its_audio(worker: ProductionWorker, queue: RunPodQueue) -> None:
    job_id = queue.enqueue({"transcript": "Hello from the production loop.", **SHORT})
    output = assert_completed_with_audio(queue, job_id)
    assert output["format"] == "wav" and output["cache_hit"] is False
    assert "error" not in output


def test_an_invalid_input_fails_naming_the_field(worker: ProductionWorker, queue: RunPodQueue) -> None:
    bad, good = queue.enqueue_many(
        [{"transcript": "Typo ahead.", "temprature": 0.5}, {"transcript": "Next job.", **SHORT}]
    )
    outcome = queue.wait(bad)
    assert outcome.status == "FAILED" and outcome.output is None
    assert isinstance(outcome.error, str)
    assert outcome.error.startswith("temprature: unknown field; allowed fields are ")
    assert_completed_with_audio(queue, good)


def test_a_crash_inside_generation_fails_with_a_plain_string(
    worker: ProductionWorker, queue: RunPodQueue
) -> None:
    """A reference far shorter than one codec frame makes the codec raise inside the handler's thread.

    The handler turns it into one readable line; left to the SDK, the error would be a JSON document holding
    the traceback, the host name and the worker id (see the next test).
    """
    crash, good = queue.enqueue_many(
        [
            {"transcript": "Clone this.", "ref_audio": short_wav_data_uri(50), "ref_text": "hm", **SHORT},
            {"transcript": "The worker is still here.", **SHORT},
        ]
    )
    outcome = queue.wait(crash)
    assert outcome.status == "FAILED" and outcome.output is None
    assert isinstance(outcome.error, str) and outcome.error
    assert "Traceback" not in outcome.error and "error_traceback" not in outcome.error
    assert_completed_with_audio(queue, good)


def test_the_sdk_wraps_a_raised_exception_as_a_json_string() -> None:
    """Why the handler catches its own errors: what runpod 1.12.0 posts when a handler raises."""
    from runpod.serverless.modules.rp_job import run_job

    async def raising_handler(job: dict) -> dict:
        raise RuntimeError("model exploded")

    result = asyncio.run(run_job(raising_handler, {"id": "job-1", "input": {}}))
    assert set(result) == {"error"} and isinstance(result["error"], str)
    details = json.loads(result["error"])
    assert details["error_message"] == "model exploded"
    assert "Traceback" in details["error_traceback"]
    assert {"hostname", "worker_id", "runpod_version"} <= set(details)


def test_an_oversized_result_fails_and_says_how_to_get_it(
    worker: ProductionWorker, queue: RunPodQueue
) -> None:
    """Never COMPLETED with a dropped output: the platform silently drops results over its limit."""
    big, good = queue.enqueue_many(
        [
            {"transcript": "A long clip that cannot travel inline.", "temperature": 0, "max_new_tokens": 64},
            {"transcript": "Small enough.", **SHORT},
        ]
    )
    outcome = queue.wait(big)
    assert outcome.status == "FAILED" and outcome.output is None
    assert "inline result limit" in outcome.error
    assert "s3_bucket" in outcome.error and "mp3" in outcome.error
    assert_completed_with_audio(queue, good)


def test_concurrent_jobs_are_taken_together_and_all_answered(
    worker: ProductionWorker, queue: RunPodQueue
) -> None:
    job_ids = queue.enqueue_many([{"transcript": f"Burst job {i}.", **SHORT} for i in range(4)])
    for job_id in job_ids:
        assert_completed_with_audio(queue, job_id)
    # CONCURRENCY=2: the SDK never asks for more than two jobs at a time, and takes two together when both
    # slots are free (one at a time when one job is still running).
    takes = [take for take in queue.takes if set(take.job_ids) & set(job_ids)]
    assert takes and all(take.batch_size <= 2 and len(take.job_ids) <= take.batch_size for take in takes)
    assert any(take.batch and len(take.job_ids) == 2 for take in takes)


def test_the_worker_speaks_the_protocol_and_keeps_its_key_out_of_logs(
    worker: ProductionWorker, queue: RunPodQueue
) -> None:
    assert queue.unexpected == []
    assert queue.authorizations == {API_KEY}  # every request carries the worker's key, as sent
    assert queue.pings and queue.pings[0]["runpod_version"]
    assert all(not take.job_in_progress for take in queue.takes[:1])
    assert API_KEY not in worker.log
