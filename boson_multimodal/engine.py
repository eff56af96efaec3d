"""Text to speech with Higgs Audio V2: one engine per process, loaded once, safe to call from any thread.

The engine turns a request into the processor's inputs (on the caller's thread), hands the sequence to the
one thread that owns the model — the continuous-batching ``Scheduler``, or transformers' own ``generate()``
as a reference (``EngineOptions.backend``) — and decodes the frames it gets back with the codec.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torchaudio

from boson_multimodal.codes import FrameStream, decode_frames
from boson_multimodal.cpu_threads import one_thread_per_op_on_cpu
from boson_multimodal.loading import LoadedModel, load_model
from boson_multimodal.prompt import Voice, build_prompt
from boson_multimodal.reference import ReferenceRunner
from boson_multimodal.scheduler import (
    GenerationCancelled,
    Scheduler,
    SchedulerLimits,
    SequenceHandle,
    SequenceInput,
    SequenceTooLong,
    sized_slots,
)
from boson_multimodal.speech_request import SamplingConfig, SpeechRequest

__all__ = [
    "EngineOptions",
    "GenerationCancelled",
    "HiggsAudioEngine",
    "SamplingConfig",
    "SequenceTooLong",
    "Speech",
    "SpeechCodes",
    "SpeechRequest",
]

logger = logging.getLogger(__name__)

BACKENDS = ("scheduler", "transformers")


@dataclass(frozen=True)
class EngineOptions:
    """How generation runs: which decode loop, how many sequences at once, CUDA graphs or not, how prompts
    are prefilled."""

    backend: str = "scheduler"  # or "transformers": its own generate(), one sequence at a time (reference)
    limits: SchedulerLimits = field(default_factory=SchedulerLimits)
    cuda_graphs: bool | None = None  # None: on when the model runs on CUDA
    # The decode forward, and with CUDA graphs the sampler, through torch.compile (fused kernels; greedy rows
    # then equal generate()'s only up to rounding): off unless asked for.
    compile_step: bool = False
    # One-piece prompts waiting in the same step share one prefill forward (their logits then depend on their
    # neighbours by rounding); None: on when the model runs on CUDA, where that rounding is there anyway.
    prefill_together: bool | None = None
    # Size the slots from the GPU memory free beside the loaded model, up to this many (``limits.slots``
    # then serves off a GPU); None: ``limits.slots`` as given.
    size_slots_up_to: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")


@dataclass(frozen=True)
class Speech:
    waveform: np.ndarray  # mono float32
    sample_rate: int
    num_frames: int
    finished: bool  # False when generation stopped at max_new_tokens before the model ended the clip


@dataclass(frozen=True)
class SpeechCodes:
    """A generated clip before decoding: streaming decodes these frames chunk by chunk, not in one go."""

    frames: torch.Tensor  # (T, K) codec frames, delay pattern reverted
    finished: bool  # as Speech.finished


def sized_limits(model, limits: SchedulerLimits, free: int, total: int, most: int) -> SchedulerLimits:
    """``limits`` with as many slots as the memory free beside ``model`` holds (see ``sized_slots``)."""
    slots = sized_slots(model.config, limits.max_tokens, model.dtype, free, total, most)
    logger.info(
        "%d sequences at once, sized from the %.1f GB the GPU has free beside the model (of %.1f GB); set "
        "SCHEDULER_SLOTS and CONCURRENCY to choose",
        slots, free / 1e9, total / 1e9,
    )  # fmt: skip
    return replace(limits, slots=slots)


class HiggsAudioEngine:
    def __init__(self, loaded: LoadedModel, options: EngineOptions | None = None) -> None:
        options = options or EngineOptions()
        self._loaded = loaded
        self.options = options
        if options.backend == "transformers":
            self._runner: ReferenceRunner | Scheduler = ReferenceRunner(loaded.model)
        else:
            graphs = loaded.device.type == "cuda" if options.cuda_graphs is None else options.cuda_graphs
            if graphs and loaded.device.type != "cuda":
                raise ValueError("CUDA graphs need the model on a CUDA device")
            limits = options.limits
            if options.size_slots_up_to is not None and loaded.device.type == "cuda":
                free, total = torch.cuda.mem_get_info(loaded.device)
                limits = sized_limits(loaded.model, limits, free, total, options.size_slots_up_to)
            together = options.prefill_together
            self._runner = Scheduler(
                loaded.model,
                limits,
                cuda_graphs=graphs,
                compile_step=options.compile_step,
                prefill_together=loaded.device.type == "cuda" if together is None else together,
            )
        # how many jobs to take at once (the reference runs one at a time; jobs beyond it wait their turn)
        runner = self._runner
        self.slots = runner.limits.slots if isinstance(runner, Scheduler) else options.limits.slots

    @classmethod
    def load(
        cls, model_dir: Path, codec_dir: Path, device: str = "auto", options: EngineOptions | None = None
    ) -> HiggsAudioEngine:
        return cls(load_model(model_dir, codec_dir, device), options)

    def close(self) -> None:
        """Finish what was submitted and stop the generation thread."""
        self._runner.close()

    @property
    def sample_rate(self) -> int:
        return self._loaded.sample_rate

    @property
    def frame_rate(self) -> int:
        return self._loaded.frame_rate

    @property
    def device(self) -> torch.device:
        return self._loaded.device

    @property
    def codec(self):
        return self._loaded.processor.audio_tokenizer

    def submit(self, request: SpeechRequest, cancel: threading.Event | None = None) -> SequenceHandle:
        """Start generating ``request``; the handle gives its rows as they come and its result.

        Setting ``cancel`` (or calling ``handle.cancel()``) abandons it; waiting on the handle then raises
        ``GenerationCancelled``. Raises ``SequenceTooLong`` when the prompt and its steps cannot fit.
        """
        if request.sampling.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {request.sampling.max_new_tokens}")
        return self._runner.submit(self._sequence_input(request), cancel)

    def generate_codes(self, request: SpeechRequest, cancel: threading.Event | None = None) -> SpeechCodes:
        started = time.perf_counter()
        result = self.submit(request, cancel).result()
        codes = self.to_codes(result.rows)
        elapsed = time.perf_counter() - started
        logger.info("generated %d frames in %.2f s", int(codes.frames.shape[0]), elapsed)
        return codes

    def generate(self, request: SpeechRequest, cancel: threading.Event | None = None) -> Speech:
        return self.decode(self.generate_codes(request, cancel))

    def decode(self, codes: SpeechCodes) -> Speech:
        return Speech(
            waveform=decode_frames(self.codec, codes.frames).numpy(),
            sample_rate=self.sample_rate,
            num_frames=int(codes.frames.shape[0]),
            finished=codes.finished,
        )

    def _sequence_input(self, request: SpeechRequest) -> SequenceInput:
        processor = self._loaded.processor
        prompt = build_prompt(request)
        text = processor.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
        audios = [self._resampled(voice) for voice in prompt.voices]
        # On the caller's thread, so that encoding 30–60 s of reference audio with the codec never holds the
        # scheduler's running streams; under inference mode, because nothing here needs autograd. The inputs
        # stay on the CPU: the runner moves them to the device on its own thread and stream (SequenceInput.to)
        one_thread_per_op_on_cpu(self.device)  # the same codes whichever thread encodes
        with torch.inference_mode():
            inputs = processor(
                text=[text], audio=audios or None, sampling_rate=self.sample_rate, return_tensors="pt"
            ).to("cpu")
        return SequenceInput(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            audio_input_ids=inputs.get("audio_input_ids"),
            audio_input_ids_mask=inputs.get("audio_input_ids_mask"),
            sampling=request.sampling,
        )

    def _resampled(self, voice: Voice) -> np.ndarray:
        waveform = torch.as_tensor(np.asarray(voice.waveform, dtype=np.float32))
        if voice.sample_rate != self.sample_rate:
            waveform = torchaudio.functional.resample(waveform, voice.sample_rate, self.sample_rate)
        return waveform.numpy()

    def to_codes(self, rows: torch.Tensor) -> SpeechCodes:
        """A sequence's rows (delay pattern applied, opening BOS row first), finished or still growing, as
        its complete frames."""
        stream = self.frame_stream()
        stream.update(rows)
        return SpeechCodes(stream.frames, stream.finished)

    def frame_stream(self) -> FrameStream:
        """An empty ``FrameStream`` for this model: streaming feeds it a sequence's rows as they grow."""
        config = self._loaded.model.config
        return FrameStream(
            config.audio_stream_bos_id,
            config.audio_stream_eos_id,
            self.codec.config.codebook_size,
            config.num_codebooks,
        )
