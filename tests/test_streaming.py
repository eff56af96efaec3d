"""Streaming: chunked decoding with overlap equals the one-shot decode; cancel and errors cross the thread."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from boson_multimodal.codes import decode_frames
from boson_multimodal.engine import (
    GenerationCancelled,
    HiggsAudioEngine,
    SamplingConfig,
    Speech,
    SpeechRequest,
)
from boson_multimodal.scheduler import SequenceHandle
from boson_multimodal.streaming import AudioChunk, ChunkSchedule, decoder_reach, stream_speech
from tests.support.engine_spy import record_submissions

HOP = 960


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> HiggsAudioEngine:
    return HiggsAudioEngine.load(tiny_checkpoint.model_dir, tiny_checkpoint.codec_dir, device="cpu")


def full_length_clip(engine: HiggsAudioEngine, steps: int) -> tuple[SpeechRequest, Speech]:
    """A seeded request and its one-shot speech that runs all ``steps`` (not ended early by the model).

    A random model may end a clip after a few frames, and the tiny checkpoint's token ids change from one
    process to the next; a few seeds make sure the stream has something to chunk.
    """
    for seed in range(8):
        request = SpeechRequest("Streaming is fun.", sampling=SamplingConfig(max_new_tokens=steps, seed=seed))
        speech = engine.generate(request)
        if not speech.finished:
            return request, speech
    raise AssertionError("every seed ended the clip early")


def joined(chunks: list[AudioChunk]) -> np.ndarray:
    return np.concatenate([chunk.waveform for chunk in chunks])


def test_schedule_starts_small_and_grows_to_its_cap() -> None:
    sizes = ChunkSchedule(first_frames=12, growth=2, max_frames=100).sizes()
    assert [next(sizes) for _ in range(6)] == [12, 24, 48, 96, 100, 100]
    sizes = ChunkSchedule(first_frames=5, growth=1.5, max_frames=9).sizes()
    assert [next(sizes) for _ in range(4)] == [5, 7, 9, 9]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"first_frames": 0}, "first_frames must be at least 1, got 0"),
        ({"first_frames": 20, "max_frames": 10}, r"max_frames must be at least first_frames \(20\), got 10"),
        ({"growth": 0.5}, "growth must be at least 1, got 0.5"),
        ({"growth": float("nan")}, "growth must be at least 1, got nan"),
        ({"lookahead_frames": -1}, "lookahead_frames must be 0 or more"),
    ],
)
def test_schedule_refuses_bad_values(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ChunkSchedule(**fields)


def test_decoder_reach_bounds_the_measured_receptive_field(engine: HiggsAudioEngine) -> None:
    """Change one frame: the decoded audio moves only within ``reach`` frames of it, and nearly that far."""
    reach = decoder_reach(engine.codec)
    assert reach == 12  # DAC upsampling 8·5·4·2·3, kernel 7, dilations 1/3/9 — the same as the real codec
    torch.manual_seed(0)
    frames = torch.randint(0, 1024, (2 * reach + 9, 8))
    changed = frames.clone()
    middle = reach + 4
    changed[middle] = (changed[middle] + 511) % 1024
    moved = np.nonzero((decode_frames(engine.codec, frames) - decode_frames(engine.codec, changed)).numpy())[
        0
    ]
    first_moved, last_moved = moved.min() // HOP, moved.max() // HOP
    assert middle - reach <= first_moved and last_moved <= middle + reach
    assert first_moved <= middle - reach + 4 and last_moved >= middle + reach - 4  # the bound is not loose


def test_stream_equals_the_one_shot_generation(engine: HiggsAudioEngine) -> None:
    request, speech = full_length_clip(engine, steps=50)
    schedule = ChunkSchedule(first_frames=4, growth=2, max_frames=12)
    chunks = list(stream_speech(engine, request, schedule))

    assert speech.num_frames == 50 - 8
    assert [c.num_frames for c in chunks] == [4, 8, 12, 12, 6]  # the schedule; the last takes the rest
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert [c.final for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert [c.start_frame for c in chunks] == [0, 4, 12, 24, 36] and chunks[1].start_s == 4 / 25
    assert all(c.waveform.dtype == np.float32 and c.waveform.shape == (c.num_frames * HOP,) for c in chunks)
    assert chunks[-1].end_frame == speech.num_frames
    assert not any(c.finished for c in chunks)  # the clip ran out of steps, like the one-shot one

    audio = joined(chunks)
    assert audio.shape == speech.waveform.shape
    peak = np.abs(speech.waveform).max()
    assert peak > 0 and np.abs(audio - speech.waveform).max() < 1e-4 * peak  # measured ≈ 1e-6


def test_shorter_lookahead_stays_close_to_the_one_shot_decode(engine: HiggsAudioEngine) -> None:
    request, speech = full_length_clip(engine, steps=40)
    schedule = ChunkSchedule(first_frames=4, lookahead_frames=4)
    audio = joined(list(stream_speech(engine, request, schedule)))
    assert audio.shape == speech.waveform.shape
    snr_db = 10 * np.log10(np.sum(speech.waveform**2) / np.sum((audio - speech.waveform) ** 2))
    assert snr_db > 40  # the full left context does most of the work


def test_a_clip_without_frames_is_one_empty_final_chunk(engine: HiggsAudioEngine) -> None:
    request = SpeechRequest("None.", sampling=SamplingConfig(max_new_tokens=8))
    [chunk] = stream_speech(engine, request)  # the opening row and the codebook delay: no whole frame
    assert chunk.final and chunk.num_frames == 0 and chunk.waveform.shape == (0,)


def test_closing_the_stream_cancels_the_generation(
    engine: HiggsAudioEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    handles = record_submissions(engine, monkeypatch)
    schedule = ChunkSchedule(first_frames=2, lookahead_frames=0)
    stream = stream_speech(
        engine, SpeechRequest("Long.", sampling=SamplingConfig(max_new_tokens=3000)), schedule
    )
    assert not next(stream).final  # the demo model never ends a clip before max_new_tokens
    stream.close()
    [handle] = handles
    with pytest.raises(GenerationCancelled):
        handle.result(timeout=60)  # stopped at its next step, not after 3000 steps
    assert engine.generate(SpeechRequest("Free.", sampling=SamplingConfig(max_new_tokens=9))).num_frames == 1


def test_generation_errors_reach_the_consumer_as_they_are(engine: HiggsAudioEngine) -> None:
    """A request the engine refuses fails the stream with the same error a one-shot call gets."""
    request = SpeechRequest("Zero.", sampling=SamplingConfig(max_new_tokens=0))
    with pytest.raises(ValueError) as direct:
        engine.generate(request)
    with pytest.raises(ValueError) as streamed:
        next(stream_speech(engine, request))
    assert str(streamed.value) == str(direct.value) == "max_new_tokens must be at least 1, got 0"


def one_shot_frames(rows: torch.Tensor, bos: int, eos: int, codebook_size: int) -> torch.Tensor:
    """The definition, written out: the stream after the last all-BOS row, up to the first all-EOS row, with
    codebook k taken k rows later."""
    bos_rows = [i for i in range(rows.shape[0]) if bool((rows[i] == bos).all())]
    stream = rows[(bos_rows[-1] + 1 if bos_rows else 0) :]
    eos_rows = [i for i in range(stream.shape[0]) if bool((stream[i] == eos).all())]
    stream = stream[: eos_rows[0]] if eos_rows else stream
    k = rows.shape[1]
    count = max(stream.shape[0] - k + 1, 0)
    return (
        torch.tensor([[int(stream[t + j, j]) for j in range(k)] for t in range(count)])
        .view(count, k)
        .clamp(0, codebook_size - 1)
    )


@pytest.mark.parametrize("ends", [False, True])
def test_frames_made_incrementally_equal_the_whole_clip_at_once(engine: HiggsAudioEngine, ends: bool) -> None:
    """Fed in uneven pieces, and reading none of the rows it has already turned into frames."""
    config = engine._loaded.model.config
    bos, eos, k = config.audio_stream_bos_id, config.audio_stream_eos_id, config.num_codebooks
    generator = torch.Generator().manual_seed(int(ends))
    rows = torch.randint(0, bos, (300, k), generator=generator)
    rows[0] = bos
    for j in range(k):  # the delay pattern's opening and (optionally) closing rows
        rows[1 : j + 1, j] = bos
        if ends:
            rows[250 - k + j + 1 :, j] = eos
    expected = one_shot_frames(rows, bos, eos, engine.codec.config.codebook_size)
    stream, fed = engine.frame_stream(), 0
    for piece in (1, 1, 5, 7, 30, 1, 100, 155):
        growing = rows[: fed + piece].clone()
        growing[: max(fed - k, 0)] = -7  # rows whose frames are made: never read again
        stream.update(growing)
        fed += piece
        assert torch.equal(stream.frames, expected[: stream.frames.shape[0]])
    assert torch.equal(stream.frames, expected) and stream.finished == ends
    assert expected.shape[0] == (250 - k if ends else 300 - k)
    assert torch.equal(engine.to_codes(rows).frames, expected)


def test_the_consumer_wakes_once_per_chunk_not_at_every_step(engine: HiggsAudioEngine, monkeypatch) -> None:
    waits: list[int] = []
    wait_rows = SequenceHandle.wait_rows

    def counting(self, count: int):
        waits.append(count)
        return wait_rows(self, count)

    monkeypatch.setattr(SequenceHandle, "wait_rows", counting)
    request, _ = full_length_clip(engine, steps=120)
    chunks = list(stream_speech(engine, request, ChunkSchedule(first_frames=10, growth=1.0, max_frames=10)))
    assert len(chunks) >= 10  # 112 frames in chunks of 10
    assert 1 <= len(waits) <= len(chunks) + 1  # the steps were 120
