"""Voice prompts of every shape the upstream examples come in, made here by espeak-ng, torchaudio, soundfile.

The upstream voice prompts are 16-bit WAV files at 22.05, 24, 44.1 and 48 kHz, mono and stereo, 6 to 28 s
long. They are recordings of people, so they are not vendored; speech of the same shapes is made instead,
sent as a job would send it (a data URI), and cloned by the demo model.
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from boson_multimodal.engine import HiggsAudioEngine, SamplingConfig, SpeechRequest
from boson_multimodal.prompt import Voice
from higgs_worker.settings import load_settings
from higgs_worker.voices.resolve import ReferenceAudio, resolve_reference
from tests.support.speech import make_voice

SHAPES = [  # (sample rate, channels, seconds)
    (22_050, 1, 6.0),
    (22_050, 2, 28.0),
    (24_000, 1, 12.5),
    (24_000, 2, 7.0),
    (44_100, 1, 20.0),
    (44_100, 2, 9.5),
    (48_000, 1, 27.0),
    (48_000, 2, 15.0),
]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> HiggsAudioEngine:
    return HiggsAudioEngine.load(tiny_checkpoint.model_dir, tiny_checkpoint.codec_dir, device="cpu")


@pytest.mark.parametrize(("rate", "channels", "seconds"), SHAPES)
def test_voice_prompt_shape_is_read_and_cloned(
    rate: int, channels: int, seconds: float, tmp_path: Path, engine: HiggsAudioEngine
) -> None:
    wav = make_voice(tmp_path / "voice.wav", rate, channels, seconds)
    info = sf.info(wav)
    assert (info.samplerate, info.channels, info.subtype) == (rate, channels, "PCM_16")
    assert info.duration == pytest.approx(seconds, abs=0.01)

    settings = load_settings({"RUNPOD_VOLUME_PATH": str(tmp_path / "volume")})
    uri = "data:audio/wav;base64," + base64.b64encode(wav.read_bytes()).decode()
    reference = resolve_reference(uri, "Spoken words.", field="ref_audio", settings=settings)
    assert isinstance(reference, ReferenceAudio)
    assert reference.sample_rate == rate and reference.waveform.ndim == 1  # mixed to mono, native rate
    assert reference.waveform.shape[0] / rate == pytest.approx(seconds, abs=0.01)
    assert np.abs(reference.waveform).max() > 0.05  # speech, not silence

    voice = Voice(reference.waveform, reference.sample_rate, reference.text)
    speech = engine.generate(
        SpeechRequest("Hello there.", voices=(voice,), sampling=SamplingConfig(max_new_tokens=16, seed=1))
    )
    assert speech.num_frames > 0 and speech.sample_rate == 24_000
