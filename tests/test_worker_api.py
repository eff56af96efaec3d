"""End to end: jobs through the runpod SDK's local API, a worker process, the hub stand-in, the tiny model."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
import soundfile as sf

from tests.support.checkpoints import MODEL_REPO, TOKENIZER_REPO
from tests.support.error_clauses import offending_fields
from tests.support.hub_server import HubServer
from tests.support.speech import data_uri, speak
from tests.support.worker_process import LocalWorker, worker_env

FRAME_SAMPLES = 960  # 24 kHz / 25 frames per second


def decode_output(output: dict) -> tuple[object, int]:
    audio, rate = sf.read(io.BytesIO(base64.b64decode(output["audio_base64"])), dtype="float32")
    return audio, rate


def assert_audio_matches_report(output: dict) -> None:
    audio, rate = decode_output(output)
    assert rate == output["sample_rate"]
    assert len(audio) / rate == pytest.approx(output["duration_s"], abs=1e-3)
    assert len(audio) > 0 and float(abs(audio).max()) > 0  # random codebooks decode to noise, not silence


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("worker") / "volume"


@pytest.fixture(scope="module")
def worker(hub: HubServer, volume: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalWorker]:
    hub.reset_counts()
    logs = tmp_path_factory.mktemp("logs")
    with LocalWorker(worker_env(volume, hub.url), logs / "worker.log") as local_worker:
        yield local_worker


def test_runsync_returns_speech_and_downloads_models_once(worker: LocalWorker, hub: HubServer) -> None:
    result = worker.runsync({"transcript": "Hello from the tiny model.", "max_new_tokens": 40, "seed": 7})
    assert result["status"] == "COMPLETED", result
    output = result["output"]
    assert output["format"] == "wav" and output["mimetype"] == "audio/wav"
    assert output["sample_rate"] == 24000
    # 40 decode steps give at most 40 − 8 frames of 40 ms; fewer only when the model closed the clip itself.
    assert output["duration_s"] == pytest.approx(output["num_frames"] * FRAME_SAMPLES / 24000, abs=1e-3)
    assert output["num_frames"] == 32 if output["truncated"] else output["num_frames"] < 32
    assert_audio_matches_report(output)
    assert set(output["timings_ms"]) >= {"download", "load", "generate", "encode", "total"}
    assert output["model"]["generation"]["repo"] == MODEL_REPO
    assert output["model"]["audio_tokenizer"]["repo"] == TOKENIZER_REPO
    assert output["model"]["generation"]["commit"] == hub.commit(MODEL_REPO)
    assert hub.file_gets and all(count == 1 for count in hub.file_gets.values())

    hub.reset_counts()
    again = worker.runsync({"transcript": "A second job.", "max_new_tokens": 20})
    assert again["status"] == "COMPLETED", again
    assert hub.requests == []  # the complete store is used without asking the hub anything


def test_run_then_status(worker: LocalWorker) -> None:
    result = worker.run_and_poll(
        {"transcript": "Polling works too.", "max_new_tokens": 24, "output_format": "flac"}
    )
    assert result["status"] == "COMPLETED", result
    assert result["output"]["format"] == "flac"
    assert_audio_matches_report(result["output"])


def test_voice_cloning_with_spoken_reference(worker: LocalWorker, spoken_reference: Path) -> None:
    result = worker.runsync(
        {
            "transcript": "Now in the voice of the reference.",
            "ref_audio": data_uri(spoken_reference),
            "ref_text": "The quick brown fox jumps over the lazy dog.",
            "scene_prompt": "A quiet studio.",
            "max_new_tokens": 30,
            "temperature": 0,
        }
    )
    assert result["status"] == "COMPLETED", result
    assert_audio_matches_report(result["output"])


def test_multi_speaker_with_one_reference_each(worker: LocalWorker, tmp_path: Path) -> None:
    first = speak("I am the first speaker.", tmp_path / "a.wav")
    second = speak("And I am the second one.", tmp_path / "b.wav", voice="en+f3")
    result = worker.runsync(
        {
            "transcript": "[SPEAKER0] Did you hear that? [SPEAKER1] I did.",
            "ref_audio": [data_uri(first), data_uri(second)],
            "ref_text": ["I am the first speaker.", "And I am the second one."],
            "max_new_tokens": 30,
            "seed": 3,
        }
    )
    assert result["status"] == "COMPLETED", result
    assert_audio_matches_report(result["output"])


@pytest.mark.parametrize(
    ("job_input", "fields"),
    [
        ({}, ["transcript"]),
        ({"transcript": 42}, ["transcript"]),
        ({"transcript": "hi", "temperature": 5}, ["temperature"]),
        ({"transcript": "hi", "temperature": "hot", "top_p": 0}, ["temperature", "top_p"]),
        ({"transcript": "hi", "temprature": 0.5}, ["temprature"]),
        ({"transcript": "hi", "output_format": "aac"}, ["output_format"]),
        ({"transcript": "hi", "max_new_tokens": 10**9}, ["max_new_tokens"]),
        ({"transcript": "hi", "seed": True}, ["seed"]),
        ({"transcript": "hi", "ref_audio": "../../etc/passwd"}, ["ref_audio"]),
        ({"transcript": "hi", "ref_audio": "data:audio/wav;base64,not-base64!"}, ["ref_audio"]),
        ({"transcript": "hi", "s3_key": "a/b.wav"}, ["s3_key"]),
        ({"input": "hi", "transcript": "ho"}, ["input", "transcript"]),
    ],
)
def test_bad_input_is_a_clear_error_and_the_worker_keeps_serving(
    worker: LocalWorker, job_input: object, fields: list[str]
) -> None:
    result = worker.runsync(job_input)
    assert result["status"] == "FAILED", result
    assert isinstance(result["error"], str)
    assert offending_fields(result["error"]) == set(fields), result["error"]


def test_worker_serves_after_bad_inputs(worker: LocalWorker) -> None:
    result = worker.runsync({"transcript": "Still here.", "max_new_tokens": 16})
    assert result["status"] == "COMPLETED", result


def test_restarted_worker_loads_from_the_volume_without_the_hub(
    worker: LocalWorker, volume: Path, tmp_path: Path
) -> None:
    worker.runsync({"transcript": "Make sure the store exists.", "max_new_tokens": 16})
    with LocalWorker(worker_env(volume, None), tmp_path / "restart.log") as restarted:
        result = restarted.runsync({"transcript": "Back again.", "max_new_tokens": 16})
    assert result["status"] == "COMPLETED", result
    assert result["output"]["timings_ms"]["download"] < 5000


def test_two_workers_cold_start_on_one_volume(tiny_checkpoint, tmp_path: Path) -> None:
    with HubServer(
        {MODEL_REPO: tiny_checkpoint.model_dir, TOKENIZER_REPO: tiny_checkpoint.codec_dir},
        throttle_bps=2_000_000,
    ) as slow_hub:
        volume = tmp_path / "shared-volume"
        env = worker_env(volume, slow_hub.url)
        with LocalWorker(env, tmp_path / "a.log") as first, LocalWorker(env, tmp_path / "b.log") as second:
            import concurrent.futures

            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                futures = [
                    pool.submit(w.runsync, {"transcript": f"Worker {i}.", "max_new_tokens": 16})
                    for i, w in enumerate((first, second))
                ]
                results = [f.result() for f in futures]
        assert [r["status"] for r in results] == ["COMPLETED", "COMPLETED"], results
        assert slow_hub.file_gets and all(count == 1 for count in slow_hub.file_gets.values()), (
            slow_hub.file_gets
        )
