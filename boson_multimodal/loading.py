"""Load the Higgs Audio V2 generation model, its audio codec and a processor from two local directories.

Why not ``AutoProcessor.from_pretrained``: the checkpoint's processor config only *points* at the codec's hub
repo, and resolving that pointer means network access (and ~30 s of retries when the hub is unreachable).
The worker has both directories on disk, so it assembles the processor from them and never touches the
network here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    DacFeatureExtractor,
    HiggsAudioV2ForConditionalGeneration,
    HiggsAudioV2Processor,
    HiggsAudioV2TokenizerModel,
)

logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The directories do not hold a loadable Higgs Audio V2 model and codec."""


@dataclass
class LoadedModel:
    model: HiggsAudioV2ForConditionalGeneration
    processor: HiggsAudioV2Processor
    device: torch.device
    dtype: torch.dtype

    @property
    def sample_rate(self) -> int:
        return int(self.processor.audio_tokenizer.config.sample_rate)

    @property
    def frame_rate(self) -> int:
        return int(self.processor.audio_tokenizer.config.frame_rate)

    @property
    def num_codebooks(self) -> int:
        return int(self.model.config.num_codebooks)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was requested but CUDA is not available")
    return resolved


def _read_chat_template(model_dir: Path, tokenizer) -> str:
    template_file = model_dir / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text()
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise ModelLoadError(f"{model_dir} has no chat_template.jinja and its tokenizer has no chat template")


def build_processor(
    tokenizer, codec: HiggsAudioV2TokenizerModel, chat_template: str
) -> HiggsAudioV2Processor:
    """The processor from its parts; the codec's own geometry defines the feature extractor (padding to
    whole frames at its sample rate)."""
    feature_extractor = DacFeatureExtractor(
        feature_size=1, sampling_rate=codec.config.sample_rate, hop_length=codec.config.hop_length
    )
    return HiggsAudioV2Processor(feature_extractor, tokenizer, codec, chat_template=chat_template)


def load_model(model_dir: Path, codec_dir: Path, device: str = "auto") -> LoadedModel:
    """bf16 on CUDA (the checkpoint's training precision), float32 on CPU (bf16 matmuls are slow there)."""
    torch_device = resolve_device(device)
    dtype = torch.bfloat16 if torch_device.type == "cuda" else torch.float32
    for directory, what in ((model_dir, "generation model"), (codec_dir, "audio tokenizer")):
        if not (directory / "config.json").is_file():
            raise ModelLoadError(f"the {what} directory {directory} has no config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        codec = HiggsAudioV2TokenizerModel.from_pretrained(codec_dir, local_files_only=True)
        model = HiggsAudioV2ForConditionalGeneration.from_pretrained(
            model_dir, local_files_only=True, dtype=dtype
        )
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"could not load Higgs Audio V2 from {model_dir} and {codec_dir}: {error}"
        ) from error
    if model.config.codebook_size != codec.config.codebook_size + 2:
        raise ModelLoadError(
            f"model codebook_size {model.config.codebook_size} must be the codec's "
            f"{codec.config.codebook_size} + 2 (stream BOS and EOS)"
        )
    processor = build_processor(
        tokenizer, codec.to(torch_device).eval(), _read_chat_template(model_dir, tokenizer)
    )
    model = model.to(torch_device).eval()
    # Repetition-aware sampling is a per-request setting (``SamplingConfig``). transformers fills every
    # setting a request leaves at None from the model's own generation config, so the model must carry none
    # of its own: otherwise "off" (None) would silently become the checkpoint's window.
    model.generation_config.ras_win_len = None
    model.generation_config.ras_win_max_num_repeat = None
    logger.info(
        "loaded Higgs Audio V2 (%d layers, hidden %d) on %s in %s",
        model.config.num_hidden_layers,
        model.config.hidden_size,
        torch_device,
        dtype,
    )
    return LoadedModel(model=model, processor=processor, device=torch_device, dtype=dtype)
