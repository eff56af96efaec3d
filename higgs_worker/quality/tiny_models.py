"""Tiny random-weight versions of the quality models, built offline (tests and ``--demo``).

They have the real classes, processors and vocabularies' shape (an English character CTC vocabulary like
``facebook/wav2vec2-base-960h``'s, the real 320-sample frame stride), so every code path runs; their
outputs are noise, so their timestamps and transcripts mean nothing.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

TINY_MARKER = "TINY_RANDOM_MODEL.json"
CTC_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", *string.ascii_uppercase, "'"]


def build_tiny_aligner(directory: Path, seed: int = 0) -> Path:
    """A tiny ``Wav2Vec2ForCTC`` with its processor, saved to ``directory``."""
    import torch
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
    )

    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file = Path(scratch) / "vocab.json"
        vocab_file.write_text(json.dumps({token: index for index, token in enumerate(CTC_VOCAB)}))
        tokenizer = Wav2Vec2CTCTokenizer(
            str(vocab_file), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|"
        )
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=16_000,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=False,
    )
    config = Wav2Vec2Config(
        vocab_size=len(CTC_VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16,) * 7,
        conv_stride=(5, 2, 2, 2, 2, 2, 2),  # the real stride: 320 samples (20 ms at 16 kHz) per frame
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        pad_token_id=0,
        ctc_loss_reduction="mean",
    )
    Wav2Vec2ForCTC(config).eval().save_pretrained(directory)
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(directory)
    (directory / TINY_MARKER).write_text(json.dumps({"seed": seed, "kind": "aligner"}))
    return directory


def build_tiny_recogniser(directory: Path, seed: int = 0) -> Path:
    """A tiny ``WhisperForConditionalGeneration`` with its processor, saved to ``directory``.

    Whisper's layout for real: 128 mel bins and 30 s windows (as large-v3 turbo), its special tokens
    (start of transcript, every language, the tasks, no-timestamps), a byte-level BPE vocabulary (the 256 byte
    symbols, no merges) and the generation settings ``generate(language=..., task=...)`` reads.
    """
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    end = "<|endoftext|>"
    specials = [
        "<|startoftranscript|>",
        *[f"<|{code}|>" for code in LANGUAGES],
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nocaptions|>",
        "<|notimestamps|>",
    ]
    with tempfile.TemporaryDirectory() as scratch:
        files = Path(scratch)
        (files / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(_byte_symbols())}))
        (files / "merges.txt").write_text("#version: 0.2\n")
        (files / "normalizer.json").write_text("{}")
        tokenizer = WhisperTokenizer(
            str(files / "vocab.json"),
            str(files / "merges.txt"),
            normalizer_file=str(files / "normalizer.json"),
            unk_token=end,
            bos_token=end,
            eos_token=end,
            pad_token=end,
        )
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in [end, *specials]}
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=128,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_source_positions=1500,
        max_target_positions=448,
        pad_token_id=ids[end],
        bos_token_id=ids[end],
        eos_token_id=ids[end],
        decoder_start_token_id=ids["<|startoftranscript|>"],
    )
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=ids[end],
        eos_token_id=ids[end],
        pad_token_id=ids[end],
        is_multilingual=True,
        lang_to_id={f"<|{code}|>": ids[f"<|{code}|>"] for code in LANGUAGES},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"],
        max_length=448,
    )
    model.save_pretrained(directory)
    processor = WhisperProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer
    )
    processor.save_pretrained(directory)
    (directory / TINY_MARKER).write_text(json.dumps({"seed": seed, "kind": "recogniser"}))
    return directory


def _byte_symbols() -> list[str]:
    """GPT-2's byte-level alphabet: one printable symbol for each of the 256 byte values."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols = [chr(b) for b in printable]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols
