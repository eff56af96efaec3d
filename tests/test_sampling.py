"""The batched sampler on fixed logits: the exponential race is ``multinomial``, draw for draw, and a seeded
slot draws the same whatever runs beside it and whichever slot it gets."""

from __future__ import annotations

import pytest
import torch

from boson_multimodal.sampling import SlotSampler, StreamTokens
from boson_multimodal.speech_request import SamplingConfig

K, V = 8, 1026
TOKENS = StreamTokens(
    audio_bos_token=5,
    audio_delay_token=6,
    stream_bos=V - 2,
    stream_eos=V - 1,
    num_codebooks=K,
    codebook_size=V,
)


@pytest.mark.parametrize("rows", [K, 3, 1])
def test_the_exponential_race_consumes_and_picks_what_multinomial_does(rows: int) -> None:
    """Both the step's draw (all K codebooks) and RAS's redraw (only some) go through multinomial in
    transformers; the race over a generator seeded alike picks the same codes and leaves the same state."""
    probs = (3 * torch.randn(rows, V, generator=torch.Generator().manual_seed(rows))).softmax(dim=-1)
    for seed in range(25):
        reference = torch.Generator().manual_seed(seed)
        expected = probs.multinomial(1, replacement=True, generator=reference).view(-1)
        race = torch.Generator().manual_seed(seed)
        noise = torch.empty_like(probs).exponential_(generator=race)
        assert torch.equal((probs / noise).argmax(dim=-1), expected)
        assert torch.equal(race.get_state(), reference.get_state())


def run(sampler: SlotSampler, logits: list[torch.Tensor], slots: list[int]) -> list[torch.Tensor]:
    """Steps over slots [0, max + 1); returns each step's rows of every slot."""
    width = max(slots) + 1
    return [sampler.next_rows(step[:width], 0, slots)[1] for step in logits]


def test_a_seeded_slot_draws_the_same_beside_others_and_in_another_slot() -> None:
    generator = torch.Generator().manual_seed(0)
    # Peaky logits so that codes repeat and RAS redraws (ras_max_repeat=1), over 30 steps.
    logits = [4 * torch.randn(4, K, V, generator=generator) for _ in range(30)]
    prompt_ids = torch.tensor([1, 2, 3, 4, 7, 8, 9, TOKENS.audio_bos_token])
    seeded = SamplingConfig(temperature=0.5, top_k=20, top_p=0.9, seed=7, ras_max_repeat=1)

    alone = SlotSampler(4, TOKENS, torch.device("cpu"))
    alone.admit(0, seeded, prompt_ids, None)
    expected = [rows[0] for rows in run(alone, [step[[2]] for step in logits], [0])]

    crowded = SlotSampler(4, TOKENS, torch.device("cpu"))
    neighbours = {
        0: SamplingConfig(seed=1),
        1: SamplingConfig(temperature=0),
        3: SamplingConfig(temperature=1.3, top_k=None, top_p=1.0),  # unseeded
    }
    for slot, config in neighbours.items():
        crowded.admit(slot, config, prompt_ids, None)
    crowded.admit(2, seeded, prompt_ids, None)
    got = [rows[2] for rows in run(crowded, logits, [0, 1, 2, 3])]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert torch.equal(got[0], torch.full((K,), TOKENS.stream_bos))  # the delay pattern's opening row

    reseeded = SlotSampler(4, TOKENS, torch.device("cpu"))
    reseeded.admit(
        0, SamplingConfig(temperature=0.5, top_k=20, top_p=0.9, seed=8, ras_max_repeat=1), prompt_ids, None
    )
    other = [rows[0] for rows in run(reseeded, [step[[2]] for step in logits], [0])]
    assert not all(torch.equal(a, b) for a, b in zip(other, expected, strict=True))
