"""Choosing the next audio row of every sequence in a step, the way transformers' Higgs Audio V2 does it.

Why our own: transformers applies its logits processing to a whole batch with one set of parameters, one
delay-pattern state and torch's global random stream. A scheduler whose sequences join and leave at any
step needs the same processing *per sequence*: each its own temperature, top-k, top-p, delay state,
repetition-aware sampling window and random stream. The order and arithmetic follow
``transformers/models/higgs_audio_v2/generation_higgs_audio_v2.py`` (``_sample`` and
``HiggsAudioV2DelayPatternLogitsProcessor``), so that

* greedy decoding picks the tokens transformers' ``generate()`` picks, and
* a seeded sequence draws from the distribution ``generate()`` draws from, and the same codes whatever runs
  beside it, because nothing else reads its random stream.

The delay pattern, in words: the first K steps force codebook k to the stream BOS until step k (codebook
k lags k steps); once any codebook emits the stream EOS, the text token becomes the "delay" token and from
the next step on codebook 0, then 0–1, … are forced to EOS, until a row of all EOS ends the clip.

How it runs (``SlotSampler``): every per-sequence parameter and counter lives in a tensor indexed by slot,
preallocated on the model's device and written once when a sequence is admitted — temperature, top-k,
top-p threshold, greedy flag, the delay pattern's BOS/EOS countdowns and delaying flag, the RAS window as a
ring of the last rows, and the slot's random stream (two keys and a counter). A step is one code path of
tensor ops over the whole batch, greedy and sampled rows alike, with no per-sequence loop and no branch on
tensor values: what no row of the step needs (the draw when all are greedy, top-k or top-p or RAS when none
asks for it) is left out, decided from host-side copies of the settings. The host's per-step work does not
grow with the batch, apart from one copy of the chosen rows, which the handles publish.

* The delay pattern forces whole codebooks, so it is applied to the chosen codes (a forced codebook takes
  the stream BOS or EOS), not as a mask over the vocabulary: the same rows, without a pass over all codes.
* Greedy rows take the ``argmax`` of the raw logits, as ``generate()`` does (ties fall on the lowest code).
* Sampled rows work on their *candidates*: the highest scores of each row, as many as the batch's largest
  top-k plus ``TIE_ROOM`` (every code when some row asks for no top-k), sorted (``highest``). Temperature,
  the row's own k-th score (codes tied with it stay in, as in transformers), top-p (each candidate's mass
  with everything below it, as transformers' ascending cumulative sum) and the draw all run over those few
  candidates, not over 1,026 codes: sorting and drawing over the whole vocabulary cost 0.2 ms a row on a CPU.
* The draw is the exponential race ``torch.multinomial`` itself runs — the code with the largest
  ``weight / noise``, the noise exponential — with counter-based noise: each code's number is a hash of the
  slot's two keys (from the request's seed, or random when it has none), its row counter, the codebook, the
  code and the use (draw or RAS redraw). Nothing else reads it, so a seeded sequence draws the same whatever
  runs beside it, in whichever slot, whenever it arrives; a race does not depend on the candidates' order or
  number; and it is pure tensor arithmetic, so it needs no ``torch.Generator`` per slot and a CUDA graph
  holds it with the rest of the step. That invariance has one bound: more than ``TIE_ROOM`` codes tied at a
  row's k-th score (flat logits, never seen with real ones) are not all candidates at every width.

The price, chosen knowingly: a seeded sequence no longer draws what ``generate()`` draws after
``torch.manual_seed`` (the exponential race that does so consumes 8 × 1,026 draws per row from a generator
per slot, one call per slot, and cost 0.17 ms a row on a CPU). Parity with transformers is distributional:
``tests/test_sampling.py`` checks on fixed logits that the drawn codes follow the distribution transformers'
warpers (temperature, top-k, top-p) and RAS give, and greedy rows stay exactly ``generate()``'s.

Repetition-aware sampling (RAS), as transformers does it: a chosen code already chosen ``ras_max_repeat``
times in the slot's window (stream BOS/EOS not counted) is redrawn from the softmax of the raw logits over
all codes, by inverse CDF in code order with one number per codebook; the test and the redraw run for the
whole batch on the device.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from boson_multimodal.speech_request import RAS_WINDOW_LIMIT, SamplingConfig

CANDIDATE_GROUP = 3  # codes per group in the first of ``highest``'s two selections (fastest on a CPU)
TIE_ROOM = 16  # candidates beyond the batch's largest top-k: up to this many codes tied at the k-th stay in
_DRAW, _REDRAW = 0, 1  # what a random number is read for: a code's draw, or a codebook's RAS redraw
_BITS = 2**31 - 1  # the noise works in 31 bits, so that no int64 product overflows


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


@dataclass(frozen=True)
class StepNeeds:
    """What a step's rows ask of the sampler, known on the host: what none asks for is left out, and a CUDA
    graph, captured before any row is known, asks for everything (which leaves every row's codes the same:
    a warper a row does not use is a no-op for it)."""

    sampled: bool  # some row samples
    greedy: bool  # some row is greedy
    width: int  # candidates per codebook row: the largest top-k plus TIE_ROOM, or every code
    top_k: bool  # some sampled row has a top-k
    nucleus: bool  # some sampled row has a top-p
    ras: bool  # some sampled row has repetition-aware sampling (greedy rows never redraw)

    def __post_init__(self) -> None:
        if not self.sampled and (self.top_k or self.nucleus or self.ras):
            raise ValueError("top-k, top-p and RAS are warpers of sampled rows: a step with none has none")


class SlotSampler:
    """Every slot's sampling state as preallocated tensors on the device, and the batched step over them.

    ``admit`` writes a slot's state once; ``next_rows`` chooses a row for each given slot from its logits
    and advances the state (see the module docstring). Only the scheduler thread calls it.
    """

    def __init__(self, slots: int, tokens: StreamTokens, device: torch.device) -> None:
        k = tokens.num_codebooks
        self.tokens = tokens
        self.device = device

        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.temperature = torch.ones(slots, device=device)
        self.top_k = zeros(slots)  # 0: no top-k
        self.top_p_cut = zeros(slots, dtype=torch.float32)  # remove a tail of mass ≤ this; −1: no top-p
        self.greedy = zeros(slots, dtype=torch.bool)
        self.bos_delay = zeros(slots, k)  # per codebook: ≥ 0 forces the stream BOS this step
        self.eos_delay = zeros(slots, k)  # per codebook: ≤ 0 forces the stream EOS this step
        self.delaying = zeros(slots, dtype=torch.bool)  # an EOS was emitted: the EOS countdown runs
        self.ras_rows = zeros(slots, RAS_WINDOW_LIMIT, k)  # ring of the last rows, prompt audio included
        self.ras_count = zeros(slots)  # rows written to the ring so far
        self.ras_window = zeros(slots)  # 0: no RAS
        self.ras_max_repeat = zeros(slots)
        self.keys = zeros(slots, 2)  # the slot's random stream: two 31-bit keys from the seed …
        self.drawn = zeros(slots)  # … and its counter, the rows chosen so far
        self._codebooks = torch.arange(k, device=device)[:, None]  # (K, 1), beside each row's codes
        self._redraw_counter = self._counter(torch.zeros_like(self._codebooks), _REDRAW)  # (K, 1)
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
        window = prompt_ids[-tokens.num_codebooks :].tolist()
        pattern = list(range(1, tokens.num_codebooks + 1))
        temperature = 1.0 if config.greedy else config.temperature
        top_k = 0 if config.greedy or not config.top_k else min(config.top_k, vocab)
        nucleus = not config.greedy and config.top_p < 1.0
        with torch.inference_mode():
            self.temperature[slot] = temperature
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
            self.keys[slot] = torch.tensor(stream_keys(config.seed))
            self.drawn[slot] = 0
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
        means nothing."""
        rows = self.choose(logits, first, self.needs(active))
        return rows, rows.cpu()  # the one copy

    def needs(self, active: Sequence[int]) -> StepNeeds:
        sampled = [slot for slot in active if self._sampled[slot]]
        top_ks = [self._top_k[slot] for slot in sampled]
        vocab = self.tokens.codebook_size
        return StepNeeds(
            sampled=bool(sampled),
            greedy=len(sampled) < len(active),
            width=vocab if 0 in top_ks or not top_ks else min(vocab, max(top_ks) + TIE_ROOM),
            top_k=any(top_ks),
            nucleus=any(self._nucleus[slot] for slot in sampled),
            ras=any(self._ras_on[slot] for slot in sampled),
        )

    @property
    def everything(self) -> StepNeeds:
        """What a step asks for when its rows are not known (a CUDA graph): every warper, every code."""
        vocab = self.tokens.codebook_size
        return StepNeeds(sampled=True, greedy=True, width=vocab, top_k=True, nucleus=True, ras=True)

    def choose(self, logits: torch.Tensor, first: int, needs: StepNeeds) -> torch.Tensor:
        """The next rows of slots ``[first, first + m)``, on the device, advancing their state: drawn or
        greedy, the delay pattern's forced codes, RAS. Tensor ops only, so a CUDA graph can hold them."""
        span = slice(first, first + logits.shape[0])
        if not needs.sampled:
            rows = self._force(logits.argmax(dim=-1), span)
        else:
            scores, codes = highest(logits, needs.width)
            # The numbers of the draw and of RAS's redraw in one pass: the same numbers, half the ops.
            counters = self._counter(codes, _DRAW)
            if needs.ras:
                counters = torch.cat([counters, self._redraw_counter.expand(codes.shape[0], -1, 1)], dim=-1)
            numbers = self._uniforms(counters, span)
            rows = self._draw(scores, codes, numbers[..., : needs.width], span, needs)
            if needs.greedy:
                rows = torch.where(self.greedy[span, None], logits.argmax(dim=-1), rows)
            rows = self._force(rows, span)
            if needs.ras:
                redrawn = self._redraw(logits, scores[..., :1], numbers[..., needs.width :])
                rows = torch.where(self._repeated(rows, span), redrawn, rows)
        self._commit(rows, span)
        return rows

    @contextmanager
    def greedy_trial(self, slots: int) -> Iterator[None]:
        """Slots ``[0, slots)`` greedy with no codebook forced, for a check of the step (CUDA graphs against
        the eager step) that compares the forward's own choices; every slot's state is restored after."""
        state = [tensor.clone() for tensor in self._state()]
        try:
            with torch.inference_mode():
                self.greedy[:slots] = True
                self.bos_delay[:slots] = -1
                self.eos_delay[:slots] = self.tokens.num_codebooks + 1
                self.delaying[:slots] = False
                self.ras_max_repeat[:slots] = RAS_WINDOW_LIMIT + 1
            yield
        finally:
            with torch.inference_mode():
                for tensor, saved in zip(self._state(), state, strict=True):
                    tensor.copy_(saved)

    def _state(self) -> list[torch.Tensor]:
        return [
            self.temperature, self.top_k, self.top_p_cut, self.greedy, self.bos_delay, self.eos_delay,
            self.delaying, self.ras_rows, self.ras_count, self.ras_window, self.ras_max_repeat, self.keys,
            self.drawn,
        ]  # fmt: skip

    def _force(self, rows: torch.Tensor, span: slice) -> torch.Tensor:
        """The delay pattern: this step's forced codebooks take the stream BOS or EOS (a codebook forced to
        both has no code left, and takes code 0, as an argmax over all −inf does), advancing the countdowns
        as the processor does."""
        tokens = self.tokens
        bos_delay = self.bos_delay[span]
        forced_bos = bos_delay >= 0
        bos_delay -= forced_bos.long()
        eos_delay = self.eos_delay[span]
        eos_delay -= self.delaying[span, None].long()
        forced_eos = eos_delay <= 0
        rows = torch.where(forced_bos, tokens.stream_bos, rows)
        rows = torch.where(forced_eos, tokens.stream_eos, rows)
        return rows.masked_fill(forced_bos & forced_eos, 0)

    def _draw(
        self, scores: torch.Tensor, codes: torch.Tensor, uniforms: torch.Tensor, span: slice, needs: StepNeeds
    ) -> torch.Tensor:
        """Sampled rows over each row's candidates (the highest ``scores``, of ``codes``, one uniform number
        each): temperature, top-k, top-p and the draw, in the order of transformers' warpers (see the
        module docstring). A row whose warper transformers would not add leaves it unchanged (divided by
        1, its k-th score −inf, its cut below every tail).

        Nothing here depends on how many candidates there are or how ties among them are ordered, so a row
        draws the same beside any neighbours: weights are taken relative to the best score, a tail's mass
        counts every code tied with it (tied codes are kept or cut together), and the draw is a race between
        codes, each with its own noise, not a walk along the candidates' order.
        """
        warped = scores / self.temperature[span, None, None]
        if needs.top_k:
            top_k = self.top_k[span]
            # (clamped: a free slot in the span may hold a larger top-k from its last sequence)
            index = (top_k.clamp(min=1, max=needs.width) - 1)[:, None, None].expand(-1, warped.shape[1], 1)
            kth = warped.gather(-1, index).masked_fill((top_k == 0)[:, None, None], -float("inf"))
            warped = warped.masked_fill(warped < kth, -float("inf"))
        weights = (warped - warped[..., :1]).exp()  # the softmax, unnormalised
        if needs.nucleus:
            # Each candidate's tail: its mass and all below it, with every code tied with it (taken where its
            # run of equal scores begins), as the whole mass less what scores higher (summed from the best,
            # so the sums do not depend on how many candidates follow).
            before = F.pad(weights.cumsum(dim=-1), (1, 0))
            starts = torch.ones_like(warped, dtype=torch.bool)
            starts[..., 1:] = warped[..., 1:] != warped[..., :-1]
            position = torch.arange(needs.width, device=self.device).expand_as(warped)
            total = before[..., -1:]
            tail = total - before.gather(-1, position.masked_fill(~starts, 0).cummax(dim=-1).values)
            remove = tail <= self.top_p_cut[span, None, None] * total
            remove &= warped != warped[..., :1]  # keep at least the best (all of them, if tied)
            weights = weights.masked_fill(remove, 0)
        noise = -uniforms.log()  # exponential, per code
        return codes.gather(-1, (weights / noise).argmax(dim=-1, keepdim=True))[..., 0]

    def _redraw(self, logits: torch.Tensor, best: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        """RAS's redraw for every codebook: from the raw logits' softmax over all codes (``best``: their
        largest), by inverse CDF in code order with one ``uniform`` number per codebook (summed in that
        order, whatever else runs)."""
        weights = (logits - best).exp()
        cumulative = weights.cumsum(dim=-1)
        total = cumulative[..., -1:]
        # Strictly below the total, so the first code whose cumulative mass exceeds it has weight.
        target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cumulative, target, right=True)[..., 0]

    def _counter(self, codes: torch.Tensor, use: int) -> torch.Tensor:
        """Which number of its row a slot reads ``(m, K, W)``: (codebook, code, use), below 2¹⁵."""
        return (self._codebooks * self.tokens.codebook_size + codes) * 2 + use

    def _uniforms(self, counter: torch.Tensor, span: slice) -> torch.Tensor:
        """Uniform numbers strictly inside (0, 1), one per counter ``(m, K, W)`` of each slot's next row: the
        slot's keys and row counter scramble it, so the same seed, row and counter give the same number."""
        keys = self.keys[span, :, None, None]
        row = _mix(_mix((self.drawn[span, None, None] & _BITS) ^ keys[:, 0]) ^ keys[:, 1])
        return unit(_mix(_mix(counter ^ row) ^ keys[:, 0]))

    def _repeated(self, candidates: torch.Tensor, span: slice) -> torch.Tensor:
        """RAS's test: which codes were chosen ras_max_repeat times already in the slot's window (stream
        BOS/EOS not counted), and so must be redrawn."""
        ring = self.ras_rows[span]
        filled = torch.minimum(self.ras_count[span], self.ras_window[span])
        in_window = torch.arange(RAS_WINDOW_LIMIT, device=self.device)[None, :] < filled[:, None]
        repeats = (
            (ring == candidates[:, None, :])
            & (ring != self.tokens.stream_bos)
            & (ring != self.tokens.stream_eos)
            & in_window[..., None]
        ).sum(dim=1)
        return repeats >= self.ras_max_repeat[span, None]

    def _commit(self, rows: torch.Tensor, span: slice) -> None:
        """After the rows are chosen: the delaying flag they imply, the RAS ring, the random streams."""
        self.delaying[span] |= (rows == self.tokens.stream_eos).any(dim=-1)
        count = self.ras_count[span]
        at = count % self.ras_window[span].clamp(min=1)
        self.ras_rows[self._slot_ids[span], at] = rows
        count += 1
        self.drawn[span] += 1


def highest(logits: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits.topk(width, dim=-1)``: each row's ``width`` highest scores, highest first, and their codes.

    Why not that call alone on a CPU: its per-row selection costs about 10 ns a code there, half of what
    choosing a batch-8 step's rows costs. Two selections over fewer codes find the same scores (codes tied
    with the last one may be others, as they may be in ``topk`` itself) in about a third less time:

    1. The codes in ``CANDIDATE_GROUP``-code groups (code c in group c mod G) and each group's highest score:
       every one of a row's ``width`` highest codes lies in one of the ``width`` groups with the highest
       maxima, since a group outside them has a maximum no higher than the ``width``-th group's, itself no
       higher than the row's ``width``-th score (those groups hold ``width`` codes at least as high).
    2. ``topk`` over those groups' codes only.

    Scores are compared as int32 keys (their float bits, negatives' flipped: the floats' order), since
    selecting int32 costs less than float32; a NaN, which only a broken forward makes, sorts by its sign bit
    (one from arithmetic is negative on x86, so it comes last, where ``topk`` puts it first). On CUDA
    ``topk`` is one kernel either way, so it is called as it is, as for other dtypes and for rows that the
    groups do not divide (the real and tiny models' 1,026 codes are 342 groups of 3).
    """
    groups, rest = divmod(logits.shape[-1], CANDIDATE_GROUP)
    if logits.device.type != "cpu" or logits.dtype != torch.float32 or rest or width >= groups:
        return logits.topk(width, dim=-1)
    bits = logits.view(torch.int32)
    keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    maxima = keys.view(*keys.shape[:-1], CANDIDATE_GROUP, groups).amax(dim=-2)
    offsets = torch.arange(0, CANDIDATE_GROUP * groups, groups, device=logits.device)[:, None]  # in a group
    codes = (maxima.topk(width, dim=-1).indices[..., None, :] + offsets).flatten(-2)
    chosen = keys.gather(-1, codes).topk(width, dim=-1).indices
    codes = codes.gather(-1, chosen)
    return logits.gather(-1, codes), codes


def stream_keys(seed: int | None) -> tuple[int, int]:
    """A slot's two 31-bit noise keys: from the seed (the same on every machine and Python version), or
    random when the request has none."""
    source = random.Random(seed) if seed is not None else random.SystemRandom()
    return source.getrandbits(31), source.getrandbits(31)


def unit(bits: torch.Tensor) -> torch.Tensor:
    """31-bit integers as float32 numbers strictly inside (0, 1): their top 23 bits and a half, exact (the
    draw's noise is −log of it, so neither end may be reached)."""
    return ((bits >> 8).float() + 0.5) * 2**-23


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A bijection of [0, 2³¹) that scrambles its bits: xorshift-multiply rounds (the products stay below
    2⁶³, so int64 arithmetic never overflows, on any device)."""
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _BITS
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _BITS
    return x ^ (x >> 16)


def _shifted(pattern: list[int], window: list[int], token: int, otherwise: list[int]) -> list[int]:
    if token not in window:
        return list(otherwise)
    return [delay - (len(pattern) - window.index(token)) for delay in pattern]
