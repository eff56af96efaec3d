"""The speed path (static KV cache + compiled decode step) makes the same audio as the plain path.

On the CPU the compiled graph is built by inductor for the tiny model (tens of seconds on two cores, once
per module); on a GPU the same switch adds CUDA graphs. Greedy decoding makes the comparison exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from boson_multimodal.engine import HiggsAudioEngine, SamplingConfig, SpeechRequest
from tests.conftest import TinyCheckpoint

pytestmark = pytest.mark.slow

GREEDY = SamplingConfig(temperature=0, max_new_tokens=24)
REQUEST = SpeechRequest("The speed path must not change a single sample.", sampling=GREEDY)


@pytest.fixture(scope="module")
def plain(tiny_checkpoint: TinyCheckpoint) -> HiggsAudioEngine:
    return HiggsAudioEngine.load(tiny_checkpoint.model_dir, tiny_checkpoint.codec_dir, device="cpu")


@pytest.fixture(scope="module")
def fast(tiny_checkpoint: TinyCheckpoint) -> HiggsAudioEngine:
    return HiggsAudioEngine.load(
        tiny_checkpoint.model_dir, tiny_checkpoint.codec_dir, device="cpu", speed_path=True
    )


def test_compiled_static_cache_reproduces_the_plain_path(
    plain: HiggsAudioEngine, fast: HiggsAudioEngine
) -> None:
    graphs_before = counters["stats"]["unique_graphs"]
    expected = plain.generate(REQUEST)
    actual = fast.generate(REQUEST)
    assert counters["stats"]["unique_graphs"] > graphs_before  # the decode step really was compiled
    assert actual.num_frames == expected.num_frames > 0
    assert actual.finished == expected.finished
    np.testing.assert_array_equal(actual.waveform, expected.waveform)


def test_a_longer_request_after_a_shorter_one_still_matches(
    plain: HiggsAudioEngine, fast: HiggsAudioEngine
) -> None:
    """The static cache grows to the longer prompt: a fresh graph, still the same audio."""
    longer = SpeechRequest(REQUEST.text + " And a second sentence makes the prompt longer.", sampling=GREEDY)
    np.testing.assert_array_equal(fast.generate(longer).waveform, plain.generate(longer).waveform)


def test_the_step_tap_works_on_the_speed_path(plain: HiggsAudioEngine, fast: HiggsAudioEngine) -> None:
    """Streaming's per-step tap cannot run inside a compiled graph; a tapped run falls back to eager."""
    tapped: list[torch.Tensor] = []
    expected = plain.generate(REQUEST)
    actual = fast.generate(REQUEST, on_rows=lambda rows: tapped.append(rows.clone()))
    np.testing.assert_array_equal(actual.waveform, expected.waveform)
    assert len(tapped) == GREEDY.max_new_tokens - 1  # one call per decode step after the first
    assert [rows.shape[1] for rows in tapped] == list(range(1, GREEDY.max_new_tokens))
