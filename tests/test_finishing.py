"""Finishing: loudness to a target and silence trimmed at the ends, on real speech and through the pipeline.

Loudness is checked with the independent BS.1770 meter in tests/loudness_reference.py, not with the
torchaudio function the worker uses; speech onsets with a plain amplitude detector, not the trimmer's rule.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as audio_functional

from higgs_worker.job.schema import RequestError
from higgs_worker.pipeline import Pipeline
from higgs_worker.quality.finishing import (
    PEAK_CEILING,
    TRIM_MARGIN_S,
    Finishing,
    SilenceTrimmer,
    StreamFinisher,
    finish,
    limit_peaks,
    trim_silence,
)
from higgs_worker.settings import load_settings
from tests.support.checkpoints import complete_store
from tests.support.hub_server import HubServer
from tests.support.loudness_reference import integrated_loudness
from tests.support.speech import speak

RATE = 24_000


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """Two sentences of espeak-ng speech at the engine's 24 kHz."""
    path = speak(
        "Finishing makes every clip sound alike. The quick brown fox jumps over the lazy dog.",
        tmp_path_factory.mktemp("finishing") / "speech.wav",
    )
    audio, rate = sf.read(path, dtype="float32")
    resampled = audio_functional.resample(torch.from_numpy(audio), rate, RATE).numpy()
    return resampled.astype(np.float32)


def onset_and_offset(waveform: np.ndarray, threshold: float = 0.005) -> tuple[float, float]:
    """Seconds to the first and from the last sample above ``threshold`` (an amplitude detector)."""
    loud = np.flatnonzero(np.abs(waveform) > threshold)
    return loud[0] / RATE, (len(waveform) - 1 - loud[-1]) / RATE


@pytest.mark.parametrize("target", [-30.0, -23.0, -16.0, -12.0])
def test_loudness_reaches_its_target_with_the_peak_limited(speech: np.ndarray, target: float) -> None:
    before = integrated_loudness(speech, RATE)
    out = finish(speech, RATE, Finishing(loudness_lufs=target))
    assert abs(before - target) > 2  # the test asks for a real change
    assert integrated_loudness(out, RATE) == pytest.approx(target, abs=0.5)
    assert float(np.max(np.abs(out))) <= PEAK_CEILING
    assert len(out) == len(speech)


def test_the_limiter_keeps_the_peak_and_leaves_quiet_audio_alone(speech: np.ndarray) -> None:
    loud = speech * 4  # peaks far over full scale
    limited = limit_peaks(loud, RATE)
    assert float(np.max(np.abs(limited))) <= PEAK_CEILING
    quiet = speech * 0.5
    assert np.array_equal(limit_peaks(quiet, RATE), quiet)
    # samples far from any peak pass through untouched
    far = np.abs(loud) < 0.1 * PEAK_CEILING
    assert np.mean(limited[far] == loud[far]) > 0.2


def test_silence_cannot_be_made_louder() -> None:
    silence = np.zeros(RATE, dtype=np.float32)
    assert np.array_equal(finish(silence, RATE, Finishing(loudness_lufs=-16.0)), silence)


@pytest.mark.parametrize("noise_dbfs", [None, -65.0])
def test_trimming_removes_added_silence_to_the_margin(speech: np.ndarray, noise_dbfs: float | None) -> None:
    rng = np.random.default_rng(0)
    lead, tail = np.zeros(int(1.3 * RATE), np.float32), np.zeros(int(0.9 * RATE), np.float32)
    if noise_dbfs is not None:  # a noise floor, as generated audio has, rather than digital silence
        lead += rng.standard_normal(len(lead)).astype(np.float32) * 10 ** (noise_dbfs / 20)
        tail += rng.standard_normal(len(tail)).astype(np.float32) * 10 ** (noise_dbfs / 20)
    padded = np.concatenate([lead, speech, tail])
    trimmed = trim_silence(padded, RATE)
    onset, offset = onset_and_offset(trimmed)
    # the silence before and after the words, added and espeak's own, is now the margin, within 20 ms
    assert onset == pytest.approx(TRIM_MARGIN_S, abs=0.02)
    assert offset == pytest.approx(TRIM_MARGIN_S, abs=0.02)
    assert len(padded) - len(trimmed) > 2.0 * RATE


def test_a_trimmed_stream_is_the_trimmed_clip_however_it_is_chunked(speech: np.ndarray) -> None:
    padded = np.concatenate([np.zeros(RATE // 2, np.float32), speech, np.zeros(RATE, np.float32)])
    whole = trim_silence(padded, RATE)
    for size in (480, 1001, 24_000):
        trimmer = SilenceTrimmer(RATE)
        parts = [trimmer.feed(padded[i : i + size]) for i in range(0, len(padded), size)]
        assert np.array_equal(np.concatenate([*parts, trimmer.close()]), whole)


def test_a_clip_without_sound_is_left_as_it_is() -> None:
    silence = np.zeros(RATE, dtype=np.float32)
    assert np.array_equal(trim_silence(silence, RATE), silence)


def test_a_stream_gets_the_gain_of_its_start_and_the_peak_limit(speech: np.ndarray) -> None:
    finisher = StreamFinisher(RATE, Finishing(loudness_lufs=-16.0, trim_silence=True))
    parts = [finisher.feed(speech[i : i + 4800]) for i in range(0, len(speech), 4800)]
    assert not parts[0].size  # 0.2 s is held: the gain needs 0.4 s to measure
    out = np.concatenate([*parts, finisher.close()])
    assert float(np.max(np.abs(out))) <= PEAK_CEILING
    assert integrated_loudness(out, RATE) == pytest.approx(-16.0, abs=3)  # the start is typical of it


# -- through the pipeline, with the tiny model -----------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(hub: HubServer, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    volume = tmp_path_factory.mktemp("finishing-pipeline") / "volume"
    settings = load_settings({"RUNPOD_VOLUME_PATH": str(volume), "RESULT_CACHE": "false"})
    complete_store(settings, hub.url)
    return Pipeline(settings)


def decoded(output: dict) -> np.ndarray:
    audio, rate = sf.read(io.BytesIO(base64.b64decode(output["audio_base64"])), dtype="float32")
    assert rate == RATE
    return audio


def test_a_job_is_finished_before_encoding(pipeline: Pipeline) -> None:
    job = {"transcript": "Louder, please.", "max_new_tokens": 60, "seed": 3}
    plain = decoded(pipeline.run("plain", job))
    output = pipeline.run("finished", job | {"loudness_lufs": -14.0, "trim_silence": True})
    audio = decoded(output)
    assert abs(integrated_loudness(plain, RATE) + 14.0) > 2
    assert integrated_loudness(audio, RATE) == pytest.approx(-14.0, abs=0.5)
    assert float(np.max(np.abs(audio))) <= PEAK_CEILING + 1 / 32768  # 16-bit WAV rounding
    assert "finish" in output["timings_ms"]


def test_a_stream_is_finished_chunk_by_chunk(pipeline: Pipeline) -> None:
    job = {"transcript": "Streamed and levelled.", "max_new_tokens": 60, "seed": 5, "loudness_lufs": -20.0}
    items = list(pipeline.stream("stream", job))
    audio = np.concatenate([decoded(item) for item in items if "audio_base64" in item])
    starts = [item["start_s"] for item in items]
    assert [item["index"] for item in items] == list(range(len(items)))
    assert starts == sorted(starts)
    assert float(np.max(np.abs(audio))) <= PEAK_CEILING + 1 / 32768
    assert integrated_loudness(audio, RATE) == pytest.approx(-20.0, abs=3)


@pytest.mark.parametrize(
    ("field", "value", "clause"),
    [
        ("loudness_lufs", -80, "loudness_lufs: Input should be greater than or equal to -70"),
        ("loudness_lufs", 0, "loudness_lufs: Input should be less than or equal to -5"),
        ("loudness_lufs", "-16", "loudness_lufs: Input should be a valid number"),
        ("trim_silence", "yes", "trim_silence: Input should be a valid boolean"),
    ],
)
def test_bad_finishing_fields_are_named(pipeline: Pipeline, field: str, value: object, clause: str) -> None:
    with pytest.raises(RequestError, match=clause):
        pipeline.validate({"transcript": "x", field: value})
