"""The speech engine on transformers' real Higgs Audio V2 classes with a tiny random checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from boson_multimodal.engine import HiggsAudioEngine, SamplingConfig, SpeechRequest, batchable
from boson_multimodal.loading import ModelLoadError, load_model
from boson_multimodal.prompt import Voice

HOP = 960


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> HiggsAudioEngine:
    return HiggsAudioEngine.load(tiny_checkpoint.model_dir, tiny_checkpoint.codec_dir, device="cpu")


def sine(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_loads_on_cpu_in_float32_with_repetition_aware_sampling(tiny_checkpoint) -> None:
    loaded = load_model(tiny_checkpoint.model_dir, tiny_checkpoint.codec_dir, device="cpu")
    assert loaded.dtype.is_floating_point and str(loaded.dtype) == "torch.float32"
    assert loaded.sample_rate == 24000 and loaded.frame_rate == 25 and loaded.num_codebooks == 8
    assert loaded.model.generation_config.ras_win_len == 7
    assert loaded.model.generation_config.ras_win_max_num_repeat == 2


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


def test_batches_of_compatible_requests(engine: HiggsAudioEngine) -> None:
    sampling = SamplingConfig(max_new_tokens=20)
    requests = [
        SpeechRequest("One.", sampling=sampling),
        SpeechRequest("A longer second one.", sampling=sampling),
    ]
    assert batchable(requests)
    assert [s.num_frames for s in engine.generate_batch(requests)] == [12, 12]


def test_unbatchable_mixes_are_refused(engine: HiggsAudioEngine) -> None:
    voice = Voice(sine(1.0, 24000), 24000, "ref")
    sampling = SamplingConfig(max_new_tokens=20)
    mixed = [SpeechRequest("a", sampling=sampling), SpeechRequest("b", voices=(voice,), sampling=sampling)]
    seeded = [
        SpeechRequest("a", sampling=SamplingConfig(seed=1)),
        SpeechRequest("b", sampling=SamplingConfig(seed=1)),
    ]
    assert not batchable(mixed) and not batchable(seeded)
    with pytest.raises(ValueError, match="cannot share one batch"):
        engine.generate_batch(mixed)


def test_rows_tap_sees_every_generated_row(engine: HiggsAudioEngine) -> None:
    seen: list[int] = []
    speech = engine.generate(
        SpeechRequest("Tap.", sampling=SamplingConfig(max_new_tokens=20, temperature=0)),
        on_rows=lambda rows: seen.append(rows.shape[1]),
    )
    # One row more per decode step, one step late: the last row only exists in generate()'s return value.
    assert seen == list(range(1, len(seen) + 1))
    rows_generated = speech.num_frames + 8 + (1 if speech.finished else 0)
    assert len(seen) == min(rows_generated, 20) - 1
