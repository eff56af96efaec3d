"""The decode forward through torch.compile: the eager step's logits up to rounding, every shape the
scheduler runs compiled before it serves, and an eager step when compiling fails."""

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
from boson_multimodal.scheduler import SchedulerLimits
from boson_multimodal.tiny_model import build_tiny_checkpoint
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
