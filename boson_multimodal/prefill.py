"""A prompt's prefill in fixed pieces, so that a long one (30–60 s of reference audio) stalls no stream.

Why pieces: a prompt with 50 s of reference audio is about 1,400 tokens; prefilled in one forward between two
decode steps, it holds every running stream for that whole forward. The scheduler instead runs a piece of at
most ``PREFILL_PIECE`` tokens between two steps, and spaces a long prompt's later pieces by several steps
(``scheduler.py``), so no gap between two of a stream's rows is longer than one step and one piece, and one
long prompt adds about one piece to a chunk of its rows rather than its whole prefill.

Each piece is transformers' own forward over the next positions, on the cache of the pieces before it, with
the reference-audio frames whose placeholders fall in it (the model scatters audio embeddings over its
placeholder tokens in order, so piece ``[a, b)`` takes the frames after the placeholders before ``a``).

Where the pieces fall depends on the prompt alone, never on what runs beside it, so a sequence's tokens are
the same whatever its neighbours and whenever it arrives. A prompt of at most ``PREFILL_PIECE`` tokens (a
request with a reference clip up to about 15 s) is one piece: the same forward as ``generate()``'s prefill,
so its greedy tokens are exactly ``generate()``'s. A longer prompt's logits equal the one-forward prefill's
up to float rounding (about 1e-6 on the tiny CPU model, ``tests/test_prefill.py``).

Several one-piece prompts admitted in the same step can also be prefilled together (``prefill_together``): one
forward over them, right-padded, so each keeps the positions it has alone and no real token sees a pad. Why:
on a GPU a short prompt's prefill is mostly kernel launches and reading the weights, which one forward over
several prompts shares (expected, not yet measured there: ``benchmarks/gpu_check.py`` times 16 streams'
first chunk both ways). The price is rounding: a prompt's logits beside others differ from its logits alone
(1e-7 to 6e-6 on the tiny CPU models), so its tokens may depend on its neighbours, as a GPU's batch-sized
kernels already make them. This is the one place that trade is stated; the scheduler prefills together only
when asked, which the engine does on a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

PREFILL_PIECE = 512  # prompt tokens per piece, by default (SchedulerLimits.prefill_piece)


class PiecewisePrefill:
    """One prompt (batch of one) prefilled a piece at a time into its own transformers cache."""

    def __init__(
        self,
        model,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        audio_input_ids: torch.Tensor | None,
        audio_input_ids_mask: torch.Tensor | None,
        piece: int,
    ) -> None:
        self._model = model
        self._input_ids = input_ids
        self._attention_mask = attention_mask
        self._piece = piece
        self.cache = DynamicCache(config=model.config)
        self.done = 0  # prompt positions prefilled so far
        self._frames: torch.Tensor | None = None  # (F, K): the valid reference frames, in placeholder order
        self._frame_starts: list[int] = [0]  # frames used by the pieces before each piece
        if audio_input_ids is not None:
            self._frames = valid_frames(audio_input_ids, audio_input_ids_mask)
            before = placeholders(model.config, input_ids[0]).long().cumsum(0)
            for end in range(piece, self.length + piece, piece):
                self._frame_starts.append(int(before[min(end, self.length) - 1]))

    @property
    def length(self) -> int:
        return int(self._input_ids.shape[1])

    @property
    def next_piece(self) -> int:
        """Prompt tokens the next ``step`` prefills."""
        return min(self._piece, self.length - self.done)

    @property
    def finished(self) -> bool:
        return self.done >= self.length

    def step(self) -> torch.Tensor | None:
        """Prefill the next piece; after the last one, return the logits of the prompt's last position."""
        start, end = self.done, self.done + self.next_piece
        index = start // self._piece
        frames = None
        if self._frames is not None:
            first, last = self._frame_starts[index], self._frame_starts[index + 1]
            if last > first:
                frames = self._frames[first:last][None]
        output = self._model(
            input_ids=self._input_ids[:, start:end],
            attention_mask=self._attention_mask[:, :end],
            audio_input_ids=frames,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.done = end
        return output.logits[:, -1] if self.finished else None


def placeholders(config, input_ids: torch.Tensor) -> torch.Tensor:
    """Where ``input_ids`` hold an audio placeholder, which the model replaces with the next reference frame's
    embedding (as transformers' ``get_placeholder_mask`` finds them)."""
    return (input_ids == config.audio_token_id) | (input_ids == config.audio_delay_token_id)


def valid_frames(audio_input_ids: torch.Tensor, audio_input_ids_mask: torch.Tensor | None) -> torch.Tensor:
    """A prompt's (batch of one) reference frames ``(F, K)`` that its mask marks valid, in placeholder
    order."""
    frames = audio_input_ids[0]
    return frames if audio_input_ids_mask is None else frames[audio_input_ids_mask[0].bool()]


def prefill_together(
    model, prompts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], device: torch.device
) -> tuple[torch.Tensor, DynamicCache]:
    """Several one-piece prompts ``(input_ids (1, L), attention_mask (1, L), valid frames (F, K) or None)``,
    on the CPU, in one forward on ``device``; returns the logits of each prompt's last position ``(B, …)``
    and the cache, whose row b holds prompt b's keys and values at positions ``[0, L_b)`` (the rest is
    padding, never read).

    Right padding keeps every prompt at the positions it has alone, and a causal mask lets no real token
    see a pad that follows it. The pads repeat each prompt's first token (its text BOS), never an audio
    placeholder, so the model scatters the frames, concatenated in prompt order, over the real placeholders
    only; prompts with and without reference audio mix. That scatter pairs frames with placeholders across
    the whole batch, so a prompt whose frames do not match its own placeholders would shift its neighbours'
    audio: such a batch is refused (``ValueError``, before any forward), and its prompts can still be
    prefilled one by one. The batch is built on the CPU and moved once, so checking and padding it costs the
    device no synchronisation.
    """
    config = model.config
    for ids, _, valid in prompts:
        places = int(placeholders(config, ids).sum())
        count = 0 if valid is None else valid.shape[0]
        if places != count:
            raise ValueError(f"a prompt has {places} audio placeholders but {count} reference frames")
    longest = max(ids.shape[1] for ids, _, _ in prompts)
    input_ids = torch.stack(
        [F.pad(ids[0], (0, longest - ids.shape[1]), value=int(ids[0, 0])) for ids, _, _ in prompts]
    )
    attention_mask = torch.stack([F.pad(mask[0], (0, longest - mask.shape[1])) for _, mask, _ in prompts])
    frames = [valid for _, _, valid in prompts if valid is not None and valid.shape[0]]
    lasts = [ids.shape[1] - 1 for ids, _, _ in prompts]
    kept = sorted(set(lasts))  # a 1-D tensor of positions, which every transformers version takes
    cache = DynamicCache(config=config)
    output = model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        audio_input_ids=torch.cat(frames)[None].to(device) if frames else None,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=torch.tensor(kept, device=device),
    )
    rows = torch.arange(len(prompts), device=device)
    at = torch.tensor([kept.index(last) for last in lasts], device=device)
    return output.logits[rows, at], cache
