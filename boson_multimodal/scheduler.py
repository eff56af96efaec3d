"""One thread owns the model and advances every sequence in flight, one audio row each, at every step.

Why (continuous batching): a decode step of the real model reads every weight once (~5.7 GB), whatever the
batch size, so on a GPU sixteen sequences cost little more than one. Everything that generates — one-shot
jobs, streams, the pieces of a long text, benchmarks — submits a *sequence* here and gets a handle. The
scheduler thread loops:

    admit   waiting sequences while a slot is free: prefill the prompt (transformers' forward, piece by
            piece), copy its keys and values into the slot, choose the first row from the prefill's logits;
    step    one decode forward for all active slots, then every sequence's own logits processing, batched
            over the slots (``sampling.SlotSampler``), as one step (``decode_step.SampledStep``; with CUDA
            graphs, one replay); copy the rows to the host once and publish them to each handle;
    retire  sequences that ended (all-EOS row, ``max_new_tokens``) or were cancelled: their slot is free
            for the next admission at once.

Admissions do not stall the running sequences. While any run, one piece of prefill runs between two decode
steps at most: a whole prompt of up to ``SchedulerLimits.prefill_piece`` tokens (512), or the next piece of a
longer one (``prefill.PiecewisePrefill``; 50 s of reference audio is three pieces). A prompt's first piece
runs at the next step, so sixteen arrivals cost the running streams sixteen short pauses (a few, prefilled
together), not one long one;
a long prompt's later pieces wait until the running sequences have taken a step for every
``PREFILL_TOKENS_PER_STEP`` tokens of the piece, so its prefill is spread over several of their chunks
rather than stretching one (50 s of reference audio waits about 28 of their steps longer for its first
row). While a long prompt waits for its next piece, a waiting prompt that is one piece is admitted whole in
that gap, so a short prompt never waits behind a long one's pieces (nor delays them). With none running,
every waiting prompt is prefilled at once.

Prompts that are one piece each and wait in the same step are prefilled together, in one forward
(``prefill.prefill_together``), when the scheduler is asked to (``prefill_together``; the engine asks on a
GPU): as many as fill ``prefill_piece`` padded tokens beside running sequences, so the pause between two of
their steps stays one piece, and ``PREFILL_TOGETHER_TOKENS`` when none runs. If that forward fails, each is
prefilled alone, so a bad prompt fails only itself. Otherwise each prompt is prefilled alone, so that its
tokens never depend on its neighbours (the trade is in ``prefill.py``'s docstring): on a CPU greedy parity
with ``generate()`` and seeded reproducibility come first (where a long prompt's pieces fall depends on the
prompt alone, for the same reason). Reference audio is encoded on the submitting thread (``engine.py``),
never here.

A long sequence never blocks a short one, N streams progress together, and because only this thread calls
into the model, its CUDA graphs are captured and replayed by one thread (torch.compile's cudagraph trees
fail when several threads call them, pytorch/pytorch#123177). Failures stay with the sequences they belong
to: a prompt that fails to prefill fails its own handle; a step that fails fails the sequences in it, and
the thread goes on serving.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace

import torch

from boson_multimodal.cpu_threads import one_thread_per_op_on_cpu
from boson_multimodal.decode_step import (
    Capture,
    CudaCapture,
    DecodeStep,
    GraphedDecodeStep,
    SampledStep,
    SlotCache,
)
from boson_multimodal.errors import SequenceTooLong
from boson_multimodal.prefill import PREFILL_PIECE, PiecewisePrefill, prefill_together, valid_frames
from boson_multimodal.sampling import SlotSampler, StreamTokens
from boson_multimodal.speech_request import SamplingConfig

logger = logging.getLogger(__name__)


# A long prompt's pieces after its first wait until the running sequences have taken a step for every this
# many of the piece's tokens since the last piece (a 512-token piece: 16 steps).
PREFILL_TOKENS_PER_STEP = 32
# Padded prompt tokens (prompts × the longest) one forward prefills together while no sequence runs: a bound
# on its activations (for the 3B model in bf16, 25 MB a hidden state and 0.2 GB of MLP intermediates), not
# on anyone's wait.
PREFILL_TOGETHER_TOKENS = 4096


class GenerationCancelled(Exception):
    """The sequence was cancelled (its consumer went away) before it finished."""


# eq=False: each is itself only. The loop removes them from lists, and == over their tensors would raise.
@dataclass(frozen=True, eq=False)
class SequenceInput:
    """One conversation as the processor encoded it (batch of one), and how to sample it."""

    input_ids: torch.Tensor  # (1, L)
    attention_mask: torch.Tensor  # (1, L)
    audio_input_ids: torch.Tensor | None  # (1, F, K) reference audio codes, delay pattern applied
    audio_input_ids_mask: torch.Tensor | None  # (1, F)
    sampling: SamplingConfig

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def to(self, device: torch.device) -> SequenceInput:
        """The tensors on ``device``, copied by the thread that runs the model: on CUDA, a copy made on
        another thread's stream could still be in flight, or its memory reused, while this one reads it."""

        def moved(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device)

        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            audio_input_ids=moved(self.audio_input_ids),
            audio_input_ids_mask=moved(self.audio_input_ids_mask),
        )


@dataclass(frozen=True)
class SequenceResult:
    rows: torch.Tensor  # (R, K) on the CPU: the generated rows, delay pattern applied, opening BOS row first
    finished: bool  # the model closed the clip (all-EOS row) rather than running out of steps


class SequenceHandle:
    """The consumer's side of one sequence: its growing rows, its result, and a way to cancel it.

    Rows are published after every step as a view of the sequence's buffer (rows already written never
    change), so a streaming consumer can wait for newer rows without copying. A consumer that waits for a
    number of rows (``wait_rows``) is woken once they are there, not at every step, and one that waits for
    the result only is woken by it: a step wakes no thread that has nothing to do (unless a consumer waiting
    for any newer rows shares the handle: a step then wakes every waiter).
    """

    def __init__(self, cancel: threading.Event | None = None) -> None:
        self._condition = threading.Condition()
        self._rows: torch.Tensor | None = None
        self._version = 0
        self._wanted: list[int] = []  # rows each waiting consumer waits for: publishing fewer wakes no one
        self._result: SequenceResult | None = None
        self._error: BaseException | None = None
        self.cancel_event = cancel or threading.Event()

    def cancel(self) -> None:
        """Abandon the sequence; its slot is freed at the next step."""
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def wait_newer(self, seen: int) -> tuple[int, torch.Tensor | None, SequenceResult | None]:
        """Block until rows newer than version ``seen`` or the end; raise the sequence's error."""
        with self._condition, self._waiting_for(1):  # every publish has a row
            self._condition.wait_for(
                lambda: self._version != seen or self._result is not None or self._error is not None
            )
            if self._error is not None:
                raise self._error
            return self._version, self._rows, self._result

    def wait_rows(self, count: int) -> tuple[torch.Tensor | None, SequenceResult | None]:
        """Block until at least ``count`` rows or the end; raise the sequence's error."""

        def ready() -> bool:
            return (
                (self._rows is not None and self._rows.shape[0] >= count)
                or self._result is not None
                or self._error is not None
            )

        with self._condition, self._waiting_for(count):
            self._condition.wait_for(ready)
            if self._error is not None:
                raise self._error
            return self._rows, self._result

    def result(self, timeout: float | None = None) -> SequenceResult:
        with self._condition:
            if not self._condition.wait_for(
                lambda: self._result is not None or self._error is not None, timeout=timeout
            ):
                raise TimeoutError("the sequence did not finish in time")
            if self._error is not None:
                raise self._error
            assert self._result is not None  # the wait ends on a result or an error
            return self._result

    @contextmanager
    def _waiting_for(self, count: int) -> Iterator[None]:
        """While a consumer waits (the condition held), the rows it waits for."""
        self._wanted.append(count)
        try:
            yield
        finally:
            self._wanted.remove(count)

    # -- the scheduler's side -----------------------------------------------------------------------------
    def publish(self, rows: torch.Tensor) -> None:
        with self._condition:
            self._rows = rows
            self._version += 1
            if self._wanted and rows.shape[0] >= min(self._wanted):
                self._condition.notify_all()

    def finish(self, result: SequenceResult) -> None:
        with self._condition:
            self._result = result
            self._condition.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._condition:
            self._error = error
            self._condition.notify_all()


class Submissions:
    """The queue from the threads that submit sequences to the one thread that runs them: submitting after
    ``close()`` is refused, and the thread can fail whatever is still queued if it has to stop."""

    CLOSE = object()  # put on the queue by close(): the thread finishes what it holds and stops

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()

    def put(self, sequence: SequenceInput, cancel: threading.Event | None) -> SequenceHandle:
        handle = SequenceHandle(cancel)
        with self._lock:
            if self._closed:
                raise RuntimeError("the generation thread is closed")
            self._queue.put((sequence, handle))
        return handle

    def get(self, *, block: bool = True):
        """The next ``(sequence, handle)`` or ``CLOSE``; raises ``queue.Empty`` when not blocking."""
        return self._queue.get(block=block)

    def close(self) -> bool:
        """Refuse new submissions and wake the thread; False when it was closed already."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            self._queue.put(self.CLOSE)
        return True

    def fail_all(self, error: BaseException) -> None:
        """Close, and fail every sequence still queued (the thread that would run them has stopped)."""
        with self._lock:
            self._closed = True
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not self.CLOSE:
                item[1].fail(error)


@dataclass(frozen=True)
class SchedulerLimits:
    """How many sequences run at once, how long one may be (prompt plus generated rows), and how many prompt
    tokens one piece of prefill takes between two decode steps (``prefill.py``), in tokens."""

    slots: int = 8
    max_tokens: int = 6144
    prefill_piece: int = PREFILL_PIECE

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError(f"slots must be at least 1, got {self.slots}")
        if self.max_tokens < 64:
            raise ValueError(f"max_tokens must be at least 64, got {self.max_tokens}")
        if self.prefill_piece < 1:
            raise ValueError(f"prefill_piece must be at least 1, got {self.prefill_piece}")


class _Sequence:
    """A sequence in a slot: its row buffer and its handle (its sampling state lives in the SlotSampler)."""

    def __init__(
        self, position: int, max_new_tokens: int, handle: SequenceHandle, num_codebooks: int
    ) -> None:
        self.position = position  # where the next row's keys and values go
        self.handle = handle
        self.rows = torch.empty(max_new_tokens, num_codebooks, dtype=torch.long)
        self.count = 0
        self.finished = False  # the last row was all stream EOS

    def append(self, row: torch.Tensor, finished: bool) -> None:
        self.rows[self.count] = row
        self.count += 1
        self.finished = finished
        self.handle.publish(self.rows[: self.count])

    @property
    def done(self) -> bool:
        return self.finished or self.count >= self.rows.shape[0]


@dataclass(eq=False)  # one admission is itself only (the scheduler removes it from a list)
class _Admission:
    """A prompt being prefilled into the slot it holds; the prefill starts with its first piece."""

    sequence: SequenceInput
    handle: SequenceHandle
    slot: int
    prefill: PiecewisePrefill | None = None


class Scheduler:
    """Runs every submitted sequence on one thread with continuous batching (see the module docstring)."""

    def __init__(
        self,
        model,
        limits: SchedulerLimits,
        *,
        cuda_graphs: bool = False,
        capture: Capture | None = None,
        compile_step: bool = False,
        prefill_together: bool = False,
    ) -> None:
        """``cuda_graphs``: replay the decode step from graphs captured before this returns (``capture``
        records them; by default a CUDA graph on the scheduler's own stream). ``compile_step``: the decode
        forward through ``torch.compile`` (``DecodeStep``), and with graphs the sampler too
        (``SampledStep``), compiled before this returns.
        ``prefill_together``: one-piece prompts waiting in the same step share one prefill forward (see the
        module docstring)."""
        self._model = model
        self.limits = limits
        self.prefill_together = prefill_together
        self.device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self._tokens = StreamTokens.from_config(model.config)
        _check_memory(model.config, limits, self.device, dtype)
        self._cache = SlotCache(model.config, limits.slots, limits.max_tokens, self.device, dtype)
        self._sampler = SlotSampler(limits.slots, self._tokens, self.device)
        # The next step's inputs stay on the device: each slot's last row and where its next keys and values
        # go (advanced by ``_running``: 1 for a slot with a sequence, 0 for a free one, which stays at 0).
        self._rows = torch.zeros(
            limits.slots, self._tokens.num_codebooks, dtype=torch.long, device=self.device
        )
        self._positions = torch.zeros(limits.slots, dtype=torch.long, device=self.device)
        self._running = torch.zeros(limits.slots, dtype=torch.long, device=self.device)
        # Its own stream: replays and prefills do not queue behind the codec's work on the default stream.
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._forward = DecodeStep(model, self._cache, compiled=compile_step)
        step = SampledStep(self._forward, self._sampler, compiled=compile_step and cuda_graphs)
        self._sampled_step = step
        self._graphed: GraphedDecodeStep | None = None
        if cuda_graphs:
            if capture is None and self._stream is None:
                raise ValueError("CUDA graphs need the model on a CUDA device")
            capture = capture or CudaCapture(self._stream)  # type: ignore[arg-type]
            self._graphed = GraphedDecodeStep(step, self._cache, self.device, capture)
        self._step = self._graphed or step
        self.cuda_graphs = cuda_graphs
        self._ready = threading.Event()  # set once the thread has captured its graphs and serves
        self._submissions = Submissions()
        self._active: dict[int, _Sequence] = {}  # slot → sequence
        self._pending: list[tuple[SequenceInput, SequenceHandle]] = []  # taken from the queue, not admitted
        # Prompts being prefilled, each holding its slot: a long one piece by piece, first; a short one
        # admitted beside it is here only while its one piece runs.
        self._admissions: list[_Admission] = []
        self._prefill_credit = 0  # prompt tokens the steps since the long prompt's last piece have paid for
        self.steps = 0  # decode steps run so far (for benchmarks and tests)
        self._thread = threading.Thread(target=self._run, name="higgs-scheduler", daemon=True)
        self._thread.start()
        self._ready.wait()

    def submit(self, sequence: SequenceInput, cancel: threading.Event | None = None) -> SequenceHandle:
        """Queue one sequence; it joins the running batch at the next step with a free slot."""
        needed = sequence.prompt_tokens + sequence.sampling.max_new_tokens
        if needed > self.limits.max_tokens:
            raise SequenceTooLong(
                f"the prompt ({sequence.prompt_tokens} tokens, reference audio included) plus "
                f"max_new_tokens ({sequence.sampling.max_new_tokens}) is {needed} tokens, more than the "
                f"{self.limits.max_tokens} one sequence may hold; shorten the reference audio or lower "
                "max_new_tokens"
            )
        return self._submissions.put(sequence, cancel)

    def close(self) -> None:
        """Finish every sequence already submitted, then stop the thread."""
        if self._submissions.close():
            self._thread.join()

    # -- the scheduler thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        cuda = self._stream is not None
        one_thread_per_op_on_cpu(self.device)
        device = torch.cuda.device(self.device) if cuda else nullcontext()
        stream = torch.cuda.stream(self._stream) if cuda else nullcontext()
        try:
            with (
                device,
                stream,
                torch.inference_mode(),
            ):  # every tensor the thread makes is an inference tensor
                try:
                    if self._forward.compiled:
                        seconds = self._sampled_step.warm_up()
                        logger.info("compiled the decode step in %.1f s", seconds)
                    if self._graphed is not None:
                        self._graphed.prepare()
                finally:
                    self._ready.set()
                self._loop()
        except BaseException as error:  # never leave a caller waiting on a thread that is gone
            logger.exception("the scheduler thread stopped")
            for sequence in self._active.values():
                sequence.handle.fail(error)
            for _, handle in self._pending:
                handle.fail(error)
            for admission in self._admissions:
                admission.handle.fail(error)
            self._submissions.fail_all(error)

    def _loop(self) -> None:
        closing = False
        pending = self._pending
        while not (closing and not self._active and not pending and not self._admissions):
            idle = not self._active and not pending and not self._admissions
            closing = self._take(pending, block=idle) or closing
            for item in [item for item in pending if item[1].cancelled]:
                pending.remove(item)
                item[1].fail(GenerationCancelled("cancelled before it started"))
            for admission in [admission for admission in self._admissions if admission.handle.cancelled]:
                admission.handle.fail(GenerationCancelled("cancelled before it started"))
                self._admissions.remove(admission)
            if self._active:
                self._admit_beside(pending)
            else:  # nothing to stall: the prompt being admitted and every waiting one, whole
                self._prefill_rest()
                while pending and self._free_slots():
                    if together := self._together(pending, PREFILL_TOGETHER_TOKENS):
                        self._prefill_together(pending, together)
                    else:
                        self._admit(*pending.pop(0))
            self._retire()
            if self._active:
                self._advance()
                self._retire()

    def _take(self, pending: list, *, block: bool) -> bool:
        """Move newly submitted sequences to ``pending``; True once ``close()`` was called."""
        closing = False
        while True:
            try:
                item = self._submissions.get(block=block)
            except queue.Empty:
                return closing
            block = False
            if item is Submissions.CLOSE:
                closing = True
            else:
                pending.append(item)

    def _free_slots(self) -> list[int]:
        taken = set(self._active) | {admission.slot for admission in self._admissions}
        return [slot for slot in range(self.limits.slots) if slot not in taken]

    def _admit_beside(self, pending: list[tuple[SequenceInput, SequenceHandle]]) -> None:
        """One piece of prefill at most between two steps of the running sequences: the long prompt's next
        piece once they have paid for it (``_paid_for``); otherwise the first piece of the first waiting
        prompt, or, while a long prompt waits, of the first waiting prompt that is one piece (whole)."""
        admissions = self._admissions
        if admissions and self._paid_for(admissions[0]):
            self._prefill_credit = 0
            self._prefill_piece(admissions[0])
            return
        waiting = [item for item in pending if not admissions or self._one_piece(item[0])]
        if waiting and self._free_slots():
            if together := self._together(waiting, self.limits.prefill_piece):
                self._prefill_together(pending, together)
                return
            pending.remove(waiting[0])
            if not admissions:  # it may be a long one: its later pieces are paced from its first
                self._prefill_credit = 0
            self._prefill_piece(self._start(*waiting[0]))

    def _one_piece(self, sequence: SequenceInput) -> bool:
        return sequence.prompt_tokens <= self.limits.prefill_piece

    def _together(
        self, waiting: list[tuple[SequenceInput, SequenceHandle]], budget: int
    ) -> list[tuple[SequenceInput, SequenceHandle]]:
        """The first waiting prompts, in order, to prefill in one forward: each one piece, one per free slot,
        as many as fit ``budget`` padded tokens (prompts × the longest). Empty unless prefilling together is
        on and at least two qualify."""
        if not self.prefill_together:
            return []
        taken: list[tuple[SequenceInput, SequenceHandle]] = []
        slots, longest = len(self._free_slots()), 0
        for item in waiting:
            longest = max(longest, item[0].prompt_tokens)
            if len(taken) == slots or not self._one_piece(item[0]) or (len(taken) + 1) * longest > budget:
                break
            taken.append(item)
        return taken if len(taken) >= 2 else []

    def _admit(self, sequence: SequenceInput, handle: SequenceHandle) -> None:
        """Prefill a whole prompt into the lowest free slot at once and choose its first row: the loop's way
        when nothing runs, and the GPU check's step profile's (on its own thread, while this one is idle)."""
        self._start(sequence, handle)
        self._prefill_rest()

    def _prefill_rest(self) -> None:
        """Every prompt being admitted prefilled to its end, in turn; each joins the batch or fails."""
        while self._admissions:
            self._prefill_piece(self._admissions[0])

    def _start(self, sequence: SequenceInput, handle: SequenceHandle) -> _Admission:
        """Take the lowest free slot for a prompt; its prefill runs piece by piece (``_prefill_piece``)."""
        admission = _Admission(sequence, handle, slot=self._free_slots()[0])
        self._admissions.append(admission)
        return admission

    def _paid_for(self, admission: _Admission) -> bool:
        """Whether the long prompt's next piece may run beside running sequences: once they have taken a
        step per PREFILL_TOKENS_PER_STEP of its tokens since its last piece (its first ran at its start)."""
        assert admission.prefill is not None  # _admit_beside runs a prompt's first piece as it starts it
        return self._prefill_credit >= admission.prefill.next_piece

    def _prefill_piece(self, admission: _Admission) -> None:
        """The next piece of a prompt being admitted; after its last, the sequence joins the batch."""
        try:
            if admission.prefill is None:
                sequence = admission.sequence.to(self.device)
                admission.sequence = sequence
                admission.prefill = PiecewisePrefill(
                    self._model,
                    sequence.input_ids,
                    sequence.attention_mask,
                    sequence.audio_input_ids,
                    sequence.audio_input_ids_mask,
                    self.limits.prefill_piece,
                )
            logits = admission.prefill.step()
            if logits is not None:
                self._activate(admission, logits, admission.prefill.cache)
        except Exception as error:  # a bad prompt fails its own sequence, not the scheduler
            self._failed(admission, error)

    def _prefill_together(
        self,
        pending: list[tuple[SequenceInput, SequenceHandle]],
        together: list[tuple[SequenceInput, SequenceHandle]],
    ) -> None:
        """Prompts (taken out of ``pending``) into their slots with one prefill forward; if it fails, each is
        prefilled alone, so that a bad prompt fails only itself (a forward that fails part-way, out of memory
        say, then adds the solo prefills to the same gap between two steps, once)."""
        admissions = []
        for item in together:
            pending.remove(item)
            admissions.append(self._start(*item))
        try:
            prompts = [self._prompt(admission.sequence) for admission in admissions]
            logits, cache = prefill_together(self._model, prompts, self.device)
        except Exception as error:
            logger.warning(
                "prefilling %d prompts together failed (%s: %s); each is prefilled alone",
                len(admissions), type(error).__name__, error,
                exc_info=not isinstance(error, ValueError),  # a refused batch is no bug of ours
            )  # fmt: skip
            for admission in admissions:
                self._prefill_piece(admission)
            return
        for row, admission in enumerate(admissions):
            length = admission.sequence.prompt_tokens
            try:
                self._activate(admission, logits[row : row + 1], cache, row, length)
            except Exception as error:
                self._failed(admission, error)

    @staticmethod
    def _prompt(sequence: SequenceInput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        audio = sequence.audio_input_ids
        frames = None if audio is None else valid_frames(audio, sequence.audio_input_ids_mask)
        return sequence.input_ids, sequence.attention_mask, frames

    def _failed(self, admission: _Admission, error: Exception) -> None:
        logger.exception("prefill failed")  # (called while handling ``error``)
        admission.handle.fail(error)
        self._admissions.remove(admission)

    def _activate(
        self,
        admission: _Admission,
        logits: torch.Tensor,
        cache,
        row: int = 0,
        length: int | None = None,
    ) -> None:
        """A prefilled prompt into its slot: its keys and values (row ``row`` of ``cache``, ``length``
        positions), its sampling state, its first row (from ``logits``)."""
        slot, sequence = admission.slot, admission.sequence
        length = self._cache.load_prefill(slot, cache, row, length)
        audio = sequence.audio_input_ids
        self._sampler.admit(
            slot,
            sequence.sampling,
            prompt_ids=sequence.input_ids[0].cpu(),
            prompt_audio_rows=audio[0].cpu() if audio is not None else None,
        )
        active = _Sequence(
            length, sequence.sampling.max_new_tokens, admission.handle, self._tokens.num_codebooks
        )
        on_device, on_host = self._sampler.next_rows(
            logits.float().view(1, *self._step_shape()), slot, [slot]
        )
        active.append(on_host[0], self._ended(on_host)[0])
        self._rows[slot] = on_device[0]
        self._positions[slot] = length
        self._running[slot] = 1
        self._active[slot] = active
        self._admissions.remove(admission)  # only now: until it is active, a stopping thread fails its handle

    def _step_shape(self) -> tuple[int, int]:
        return self._tokens.num_codebooks, self._tokens.codebook_size

    def _advance(self) -> None:
        """One decode step over slots ``[0, highest active + 1)``; free slots in between compute padding."""
        width = max(self._active) + 1
        positions = [sequence.position for sequence in self._active.values()]
        span = max(positions) + 1
        uniform = len(self._active) == width and min(positions) == span - 1
        order = sorted(self._active)
        try:
            needs = self._sampler.needs(order)
            on_device = self._step(self._rows[:width], self._positions[:width], span, not uniform, needs)
            chosen = on_device.cpu()  # the one copy
            self._rows[:width] = on_device
            self._positions[:width] += self._running[:width]
        except Exception as error:
            logger.exception("a decode step failed; failing the %d sequences in it", len(order))
            for slot in order:
                self._free(slot).handle.fail(error)
            return
        self.steps += 1
        self._prefill_credit += PREFILL_TOKENS_PER_STEP
        ended = self._ended(chosen)
        for slot in order:
            sequence = self._active[slot]
            sequence.position += 1
            sequence.append(chosen[slot], ended[slot])

    def _ended(self, rows: torch.Tensor) -> list[bool]:
        """Which of these rows (on the CPU) close their clip: all stream EOS."""
        return (rows == self._tokens.stream_eos).all(dim=-1).tolist()

    def _free(self, slot: int) -> _Sequence:
        """Take the sequence out of its slot; the slot computes padding at position 0 until it is taken."""
        self._running[slot] = 0
        self._positions[slot] = 0
        return self._active.pop(slot)

    def _retire(self) -> None:
        for slot in [s for s, seq in self._active.items() if seq.done or seq.handle.cancelled]:
            sequence = self._free(slot)
            if sequence.handle.cancelled and not sequence.done:
                logger.info("sequence cancelled after %d rows; slot %d is free", sequence.count, slot)
                sequence.handle.fail(GenerationCancelled("cancelled"))
            else:
                rows = sequence.rows[: sequence.count].clone()
                sequence.handle.finish(SequenceResult(rows=rows, finished=sequence.finished))


# Memory kept free beside the KV cache for prefill activations, the codec and CUDA graphs' pools.
HEADROOM_FRACTION = 0.1


KV_SHARE = 0.5  # of the memory free beside the model (less the headroom) that sized slots may take


def sized_slots(config, max_tokens: int, dtype: torch.dtype, free: int, total: int, most: int) -> int:
    """How many slots to run when the settings do not say: what half the GPU memory still free beside the
    loaded model (less the headroom) holds in KV cache, 1 to ``most``.

    For the 3B model in bf16 with 6144-token slots (0.7 GB each) that is about 8 on a 24 GB card and 40–64 on
    an 80–141 GB one; the other half stays for prefill activations, the codec, and the CUDA graphs' pool.
    """
    per_slot = SlotCache.bytes_needed(config, 1, max_tokens, dtype)
    usable = KV_SHARE * (free - HEADROOM_FRACTION * total)
    return max(1, min(most, int(usable // per_slot)))


class SchedulerMemoryError(ValueError):
    """The KV cache the limits ask for does not fit the GPU beside the model."""


def _check_memory(config, limits: SchedulerLimits, device: torch.device, dtype: torch.dtype) -> None:
    """Fail at start-up, with the numbers, rather than with an out-of-memory error in the first busy step."""
    if device.type != "cuda":
        return
    needed = SlotCache.bytes_needed(config, limits.slots, limits.max_tokens, dtype)
    free, total = torch.cuda.mem_get_info(device)
    if needed > free - HEADROOM_FRACTION * total:
        raise SchedulerMemoryError(
            f"the KV cache for {limits.slots} sequences of {limits.max_tokens} tokens needs "
            f"{needed / 1e9:.1f} GB, but the GPU has {free / 1e9:.1f} GB free beside the model and keeps "
            f"{HEADROOM_FRACTION * total / 1e9:.1f} GB for activations; lower the slots or the longest "
            "sequence, or use a larger GPU"
        )
