"""The speech engine on transformers' real Higgs Audio V2 classes with a tiny random checkpoint."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from boson_multimodal.engine import HiggsAudioEngine, SamplingConfig, SpeechRequest
from boson_multimodal.loading import ModelLoadError, load_model
from boson_multimodal.prompt import Voice

HOP = 960


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> HiggsAudioEngine:
    return HiggsAudioEngine.load(tiny_checkpoint.model_dir, tiny_checkpoint.codec_dir, device="cpu")


def sine(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_loads_on_cpu_in_float32_with_no_sampling_settings_of_its_own(tiny_checkpoint) -> None:
    """The tiny checkpoint saves Boson's RAS window in its generation config; the loaded model must not
    keep it, or transformers would fill a request's "RAS off" (None) with it."""
    loaded = load_model(tiny_checkpoint.model_dir, tiny_checkpoint.codec_dir, device="cpu")
    assert loaded.dtype.is_floating_point and str(loaded.dtype) == "torch.float32"
    assert loaded.sample_rate == 24000 and loaded.frame_rate == 25 and loaded.num_codebooks == 8
    assert loaded.model.generation_config.ras_win_len is None
    assert loaded.model.generation_config.ras_win_max_num_repeat is None
    assert SamplingConfig().ras_window == 7 and SamplingConfig().ras_max_repeat == 2
    assert SamplingConfig().ras_on and not SamplingConfig(temperature=0).ras_on


def test_missing_directory_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(tmp_path / "nope", tmp_path / "nope2", device="cpu")


def test_steps_give_frames_and_a_matching_waveform(engine: HiggsAudioEngine) -> None:
    speech = engine.generate(SpeechRequest("Hello.", sampling=SamplingConfig(max_new_tokens=30, seed=1)))
    assert speech.sample_rate == 24000
    # The opening BOS row and the 7-step codebook delay cost 8 steps, unless the model closed the clip itself.
    assert speech.num_frames == 30 - 8 or (speech.finished and speech.num_frames < 30 - 8)
    assert speech.waveform.dtype == np.float32 and speech.waveform.shape == (speech.num_frames * HOP,)


def test_same_seed_same_audio_other_seed_other_audio(engine: HiggsAudioEngine) -> None:
    def run(seed: int) -> np.ndarray:
        return engine.generate(
            SpeechRequest("Seeded.", sampling=SamplingConfig(max_new_tokens=24, seed=seed))
        ).waveform

    assert np.array_equal(run(5), run(5))
    assert not np.array_equal(run(5), run(6))


def test_greedy_is_deterministic_without_a_seed(engine: HiggsAudioEngine) -> None:
    request = SpeechRequest("Greedy.", sampling=SamplingConfig(temperature=0, max_new_tokens=24))
    assert np.array_equal(engine.generate(request).waveform, engine.generate(request).waveform)


def test_cloning_resamples_the_reference_and_scene_changes_the_prompt(engine: HiggsAudioEngine) -> None:
    voice = Voice(sine(1.5, 16000), 16000, "A reference sentence.")
    plain = SpeechRequest(
        "Target.", voices=(voice,), sampling=SamplingConfig(temperature=0, max_new_tokens=20)
    )
    scened = SpeechRequest(
        "Target.",
        scene="A cathedral.",
        voices=(voice,),
        sampling=SamplingConfig(temperature=0, max_new_tokens=20),
    )
    first, second = engine.generate(plain), engine.generate(scened)
    assert 0 < first.num_frames <= 12 and 0 < second.num_frames <= 12
    assert not np.array_equal(first.waveform, second.waveform)


def test_multi_speaker_with_references(engine: HiggsAudioEngine) -> None:
    voices = (Voice(sine(1.0, 24000), 24000, None), Voice(sine(0.8, 22050), 22050, "Second voice."))
    speech = engine.generate(
        SpeechRequest(
            "[SPEAKER0] One. [SPEAKER1] Two.", voices=voices, sampling=SamplingConfig(max_new_tokens=20)
        )
    )
    assert 0 < speech.num_frames <= 12  # the model may close the clip itself before the step limit
    assert speech.waveform.shape == (speech.num_frames * HOP,)


def test_concurrent_requests_of_every_kind_run_together(engine: HiggsAudioEngine) -> None:
    """Requests with and without references, seeded, greedy and sampled: submitted at once, each gets what
    it would get alone (the deterministic ones to the token)."""
    voice = Voice(sine(1.0, 24000), 24000, "ref")
    requests = [
        SpeechRequest("One.", sampling=SamplingConfig(max_new_tokens=20)),
        SpeechRequest("Two.", voices=(voice,), sampling=SamplingConfig(max_new_tokens=26, seed=4)),
        SpeechRequest("Three.", sampling=SamplingConfig(max_new_tokens=30, temperature=0)),
    ]
    alone = [engine.generate(r) for r in requests[1:]]
    handles = [engine.submit(r) for r in requests]
    together = [engine.decode(engine.to_codes(h.result().rows)) for h in handles]
    assert [s.num_frames for s in together] == [12, 18, 22]
    for got, want in zip(together[1:], alone, strict=True):
        assert np.array_equal(got.waveform, want.waveform)


def test_the_handle_publishes_every_row_as_it_is_made(engine: HiggsAudioEngine) -> None:
    handle = engine.submit(SpeechRequest("Tap.", sampling=SamplingConfig(max_new_tokens=20, temperature=0)))
    seen, version = [], 0
    while True:
        version, rows, result = handle.wait_newer(version)
        if result is not None:
            break
        seen.append(rows.shape[0])
    assert seen == sorted(set(seen)) and seen[-1] <= 20  # growing; a slow reader may skip versions
    assert torch.equal(rows, result.rows)  # the last published rows are the result


def test_reference_audio_is_encoded_on_the_callers_thread_without_autograd(engine: HiggsAudioEngine) -> None:
    """Encoding a reference voice is codec work the scheduler thread must not wait on, and needs no graph."""
    seen: list[tuple[str, bool, bool]] = []

    def record(_module, _inputs, _output) -> None:
        thread = threading.current_thread().name
        seen.append((thread, torch.is_inference_mode_enabled(), torch.is_grad_enabled()))

    hook = engine.codec.acoustic_encoder.register_forward_hook(record)
    try:
        voice = Voice(sine(0.8, 24000), 24000, "A hum.")
        engine.submit(
            SpeechRequest("Like me.", voices=(voice,), sampling=SamplingConfig(max_new_tokens=10))
        ).result()
    finally:
        hook.remove()
    assert seen == [(threading.current_thread().name, True, False)]
