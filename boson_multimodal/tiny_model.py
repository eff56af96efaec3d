"""Build a tiny random-weight Higgs Audio V2 model and audio codec, offline, in the real on-disk format.

Why: the real checkpoints (~12 GB) cannot be downloaded on every machine (CI, laptops, this project's own
build machines), but every code path — download, load, prompt building, generation, decoding, streaming —
should still run for real. These builders use transformers' own Higgs Audio V2 classes with the real
geometry where it matters (24 kHz, hop 960 → 25 frames/s, 8 codebooks of 1024 codes + stream BOS/EOS,
the real special-token strings) and tiny widths elsewhere. The audio they produce is noise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    HiggsAudioV2Config,
    HiggsAudioV2ForConditionalGeneration,
    HiggsAudioV2TokenizerConfig,
    HiggsAudioV2TokenizerModel,
    PreTrainedTokenizerFast,
)

from boson_multimodal.prompt import CHAT_TEMPLATE

SAMPLE_RATE = 24_000
HOP_LENGTH = 960
NUM_CODEBOOKS = 8
CODEBOOK_SIZE = 1024  # codes per codebook in the codec; the LM adds stream BOS (1024) and EOS (1025)

SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|scene_desc_start|>",
    "<|scene_desc_end|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
    "<|audio_out_bos|>",
    "<|reserved_special_token_6|>",
    "<|AUDIO_OUT|>",
    "<|AUDIO|>",
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Sizes of the tiny model; different values give a different (still valid) model."""

    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 64
    codec_hidden: int = 8
    seed: int = 0
    # A random audio head puts the stream EOS on a par with the 1024 codes, and any of the 8 codebooks can
    # start the end of a clip, so random clips end after a random, often tiny, length. Sharper code logits
    # keep EOS out of reach: the model speaks until max_new_tokens, and lengths are predictable. 1: raw.
    code_logit_scale: float = 40.0


def _byte_level_vocab() -> dict[str, int]:
    # sorted: the alphabet is a set, whose order changes with PYTHONHASHSEED, and so would the checkpoint
    return {token: index for index, token in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}


def build_text_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with Llama-3's and Higgs Audio's special-token strings."""
    vocab = _byte_level_vocab()
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
        additional_special_tokens=list(SPECIAL_TOKENS[2:]),
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_codec(spec: TinyModelSpec) -> HiggsAudioV2TokenizerModel:
    config = HiggsAudioV2TokenizerConfig(
        sample_rate=SAMPLE_RATE,
        target_bandwidths=[0.5, 1, 1.5, 2],  # 2 kbps at 25 frames/s and 10 bits per code → 8 codebooks
        codebook_size=CODEBOOK_SIZE,
        codebook_dim=8,
        acoustic_model_config={
            "encoder_hidden_size": spec.codec_hidden,
            "downsampling_ratios": [8, 5, 4, 2, 3],
            "upsampling_ratios": [8, 5, 4, 2, 3],
            "decoder_hidden_size": spec.codec_hidden * 8,
            "hidden_size": spec.codec_hidden * 4,
        },
        semantic_model_config={
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "conv_dim": [8] * 7,
            "num_conv_pos_embeddings": 16,
            "num_conv_pos_embedding_groups": 2,
        },
    )
    torch.manual_seed(spec.seed)
    codec = HiggsAudioV2TokenizerModel(config).eval()
    assert config.hop_length == HOP_LENGTH and config.num_quantizers == NUM_CODEBOOKS
    with torch.no_grad():
        # Zero codebooks (the class default) decode every code to silence; random ones make audible noise.
        for quantizer in codec.quantizer.quantizers:
            quantizer.codebook.embed.normal_()
            quantizer.codebook.embed_avg.copy_(quantizer.codebook.embed)
    return codec


def build_model(
    spec: TinyModelSpec, tokenizer: PreTrainedTokenizerFast
) -> HiggsAudioV2ForConditionalGeneration:
    ids = tokenizer.convert_tokens_to_ids
    config = HiggsAudioV2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.hidden_size // spec.num_heads,
        max_position_embeddings=4096,
        num_codebooks=NUM_CODEBOOKS,
        codebook_size=CODEBOOK_SIZE + 2,
        pad_token_id=ids("<|end_of_text|>"),
        bos_token_id=ids("<|begin_of_text|>"),
        eos_token_id=ids("<|eot_id|>"),
        audio_token_id=ids("<|AUDIO_OUT|>"),
        audio_bos_token_id=ids("<|audio_out_bos|>"),
        audio_delay_token_id=ids("<|reserved_special_token_6|>"),
        audio_stream_bos_id=CODEBOOK_SIZE,
        audio_stream_eos_id=CODEBOOK_SIZE + 1,
    )
    torch.manual_seed(spec.seed)
    model = HiggsAudioV2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        rows = model.audio_lm_head.weight.view(NUM_CODEBOOKS, CODEBOOK_SIZE + 2, -1)
        rows[:, :CODEBOOK_SIZE] *= spec.code_logit_scale  # the codes, not stream BOS/EOS
    return model


def build_tiny_checkpoint(model_dir: Path, codec_dir: Path, spec: TinyModelSpec | None = None) -> None:
    """Write a loadable tiny generation model (weights, text tokenizer, chat template) and codec."""
    spec = spec or TinyModelSpec()
    model_dir.mkdir(parents=True, exist_ok=True)
    codec_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_text_tokenizer()
    tokenizer.save_pretrained(model_dir)
    (model_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    model = build_model(spec, tokenizer)
    model.generation_config.ras_win_len = 7
    model.generation_config.ras_win_max_num_repeat = 2
    model.save_pretrained(model_dir)
    build_codec(spec).save_pretrained(codec_dir)
    (model_dir / "TINY_RANDOM_MODEL.json").write_text(
        json.dumps({"note": "tiny random weights: the audio is noise", "spec": spec.__dict__}, indent=2)
    )
