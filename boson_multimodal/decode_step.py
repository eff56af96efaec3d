"""The decode step: one audio row per sequence in flight, through the model's own layers, over a slot cache.

Why not ``model.forward`` with a transformers cache: the scheduler's sequences have different lengths and
come and go at every step, which transformers' caches (one length per batch, left padding) do not express,
and a step with fixed shapes is what CUDA graphs need. So, like gpt-fast and nano-vllm, the KV cache is
preallocated — ``slots × max_tokens`` positions per layer, one slot per sequence — and the step is written
out here against the loaded model's modules (its weights, norms and rotary embedding):

    rows (n, K) ─ audio embedding ─▶ per layer: audio norm → attention over the slot's cache → audio MLP
                                      ─▶ final norm ─▶ audio head ─▶ logits (n, K, V)

In decode mode transformers feeds Higgs Audio V2 only the previous audio row, with no text token, so
every position takes the audio branch of the dual FFN (``audio_token_mask`` is None); that is the path
written here. The prompt (text and reference audio mixed) is prefilled by transformers' own forward and its
keys and values are copied into the slot (``load_prefill``).

Attention is ``torch.nn.functional.scaled_dot_product_attention`` called here with a boolean mask,
whatever ``config._attn_implementation`` names. Why not transformers' attention function: its eager one
*adds* the mask to the scores (a boolean mask then lets stale cache positions in), flash-attention reads
masks differently, and its sdpa one copies the grouped-query K/V heads with ``repeat_kv`` on some versions
(5.17) and not on others (5.23) — the same code, different memory traffic. Grouped-query heads are not
copied: a decode step has one query position, so the query heads that share a K/V head are laid along the
query-length axis of that head (``(n, kv_heads, group, head_dim)``) and attend as one. This needs no
``enable_gqa``, which torch's fused kernels refuse beside a mask (it falls back to the math kernel, which
copies K/V with ``repeat_interleave``), so any SDPA backend can run it.

Row b of a step is slot b: a step runs over slots ``[0, n)``, free slots in that range compute a throwaway
row at position 0 of their own (unused) cache, and nothing is gathered or copied per step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.higgs_audio_v2 import modeling_higgs_audio_v2 as higgs

from boson_multimodal.sampling import SlotSampler, StepNeeds

logger = logging.getLogger(__name__)

# Batch sizes the CUDA graphs are captured for (a step pads to the next one) and the attention spans (a
# step attends over the next one that covers its longest sequence, so short sequences do not pay for
# reading a long cache).
GRAPH_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
GRAPH_SPAN_BUCKET = 512


def span_buckets(max_tokens: int) -> list[int]:
    """The spans a graph is captured for, up to a slot's ``max_tokens``: a step attends over the first one
    that covers its span."""
    return [*range(GRAPH_SPAN_BUCKET, max_tokens, GRAPH_SPAN_BUCKET), max_tokens]


class SlotCache:
    """Preallocated keys and values: ``slots`` sequences of up to ``max_tokens`` positions, every layer."""

    # One spare position per slot, never read: a step's span then never covers the whole axis, so the keys it
    # reads are always a strided slice (torch.compile would compile the slice that covers it apart).
    SPARE = 1

    def __init__(self, config, slots: int, max_tokens: int, device: torch.device, dtype: torch.dtype):
        shape = (slots, config.num_key_value_heads, max_tokens + self.SPARE, config.head_dim)
        layers = range(config.num_hidden_layers)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in layers]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in layers]
        self.slots = slots
        self.max_tokens = max_tokens

    @staticmethod
    def bytes_needed(config, slots: int, max_tokens: int, dtype: torch.dtype) -> int:
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
        return slots * (max_tokens + SlotCache.SPARE) * per_token * dtype.itemsize

    def load_prefill(self, slot: int, past_key_values, row: int = 0, length: int | None = None) -> int:
        """Copy row ``row`` of a prefilled transformers cache into ``slot``: its first ``length`` positions
        (all of them by default; a prompt prefilled beside longer ones has padding after its own); returns
        the prompt length."""
        length = past_key_values.layers[0].keys.shape[-2] if length is None else length
        for layer, cached in enumerate(past_key_values.layers):
            self.keys[layer][slot, :, :length] = cached.keys[row, :, :length]
            self.values[layer][slot, :, :length] = cached.values[row, :, :length]
        return length


class DecodeStep:
    """The model's decode forward for slots ``[0, n)``: rows ``(n, K)`` at ``positions`` ``(n,)`` → logits.

    ``compiled``: the forward through ``torch.compile`` (inductor, dynamic shapes, no CUDA graphs of its own:
    the scheduler captures its own). Why: a step of the real model runs about 43 kernels per layer, most of
    them tiny (norms, RoPE, casts, residual adds); inductor fuses them into a few per layer, which a CUDA
    graph then replays. The price: fused kernels round differently (about 4e-6 in the tiny CPU model's
    logits), so greedy rows equal ``generate()``'s exactly only uncompiled, and the first steps of each
    shape family (one row or several, masked or not) wait for the compiler (``warm_up``), cached on disk
    where ``TORCHINDUCTOR_CACHE_DIR`` says.
    """

    def __init__(self, model, cache: SlotCache, compiled: bool = False) -> None:
        self._model = model
        self._cache = cache
        config = model.config
        self._shape = (config.num_codebooks, config.codebook_size)
        self.compiled = compiled
        self._forward = torch.compile(self._body, dynamic=True) if compiled else self._body

    @torch.inference_mode()
    def __call__(self, rows: torch.Tensor, positions: torch.Tensor, span: int, masked: bool) -> torch.Tensor:
        """Write each row's keys and values at its position; attend over cache positions ``[0, span)``.

        ``masked=False`` is for a step in which every row is at position ``span − 1`` (one sequence alone,
        or all of one length): each row sees the whole span and, as in transformers' own decode step, no
        mask is passed to the attention. Otherwise row b sees positions ``≤ positions[b]``.
        """
        if self.compiled:
            try:
                return self._forward(rows, positions, span, masked)
            except Exception as error:  # a compiler that fails never fails a step: it runs uncompiled
                logger.warning(
                    "compiling the decode step failed (%s: %s); it runs uncompiled from now on",
                    type(error).__name__, error,
                )  # fmt: skip
                self.compiled, self._forward = False, self._body
        return self._body(rows, positions, span, masked)

    def warm_up(self) -> float:
        """Compile every shape family the scheduler runs (one row or several, masked or not) on free slots'
        padding (their state is written afresh at admission); seconds it took, 0 when not compiled.

        The inputs are made as the scheduler's are, outside inference mode (torch.compile guards on it, so
        inference tensors here would leave the serving steps to compile again), and their sizes avoid 1
        and the model's own sizes (torch specialises a size of 1, and compiles sizes that happen to be
        equal as one): one row and two, over 5 positions."""
        if not self.compiled:
            return 0.0
        started = time.perf_counter()
        device = self._cache.keys[0].device
        for n in sorted({1, min(2, self._cache.slots)}):
            with torch.inference_mode(False):
                rows = torch.zeros(n, self._shape[0], dtype=torch.long, device=device)
                positions = torch.zeros(n, dtype=torch.long, device=device)
            for masked in (False, True):
                self(rows, positions, min(5, self._cache.max_tokens), masked)
        return time.perf_counter() - started

    def _body(self, rows: torch.Tensor, positions: torch.Tensor, span: int, masked: bool) -> torch.Tensor:
        backbone = self._model.model
        n = rows.shape[0]
        hidden = backbone.embed_audio_tokens(rows[:, None, :])  # (n, 1, H): the K codes summed
        cos, sin = backbone.rotary_emb(hidden, positions[:, None])
        mask = None
        if masked:
            visible = torch.arange(span, device=rows.device)[None, :] <= positions[:, None]
            mask = visible[:, None, None, :]  # (n, 1, 1, span)
        slots = torch.arange(n, device=rows.device)
        kv_heads = self._cache.keys[0].shape[1]
        for index, layer in enumerate(backbone.layers):
            attention = layer.self_attn
            residual = hidden
            normed = layer.audio_input_layernorm(hidden)
            query = attention.q_proj(normed).view(n, 1, -1, attention.head_dim).transpose(1, 2)
            key = attention.k_proj(normed).view(n, 1, -1, attention.head_dim).transpose(1, 2)
            value = attention.v_proj(normed).view(n, 1, -1, attention.head_dim).transpose(1, 2)
            query, key = higgs.apply_rotary_pos_emb(query, key, cos, sin)
            keys, values = self._cache.keys[index], self._cache.values[index]
            keys[slots, :, positions] = key[:, :, 0]
            values[slots, :, positions] = value[:, :, 0]
            # Query heads grouped under their K/V head (query head h reads K/V head h // group, as
            # transformers' repeat_kv pairs them): the group takes the place of the query length.
            grouped = query.reshape(n, kv_heads, -1, attention.head_dim)
            out = F.scaled_dot_product_attention(
                grouped, keys[:n, :, :span], values[:n, :, :span], attn_mask=mask, scale=attention.scaling
            )  # (n, kv_heads, group, head_dim)
            hidden = residual + attention.o_proj(out.reshape(n, 1, -1))
            hidden = hidden + layer.audio_mlp(layer.audio_post_attention_layernorm(hidden))
        hidden = backbone.norm(hidden)
        logits = self._model.audio_lm_head(hidden[:, 0])
        return logits.float().view(n, *self._shape)


class SampledStep:
    """The whole decode step: the forward, then the choice of every slot's next row and the update of its
    sampling state (``SlotSampler.choose``), rows ``(n, K)`` at ``positions`` → next rows ``(n, K)``, on the
    device. One callable, so that one CUDA graph holds all of it.

    ``compiled``: the sampler too goes through ``torch.compile`` where a graph holds the step (``needs``
    None: every warper on, so one compiled function serves every step). Why: the sampler is about 180 small
    ops (selection, the noise's hash, the warpers, RAS, the state update), one kernel each in a replay;
    inductor fuses its elementwise runs into a few. Eager steps (``needs`` given) keep the uncompiled
    sampler, whose shapes follow what the step's rows ask for and would make it compile again and again.
    """

    def __init__(self, forward: DecodeStep, sampler: SlotSampler, compiled: bool = False) -> None:
        self.forward = forward
        self.sampler = sampler
        self.compiled = compiled
        self._choose_all = torch.compile(self._everything, dynamic=True) if compiled else self._everything

    def __call__(
        self, rows: torch.Tensor, positions: torch.Tensor, span: int, masked: bool, needs: StepNeeds | None
    ) -> torch.Tensor:
        """``needs``: what this step's rows ask of the sampler; None (a graph's capture) asks for all."""
        logits = self.forward(rows, positions, span, masked)
        if needs is not None:
            return self.sampler.choose(logits, 0, needs)
        if self.compiled:
            try:
                return self._choose_all(logits)
            except Exception as error:  # as for the forward: a compiler that fails never fails a step
                logger.warning(
                    "compiling the sampler failed (%s: %s); it runs uncompiled from now on",
                    type(error).__name__, error,
                )  # fmt: skip
                self.compiled, self._choose_all = False, self._everything
        return self._everything(logits)

    def warm_up(self) -> float:
        """Compile the forward (``DecodeStep.warm_up``) and the sampler, one row and two (torch specialises
        a size of 1), on free slots' state, which admission writes afresh; seconds it took."""
        seconds = self.forward.warm_up()
        if not self.compiled:
            return seconds
        started = time.perf_counter()
        device = self.sampler.device
        for n in sorted({1, min(2, len(self.sampler.drawn))}):
            with torch.inference_mode(False):  # as the scheduler's inputs are (see DecodeStep.warm_up)
                rows = torch.zeros(n, self.forward._shape[0], dtype=torch.long, device=device)
                positions = torch.zeros(n, dtype=torch.long, device=device)
            self(rows, positions, min(5, self.forward._cache.max_tokens), masked=True, needs=None)
        return seconds + time.perf_counter() - started

    def _everything(self, logits: torch.Tensor) -> torch.Tensor:
        return self.sampler.choose(logits, 0, self.sampler.everything)


Replay = Callable[[], torch.Tensor]  # runs a captured step again on its static inputs; returns its output
Capture = Callable[[Callable[[], torch.Tensor]], Replay]  # records one run of a step, returns its replay


class CudaCapture:
    """Records a step as a CUDA graph on the scheduler's own stream, all graphs sharing one memory pool.

    ``thread_local`` capture: other threads (a codec decoding audio) may use the GPU while this thread
    captures; the default ("global") mode would make their CUDA calls fail during the capture.
    """

    def __init__(self, stream: torch.cuda.Stream) -> None:
        self._stream = stream
        self._pool: Any = None  # the graphs' shared memory pool, set by the first capture

    def __call__(self, run: Callable[[], torch.Tensor]) -> Replay:
        with torch.cuda.stream(self._stream):
            for _ in range(2):  # warm-up: lazy initialisation and allocator state outside the capture
                run()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(
                graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"
            ):
                output = run()
        self._pool = graph.pool()

        def replay() -> torch.Tensor:
            graph.replay()
            return output

        return replay


class GraphedDecodeStep:
    """The whole decode step (forward, sampling, state update) replayed from CUDA graphs, one per (batch
    bucket, span bucket), captured at start-up.

    Why: at batch 1 a step of the real model launches hundreds of small kernels, and launching them from
    Python costs more than running them. A graph replays all of them with one call. Shapes are fixed per
    graph, so a step pads its batch to the next bucket (padding rows are free slots, see the module doc)
    and attends over the next multiple of ``GRAPH_SPAN_BUCKET`` positions, with the mask hiding the rest.

    ``prepare`` (on the scheduler thread, before it serves: it is the only thread that replays them) captures
    every bucket, so no capture stalls the serving loop or runs while job threads allocate on the GPU. A
    bucket whose capture fails runs eagerly, with a warning, and never fails a job. Then one replay is
    checked against the eager step on the same inputs: if their greedy rows differ, graphs are switched off
    and the log says so. ``capture`` is injectable so that this logic runs on a CPU too.

    A graph is captured before any row is known, so it samples with every warper on (``needs`` None), which
    gives every row the codes the eager step gives it; it also advances the padding slots' state, which
    means nothing: a slot's state is written afresh when a sequence takes it.
    """

    def __init__(self, step: SampledStep, cache: SlotCache, device: torch.device, capture: Capture) -> None:
        self._step = step
        self._cache = cache
        self._capture = capture
        self._codebooks = step.forward._shape[0]
        self._rows = torch.zeros(cache.slots, self._codebooks, dtype=torch.long, device=device)
        self._positions = torch.zeros(cache.slots, dtype=torch.long, device=device)
        self._graphs: dict[tuple[int, int], Replay] = {}
        self.batch_buckets = [b for b in GRAPH_BATCH_BUCKETS if b < cache.slots] + [cache.slots]
        self.span_buckets = span_buckets(cache.max_tokens)
        self.eager_buckets: set[tuple[int, int]] = set()  # captures that failed
        self.enabled = True  # False once the start-up check found a replay that disagrees with the eager step
        self.replays = 0
        self.capture_seconds = 0.0

    def prepare(self) -> None:
        """Capture every bucket, then check one replay against the eager step (see the class docstring)."""
        started = time.perf_counter()
        for batch in self.batch_buckets:
            for span in self.span_buckets:
                try:
                    self._graphs[batch, span] = self._capture(self._static_step(batch, span))
                except Exception as error:
                    self.eager_buckets.add((batch, span))
                    logger.warning(
                        "capturing the decode step for batch %d over %d positions failed (%s: %s); "
                        "that bucket runs eagerly",
                        batch, span, type(error).__name__, error,
                    )  # fmt: skip
        self.capture_seconds = time.perf_counter() - started
        logger.info(
            "captured %d decode-step graphs in %.1f s (%d buckets eager)",
            len(self._graphs), self.capture_seconds, len(self.eager_buckets),
        )  # fmt: skip
        self._check()

    def _static_step(self, batch: int, span: int) -> Callable[[], torch.Tensor]:
        """The step over the first ``batch`` static input rows, as a graph records and replays it."""
        rows, positions = self._rows[:batch], self._positions[:batch]
        return lambda: self._step(rows, positions, span, masked=True, needs=None)

    def _check(self) -> None:
        if not self._graphs:
            return
        batch, span = min(self._graphs)
        generator = torch.Generator().manual_seed(0)
        vocab = self._step.forward._shape[1]
        with torch.inference_mode(False):  # as the scheduler's inputs are: a compiled step compiles no other
            rows = torch.randint(0, vocab - 2, (batch, self._codebooks), generator=generator)
            positions = torch.arange(batch) % span
            rows, positions = rows.to(self._rows.device), positions.to(self._rows.device)
        with self._step.sampler.greedy_trial(batch):
            eager = self._step(rows, positions, span, masked=True, needs=None)
        self._rows[:batch].copy_(rows)
        self._positions[:batch].copy_(positions)
        try:
            with self._step.sampler.greedy_trial(batch):
                replayed = self._graphs[batch, span]()[:batch]
        except Exception as error:  # a replay that cannot run is one that disagrees: never a dead scheduler
            self.enabled = False
            logger.error(
                "CUDA graphs switched off: a replay of the decode step (batch %d over %d positions) failed "
                "(%s: %s); every step now runs eagerly",
                batch, span, type(error).__name__, error,
            )  # fmt: skip
            return
        if not torch.equal(eager, replayed):
            self.enabled = False
            logger.error(
                "CUDA graphs switched off: a replay of the decode step (batch %d over %d positions) chose "
                "other greedy rows than the eager step on the same inputs; every step now runs eagerly",
                batch, span,
            )  # fmt: skip

    def __call__(
        self, rows: torch.Tensor, positions: torch.Tensor, span: int, masked: bool, needs: StepNeeds | None
    ) -> torch.Tensor:
        n = rows.shape[0]
        batch = next(b for b in self.batch_buckets if b >= n)
        bucket = next(s for s in self.span_buckets if s >= span)
        replay = self._graphs.get((batch, bucket)) if self.enabled else None
        if replay is None:
            return self._step(rows, positions, span, masked, needs)
        self._rows[:batch].zero_()
        self._positions[:batch].zero_()
        self._rows[:n].copy_(rows)
        self._positions[:n].copy_(positions)
        self.replays += 1
        return replay()[:n]
