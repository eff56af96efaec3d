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

How it runs (``SlotSampler``): every per-sequence parameter and counter lives in a tensor indexed by slot,
preallocated on the model's device and written once when a sequence is admitted — temperature, top-k,
top-p threshold, greedy flag, the delay pattern's BOS/EOS countdowns and delaying flag, the RAS window as a
ring of the last rows. A step is one code path of tensor ops over the whole batch, greedy and sampled rows
alike: delay masks, temperature, per-row top-k (one ``topk`` at the batch's largest k, then each row's own
k-th value) and top-p, the draw, the RAS test and the state update. The host's per-step work does not grow
with the batch, apart from one copy of the chosen rows, which the handles publish.

The draw is the *exponential race*, chosen over counter-based noise because it keeps draw-for-draw parity
with ``generate()``: ``torch.multinomial(p, 1)`` is itself implemented as
``q = empty_like(p).exponential_()`` then ``argmax(p / q)``, so filling ``q`` from the sequence's own
generator and taking ``argmax(p / q)`` consumes exactly what ``multinomial`` consumes and picks the same
codes (``tests/test_sampling.py`` checks it). Each slot keeps one ``torch.Generator``, seeded at admission,
so a seeded sequence's draws do not depend on its neighbours or on when it arrived. The one call per sampled
slot, ``noise[slot].exponential_(generator=g)``, is the only per-sequence operation of a step (torch has no
batched draw from several generators); on CUDA it runs inside the step's graph. Counter-based noise from
(seed, step) would batch that call too, but makes parity with ``generate()`` distributional only.

Repetition-aware sampling (RAS) redraws an over-repeated code from the raw logits with ``multinomial`` over
only the redrawn codebooks, so how much it consumes depends on how many there are. To stay draw-for-draw
equal, the test runs on the device for the whole batch and travels back with the chosen rows (still one
copy), and only a step where some row must redraw does the redraw, for those rows, from the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from boson_multimodal.speech_request import RAS_WINDOW_LIMIT, SamplingConfig


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


class SlotSampler:
    """Every slot's sampling state as preallocated tensors on the device, and the batched step over them.

    ``admit`` writes a slot's state once; ``next_rows`` chooses a row for each given slot from its logits
    and advances the state (see the module docstring). Only the scheduler thread calls it.
    """

    def __init__(self, slots: int, tokens: StreamTokens, device: torch.device) -> None:
        k, vocab = tokens.num_codebooks, tokens.codebook_size
        self.tokens = tokens
        self.device = device

        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        # CUDA divides a tensor by a Python number as a multiplication by its float32 reciprocal, and
        # transformers divides by a Python number: to match it bit for bit, do what the device would do.
        self._divide = device.type != "cuda"
        self.temperature = torch.ones(slots, device=device)  # the divisor (or its reciprocal on CUDA)
        self.top_k = zeros(slots)  # 0: no top-k
        self.top_p_cut = zeros(slots, dtype=torch.float32)  # remove cumulative ≤ this; −1: no top-p
        self.greedy = zeros(slots, dtype=torch.bool)
        self.bos_delay = zeros(slots, k)  # per codebook: ≥ 0 forces the stream BOS this step
        self.eos_delay = zeros(slots, k)  # per codebook: ≤ 0 forces the stream EOS this step
        self.delaying = zeros(slots, dtype=torch.bool)  # an EOS was emitted: the EOS countdown runs
        self.ras_rows = zeros(slots, RAS_WINDOW_LIMIT, k)  # ring of the last rows, prompt audio included
        self.ras_count = zeros(slots)  # rows written to the ring so far
        self.ras_window = zeros(slots)  # 0: no RAS
        self.ras_max_repeat = zeros(slots)
        self.noise = torch.ones(slots, k, vocab, dtype=torch.float32, device=device)
        self.generators = [torch.Generator(device=device) for _ in range(slots)]
        self._codes = torch.arange(vocab, device=device)
        self._slot_ids = torch.arange(slots, device=device)
        # Host copies of what decides the shapes of a step (never read back from the device).
        self._sampled = [False] * slots
        self._ras_on = [False] * slots
        self._top_k = [0] * slots
        self._nucleus = [False] * slots

    def admit(
        self,
        slot: int,
        config: SamplingConfig,
        prompt_ids: torch.Tensor,
        prompt_audio_rows: torch.Tensor | None,
    ) -> None:
        """Write ``slot``'s state before its first row, from the prompt's text ids and audio rows (CPU).

        As in the delay processor: an audio BOS among the last K ids shifts the BOS countdown by its distance
        from the end (at the very end: codebook k is forced to BOS for k + 1 steps); an audio delay token
        there starts the EOS countdown the same way.
        """
        tokens, vocab = self.tokens, self.tokens.codebook_size
        generator = self.generators[slot]
        if config.seed is not None:
            generator.manual_seed(config.seed)
        else:
            generator.seed()
        window = prompt_ids[-tokens.num_codebooks :].tolist()
        pattern = list(range(1, tokens.num_codebooks + 1))
        temperature = 1.0 if config.greedy else config.temperature
        divisor = torch.tensor(temperature, dtype=torch.float32)
        top_k = 0 if config.greedy or not config.top_k else min(config.top_k, vocab)
        nucleus = not config.greedy and config.top_p < 1.0
        with torch.inference_mode():
            self.temperature[slot] = divisor if self._divide else 1 / divisor
            self.top_k[slot] = top_k
            # transformers compares float32 cumulative probabilities with the Python number 1 − top_p
            self.top_p_cut[slot] = (
                float(torch.tensor(1 - config.top_p, dtype=torch.float32)) if nucleus else -1
            )
            self.greedy[slot] = config.greedy
            self.bos_delay[slot] = torch.tensor(
                _shifted(pattern, window, tokens.audio_bos_token, otherwise=[0] * len(pattern))
            )
            self.eos_delay[slot] = torch.tensor(
                _shifted(pattern, window, tokens.audio_delay_token, otherwise=pattern)
            )
            self.delaying[slot] = window[-1] == tokens.audio_delay_token
            recent = (
                prompt_audio_rows[-config.ras_window :]
                if config.ras_on and prompt_audio_rows is not None
                else torch.zeros(0, tokens.num_codebooks, dtype=torch.long)
            )
            self.ras_rows[slot, : recent.shape[0]] = recent.to(self.device)
            self.ras_count[slot] = recent.shape[0]
            self.ras_window[slot] = config.ras_window if config.ras_on else 0
            # With RAS off the window is empty, so no code can reach this many repeats.
            self.ras_max_repeat[slot] = config.ras_max_repeat if config.ras_on else RAS_WINDOW_LIMIT + 1
        self._sampled[slot] = not config.greedy
        self._ras_on[slot] = config.ras_on
        self._top_k[slot] = top_k
        self._nucleus[slot] = nucleus

    def next_rows(
        self, logits: torch.Tensor, first: int, active: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The next row ``(m, K)`` of slots ``[first, first + m)`` from their raw float32 logits
        ``(m, K, V)``, on the device (the next step's input) and on the CPU (for the handles); advances their
        state. Slots in that range not in ``active`` (free ones, computing padding) get a row too, which
        means nothing, and draw nothing from any generator."""
        m = logits.shape[0]
        span = slice(first, first + m)
        candidates, redraw = self._choose(logits, span, active)
        ras = any(self._ras_on[slot] for slot in active)
        host = (torch.cat([candidates, redraw.long()], dim=-1) if ras else candidates).cpu()  # the one copy
        rows = host[:, : self.tokens.num_codebooks]
        if ras and bool(host[:, self.tokens.num_codebooks :].any()):
            self._redraw(logits, candidates, rows, host[:, self.tokens.num_codebooks :].bool(), first, active)
        self._commit(candidates, span)
        return candidates, rows

    def _choose(self, logits: torch.Tensor, span: slice, active: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """Candidate rows and which of their codes RAS must redraw, for the slots in ``span``."""
        tokens = self.tokens
        # The delay pattern: this step's forced codebooks, advancing the countdowns as the processor does.
        bos_delay = self.bos_delay[span]
        forced_bos = bos_delay >= 0
        bos_delay -= forced_bos.long()
        eos_delay = self.eos_delay[span]
        eos_delay -= self.delaying[span, None].long()
        forced_eos = eos_delay <= 0
        masked = (forced_bos[..., None] & (self._codes != tokens.stream_bos)) | (
            forced_eos[..., None] & (self._codes != tokens.stream_eos)
        )
        scores = logits.masked_fill(masked, -float("inf"))
        # Temperature, top-k and top-p, operation for operation as transformers' warpers do them (bf16 logits
        # tie often, and ties must fall as transformers lets them); a row whose warper transformers would not
        # add leaves it unchanged (divided by 1, its k-th value −inf, its cut below every probability).
        divisor = self.temperature[span, None, None]
        warped = scores / divisor if self._divide else scores * divisor
        largest_k = max(self._top_k[slot] for slot in active)
        if largest_k:
            top_k = self.top_k[span]
            largest = warped.topk(largest_k, dim=-1).values
            index = (top_k.clamp(min=1) - 1)[:, None, None].expand(-1, warped.shape[1], 1)
            kth = largest.gather(-1, index).masked_fill((top_k == 0)[:, None, None], -float("inf"))
            warped = warped.masked_fill(warped < kth, -float("inf"))
        if any(self._nucleus[slot] for slot in active):
            sorted_scores, order = warped.sort(dim=-1, descending=False)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            remove = cumulative <= self.top_p_cut[span, None, None]
            remove[..., -1:] = False  # keep at least one
            warped = warped.masked_fill(remove.scatter(-1, order, remove), -float("inf"))
        # The draw: the exponential race (see the module docstring); a greedy row takes the argmax of its
        # delay-masked scores instead.
        noise = self.noise[span]
        for slot in active:
            if self._sampled[slot]:
                self.noise[slot].exponential_(generator=self.generators[slot])
        race = warped.softmax(dim=-1) / noise
        candidates = torch.where(self.greedy[span, None, None], scores, race).argmax(dim=-1)
        # RAS: a code repeated ras_max_repeat times in the window (stream BOS/EOS not counted) is redrawn.
        ring = self.ras_rows[span]
        filled = torch.minimum(self.ras_count[span], self.ras_window[span])
        in_window = torch.arange(RAS_WINDOW_LIMIT, device=self.device)[None, :] < filled[:, None]
        repeats = (
            (ring == candidates[:, None, :])
            & (ring != tokens.stream_bos)
            & (ring != tokens.stream_eos)
            & in_window[..., None]
        ).sum(dim=1)
        redraw = repeats >= self.ras_max_repeat[span, None]
        return candidates, redraw

    def _redraw(
        self,
        logits: torch.Tensor,
        candidates: torch.Tensor,
        rows: torch.Tensor,
        redraw: torch.Tensor,
        first: int,
        active: Sequence[int],
    ) -> None:
        """RAS's redraw, from the untempered raw logits of only the codebooks that need it, drawing what
        ``multinomial`` over them would draw (in place on the device candidates and the host rows)."""
        for slot in active:
            codebooks = redraw[slot - first].nonzero().view(-1)
            if codebooks.numel() == 0:
                continue
            probs = logits[slot - first, codebooks.to(self.device)].softmax(dim=-1)
            noise = torch.empty_like(probs).exponential_(generator=self.generators[slot])
            drawn = (probs / noise).argmax(dim=-1)
            candidates[slot - first, codebooks.to(self.device)] = drawn
            rows[slot - first, codebooks] = drawn.cpu()

    def _commit(self, rows: torch.Tensor, span: slice) -> None:
        """After the rows are chosen: the delaying flag they imply, and the RAS ring."""
        self.delaying[span] |= (rows == self.tokens.stream_eos).any(dim=-1)
        count = self.ras_count[span]
        at = count % self.ras_window[span].clamp(min=1)
        self.ras_rows[self._slot_ids[span], at] = rows
        count += 1


def _shifted(pattern: list[int], window: list[int], token: int, otherwise: list[int]) -> list[int]:
    if token not in window:
        return list(otherwise)
    return [delay - (len(pattern) - window.index(token)) for delay in pattern]
