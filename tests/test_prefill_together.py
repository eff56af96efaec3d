"""One-piece prompts waiting in the same step prefilled in one forward (``prefill_together``): the rows each
would have alone, the stall bound beside running sequences, and a bad prompt that fails only itself.

Prompts are made to wait together by holding a first prompt's prefill until the others are submitted. One
forward beside others moves a prompt's logits by rounding only (checked directly below), which on this CPU
changes none of these prompts' tokens, so their rows are compared exactly with their rows prefilled alone.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from boson_multimodal import scheduler as scheduler_module
from boson_multimodal.engine import EngineOptions, HiggsAudioEngine, SpeechRequest
from boson_multimodal.loading import LoadedModel, load_model
from boson_multimodal.prefill import PiecewisePrefill, prefill_together
from boson_multimodal.prompt import Voice
from boson_multimodal.scheduler import SchedulerLimits, SequenceInput
from boson_multimodal.speech_request import SamplingConfig
from boson_multimodal.tiny_model import build_tiny_checkpoint
from tests.support.checkpoints import GEOMETRIES

GREEDY = SamplingConfig(temperature=0, max_new_tokens=24)


def voice(seconds: float, hz: float) -> Voice:
    t = np.arange(int(seconds * 16000)) / 16000
    return Voice((0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), 16000, "A hum.")


REQUESTS = [
    SpeechRequest("Hello there, this is a test.", sampling=GREEDY),
    SpeechRequest("Say it like me.", voices=(voice(1.2, 220.0),), sampling=GREEDY),
    SpeechRequest("A seeded one, drawn.", sampling=SamplingConfig(seed=5, max_new_tokens=20)),
    SpeechRequest(
        "Quiet now.", scene="Audio is recorded in a hall.", voices=(voice(0.8, 330.0),), sampling=GREEDY
    ),
]


class Spy:
    """Records every prefill forward in order: whether shared, the scheduler's step count, the lengths of its
    prompts; the first prompt prefilled alone (the blocker) waits for ``hold``."""

    def __init__(self, engine: HiggsAudioEngine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.forwards: list[tuple[bool, int, list[int]]] = []
        self.hold = threading.Event()
        self.held = threading.Event()
        scheduler = engine._runner
        original = scheduler_module.prefill_together
        spy = self

        def together(model, prompts, device):
            spy.forwards.append((True, scheduler.steps, [int(ids.shape[1]) for ids, _, _ in prompts]))
            return original(model, prompts, device)

        class Held(PiecewisePrefill):
            def step(self):
                if not spy.held.is_set():
                    spy.held.set()
                    assert spy.hold.wait(timeout=60), "the test never let the held prefill go"
                spy.forwards.append((False, scheduler.steps, [self.length]))
                return super().step()

        monkeypatch.setattr(scheduler_module, "prefill_together", together)
        monkeypatch.setattr(scheduler_module, "PiecewisePrefill", Held)

    def holding(self) -> None:
        assert self.held.wait(timeout=60)

    def after_blocker(self) -> list[tuple[bool, int, list[int]]]:
        assert not self.forwards[0][0]
        return self.forwards[1:]


def engine_with(loaded: LoadedModel, slots: int, together: bool) -> HiggsAudioEngine:
    limits = SchedulerLimits(slots=slots, max_tokens=1024)
    return HiggsAudioEngine(loaded, EngineOptions(limits=limits, prefill_together=together))


def alone_rows(loaded: LoadedModel, sequences: list[SequenceInput]) -> list[torch.Tensor]:
    engine = engine_with(loaded, 1, together=False)
    try:
        return [engine._runner.submit(sequence).result(timeout=120).rows for sequence in sequences]
    finally:
        engine.close()


def test_off_on_a_cpu_unless_asked(loaded: LoadedModel) -> None:
    for together, expected in ((None, False), (True, True)):
        engine = HiggsAudioEngine(loaded, EngineOptions(prefill_together=together))
        try:
            assert engine._runner.prefill_together is expected
        finally:
            engine.close()


def burst_while_idle(
    engine: HiggsAudioEngine, spy: Spy, sequences: list[SequenceInput]
) -> list[scheduler_module.SequenceHandle]:
    """``sequences`` submitted while a blocker's prefill is held; the blocker is cancelled, so nothing runs
    when the scheduler takes them, all in the same step."""
    cancel = threading.Event()
    blocker = engine.submit(SpeechRequest("Wait.", sampling=GREEDY), cancel)
    spy.holding()
    handles = [engine._runner.submit(sequence) for sequence in sequences]
    cancel.set()  # once its prefill is let go, the blocker leaves: nothing runs when the others are taken
    spy.hold.set()
    with pytest.raises(scheduler_module.GenerationCancelled):
        blocker.result(timeout=60)
    return handles


def requests_burst(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch, slots: int, together: bool
) -> tuple[list[int], list[tuple[bool, int, list[int]]]]:
    """REQUESTS in one burst while idle: their prompt lengths and the prefill forwards after the blocker's;
    each got the rows it gets prefilled alone."""
    engine = engine_with(loaded, slots, together=together)
    try:
        spy = Spy(engine, monkeypatch)
        sequences = [engine._sequence_input(request) for request in REQUESTS]
        got = [handle.result(timeout=120).rows for handle in burst_while_idle(engine, spy, sequences)]
    finally:
        engine.close()
    forwards = spy.after_blocker()  # before the prefills alone below add theirs
    for ours, theirs in zip(got, alone_rows(loaded, sequences), strict=True):
        assert torch.equal(ours, theirs)
    return [sequence.prompt_tokens for sequence in sequences], forwards


@pytest.mark.parametrize("together", [True, False])
def test_prompts_waiting_together_share_one_forward_and_keep_their_rows(loaded, monkeypatch, together):
    """Nothing runs: every waiting one-piece prompt, with and without reference audio, greedy and seeded, in
    one forward; each gets the rows it gets prefilled alone. Off (the CPU default): each prefilled alone."""
    lengths, forwards = requests_burst(loaded, monkeypatch, 5, together)
    if together:
        assert forwards == [(True, 0, lengths)]
    else:
        assert forwards == [(False, 0, [length]) for length in lengths]


def test_a_shared_forward_takes_no_more_prompts_than_free_slots(loaded, monkeypatch) -> None:
    """Four waiting, three slots: three share a forward, the fourth waits for a slot and comes alone."""
    lengths, forwards = requests_burst(loaded, monkeypatch, 3, together=True)
    assert [(shared, group) for shared, _, group in forwards] == [(True, lengths[:3]), (False, lengths[3:])]


def test_a_prompt_that_fails_to_join_after_a_shared_forward_fails_alone(loaded, monkeypatch) -> None:
    """The shared forward ran, and one of its prompts fails as it takes its slot (its sampling state, here):
    that one fails its own job, the others join, and the slot it held serves the next prompt."""
    engine = engine_with(loaded, 3, together=True)
    try:
        spy = Spy(engine, monkeypatch)
        sampler = engine._runner._sampler
        admit = sampler.admit

        def failing_admit(slot, config, prompt_ids, prompt_audio_rows):
            if config.seed == 666:
                raise RuntimeError("this prompt's sampling state cannot be written")
            admit(slot, config, prompt_ids, prompt_audio_rows)

        monkeypatch.setattr(sampler, "admit", failing_admit)
        sequences = [engine._sequence_input(request) for request in REQUESTS[:3]]
        sequences[1] = replace(sequences[1], sampling=replace(sequences[1].sampling, seed=666))
        handles = burst_while_idle(engine, spy, sequences)
        with pytest.raises(RuntimeError, match="cannot be written"):
            handles[1].result(timeout=120)
        got = [handles[0].result(timeout=120).rows, handles[2].result(timeout=120).rows]
        later = engine._runner.submit(sequences[0]).result(timeout=120).rows
    finally:
        engine.close()
    assert [shared for shared, _, _ in spy.after_blocker()] == [True, False]  # the shared one, then `later`
    expected = alone_rows(loaded, [sequences[0], sequences[2]])
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.equal(later, expected[0])


def test_the_shared_forward_gives_each_prompt_its_own_logits_and_cache(loaded) -> None:
    """Against each prompt's own forward (``one_forward``'s inputs, batch of one): logits and keys and values
    equal up to rounding, with and without reference audio in one batch; frames that do not match a
    prompt's placeholders are refused before any forward."""
    engine = engine_with(loaded, 1, together=False)
    try:
        sequences = [engine._sequence_input(request) for request in REQUESTS]
    finally:
        engine.close()
    model = loaded.model
    prompts = [scheduler_module.Scheduler._prompt(sequence) for sequence in sequences]
    with torch.inference_mode():
        logits, cache = prefill_together(model, prompts, torch.device("cpu"))
        for row, sequence in enumerate(sequences):
            alone = PiecewisePrefill(
                model,
                sequence.input_ids,
                sequence.attention_mask,
                sequence.audio_input_ids,
                sequence.audio_input_ids_mask,
                sequence.prompt_tokens,
            )
            expected = alone.step()
            assert expected is not None
            torch.testing.assert_close(logits[row : row + 1], expected, rtol=0, atol=2e-5)
            length = sequence.prompt_tokens
            for ours, theirs in zip(cache.layers, alone.cache.layers, strict=True):
                torch.testing.assert_close(ours.keys[row, :, :length], theirs.keys[0], rtol=0, atol=2e-5)
                torch.testing.assert_close(ours.values[row, :, :length], theirs.values[0], rtol=0, atol=2e-5)
        # the same prompt, elsewhere in the batch, with its frames elsewhere in the concatenation
        swapped = [prompts[1], prompts[0], *prompts[2:]]
        other, _ = prefill_together(model, swapped, torch.device("cpu"))
        torch.testing.assert_close(other[0], logits[1], rtol=0, atol=2e-5)
        ids, mask, frames = prompts[1]
        assert frames is not None
        with pytest.raises(ValueError, match="audio placeholders but"):
            prefill_together(model, [prompts[0], (ids, mask, frames[:-3])], torch.device("cpu"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The demo geometry, whose clips always run to max_new_tokens: a running sequence stays running."""
    root: Path = tmp_path_factory.mktemp("demo-together")
    build_tiny_checkpoint(root / "model", root / "codec", GEOMETRIES["demo"])
    return load_model(root / "model", root / "codec", device="cpu")


def test_beside_running_sequences_a_shared_forward_stays_within_one_piece(demo, monkeypatch) -> None:
    """While a sequence runs, the waiting prompts go in order, as many per forward as fill one piece of
    padded tokens, one forward between two of its steps; each gets its rows alone."""
    engine = engine_with(demo, 8, together=True)
    piece = engine._runner.limits.prefill_piece
    try:
        sequences = [engine._sequence_input(request) for request in REQUESTS]
        sequences.append(replace(sequences[0], sampling=replace(GREEDY, max_new_tokens=12)))
        running = engine.submit(SpeechRequest("Keep talking.", sampling=SamplingConfig(max_new_tokens=900)))
        running.wait_newer(0)
        spy = Spy(engine, monkeypatch)
        blocker = engine.submit(SpeechRequest("Wait.", sampling=GREEDY))
        spy.holding()
        handles = [engine._runner.submit(sequence) for sequence in sequences]
        spy.hold.set()
        got = [handle.result(timeout=120).rows for handle in handles]
        blocker.result(timeout=60)
        running.cancel()
    finally:
        engine.close()
    lengths = [sequence.prompt_tokens for sequence in sequences]
    # In order, each forward taking the next prompts while they fit one piece of padded tokens.
    expected, start = [], 0
    while start < len(lengths):
        end = start + 1
        while end < len(lengths) and (end + 1 - start) * max(lengths[start : end + 1]) <= piece:
            end += 1
        expected.append((end - start > 1, lengths[start:end]))
        start = end
    forwards = spy.after_blocker()
    assert [(shared, group) for shared, _, group in forwards] == expected
    assert sum(shared for shared, _ in expected) >= 2 and len(expected) < len(lengths)
    steps = [step for _, step, _ in forwards]
    assert steps == sorted(set(steps))  # one prefill forward between two steps at most
    for ours, theirs in zip(got, alone_rows(demo, sequences), strict=True):
        assert torch.equal(ours, theirs)


def test_a_bad_prompt_in_a_shared_forward_fails_alone(loaded, monkeypatch, caplog) -> None:
    """A prompt whose reference frames do not match its placeholders: the shared forward is refused, each
    prompt is prefilled alone, the bad one fails its own job and the others get their rows."""
    engine = engine_with(loaded, 4, together=True)
    try:
        spy = Spy(engine, monkeypatch)
        good = [engine._sequence_input(request) for request in (REQUESTS[0], REQUESTS[2])]
        cloned = engine._sequence_input(REQUESTS[1])
        assert cloned.audio_input_ids is not None and cloned.audio_input_ids_mask is not None
        bad = replace(
            cloned,
            audio_input_ids=cloned.audio_input_ids[:, :-3],
            audio_input_ids_mask=cloned.audio_input_ids_mask[:, :-3],
        )
        cancel = threading.Event()
        engine.submit(SpeechRequest("Wait.", sampling=GREEDY), cancel)
        spy.holding()
        with caplog.at_level(logging.WARNING, logger=scheduler_module.__name__):
            handles = [engine._runner.submit(sequence) for sequence in (good[0], bad, good[1])]
            cancel.set()
            spy.hold.set()
            with pytest.raises(RuntimeError):
                handles[1].result(timeout=120)
            got = [handles[0].result(timeout=120).rows, handles[2].result(timeout=120).rows]
        later = engine.submit(REQUESTS[0]).result(timeout=120).rows  # the thread still serves
    finally:
        engine.close()
    assert "prefilling 3 prompts together failed (ValueError" in caplog.text
    alone = [[s.prompt_tokens] for s in (good[0], bad, good[1], good[0])]  # each of the three, then the later
    assert [(shared, group) for shared, _, group in spy.after_blocker()] == [
        (True, [s.prompt_tokens for s in (good[0], bad, good[1])]),
        *((False, group) for group in alone),
    ]
    expected = alone_rows(loaded, good)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.equal(later, expected[0])
