"""Greedy audio through the runpod SDK's production loop: the scheduler's is generate()'s, sample for sample.

The token-level parity tests (tests/test_scheduler.py) drive the scheduler in-process. This one checks what a
client receives: the same burst of greedy jobs — different lengths, a cloned voice, several at once — sent to
a worker with ``GENERATION_BACKEND=scheduler`` (continuous batching) and to one with ``transformers`` (its
``generate()``, one job at a time) gives the same audio, whole or streamed, on both tiny geometries (one
whose clips run to ``max_new_tokens``, one whose clips the model ends itself).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.support.checkpoints import GEOMETRIES, MODEL_REPO, TOKENIZER_REPO
from tests.support.hub_server import HubServer
from tests.support.runpod_queue import JobOutcome, ProductionWorker, RunPodQueue
from tests.support.speech import data_uri
from tests.support.worker_process import worker_env

pytestmark = pytest.mark.slow


def greedy_jobs(reference: Path) -> list[dict]:
    return [
        {"transcript": "The first of a burst of jobs.", "temperature": 0, "max_new_tokens": 40},
        {"transcript": "A second, shorter one.", "temperature": 0, "max_new_tokens": 17},
        {
            "transcript": "This one speaks in a cloned voice.",
            "ref_audio": data_uri(reference),
            "ref_text": "The quick brown fox jumps over the lazy dog.",
            "temperature": 0,
            "max_new_tokens": 33,
        },
        {"transcript": "And the last joins the others.", "temperature": 0, "max_new_tokens": 64},
    ]


def run_burst(
    hub_url: str, root: Path, backend: str, streaming: bool, inputs: list[dict]
) -> list[JobOutcome]:
    """The jobs made visible at once to a fresh worker with ``backend`` (streaming or not), and what the
    platform got back."""
    name = f"{backend}-{'streaming' if streaming else 'whole'}"
    env = worker_env(
        root / name / "volume", hub_url, CONCURRENCY="4", GENERATION_BACKEND=backend, RESULT_CACHE="false",
        STREAMING=str(streaming).lower(), MAX_INLINE_BYTES="1000000",
    )  # fmt: skip
    with RunPodQueue() as queue, ProductionWorker(queue, env, root / f"{name}.log"):
        return [queue.wait(job_id) for job_id in queue.enqueue_many(inputs)]


def frames(outcome: JobOutcome) -> int:
    return (outcome.stream[-1]["summary"] if outcome.stream else outcome.output)["num_frames"]


def samples(outcome: JobOutcome) -> np.ndarray:
    """The clip's 16-bit samples: the result's, or its streamed chunks' one after another."""
    assert outcome.status == "COMPLETED", outcome.error
    chunks = outcome.stream or [outcome.output]
    return np.concatenate(
        [
            sf.read(io.BytesIO(base64.b64decode(chunk["audio_base64"])), dtype="int16")[0]
            for chunk in chunks
            if "audio_base64" in chunk
        ]
    )


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streaming"])
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_greedy_audio_equals_generates_through_the_production_loop(
    geometry: str, streaming: bool, spoken_reference: Path, tmp_path: Path
) -> None:
    from boson_multimodal.tiny_model import build_tiny_checkpoint

    build_tiny_checkpoint(tmp_path / "model", tmp_path / "codec", GEOMETRIES[geometry])
    inputs = greedy_jobs(spoken_reference)
    with HubServer({MODEL_REPO: tmp_path / "model", TOKENIZER_REPO: tmp_path / "codec"}) as hub:
        ours = run_burst(hub.url, tmp_path, "scheduler", streaming, inputs)
        theirs = run_burst(hub.url, tmp_path, "transformers", streaming, inputs)
    for job, mine, reference in zip(inputs, ours, theirs, strict=True):
        assert bool(mine.stream) == bool(reference.stream) == streaming
        assert frames(mine) == frames(reference) > 0, job
        np.testing.assert_array_equal(samples(mine), samples(reference), err_msg=str(job))
