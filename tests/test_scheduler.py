"""The scheduler's decode loop against transformers' own ``generate()``: same tokens, whatever runs beside.

Parity is checked on more than one tiny geometry: the default demo checkpoint (sharp code logits: clips run
to ``max_new_tokens``) and a wider, deeper one with raw random logits, whose clips the model ends itself
(so the delay pattern's end of stream is exercised too).
"""

from __future__ import annotations

import contextlib
import copy
import threading
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from boson_multimodal.decode_step import DecodeStep, SlotCache
from boson_multimodal.engine import EngineOptions, HiggsAudioEngine, SpeechRequest
from boson_multimodal.loading import LoadedModel, load_model
from boson_multimodal.prompt import Voice
from boson_multimodal.scheduler import (
    GenerationCancelled,
    Scheduler,
    SchedulerLimits,
    SequenceHandle,
    SequenceResult,
    SequenceTooLong,
    sized_slots,
)
from boson_multimodal.speech_request import SamplingConfig
from boson_multimodal.tiny_model import build_tiny_checkpoint
from tests.support.captures import rerun_capture
from tests.support.checkpoints import GEOMETRIES


@pytest.fixture(scope="module")
def reference(loaded: LoadedModel):
    engine = HiggsAudioEngine(loaded, EngineOptions(backend="transformers"))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def scheduler(loaded: LoadedModel):
    engine = HiggsAudioEngine(loaded, EngineOptions(limits=SchedulerLimits(slots=4, max_tokens=2048)))
    yield engine
    engine.close()


def sine(seconds: float, rate: int = 22050, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


VOICE_A = Voice(sine(1.2), 22050, "A low hum.")
VOICE_B = Voice(sine(0.9, 16000, 330.0), 16000, "A higher hum.")
GREEDY = SamplingConfig(temperature=0, max_new_tokens=48)
PROMPTS = {
    "smart voice": SpeechRequest("Hello there, this is a test.", sampling=GREEDY),
    "scene": SpeechRequest("Quiet now.", scene="Audio is recorded in a hall.", sampling=GREEDY),
    "cloned voice": SpeechRequest("Say it like me.", voices=(VOICE_A,), sampling=GREEDY),
    "two speakers": SpeechRequest(
        "[SPEAKER0] Hi. [SPEAKER1] Hello.", voices=(VOICE_A, VOICE_B), sampling=GREEDY
    ),
}


def rows_of(engine: HiggsAudioEngine, request: SpeechRequest) -> torch.Tensor:
    return engine.submit(request).result().rows


@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_greedy_tokens_equal_transformers_generate(reference, scheduler, prompt: str) -> None:
    request = PROMPTS[prompt]
    expected = rows_of(reference, request)
    assert torch.equal(rows_of(scheduler, request), expected)


def test_greedy_tokens_hold_while_other_sequences_join_and_leave(reference, scheduler) -> None:
    """A long sequence runs; others of other lengths and kinds join mid-way and leave before it ends."""
    long = replace(PROMPTS["smart voice"], sampling=replace(GREEDY, max_new_tokens=90))
    others = [
        replace(PROMPTS["cloned voice"], sampling=replace(GREEDY, max_new_tokens=20)),
        replace(PROMPTS["two speakers"], sampling=SamplingConfig(seed=11, max_new_tokens=30)),
        replace(PROMPTS["scene"], sampling=replace(GREEDY, max_new_tokens=35)),
    ]
    # Greedy rows are generate()'s; the seeded sampled one is what the scheduler draws for it alone.
    expected = [rows_of(scheduler if r.sampling.seed is not None else reference, r) for r in (long, *others)]
    handle = scheduler.submit(long)
    handles, version = [], 0
    for joins_at, other in zip((5, 15, 30), others, strict=True):
        while True:  # wait until the long one has that many rows, then let the next one join
            version, rows, result = handle.wait_newer(version)
            if result is not None or rows.shape[0] >= joins_at:
                break
        handles.append(scheduler.submit(other))
    results = [h.result().rows for h in (handle, *handles)]
    for got, want in zip(results, expected, strict=True):
        assert torch.equal(got, want)


def test_seeded_sampling_is_the_same_whatever_runs_beside_it_and_whenever_it_arrives(scheduler) -> None:
    seeded = replace(PROMPTS["smart voice"], sampling=SamplingConfig(seed=21, max_new_tokens=40))
    alone = rows_of(scheduler, seeded)
    neighbours = [
        replace(PROMPTS["two speakers"], sampling=SamplingConfig(max_new_tokens=60)),  # unseeded
        replace(PROMPTS["scene"], sampling=SamplingConfig(seed=21, temperature=1.1, max_new_tokens=50)),
    ]
    running = [scheduler.submit(n) for n in neighbours]
    late = running[0]
    version = 0
    while True:
        version, rows, result = late.wait_newer(version)
        if result is not None or rows.shape[0] >= 12:
            break
    assert torch.equal(scheduler.submit(seeded).result().rows, alone)
    for handle in running:
        handle.result()
    other_seed = replace(seeded, sampling=replace(seeded.sampling, seed=22))
    assert not torch.equal(rows_of(scheduler, other_seed), alone)


def test_repetition_aware_sampling_redraws_in_the_production_loop(tmp_path: Path) -> None:
    """A low temperature makes codes repeat, which RAS must catch: on differs from off. On the geometry with
    raw logits, whose untempered redraw can land elsewhere (the demo's sharp logits redraw the same code);
    its distribution against transformers' is checked on fixed logits in ``test_sampling.py``."""
    build_tiny_checkpoint(tmp_path / "model", tmp_path / "codec", GEOMETRIES["wide-raw"])
    engine = HiggsAudioEngine(load_model(tmp_path / "model", tmp_path / "codec", device="cpu"))
    try:
        on = replace(
            PROMPTS["smart voice"],
            sampling=SamplingConfig(temperature=0.3, top_k=5, seed=8, max_new_tokens=40, ras_max_repeat=1),
        )
        off = replace(on, sampling=replace(on.sampling, ras_window=0))
        assert not torch.equal(rows_of(engine, on), rows_of(engine, off))
    finally:
        engine.close()


def test_a_short_sequence_is_not_held_behind_a_long_one(scheduler, monkeypatch) -> None:
    """It finishes within its own number of steps, not after the long one's.

    The step count at its finish is read on the scheduler thread, as it finishes: read after ``result()``
    returns, it would include the steps the long one took while this thread woke up. The count at its join
    is read after its first row arrives, so it can only be late, which loosens the bound, never fails it.
    """
    long = scheduler.submit(replace(PROMPTS["smart voice"], sampling=SamplingConfig(max_new_tokens=1500)))
    short = scheduler.submit(replace(PROMPTS["scene"], sampling=SamplingConfig(max_new_tokens=20)))
    finished_at: list[int] = []
    finish = short.finish

    def counted_finish(result) -> None:
        finished_at.append(scheduler._runner.steps)
        finish(result)

    monkeypatch.setattr(short, "finish", counted_finish)
    short.wait_newer(0)  # its first row, from its prefill: it has joined (the long one ran while encoding it)
    joined_at = scheduler._runner.steps
    short.result()
    assert finished_at and finished_at[0] - joined_at <= 19
    long.cancel()
    with contextlib.suppress(GenerationCancelled):  # the raw geometry may have ended the long clip itself
        long.result()


def test_two_consumers_of_one_handle_are_each_woken_for_what_they_wait_for() -> None:
    """One waits for three rows, another for any newer rows: the second's wake-up must not make the first
    miss the row it waits for (it would then sleep until the sequence ends)."""
    handle = SequenceHandle()
    got: dict[str, int] = {}

    def consumer(name: str, wait) -> None:
        got[name] = wait().shape[0]

    def start(name: str, wait) -> threading.Thread:
        thread = threading.Thread(target=consumer, args=(name, wait), daemon=True)
        thread.start()
        thread.join(timeout=0.2)  # it is waiting by then
        return thread

    rows = torch.zeros(3, 8, dtype=torch.long)
    threes = start("rows", lambda: handle.wait_rows(3)[0])
    newer = start("newer", lambda: handle.wait_newer(0)[1])
    handle.publish(rows[:1])
    newer.join(timeout=5)
    assert got.get("newer") == 1
    handle.publish(rows[:3])
    threes.join(timeout=5)
    woken = dict(got)
    handle.finish(SequenceResult(rows=rows, finished=False))  # whatever happened, no one waits after this
    assert woken.get("rows") == 3, "the consumer waiting for three rows was not woken by them"


def test_cancelling_frees_the_slot_for_the_next_sequence(loaded: LoadedModel) -> None:
    engine = HiggsAudioEngine(loaded, EngineOptions(limits=SchedulerLimits(slots=1, max_tokens=2048)))
    try:
        cancel = threading.Event()
        long = engine.submit(
            replace(PROMPTS["smart voice"], sampling=SamplingConfig(max_new_tokens=1900)), cancel
        )
        waiting = engine.submit(PROMPTS["scene"])  # no free slot until the long one goes
        long.wait_newer(0)
        cancel.set()
        with pytest.raises(GenerationCancelled):
            long.result()
        assert waiting.result(timeout=60).rows.shape[0] > 0
    finally:
        engine.close()


def test_a_sequence_too_long_for_a_slot_is_refused_up_front(loaded: LoadedModel) -> None:
    engine = HiggsAudioEngine(loaded, EngineOptions(limits=SchedulerLimits(slots=1, max_tokens=200)))
    try:
        with pytest.raises(SequenceTooLong, match=r"max_new_tokens \(190\)"):
            engine.submit(replace(PROMPTS["smart voice"], sampling=SamplingConfig(max_new_tokens=190)))
        with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
            engine.submit(replace(PROMPTS["smart voice"], sampling=SamplingConfig(max_new_tokens=0)))
        assert rows_of(engine, replace(PROMPTS["scene"], sampling=GREEDY)).shape[0] > 0  # still serving
    finally:
        engine.close()


def test_a_prompt_that_fails_fails_alone(scheduler, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken sequence (its audio codes do not match its placeholders) fails its own handle only."""
    good = scheduler.submit(replace(PROMPTS["smart voice"], sampling=SamplingConfig(max_new_tokens=30)))
    sequence = scheduler._sequence_input(PROMPTS["cloned voice"])
    broken = replace(sequence, audio_input_ids=sequence.audio_input_ids[:, :-3])
    handle = scheduler._runner.submit(broken)
    with pytest.raises(Exception) as failure:
        handle.result()
    assert not isinstance(failure.value, GenerationCancelled)
    good_rows = good.result().rows  # finished, not failed (the raw geometry may end it before its 30 steps)
    assert 0 < good_rows.shape[0] <= 30
    assert rows_of(scheduler, PROMPTS["scene"]).shape[0] > 0


class _Fatal(BaseException):
    """Not an Exception: what the scheduler's own per-step guard does not catch."""


def test_a_dying_scheduler_thread_fails_every_waiting_caller(loaded: LoadedModel, monkeypatch) -> None:
    engine = HiggsAudioEngine(loaded, EngineOptions(limits=SchedulerLimits(slots=1, max_tokens=2048)))
    runner = engine._runner

    def fatal_step(*args, **kwargs):
        raise _Fatal("the step could not run")

    monkeypatch.setattr(runner, "_advance", fatal_step)
    running = engine.submit(replace(PROMPTS["smart voice"], sampling=GREEDY))
    waiting = engine.submit(replace(PROMPTS["scene"], sampling=GREEDY))  # no slot: still pending
    for handle in (running, waiting):
        with pytest.raises(_Fatal):
            handle.result(timeout=60)
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(PROMPTS["scene"])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_masked_cache_positions_never_leak_into_a_row(loaded: LoadedModel, attention: str) -> None:
    """Row 0 sits at position 3 beside a row at position 10: whatever lies in its own cache past position 3
    (stale keys of an earlier sequence, padding) must not change its logits, whichever attention the model
    was loaded with (transformers' eager attention *adds* a mask, so a boolean one would let them in)."""
    model = copy.deepcopy(loaded.model)
    model.set_attn_implementation(attention)
    assert model.config._attn_implementation == attention
    cache = SlotCache(model.config, slots=2, max_tokens=64, device=torch.device("cpu"), dtype=torch.float32)
    step = DecodeStep(model, cache)
    generator = torch.Generator().manual_seed(0)
    for layer in range(model.config.num_hidden_layers):  # a plausible history for both slots
        for tensor in (cache.keys[layer], cache.values[layer]):
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
    rows = torch.randint(0, 1024, (2, model.config.num_codebooks), generator=generator)
    positions = torch.tensor([3, 10])
    outputs = []
    for _ in range(2):
        for layer in range(model.config.num_hidden_layers):  # new stale entries past row 0's position
            for tensor in (cache.keys[layer], cache.values[layer]):
                tensor[0, :, 4:].copy_(100 * torch.randn(tensor[0, :, 4:].shape, generator=generator))
        outputs.append(step(rows, positions, span=11, masked=True))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=0, atol=1e-5)
    alone = step(rows[:1], positions[:1], span=4, masked=False)  # row 0 alone over exactly its own history
    torch.testing.assert_close(outputs[0][0], alone[0], rtol=1e-5, atol=1e-5)
    unmasked = step(rows[:1], positions[:1], span=11, masked=False)  # what a leak looks like
    assert not torch.allclose(unmasked[0], outputs[1][0], atol=1e-2)


@pytest.fixture(scope="module")
def demo_scheduler(tmp_path_factory: pytest.TempPathFactory):
    """The demo geometry, whose clips always run to max_new_tokens: a running sequence stays running."""
    root: Path = tmp_path_factory.mktemp("demo-only")
    build_tiny_checkpoint(root / "model", root / "codec", GEOMETRIES["demo"])
    engine = HiggsAudioEngine(load_model(root / "model", root / "codec", device="cpu"))
    yield engine
    engine.close()


def test_admissions_beside_a_running_sequence_prefill_one_per_step(demo_scheduler, monkeypatch) -> None:
    """Three prompts arriving together while a sequence runs join at three different steps, so the running
    one never waits for more than one prefill between two of its rows."""
    runner = demo_scheduler._runner
    admitted_at: list[tuple[int, int]] = []  # (step, sequences running) at each admission
    activate = runner._activate

    def recording_activate(*args) -> None:
        admitted_at.append((runner.steps, len(runner._active)))
        activate(*args)

    monkeypatch.setattr(runner, "_activate", recording_activate)
    prompts = [PROMPTS["scene"], PROMPTS["cloned voice"], PROMPTS["smart voice"]]
    short = [replace(p, sampling=replace(GREEDY, max_new_tokens=20)) for p in prompts]
    inputs = [demo_scheduler._sequence_input(request) for request in short]  # encoded before the long one
    long = replace(PROMPTS["smart voice"], sampling=replace(GREEDY, max_new_tokens=200))
    running = demo_scheduler.submit(long)
    running.wait_newer(0)
    handles = [runner.submit(sequence) for sequence in inputs]  # they arrive together, while it runs
    for handle in handles:
        handle.result()
    assert running.result().rows.shape[0] == 200  # it ran all along
    late = admitted_at[1:]
    assert len(late) == 3 and len({step for step, _ in late}) == 3 and all(n > 0 for _, n in late), late


def graphed_rows(loaded: LoadedModel, scheduler, capture, requests) -> tuple[list[torch.Tensor], Scheduler]:
    runner = Scheduler(
        loaded.model, SchedulerLimits(slots=4, max_tokens=1024), cuda_graphs=True, capture=capture
    )
    try:
        handles = [runner.submit(scheduler._sequence_input(request)) for request in requests]
        return [handle.result(timeout=120).rows for handle in handles], runner
    finally:
        runner.close()


GRAPHED = [
    replace(PROMPTS["cloned voice"], sampling=replace(GREEDY, max_new_tokens=30)),
    replace(PROMPTS["smart voice"], sampling=replace(GREEDY, max_new_tokens=40)),
    replace(PROMPTS["scene"], sampling=SamplingConfig(seed=5, max_new_tokens=35)),
]


def test_graphs_are_captured_at_start_up_and_replayed_with_the_eager_steps_tokens(loaded, scheduler) -> None:
    expected = [rows_of(scheduler, request) for request in GRAPHED]
    captured: list[int] = []

    def counting(run):
        captured.append(1)
        return rerun_capture(run)

    runner = Scheduler(
        loaded.model, SchedulerLimits(slots=4, max_tokens=1024), cuda_graphs=True, capture=counting
    )
    runner.close()
    assert len(captured) == 3 * 2  # batch buckets 1, 2, 4 × spans 512, 1024, all before serving
    got, runner = graphed_rows(loaded, scheduler, rerun_capture, GRAPHED)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert runner._graphed is not None and runner._graphed.enabled and runner._graphed.replays > 0


def test_a_capture_that_fails_falls_back_to_eager_for_its_bucket(loaded, scheduler, caplog) -> None:
    expected = [rows_of(scheduler, request) for request in GRAPHED]

    def failing_for_batch_2(run):
        if run().shape[0] == 2:
            raise RuntimeError("operation not permitted when stream is capturing")
        return rerun_capture(run)

    with caplog.at_level("WARNING", logger="boson_multimodal.decode_step"):
        got, runner = graphed_rows(loaded, scheduler, failing_for_batch_2, GRAPHED)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert runner._graphed is not None and runner._graphed.eager_buckets == {(2, 512), (2, 1024)}
    assert "capturing the decode step for batch 2 over 512 positions failed" in caplog.text
    assert runner._graphed.enabled and runner._graphed.replays > 0  # the other buckets still replay


def test_graphs_that_disagree_with_the_eager_step_are_switched_off(loaded, scheduler, caplog) -> None:
    expected = [rows_of(scheduler, request) for request in GRAPHED]

    def wrong(run):
        replay = rerun_capture(run)
        return lambda: replay().flip(-1)  # the codes come out in the wrong places

    with caplog.at_level("ERROR", logger="boson_multimodal.decode_step"):
        got, runner = graphed_rows(loaded, scheduler, wrong, GRAPHED)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert runner._graphed is not None and not runner._graphed.enabled and runner._graphed.replays == 0
    assert "CUDA graphs switched off" in caplog.text


def test_graphs_whose_replay_fails_are_switched_off_and_every_job_still_runs(
    loaded, scheduler, caplog
) -> None:
    expected = [rows_of(scheduler, request) for request in GRAPHED]

    def broken(run):
        rerun_capture(run)

        def replay():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        return replay

    with caplog.at_level("ERROR", logger="boson_multimodal.decode_step"):
        got, runner = graphed_rows(loaded, scheduler, broken, GRAPHED)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert runner._graphed is not None and not runner._graphed.enabled
    assert "a replay of the decode step (batch 1 over 512 positions) failed (RuntimeError" in caplog.text


def test_slots_are_sized_from_the_free_gpu_memory() -> None:
    """The real geometry in bf16 after its 10.75 GB of weights, 6144-token slots: the issue's sizes."""
    config = SimpleNamespace(num_hidden_layers=28, num_key_value_heads=8, head_dim=128)
    gb = 10**9

    def slots(card_gb: float) -> int:
        return sized_slots(
            config, 6144, torch.bfloat16, free=int((card_gb - 10.75) * gb), total=int(card_gb * gb), most=64
        )

    assert 7 <= slots(24) <= 9
    assert 32 <= slots(80) <= 64 and slots(141) == 64
    assert slots(12) == 1  # never none: the memory check at start-up then says what does not fit
