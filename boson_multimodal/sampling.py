"""Choosing the next audio row of every sequence in a step, the way transformers' Higgs Audio V2 does it.

Why our own: transformers applies its logits processing to a whole batch with one set of parameters, one
delay-pattern state and torch's global random stream. A scheduler whose sequences join and leave at any
step needs the same processing *per sequence*: each its own temperature, top-k, top-p, delay state,
repetition-aware sampling window and random generator. The order and arithmetic follow
``transformers/models/higgs_audio_v2/generation_higgs_audio_v2.py`` (``_sample`` and
``HiggsAudioV2DelayPatternLogitsProcessor``), so that

* greedy decoding picks the tokens transformers' ``generate()`` picks, and
* a seeded sequence draws exactly what ``generate()`` draws after ``torch.manual_seed(seed)`` for a batch
  of one — and the same whatever runs beside it, because nothing else touches its generator.

The delay pattern, in words: the first K steps force codebook k to the stream BOS until step k (codebook
k lags k steps); once any codebook emits the stream EOS, the text token becomes the "delay" token and from
the next step on codebook 0, then 0–1, … are forced to EOS, until a row of all EOS ends the clip.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

# Boson's repetition-aware sampling defaults (``GenerationConfig.from_pretrained`` drops these keys).
RAS_WINDOW = 7
RAS_MAX_REPEAT = 2


@dataclass(frozen=True)
class SamplingConfig:
    """What transformers' Higgs Audio V2 supports: greedy, or sampling with temperature, top-k and top-p."""

    temperature: float = 0.7  # 0 means greedy decoding
    top_p: float = 0.95
    top_k: int | None = 50
    max_new_tokens: int = 1024  # decode steps; N steps give N − 8 frames of 40 ms
    seed: int | None = None
    ras_window: int = RAS_WINDOW  # repetition-aware sampling; 0 turns it off
    ras_max_repeat: int = RAS_MAX_REPEAT

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def deterministic(self) -> bool:
        """Same request, same audio: greedy decoding, or sampling from a fixed seed."""
        return self.greedy or self.seed is not None

    @property
    def ras_on(self) -> bool:
        """RAS resamples even in greedy mode in transformers; greedy here means greedy, so it is off there."""
        return self.ras_window > 0 and not self.greedy


@dataclass(frozen=True)
class StreamTokens:
    """The ids that shape a clip: the text tokens the delay pattern reads and the audio stream's ends."""

    audio_bos_token: int  # text token that opens the generated audio (<|audio_out_bos|>)
    audio_delay_token: int  # text token that marks "the clip is ending" (the delay pattern's EOS)
    stream_bos: int  # audio code opening the stream (codebook_size − 2)
    stream_eos: int  # audio code closing the stream (codebook_size − 1)
    num_codebooks: int
    codebook_size: int  # codes per codebook in the LM's head, BOS and EOS included

    @classmethod
    def from_config(cls, config) -> StreamTokens:
        return cls(
            audio_bos_token=config.audio_bos_token_id,
            audio_delay_token=config.audio_delay_token_id,
            stream_bos=config.audio_stream_bos_id,
            stream_eos=config.audio_stream_eos_id,
            num_codebooks=config.num_codebooks,
            codebook_size=config.codebook_size,
        )


@dataclass
class SequenceSampler:
    """One sequence's sampling state: parameters, delay pattern, recent rows for RAS, its own generator.

    The bookkeeping is plain Python (eight small integers a step): a torch call costs more than the work.
    """

    config: SamplingConfig
    generator: torch.Generator
    bos_delay: list[int]  # per codebook: a value ≥ 0 forces the stream BOS this step
    eos_delay: list[int]  # per codebook: a value ≤ 0 forces the stream EOS this step
    recent_rows: deque[tuple[int, ...]]  # the last ``ras_window`` audio rows, the prompt's included
    delaying: bool = False  # the previous text token was the delay token
    finished: bool = False  # the last row was all stream EOS

    @classmethod
    def start(
        cls,
        config: SamplingConfig,
        tokens: StreamTokens,
        prompt_ids: torch.Tensor,
        prompt_audio_rows: torch.Tensor | None,
        device: torch.device,
    ) -> SequenceSampler:
        """State before the first step, from the prompt's last K text ids and its audio rows (CPU tensors).

        As in the delay processor: an audio BOS among the last K ids shifts the BOS countdown by its distance
        from the end (at the very end: codebook k is forced to BOS for k + 1 steps); an audio delay token
        there starts the EOS countdown the same way.
        """
        generator = torch.Generator(device=device)
        if config.seed is not None:
            generator.manual_seed(config.seed)
        else:
            generator.seed()
        window = prompt_ids[-tokens.num_codebooks :].tolist()
        pattern = list(range(1, tokens.num_codebooks + 1))
        rows = [] if prompt_audio_rows is None else [tuple(r) for r in prompt_audio_rows.tolist()]
        return cls(
            config=config,
            generator=generator,
            bos_delay=_shifted(pattern, window, tokens.audio_bos_token, otherwise=[0] * len(pattern)),
            eos_delay=_shifted(pattern, window, tokens.audio_delay_token, otherwise=pattern),
            recent_rows=deque(
                rows[-config.ras_window :] if config.ras_on else [], maxlen=config.ras_window or 1
            ),
            delaying=window[-1] == tokens.audio_delay_token,
        )

    def masks(self) -> tuple[list[bool], list[bool]]:
        """This step's forced codebooks (BOS, EOS), advancing the countdowns as the processor does."""
        forced_bos = [delay >= 0 for delay in self.bos_delay]
        self.bos_delay = [delay - 1 if delay >= 0 else delay for delay in self.bos_delay]
        if self.delaying:
            self.eos_delay = [delay - 1 for delay in self.eos_delay]
        return forced_bos, [delay <= 0 for delay in self.eos_delay]

    def record(self, row: list[int], tokens: StreamTokens) -> None:
        """After a row is chosen: the text token it implies, and the RAS window."""
        ended = [code == tokens.stream_eos for code in row]
        self.delaying = self.delaying or any(ended)
        self.finished = all(ended)
        if self.config.ras_on:
            self.recent_rows.append(tuple(row))


def _shifted(pattern: list[int], window: list[int], token: int, otherwise: list[int]) -> list[int]:
    if token not in window:
        return list(otherwise)
    return [delay - (len(pattern) - window.index(token)) for delay in pattern]


def next_rows(logits: torch.Tensor, samplers: list[SequenceSampler], tokens: StreamTokens) -> torch.Tensor:
    """The next row ``(n, K)`` (on the CPU) for each of n sequences, from raw logits ``(n, K, V)`` (float32).

    Updates each sampler's state. Greedy rows take the argmax of the delay-masked logits; sampled rows go
    through temperature, top-k and top-p (each only where transformers would add that warper), then draw
    from their own generator; then repetition-aware sampling redraws over-repeated codes from the raw logits.
    """
    n, num_codebooks, vocab = logits.shape
    device = logits.device
    forced = [sampler.masks() for sampler in samplers]
    codes = torch.arange(vocab, device=device)
    forced_bos = torch.tensor([bos for bos, _ in forced], device=device)[..., None] & (
        codes != tokens.stream_bos
    )
    forced_eos = torch.tensor([eos for _, eos in forced], device=device)[..., None] & (
        codes != tokens.stream_eos
    )
    scores = logits.masked_fill(forced_bos | forced_eos, -float("inf"))

    chosen = torch.empty(n, num_codebooks, dtype=torch.long, device=device)
    greedy = [i for i, s in enumerate(samplers) if s.config.greedy]
    sampled = [i for i, s in enumerate(samplers) if not s.config.greedy]
    if greedy:
        chosen[greedy] = scores[greedy].argmax(dim=-1)
    if sampled:
        probs = _warped(scores[sampled], [samplers[i].config for i in sampled]).softmax(dim=-1)
        for row, i in enumerate(sampled):
            draw = torch.multinomial(probs[row], num_samples=1, generator=samplers[i].generator)
            chosen[i] = draw.squeeze(1)
    rows = chosen.tolist()
    for i, sampler in enumerate(samplers):
        _repetition_aware(rows[i], logits[i], sampler, tokens)
        sampler.record(rows[i], tokens)
    return torch.tensor(rows, dtype=torch.long)


def _warped(scores: torch.Tensor, configs: list[SamplingConfig]) -> torch.Tensor:
    """Temperature, top-k, top-p over ``(m, K, V)`` with per-sequence values, as transformers' warpers do
    them, operation for operation (bf16 logits tie often, and ties must fall as transformers lets them).

    A warper transformers would not add for a sequence (temperature 1, top-k None or 0, top-p 1) is skipped
    for it here too: even a no-op warper can change probabilities that underflow.
    """
    m, _, vocab = scores.shape
    device = scores.device

    def per_sequence(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=scores.dtype, device=device)[:, None, None]

    # Divided by a Python number, as transformers does (on CUDA that is a multiplication by its reciprocal,
    # which can differ from dividing by a tensor in the last bit); x / 1 is x.
    divided = torch.empty_like(scores)
    for temperature in {c.temperature for c in configs}:
        rows = [i for i, c in enumerate(configs) if c.temperature == temperature]
        divided[rows] = scores[rows] / temperature
    scores = divided
    top_k = [min(c.top_k, vocab) if c.top_k else 0 for c in configs]
    if any(top_k):
        # transformers: remove what is below the k-th largest score (torch.topk), per sequence's own k
        largest = scores.topk(max(top_k), dim=-1).values
        index = torch.tensor([max(k, 1) - 1 for k in top_k], device=device)[:, None, None]
        kth = largest.gather(-1, index.expand(m, scores.shape[1], 1))
        remove = (scores < kth) & (per_sequence([k > 0 for k in top_k]) > 0)
        scores = scores.masked_fill(remove, -float("inf"))
    nucleus = [c.top_p < 1.0 for c in configs]
    if any(nucleus):
        sorted_scores, order = scores.sort(dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - per_sequence([c.top_p for c in configs]))
        remove[..., -1:] = False  # keep at least one
        remove &= per_sequence(nucleus) > 0
        scores = scores.masked_fill(remove.scatter(-1, order, remove), -float("inf"))
    return scores


def _repetition_aware(row: list[int], logits: torch.Tensor, sampler: SequenceSampler, tokens: StreamTokens):
    """Boson's RAS: a code repeated ``ras_max_repeat`` times in the last ``ras_window`` rows is redrawn from
    the untempered raw logits (stream BOS/EOS in the window do not count). In place on ``row``."""
    config = sampler.config
    if not config.ras_on or not sampler.recent_rows:
        return
    ends = (tokens.stream_bos, tokens.stream_eos)
    redraw = [
        k
        for k, code in enumerate(row)
        if sum(past[k] == code and past[k] not in ends for past in sampler.recent_rows)
        >= config.ras_max_repeat
    ]
    if redraw:
        probs = logits[redraw].softmax(dim=-1)
        drawn = probs.multinomial(1, replacement=True, generator=sampler.generator).view(-1).tolist()
        for k, code in zip(redraw, drawn, strict=True):
            row[k] = code
