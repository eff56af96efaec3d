"""The decode step through torch.compile: the forward gives the eager step's logits up to rounding, the
sampler (where graphs hold the step) the eager sampler's rows, every shape the scheduler runs is compiled
before it serves, and a step whose compiling fails runs eagerly."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from boson_multimodal.decode_step import DecodeStep, GraphedDecodeStep, SampledStep, SlotCache
from boson_multimodal.engine import EngineOptions, HiggsAudioEngine, SamplingConfig, SpeechRequest
from boson_multimodal.loading import LoadedModel, load_model
from boson_multimodal.sampling import SlotSampler, StreamTokens
from boson_multimodal.scheduler import Scheduler, SchedulerLimits
from boson_multimodal.tiny_model import build_tiny_checkpoint
from tests.support.captures import rerun_capture
from tests.support.checkpoints import GEOMETRIES


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The demo geometry: sharp code logits, so rounding never moves a greedy choice."""
    root: Path = tmp_path_factory.mktemp("compiled")
    build_tiny_checkpoint(root / "model", root / "codec", GEOMETRIES["demo"])
    return load_model(root / "model", root / "codec", device="cpu")


def steps(loaded: LoadedModel, compiled: bool) -> tuple[DecodeStep, SlotCache]:
    config = loaded.model.config
    cache = SlotCache(config, 4, 256, torch.device("cpu"), torch.float32)
    return DecodeStep(loaded.model, cache, compiled=compiled), cache


def test_the_compiler_that_torch_compile_needs_on_a_cpu_is_installed() -> None:
    """Inductor generates C++ for a CPU and builds it with g++ (scripts/system-packages.txt installs it)."""
    assert shutil.which("g++"), "g++ is missing: run the tests through scripts/test.sh, which installs it"


@torch.no_grad()
def test_the_compiled_step_gives_the_eager_logits_and_compiles_only_while_warming_up(loaded) -> None:
    """Inputs made as the scheduler makes them (not inference tensors), every span up to the whole cache."""
    compiled, compiled_cache = steps(loaded, compiled=True)
    eager, eager_cache = steps(loaded, compiled=False)
    before = counters["stats"]["unique_graphs"]
    assert compiled.warm_up() > 0 and compiled.compiled
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > before  # the counter sees compilations
    generator = torch.Generator().manual_seed(0)
    shapes = ((1, 9, False), (3, 40, True), (4, 256, True), (2, 200, False), (1, 256, True), (1, 256, False))
    for n, span, masked in shapes:
        rows = torch.randint(0, 1000, (n, loaded.model.config.num_codebooks), generator=generator)
        positions = (torch.arange(n) * 7 % span) if masked else torch.full((n,), span - 1)
        for cache in (compiled_cache, eager_cache):  # the same history in both caches
            for layer in range(len(cache.keys)):
                cache.keys[layer].copy_(
                    torch.randn(cache.keys[layer].shape, generator=generator.manual_seed(layer))
                )
                cache.values[layer].copy_(cache.keys[layer] * 0.5)
        expected = eager(rows, positions, span, masked)
        got = compiled(rows, positions, span, masked)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        assert not torch.equal(got, torch.zeros_like(got))
    assert counters["stats"]["unique_graphs"] == graphs  # no shape the scheduler runs compiled anew


def test_the_start_up_check_of_the_graphs_compiles_nothing_more(loaded) -> None:
    """Graphs over a compiled step: the captures and the replay check at start-up run the shapes the warm-up
    compiled, on inputs made as the scheduler's are, so the check costs no compile of its own (each is tens
    of seconds for the real model on a GPU). Captured here as a replay that runs the step again."""
    step, cache = steps(loaded, compiled=True)
    sampler = SlotSampler(cache.slots, StreamTokens.from_config(loaded.model.config), torch.device("cpu"))
    graphed = GraphedDecodeStep(SampledStep(step, sampler), cache, torch.device("cpu"), lambda run: run)
    with torch.inference_mode():  # as on the scheduler's thread
        step.warm_up()
        graphs = counters["stats"]["unique_graphs"]
        graphed.prepare()
    assert graphed.enabled and not graphed.eager_buckets
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_compiled_scheduler_serves_the_rows_the_eager_one_gives(loaded) -> None:
    request = SpeechRequest(
        "Compiled or not, the same rows.", sampling=SamplingConfig(temperature=0, max_new_tokens=30)
    )
    rows = {}
    for compiled in (True, False):
        options = EngineOptions(limits=SchedulerLimits(slots=2, max_tokens=512), compile_step=compiled)
        engine = HiggsAudioEngine(loaded, options)
        try:
            assert engine._runner._forward.compiled is compiled
            graphs = counters["stats"]["unique_graphs"]
            handles = [engine.submit(request), engine.submit(replace(request, text="And a neighbour."))]
            rows[compiled] = [handle.result(timeout=300).rows for handle in handles]
            assert counters["stats"]["unique_graphs"] == graphs  # compiled before it served, nothing since
            assert engine._runner._forward.compiled is compiled
        finally:
            engine.close()
    assert all(torch.equal(a, b) for a, b in zip(rows[True], rows[False], strict=True))


def test_a_step_whose_compilation_fails_runs_eagerly(loaded, caplog) -> None:
    step, _ = steps(loaded, compiled=True)

    def broken(*args):
        raise RuntimeError("no C compiler")

    step._forward = broken
    with caplog.at_level(logging.WARNING, logger="boson_multimodal.decode_step"):
        step.warm_up()
    assert not step.compiled and "compiling the decode step failed" in caplog.text
    rows = torch.zeros(2, loaded.model.config.num_codebooks, dtype=torch.long)
    assert step(rows, torch.tensor([0, 1]), 2, True).shape[0] == 2


class FixedLogits:
    """A decode forward that returns the next of given logits, so that two samplers see the same ones."""

    def __init__(self, logits: list[torch.Tensor]) -> None:
        self._logits = iter(logits)

    def __call__(self, rows, positions, span, masked) -> torch.Tensor:
        return next(self._logits)[: rows.shape[0]]


MIXED_SAMPLING = [
    SamplingConfig(seed=1),  # the defaults: temperature, top-k, top-p and RAS
    SamplingConfig(temperature=0, seed=9),  # a seed, so that both samplers hold the same keys
    SamplingConfig(seed=2, temperature=1.3, top_k=0, top_p=0.8, ras_window=0),
    SamplingConfig(seed=3, top_k=5, top_p=1.0, ras_window=3, ras_max_repeat=1),
]


def test_the_compiled_sampler_chooses_the_eager_samplers_rows_and_state(loaded) -> None:
    """Sampled (every warper, RAS redrawing often), greedy and forced rows from the same logits, step after
    step: the same rows, and the same state after."""
    config = loaded.model.config
    tokens = StreamTokens.from_config(config)
    generator = torch.Generator().manual_seed(0)
    logits = [
        torch.randn(4, config.num_codebooks, config.codebook_size, generator=generator) * 3 for _ in range(24)
    ]
    prompt_ids = torch.tensor([7, config.audio_bos_token_id])
    audio = torch.randint(0, 8, (6, config.num_codebooks), generator=generator)  # repeats for RAS to see
    steps = {}
    for compiled in (True, False):
        sampler = SlotSampler(4, tokens, torch.device("cpu"))
        for slot, sampling in enumerate(MIXED_SAMPLING):
            sampler.admit(slot, sampling, prompt_ids, audio)
        steps[compiled] = SampledStep(FixedLogits(logits), sampler, compiled=compiled)  # type: ignore[arg-type]
    rows = torch.zeros(4, config.num_codebooks, dtype=torch.long)
    positions = torch.arange(4)
    with torch.inference_mode():
        for _ in logits:
            got = steps[True](rows, positions, 8, True, None)
            expected = steps[False](rows, positions, 8, True, None)
            assert torch.equal(got, expected)
    assert steps[True].compiled  # it ran compiled all along
    for a, b in zip(steps[True].sampler._state(), steps[False].sampler._state(), strict=True):
        assert torch.equal(a, b)


def test_graphs_over_a_compiled_step_serve_the_eager_schedulers_rows_and_compile_at_start_up_only(
    loaded,
) -> None:
    """The scheduler with graphs (each replay runs the step again, as rerun_capture does) and the compiled
    forward and sampler: greedy rows equal the eager scheduler's, a seeded job runs beside them, and nothing
    compiles once it serves."""
    requests = [
        SpeechRequest("Compiled and graphed.", sampling=SamplingConfig(temperature=0, max_new_tokens=30)),
        SpeechRequest("A seeded neighbour.", sampling=SamplingConfig(seed=4, max_new_tokens=25)),
        SpeechRequest("A greedy one, later.", sampling=SamplingConfig(temperature=0, max_new_tokens=20)),
    ]
    eager = HiggsAudioEngine(loaded, EngineOptions(limits=SchedulerLimits(slots=4, max_tokens=1024)))
    try:
        inputs = [eager._sequence_input(request) for request in requests]
        expected = [eager.submit(request).result(timeout=300).rows for request in requests]
    finally:
        eager.close()
    runner = Scheduler(
        loaded.model,
        SchedulerLimits(slots=4, max_tokens=1024),
        cuda_graphs=True,
        capture=rerun_capture,
        compile_step=True,
    )
    try:
        graphs = counters["stats"]["unique_graphs"]
        handles = [runner.submit(sequence) for sequence in inputs]
        got = [handle.result(timeout=300).rows for handle in handles]
        assert counters["stats"]["unique_graphs"] == graphs
        assert runner._graphed is not None and runner._graphed.enabled and runner._graphed.replays > 0
        assert runner._sampled_step.compiled and runner._forward.compiled
    finally:
        runner.close()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[2], expected[2])
    assert got[1].shape == expected[1].shape


def test_a_sampler_whose_compilation_fails_runs_uncompiled(loaded, caplog) -> None:
    step, cache = steps(loaded, compiled=False)
    sampler = SlotSampler(cache.slots, StreamTokens.from_config(loaded.model.config), torch.device("cpu"))
    sampled = SampledStep(step, sampler, compiled=True)

    def broken(logits):
        raise RuntimeError("no C compiler")

    sampled._choose_all = broken
    with caplog.at_level(logging.WARNING, logger="boson_multimodal.decode_step"), torch.inference_mode():
        sampled.warm_up()
    assert not sampled.compiled and "compiling the sampler failed" in caplog.text
    rows = torch.zeros(2, loaded.model.config.num_codebooks, dtype=torch.long)
    with torch.inference_mode():
        assert sampled(rows, torch.tensor([0, 1]), 2, True, None).shape == rows.shape
