"""What one clip is asked for: the prompt's terms and how to sample, as plain data that needs no torch.

Why a module of its own: the worker plans a job (and answers a cached one) without importing torch, and
its defaults for sampling are these, not a second copy. The engine (:mod:`boson_multimodal.engine`) and
the batched sampler (:mod:`boson_multimodal.sampling`) take these objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from boson_multimodal.prompt import PromptRequest

# Boson's repetition-aware sampling defaults (``GenerationConfig.from_pretrained`` drops these keys).
RAS_WINDOW = 7
RAS_MAX_REPEAT = 2
RAS_WINDOW_LIMIT = 64  # the ring of recent rows each slot keeps
# How a seed becomes codes (``boson_multimodal/sampling.py``). Results are cached under it: bump it with any
# change that makes the same seed draw other codes. 2: counter-based noise, drawn over the candidates.
SAMPLER_VERSION = 2


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

    def __post_init__(self) -> None:
        if not 0 <= self.ras_window <= RAS_WINDOW_LIMIT:
            raise ValueError(f"ras_window must be between 0 and {RAS_WINDOW_LIMIT}, got {self.ras_window}")

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
class SpeechRequest(PromptRequest):  # the text, scene, voices and context the prompt is built from
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
