"""A long prompt prefilled in pieces: the one-forward prefill's logits and cache, one piece between two steps
of the running sequences, and the same rows whatever runs beside it."""

from __future__ import annotations

import itertools
import math
import threading
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from boson_multimodal import scheduler as scheduler_module
from boson_multimodal.engine import EngineOptions, HiggsAudioEngine, SpeechRequest
from boson_multimodal.loading import LoadedModel, load_model
from boson_multimodal.prefill import PREFILL_PIECE, PiecewisePrefill
from boson_multimodal.prompt import Voice
from boson_multimodal.scheduler import (
    PREFILL_TOKENS_PER_STEP,
    GenerationCancelled,
    SchedulerLimits,
    SequenceInput,
)
from boson_multimodal.speech_request import SamplingConfig
from boson_multimodal.tiny_model import build_tiny_checkpoint
from tests.support.checkpoints import GEOMETRIES

PIECE = 128  # small pieces, so that a reference clip of a few seconds is several of them


def long_request(seconds: float, sampling: SamplingConfig) -> SpeechRequest:
    waveform = 0.1 * np.random.default_rng(7).standard_normal(int(24000 * seconds)).astype(np.float32)
    voice = Voice(waveform=waveform, sample_rate=24000, transcript="A reference clip.")
    return SpeechRequest("Say it like the reference.", voices=(voice,), sampling=sampling)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The demo geometry, whose clips always run to max_new_tokens: a running sequence stays running."""
    root: Path = tmp_path_factory.mktemp("demo-pieces")
    build_tiny_checkpoint(root / "model", root / "codec", GEOMETRIES["demo"])
    return load_model(root / "model", root / "codec", device="cpu")


@pytest.fixture(scope="module")
def engine(demo: LoadedModel):
    limits = SchedulerLimits(slots=2, max_tokens=2048, prefill_piece=PIECE)
    engine = HiggsAudioEngine(demo, EngineOptions(limits=limits))
    yield engine
    engine.close()


def one_forward(model, sequence: SequenceInput) -> tuple[torch.Tensor, DynamicCache]:
    cache = DynamicCache(config=model.config)
    output = model(
        input_ids=sequence.input_ids,
        attention_mask=sequence.attention_mask,
        audio_input_ids=sequence.audio_input_ids,
        audio_input_ids_mask=sequence.audio_input_ids_mask,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return output.logits[:, -1], cache


def in_pieces(model, sequence: SequenceInput, piece: int) -> tuple[torch.Tensor, DynamicCache, int]:
    prefill = PiecewisePrefill(
        model,
        sequence.input_ids,
        sequence.attention_mask,
        sequence.audio_input_ids,
        sequence.audio_input_ids_mask,
        piece,
    )
    pieces = 1
    while (logits := prefill.step()) is None:
        pieces += 1
    return logits, prefill.cache, pieces


@torch.inference_mode()
def test_pieces_give_the_one_forward_prefill(loaded: LoadedModel) -> None:
    """Pieces that cut the reference audio anywhere give the one-forward prefill's logits and keys and values
    up to float rounding; a prompt that fits one piece gives them exactly (it is the same forward)."""
    encoder = HiggsAudioEngine(loaded, EngineOptions(backend="transformers"))
    try:
        sequence = encoder._sequence_input(long_request(6, SamplingConfig()))
    finally:
        encoder.close()
    length = sequence.prompt_tokens
    assert 2 * PIECE < length < PREFILL_PIECE
    expected, expected_cache = one_forward(loaded.model, sequence)
    for piece in (length, 97, PIECE, 13):
        logits, cache, pieces = in_pieces(loaded.model, sequence, piece)
        assert pieces == math.ceil(length / piece)
        assert cache.get_seq_length() == length
        pairs = list(zip(cache.layers, expected_cache.layers, strict=True))
        if piece == length:
            assert torch.equal(logits, expected)
            assert all(torch.equal(ours.keys, theirs.keys) for ours, theirs in pairs)
            continue
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)
        for ours, theirs in pairs:
            torch.testing.assert_close(ours.keys, theirs.keys, rtol=0, atol=1e-5)
            torch.testing.assert_close(ours.values, theirs.values, rtol=0, atol=1e-5)
    # A piece that feeds the wrong frames would move the logits far more than rounding does.
    shifted = replace(sequence, audio_input_ids=sequence.audio_input_ids.roll(1, dims=1))
    wrong, _, _ = in_pieces(loaded.model, shifted, PIECE)
    assert not torch.allclose(wrong, expected, atol=1e-3)


class RecordingPrefill(PiecewisePrefill):
    """Records the scheduler's step count at each piece, and the length of the prompt it belongs to;
    ``after_first`` is set once the first piece is done; a piece waits for ``hold`` to be set."""

    pieces_at: ClassVar[list[int]] = []
    pieces_of: ClassVar[list[int]] = []
    scheduler = None
    after_first: threading.Event | None = None
    hold: threading.Event | None = None

    def step(self):
        if RecordingPrefill.hold is not None:
            RecordingPrefill.hold.wait(timeout=60)
        RecordingPrefill.pieces_at.append(RecordingPrefill.scheduler.steps)
        RecordingPrefill.pieces_of.append(self.length)
        logits = super().step()
        if RecordingPrefill.after_first is not None:
            RecordingPrefill.after_first.set()
        return logits


def recording_on(engine: HiggsAudioEngine, monkeypatch) -> type[RecordingPrefill]:
    monkeypatch.setattr(scheduler_module, "PiecewisePrefill", RecordingPrefill)
    monkeypatch.setattr(RecordingPrefill, "pieces_at", [])
    monkeypatch.setattr(RecordingPrefill, "pieces_of", [])
    monkeypatch.setattr(RecordingPrefill, "scheduler", engine._runner)
    monkeypatch.setattr(RecordingPrefill, "after_first", None)
    monkeypatch.setattr(RecordingPrefill, "hold", None)
    return RecordingPrefill


@pytest.fixture
def recording(engine: HiggsAudioEngine, monkeypatch) -> type[RecordingPrefill]:
    return recording_on(engine, monkeypatch)


def running_beside(engine: HiggsAudioEngine, steps: int):
    """A sequence that runs for ``steps`` steps, started and producing rows before this returns (the pieces
    recorded so far, its own, are forgotten)."""
    handle = engine.submit(SpeechRequest("Keep talking.", sampling=SamplingConfig(max_new_tokens=steps)))
    handle.wait_newer(0)
    RecordingPrefill.pieces_at.clear()
    RecordingPrefill.pieces_of.clear()
    return handle


def assert_paced(pieces_at: list[int], length: int) -> None:
    """The steps at which a ``length``-token prompt's pieces ran are its pace: each piece after the first a
    step per PREFILL_TOKENS_PER_STEP of its tokens after the one before."""
    sizes = [min(PIECE, length - start) for start in range(0, length, PIECE)]
    paid = [math.ceil(size / PREFILL_TOKENS_PER_STEP) for size in sizes[1:]]
    assert [later - earlier for earlier, later in itertools.pairwise(pieces_at)] == paid, (pieces_at, sizes)


def test_a_long_prompt_beside_running_sequences_prefills_paced_pieces(engine, recording) -> None:
    """One piece between two steps at most, and a piece after the first only once the running sequence has
    taken a step per PREFILL_TOKENS_PER_STEP of its tokens: the prefill is spread, not run in one go."""
    sampling = SamplingConfig(temperature=0, max_new_tokens=30)
    sequence = engine._sequence_input(long_request(6, sampling))
    running = running_beside(engine, 1500)
    admitted = engine._runner.submit(sequence)
    admitted.result(timeout=120)
    running.cancel()
    length, pieces = sequence.prompt_tokens, recording.pieces_at
    assert len(pieces) == math.ceil(length / PIECE) >= 3
    assert_paced(pieces, length)


def test_a_long_prompt_draws_the_same_rows_alone_and_beside_others(engine, recording) -> None:
    """Its pieces fall where its own length puts them, so a seeded long prompt draws the same rows whether it
    is prefilled at once (nothing else running) or a piece per step beside other sequences."""
    request = long_request(6, SamplingConfig(seed=11, max_new_tokens=40))
    alone = engine.submit(request).result(timeout=120).rows
    assert len(recording.pieces_at) > 2 and len(set(recording.pieces_at)) == 1  # all before one step
    running = running_beside(engine, 1500)
    beside = engine.submit(request).result(timeout=120).rows
    running.cancel()
    assert len(set(recording.pieces_at)) == len(recording.pieces_at) > 2  # spread over steps this time
    assert torch.equal(alone, beside)


def test_a_prompt_cancelled_between_its_pieces_frees_its_slot(engine, recording) -> None:
    sequence = engine._sequence_input(long_request(6, SamplingConfig(max_new_tokens=20)))  # encoded first
    running = running_beside(engine, 1500)
    cancel = threading.Event()
    recording.after_first = cancel  # the consumer goes away once the first piece is in
    cancelled = engine._runner.submit(sequence, cancel)
    with pytest.raises(GenerationCancelled):
        cancelled.result(timeout=120)
    assert 1 <= len(recording.pieces_at) < math.ceil(sequence.prompt_tokens / PIECE)
    recording.after_first = None
    # its slot is free again: the next prompt is admitted beside the running sequence (2 slots)
    nxt = engine.submit(SpeechRequest("Next one.", sampling=SamplingConfig(max_new_tokens=10)))
    assert nxt.result(timeout=120).rows.shape[0] == 10
    running.cancel()


def test_a_short_prompt_is_admitted_while_a_long_one_waits_for_its_next_piece(demo, monkeypatch) -> None:
    """A one-piece prompt arriving behind a long one joins in the gap before the long one's next piece: it
    does not wait for all of them, and the long one's pieces keep their pace; still one piece at most
    between two steps of the running sequence."""
    engine = HiggsAudioEngine(demo, EngineOptions(limits=SchedulerLimits(slots=3, prefill_piece=PIECE)))
    try:
        recording_on(engine, monkeypatch)
        greedy = SamplingConfig(temperature=0, max_new_tokens=30)
        long = engine._sequence_input(long_request(6, greedy))
        short = engine._sequence_input(SpeechRequest("A short one.", sampling=greedy))
        assert short.prompt_tokens <= PIECE < long.prompt_tokens
        running = running_beside(engine, 1500)
        RecordingPrefill.hold = threading.Event()  # the long one's first piece waits until both are sent
        handles = {"long": engine._runner.submit(long), "short": engine._runner.submit(short)}
        RecordingPrefill.hold.set()
        for handle in handles.values():
            handle.result(timeout=120)
        running.cancel()
        pieces, owners = RecordingPrefill.pieces_at, RecordingPrefill.pieces_of
        long_pieces = math.ceil(long.prompt_tokens / PIECE)
        assert long_pieces >= 3
        # the long one's first piece, the short one whole, then the long one's others
        assert owners == [long.prompt_tokens, short.prompt_tokens] + [long.prompt_tokens] * (long_pieces - 1)
        assert len(set(pieces)) == len(pieces)  # one piece per gap between two steps
        assert_paced([pieces[0], *pieces[2:]], long.prompt_tokens)
        # the short one's rows are its rows alone
        alone = engine._runner.submit(short).result(timeout=120).rows
        assert torch.equal(handles["short"].result().rows, alone)
    finally:
        engine.close()


def test_a_short_prompt_behind_a_second_long_one_and_a_cancelled_one_behind_another(demo) -> None:
    """Taking a prompt from the middle of the waiting ones (a short one behind a second long one, or a
    cancelled one behind another) leaves the others waiting and the thread serving."""
    engine = HiggsAudioEngine(demo, EngineOptions(limits=SchedulerLimits(slots=4, prefill_piece=PIECE)))
    try:
        greedy = SamplingConfig(temperature=0, max_new_tokens=20)
        long, second = (engine._sequence_input(long_request(seconds, greedy)) for seconds in (6, 5))
        short, behind = (
            engine._sequence_input(SpeechRequest(text, sampling=greedy)) for text in ("Short.", "Behind.")
        )
        running = running_beside(engine, 1500)
        cancel = threading.Event()
        handles = [engine._runner.submit(sequence) for sequence in (long, second, short)]
        cancelled = engine._runner.submit(behind, cancel)
        cancel.set()
        for handle in handles:
            assert handle.result(timeout=120).rows.shape[0] == 20
        with pytest.raises(GenerationCancelled):
            cancelled.result(timeout=120)
        running.cancel()
        assert engine.submit(SpeechRequest("Still serving.", sampling=greedy)).result(timeout=120)
    finally:
        engine.close()
