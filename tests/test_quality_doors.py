"""The quality fields through both doors: a real HTTP worker (captioned speech, SSE words, errors) and the
queue door's dry run, with the tiny aligner and recogniser on the volume as ``--demo`` puts them."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import srt

from higgs_worker.quality.words import transcript_words
from higgs_worker.settings import load_settings
from tests.support.hub_server import HubServer
from tests.support.quality_models import place
from tests.support.worker_process import HttpWorker, worker_env

pytestmark = pytest.mark.slow  # a real worker process

TEXT = "Captions over HTTP, word by word."
WORDS = [w.text for w in transcript_words(TEXT)]
JOB = {"input": TEXT, "max_new_tokens": 40, "seed": 3}


@pytest.fixture(scope="module")
def server(
    hub: HubServer, tiny_aligner: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HttpWorker]:
    from higgs_worker.quality.tiny_models import build_tiny_recogniser

    root = tmp_path_factory.mktemp("quality-http")
    settings = load_settings({"RUNPOD_VOLUME_PATH": str(root / "volume")})
    place(tiny_aligner, settings, "aligner")
    place(build_tiny_recogniser(root / "whisper"), settings, "recogniser")
    env = worker_env(root / "volume", hub.url, CONCURRENCY="1", DEMO_MODEL="true")
    with HttpWorker(env, root / "worker.log") as worker:
        yield worker


@pytest.fixture(scope="module")
def client(server: HttpWorker) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as http:
        yield http


def seconds_of(data: bytes) -> float:
    audio, rate = sf.read(io.BytesIO(data), dtype="float32")
    return len(audio) / rate


def check_timestamps(timestamps: list[dict], duration: float) -> None:
    assert [t["word"] for t in timestamps] == WORDS
    starts, ends = [t["start_time"] for t in timestamps], [t["end_time"] for t in timestamps]
    assert starts == sorted(starts) and all(
        0 <= s <= e <= duration + 1e-3 for s, e in zip(starts, ends, strict=True)
    )


def test_captioned_speech_returns_audio_with_its_timestamps(client: httpx.Client) -> None:
    body = JOB | {"stream": False, "response_format": "wav", "captions": "srt"}
    response = client.post("/dev/captioned_speech", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["audio_format"] == "wav"
    duration = seconds_of(base64.b64decode(answer["audio"]))
    check_timestamps(answer["timestamps"], duration)
    cues = list(srt.parse(answer["captions"]))
    assert " ".join(c.content.replace("\n", " ") for c in cues) == " ".join(WORDS)


def test_captioned_speech_streams_lines_and_ends_with_the_words(client: httpx.Client) -> None:
    with client.stream("POST", "/dev/captioned_speech", json=JOB | {"response_format": "wav"}) as response:
        assert response.status_code == 200 and response.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert len(lines) >= 2
    duration = sum(seconds_of(base64.b64decode(line["audio"])) for line in lines if "audio" in line)
    check_timestamps([t for line in lines for t in line["timestamps"]], duration)


def test_speech_sse_ends_with_words_and_verification(client: httpx.Client) -> None:
    body = JOB | {"stream_format": "sse", "timestamps": "word", "verify": True, "max_attempts": 2}
    body |= {"loudness_lufs": -20.0, "response_format": "wav"}
    with client.stream("POST", "/v1/audio/speech", json=body) as response:
        assert response.status_code == 200, response.read()
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    done = events[-1]
    assert done["type"] == "speech.audio.done"
    assert [w["word"] for w in done["words"]] == WORDS
    assert [w for e in events[:-1] for w in e["words"]] == done["words"]  # each delta: the words it said
    assert 1 <= done["verification"]["attempts"] <= 2
    stream = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])  # one streamed WAV file
    audio = sf.read(io.BytesIO(stream), dtype="float32")[0]
    assert len(audio) > 0
    assert float(np.max(np.abs(audio))) <= 0.95 + 1 / 32768


def test_require_verified_fails_clearly_over_http(client: httpx.Client) -> None:
    """The tiny recogniser hears noise: no attempt passes, so the request fails saying why."""
    body = JOB | {"verify": True, "max_attempts": 2, "require_verified": True, "response_format": "flac"}
    response = client.post("/v1/audio/speech", json=body)
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["param"] == "require_verified" and error["type"] == "server_error"
    assert error["message"].startswith("require_verified: the clip did not say its text in 2 attempts")


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/audio/speech", {"timestamps": "word"}, "timestamps"),  # bare audio has no room for words
        ("/v1/audio/speech", {"loudness_lufs": 3}, "loudness_lufs"),
        ("/v1/audio/speech", {"verify": True, "max_attempts": 9}, "max_attempts"),
        ("/v1/audio/speech", {"max_wer": 0.5}, "max_wer"),
        ("/dev/captioned_speech", {"stream": "yes"}, "stream"),
        ("/dev/captioned_speech", {"captions": "ass"}, "captions"),
        ("/dev/captioned_speech", {"trim_silence": 1}, "trim_silence"),
    ],
)
def test_bad_values_are_400s_naming_the_field(
    client: httpx.Client, route: str, body: dict, param: str
) -> None:
    response = client.post(route, json=JOB | body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"].startswith(f"{param}:"), error


def test_dry_run_names_the_quality_steps_and_their_models(client: httpx.Client) -> None:
    body = JOB | {"dry_run": True, "captions": "vtt", "verify": True, "trim_silence": True, "max_wer": 0.3}
    quality = client.post("/dev/captioned_speech", json=body).json()["quality"]
    assert quality["finishing"] == {"loudness_lufs": None, "trim_silence": True}
    assert quality["alignment"]["words"] == len(WORDS) and quality["alignment"]["captions"] == "vtt"
    assert quality["alignment"]["model"] == {"repo": "facebook/wav2vec2-base-960h", "revision": "main"}
    assert quality["verification"]["model"]["repo"] == "openai/whisper-large-v3-turbo"
    assert quality["verification"]["max_wer"] == 0.3 and quality["verification"]["metric"] == "wer"


def test_a_queue_dry_run_with_every_quality_field_loads_nothing(tmp_path: Path) -> None:
    job = {
        "transcript": "[SPEAKER0] 你好 [SPEAKER1] Hello there.",
        "dry_run": True,
        "timestamps": "word",
        "captions": "srt",
        "verify": True,
        "require_verified": True,
        "loudness_lufs": -16,
    }
    script = f"""
import sys
from higgs_worker.settings import load_settings
from higgs_worker.pipeline import Pipeline
out = Pipeline(load_settings({{"RUNPOD_VOLUME_PATH": {str(tmp_path)!r}}})).run("dry", {job!r})
quality = out["quality"]
assert quality["verification"]["metric"] == "cer" and quality["verification"]["require_verified"], quality
assert quality["alignment"]["timestamps"] and quality["finishing"]["loudness_lufs"] == -16, quality
assert "torch" not in sys.modules and "transformers.models.whisper" not in sys.modules
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_demo_volume_runs_every_quality_step_offline(tmp_path: Path) -> None:
    """``--demo`` publishes tiny aligner and recogniser beside the speech model: no hub is ever asked."""
    from demo_model import publish_demo
    from higgs_worker.pipeline import Pipeline

    volume = tmp_path / "volume"
    volume.mkdir()
    settings = load_settings({"RUNPOD_VOLUME_PATH": str(volume), "DEMO_MODEL": "true"})
    publish_demo(settings)
    job = {"transcript": TEXT, "max_new_tokens": 40, "seed": 5, "timestamps": "word", "captions": "vtt"}
    job |= {"verify": True, "max_attempts": 2, "loudness_lufs": -18.0, "trim_silence": True}
    pipeline = Pipeline(settings)
    output = pipeline.run("demo", job)
    stored = pipeline.quality.models.stored
    assert {role: repo.source for role, repo in stored.items()} == {"aligner": "store", "recogniser": "store"}
    assert all(repo.commit == "local-build" for repo in stored.values())  # nothing came from a hub
    assert [w["word"] for w in output["words"]] == WORDS
    assert output["captions"].startswith("WEBVTT")
    assert 1 <= output["verification"]["attempts"] <= 2
    assert {"finish", "align", "verify"} <= set(output["timings_ms"])
