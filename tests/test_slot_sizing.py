"""How many jobs a worker takes at once when the operator does not say: sized from the GPU's free memory
once the model is loaded, and the doors' slots follow. A GPU cannot be had here, so the sizing is driven
with the memory figures a GPU would report; the settings and the HTTP door's slots are the real ones."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from boson_multimodal.engine import sized_limits
from boson_multimodal.scheduler import SchedulerLimits
from higgs_worker.settings import MOST_SIZED_SLOTS, load_settings
from http_api.limits import Slots

GB = 10**9
REAL_GEOMETRY = SimpleNamespace(
    config=SimpleNamespace(num_hidden_layers=28, num_key_value_heads=8, head_dim=128), dtype=torch.bfloat16
)


@pytest.mark.parametrize(
    ("env", "sized"),
    [
        ({}, True),
        ({"CONCURRENCY": "4"}, False),
        ({"SCHEDULER_SLOTS": "16"}, False),
        ({"CONCURRENCY": " "}, True),
    ],
)
def test_slots_are_sized_only_when_neither_setting_chooses(env: dict[str, str], sized: bool) -> None:
    settings = load_settings({"RUNPOD_VOLUME_PATH": "/tmp/volume", **env})
    assert settings.size_slots_up_to == (MOST_SIZED_SLOTS if sized else None)
    assert settings.most_concurrent == (MOST_SIZED_SLOTS if sized else settings.concurrency)


def test_the_limits_take_what_the_free_memory_holds_and_say_so(caplog: pytest.LogCaptureFixture) -> None:
    limits = SchedulerLimits(slots=8, max_tokens=6144)
    with caplog.at_level(logging.INFO, logger="boson_multimodal.engine"):
        on_h200 = sized_limits(REAL_GEOMETRY, limits, free=int(130 * GB), total=int(141 * GB), most=64)
    on_4090 = sized_limits(REAL_GEOMETRY, limits, free=int(13 * GB), total=int(24 * GB), most=64)
    assert on_h200.slots == 64 and on_h200.max_tokens == 6144
    assert 7 <= on_4090.slots <= 9
    assert "64 sequences at once, sized from the 130.0 GB the GPU has free" in caplog.text


def test_http_slots_follow_a_capacity_that_grows_once_the_engine_is_sized() -> None:
    capacity = [2]
    slots = Slots(lambda: capacity[0])
    assert slots.take() and slots.take() and not slots.take()
    capacity[0] = 3  # the engine was loaded and sized
    assert slots.take() and not slots.take()
    for _ in range(3):
        slots.give_back()
    with pytest.raises(RuntimeError, match="nobody held"):
        slots.give_back()
