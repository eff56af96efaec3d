"""The batched sampler on fixed logits: its draws follow the distribution transformers' warpers and RAS
give, and a seeded slot draws the same whatever runs beside it and whichever slot it gets."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from boson_multimodal.sampling import SlotSampler, StreamTokens, highest, unit
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


def warped(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """The probabilities transformers samples from: its warpers in ``generate()``'s order, then softmax."""
    scores = logits[None]
    if config.temperature != 1.0:
        scores = TemperatureLogitsWarper(config.temperature)(None, scores)
    if config.top_k:
        scores = TopKLogitsWarper(config.top_k)(None, scores)
    if config.top_p < 1.0:
        scores = TopPLogitsWarper(config.top_p)(None, scores)
    return scores[0].softmax(dim=-1)


def with_ras(logits: torch.Tensor, config: SamplingConfig, repeated: int) -> torch.Tensor:
    """RAS's distribution when ``repeated`` is already in the window often enough: a draw of it is redrawn
    from the raw logits' softmax."""
    first = warped(logits, config)
    final = first.clone()
    final[repeated] = 0
    return final + first[repeated] * logits.softmax(dim=-1)


@dataclass
class Draws:
    counts: torch.Tensor  # (V,) how often each code was drawn
    total: int


def draw_many(logits: torch.Tensor, config: SamplingConfig, audio: torch.Tensor | None) -> Draws:
    """The second row of many seeded slots (every codebook given the same logits, 256 slots at a time,
    fresh seeds each round); the first row is the delay pattern's forced BOS."""
    slots, rounds = 256, 8
    counts = torch.zeros(V, dtype=torch.long)
    sampler = SlotSampler(slots, TOKENS, torch.device("cpu"))
    prompt = torch.tensor([7, 8, 9, 10, 11, 12, 13, 14])
    step = logits.expand(slots, K, V)
    for round in range(rounds):
        for slot in range(slots):
            sampler.admit(slot, config_with_seed(config, round * slots + slot), prompt, audio)
        with torch.inference_mode():
            first = sampler.next_rows(step, 0, range(slots))[1]
            assert torch.equal(first, torch.full((slots, K), TOKENS.stream_bos))
            counts += torch.bincount(sampler.next_rows(step, 0, range(slots))[1].view(-1), minlength=V)
    return Draws(counts, slots * rounds * K)


def config_with_seed(config: SamplingConfig, seed: int) -> SamplingConfig:
    return SamplingConfig(
        temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, seed=seed,
        ras_window=config.ras_window, ras_max_repeat=config.ras_max_repeat,
    )  # fmt: skip


def chi_square(draws: Draws, expected: torch.Tensor) -> tuple[float, float]:
    """Pearson's statistic of the counts against probabilities ``expected`` (codes expected fewer than 5
    times pooled into one bin), and a bound it exceeds with probability about 1e-6 when they agree
    (Wilson–Hilferty: the statistic's cube root is close to normal)."""
    mean = expected.double() * draws.total
    big = mean >= 5
    observed, means = draws.counts[big].double(), mean[big]
    rest = draws.counts[~big].sum().double().view(1), mean[~big].sum().view(1)
    if rest[1] >= 5:
        observed, means = torch.cat([observed, rest[0]]), torch.cat([means, rest[1]])
    else:  # too little mass for a bin of its own: a coarser binning folds it into the smallest one
        smallest = means.argmin()
        observed[smallest] += rest[0][0]
        means[smallest] += rest[1][0]
    statistic = float(((observed - means) ** 2 / means).sum())
    freedom = observed.numel() - 1
    z = 4.75  # one-sided 1e-6
    bound = freedom * (1 - 2 / (9 * freedom) + z * math.sqrt(2 / (9 * freedom))) ** 3
    return statistic, bound


LOGITS = 3 * torch.randn(V, generator=torch.Generator().manual_seed(11))
LOGITS[TOKENS.stream_bos] = LOGITS[TOKENS.stream_eos] = -30.0  # a real row rarely opens or ends a stream
CONFIGS = {
    "defaults": SamplingConfig(ras_window=0),  # temperature 0.7, top-k 50, top-p 0.95
    "top-p alone": SamplingConfig(temperature=1.3, top_k=None, top_p=0.8, ras_window=0),
    "top-k alone": SamplingConfig(temperature=0.5, top_k=7, top_p=1.0, ras_window=0),
    "softmax": SamplingConfig(temperature=1.0, top_k=None, top_p=1.0, ras_window=0),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_draws_follow_transformers_warpers(name: str) -> None:
    config = CONFIGS[name]
    draws = draw_many(LOGITS, config, None)
    statistic, bound = chi_square(draws, warped(LOGITS, config))
    assert statistic < bound, (statistic, bound)
    # The test can tell: the same draws against the plain softmax (or, for it, a hotter one) fail it.
    other = SamplingConfig(temperature=1.0, top_k=None, top_p=1.0)
    if name == "softmax":
        other = SamplingConfig(temperature=1.5, top_k=None, top_p=1.0)
    wrong, _ = chi_square(draws, warped(LOGITS, other))
    assert wrong > 10 * bound


def test_repetition_aware_sampling_redraws_a_repeated_code_from_the_raw_logits() -> None:
    """The most likely code fills the window, so drawing it again (ras_max_repeat=1) is redrawn."""
    config = SamplingConfig(temperature=0.7, top_k=20, top_p=0.9, ras_window=7, ras_max_repeat=1)
    repeated = int(LOGITS.argmax())
    window = torch.full((7, K), repeated)
    draws = draw_many(LOGITS, config, window)
    statistic, bound = chi_square(draws, with_ras(LOGITS, config, repeated))
    assert statistic < bound, (statistic, bound)
    without, _ = chi_square(draws, warped(LOGITS, config))
    assert without > 10 * bound  # it redrew


def run(sampler: SlotSampler, logits: list[torch.Tensor], slots: list[int]) -> list[torch.Tensor]:
    """Steps over slots [0, max + 1); returns each step's rows of every slot."""
    width = max(slots) + 1
    return [sampler.next_rows(step[:width], 0, slots)[1] for step in logits]


def test_a_seeded_slot_draws_the_same_beside_others_and_in_another_slot() -> None:
    generator = torch.Generator().manual_seed(0)
    # Peaky logits so that codes repeat and RAS redraws (ras_max_repeat=1), over 30 steps; rounded to bf16, as
    # the real model's are, so that many codes tie (the neighbour without top-k makes every code a candidate).
    logits = [(4 * torch.randn(4, K, V, generator=generator)).bfloat16().float() for _ in range(30)]
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


def test_tied_scores_draw_the_same_however_many_candidates_the_batch_takes() -> None:
    """Codes tied at a row's k-th score and at its top-p cut: the row draws the same alone (its own top-k
    sets the candidates) as beside a row without top-k (every code is a candidate, in another order)."""
    row = torch.full((K, V), -8.0)
    row[:, :3] = 4.0  # three codes tied for the best …
    row[:, 3:9] = 3.0  # … and six at the k-th score (top-k 5 keeps all nine)
    row[:, 9:40] = 1.0
    seeded = SamplingConfig(temperature=1.0, top_k=5, top_p=0.8, seed=3, ras_window=0)
    prompt_ids = torch.tensor([1, 2, 3, 4, 7, 8, 9, 10])
    alone = SlotSampler(2, TOKENS, torch.device("cpu"))
    alone.admit(0, seeded, prompt_ids, None)
    beside = SlotSampler(2, TOKENS, torch.device("cpu"))
    beside.admit(0, seeded, prompt_ids, None)
    beside.admit(1, SamplingConfig(top_k=None, top_p=1.0, seed=4), prompt_ids, None)
    steps = 200
    with torch.inference_mode():
        mine = torch.stack([alone.next_rows(row[None], 0, [0])[1][0] for _ in range(steps)])
        crowd = torch.stack([beside.next_rows(row.expand(2, K, V), 0, [0, 1])[1][0] for _ in range(steps)])
    assert torch.equal(mine, crowd)
    drawn = mine[1:].unique()  # after the opening BOS row
    # The six tied at the k-th score hold 6 / (3e + 6) = 0.42 of the mass, one of them 0.07: top-p 0.8
    # removes a tail of at most 0.2, which would be some of them one by one, but is none of them together.
    assert set(drawn.tolist()) == set(range(9))


def test_one_seed_draws_from_the_distribution_row_after_row() -> None:
    """A single slot's random stream over many rows (not fresh seeds): the codes still follow the warpers."""
    config = SamplingConfig(temperature=0.7, top_k=50, top_p=0.95, seed=12, ras_window=0)
    sampler = SlotSampler(1, TOKENS, torch.device("cpu"))
    sampler.admit(0, config, torch.tensor([7, 8, 9, 10, 11, 12, 13, 14]), None)
    step = LOGITS.expand(1, K, V)
    with torch.inference_mode():
        rows = torch.cat([sampler.next_rows(step, 0, [0])[1] for _ in range(2001)][1:])  # after the BOS row
    draws = Draws(torch.bincount(rows.view(-1), minlength=V), rows.numel())
    statistic, bound = chi_square(draws, warped(LOGITS, config))
    assert statistic < bound, (statistic, bound)


def test_the_noise_never_reaches_either_end_of_the_unit_interval() -> None:
    """Its draw's noise is −log(u): u = 1 would make a removed code win the race, u = 0 an infinite one."""
    ends = unit(torch.tensor([0, 1, 2**30, 2**31 - 2, 2**31 - 1]))
    assert bool((ends > 0).all() and (ends < 1).all())
    assert bool(torch.isfinite(-ends.log()).all() and (-ends.log() > 0).all())


def test_a_free_slot_with_a_larger_top_k_does_not_upset_the_step() -> None:
    """Slot 0's last sequence had top-k 200; slot 1 now runs alone with top-k 5 over slots [0, 2)."""
    prompt_ids = torch.tensor([1, 2, 3, 4, 7, 8, 9, 10])
    running = SamplingConfig(top_k=5, seed=1)
    logits = [3 * torch.randn(2, K, V, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    beside = SlotSampler(2, TOKENS, torch.device("cpu"))
    beside.admit(0, SamplingConfig(top_k=200, seed=2), prompt_ids, None)  # then freed: stale state
    beside.admit(1, running, prompt_ids, None)
    alone = SlotSampler(2, TOKENS, torch.device("cpu"))
    alone.admit(1, running, prompt_ids, None)
    with torch.inference_mode():
        got = [beside.next_rows(step, 0, [1])[1][1] for step in logits]
        want = [alone.next_rows(step[1:], 1, [1])[1][0] for step in logits]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_the_warpers_a_step_takes_are_those_of_its_sampled_rows() -> None:
    """Greedy rows never redraw (RAS is off for them, as ``ras_on`` says), so a step of greedy rows takes no
    warper, and a step description that asks for one without sampled rows is refused, not silently skipped."""
    sampler = SlotSampler(2, TOKENS, torch.device("cpu"))
    prompt_ids = torch.tensor([1, 2, 3, 4, 7, 8, 9, 10])
    sampler.admit(0, SamplingConfig(temperature=0, ras_window=7), prompt_ids, None)
    sampler.admit(1, SamplingConfig(seed=1), prompt_ids, None)
    greedy_only, both = sampler.needs([0]), sampler.needs([0, 1])
    assert not (greedy_only.sampled or greedy_only.top_k or greedy_only.nucleus or greedy_only.ras)
    assert both.sampled and both.greedy and both.top_k and both.nucleus and both.ras
    with pytest.raises(ValueError, match="sampled rows"):
        replace(greedy_only, ras=True)


@pytest.mark.parametrize(
    "codes", [V, 1002, 9, 1000]
)  # the last: no groups (1,000 codes are not all in threes)
def test_the_candidates_are_the_highest_scores_topk_finds(codes: int) -> None:
    """The two-stage selection on a CPU finds ``topk``'s scores, highest first, at every width: spread and
    tied scores, infinities, and rows of other lengths."""
    generator = torch.Generator().manual_seed(3)
    spread = 4 * torch.randn(3, K, codes, generator=generator)
    tied = torch.randint(-3, 3, (3, K, codes), generator=generator).float()
    extremes = spread.clone()
    extremes[0, :, :3] = -float("inf")
    extremes[1, :, -2:] = float("inf")
    for logits in (spread, tied, extremes):
        for width in sorted({w for w in (1, 2, 16, 66, 300, codes // 3, codes - 1, codes) if 0 < w <= codes}):
            scores, chosen = highest(logits, width)
            expected = logits.topk(width, dim=-1).values
            assert torch.equal(scores, expected), (codes, width)
            assert torch.equal(logits.gather(-1, chosen), scores)
            assert (chosen.sort(dim=-1).values.diff(dim=-1) > 0).all()  # each code once
