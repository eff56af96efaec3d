"""The cost of word timestamps and of verification, as a fraction of generation time (tiny models, CPU).

Builds the tiny random-weight speech model, aligner and Whisper recogniser offline, generates one clip,
then times, on that clip: forced alignment (``timestamps: "word"``) and one transcription plus scoring
(one verification attempt; a failing attempt adds a generation and a transcription), and the alternative
method for word times, Whisper's cross-attention token timestamps. Each figure is the median of ``--runs``;
the ratios are measured in the same run.

    python benchmarks/quality_cost.py [--steps 200] [--runs 3]
    python benchmarks/quality_cost.py --real-geometry --device cuda   # the GPU check: 10 s clip, real sizes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TEXT = (
    "Word timestamps and verification should cost little next to making the speech itself, "
    "so this benchmark measures both on the same clip."
)


def median_time(function: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="decode steps of the clip (25 per second)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--real-geometry", action="store_true", help="the real model sizes, random weights")
    parser.add_argument("--device", default="cpu", help="with --real-geometry: cpu or cuda")
    args = parser.parse_args()
    if args.real_geometry:
        figures = quality_models_on_clip(args.device, args.runs)
        print(f"{figures['clip_s']:.0f} s clip on {args.device}, real geometries with random weights:")
        print(f"aligner wav2vec2-base ({figures['aligner_params_m']:.0f}M): {figures['align_ms']:.1f} ms")
        print(
            f"recogniser Whisper large-v3 turbo ({figures['recogniser_params_m']:.0f}M), "
            f"{figures['recogniser_tokens']} tokens: {figures['transcribe_ms']:.1f} ms"
        )
        return 0

    from boson_multimodal.engine import HiggsAudioEngine, SamplingConfig, SpeechRequest
    from boson_multimodal.tiny_model import build_tiny_checkpoint
    from higgs_worker.quality.alignment import CTCAligner
    from higgs_worker.quality.tiny_models import build_tiny_aligner, build_tiny_recogniser
    from higgs_worker.quality.verification import WhisperRecogniser, error_rate, language_of
    from higgs_worker.quality.words import transcript_words

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        build_tiny_checkpoint(root / "model", root / "codec")
        engine = HiggsAudioEngine.load(root / "model", root / "codec", device="cpu")
        aligner = CTCAligner.load(build_tiny_aligner(root / "aligner"), "cpu")
        recogniser = WhisperRecogniser.load(build_tiny_recogniser(root / "whisper"), "cpu")
        request = SpeechRequest(TEXT, sampling=SamplingConfig(temperature=0, max_new_tokens=args.steps))
        engine.generate(request)  # warm-up
        speech = engine.generate(request)
        generation = median_time(lambda: engine.generate(request), args.runs)
        words = transcript_words(TEXT)
        aligner.align(speech.waveform, speech.sample_rate, words)  # warm-up
        alignment = median_time(lambda: aligner.align(speech.waveform, speech.sample_rate, words), args.runs)
        language = language_of(TEXT)

        def verify_once() -> float:
            heard = recogniser.transcribe(speech.waveform, speech.sample_rate, language)
            return error_rate(TEXT, heard, language)

        verify_once()  # warm-up
        verification = median_time(verify_once, args.runs)
        cross_attention, heard_tokens = whisper_word_times(
            recogniser, speech.waveform, speech.sample_rate, args.runs
        )
    seconds = len(speech.waveform) / speech.sample_rate
    print(
        f"clip: {seconds:.2f} s of audio, {speech.num_frames} frames, {len(words)} words (tiny models, CPU)"
    )
    print(f"generation: {generation * 1000:.1f} ms (median of {args.runs})")
    print(
        f"word timestamps (CTC forced alignment): {alignment * 1000:.1f} ms = {alignment / generation:.3f}x"
    )
    share = verification / generation
    print(f"verification, one attempt (Whisper + WER): {verification * 1000:.1f} ms = {share:.3f}x")
    share = cross_attention / generation
    alternative = f"{cross_attention * 1000:.1f} ms = {share:.3f}x"
    print(
        f"the alternative, Whisper cross-attention token times: {alternative}, for the {heard_tokens} tokens"
    )
    print(f"  it heard, not the {len(words)} transcript words")
    return 0


def whisper_word_times(recogniser: Any, waveform: Any, sample_rate: int, runs: int) -> tuple[float, int]:
    """Whisper's own token timestamps (cross-attention + DTW, ``return_token_timestamps``)."""
    import torch
    import torchaudio.functional as audio_functional

    model, processor = recogniser.model, recogniser.processor
    model.generation_config.alignment_heads = [[0, 0], [0, 1]]  # the tiny decoder's one layer, both heads
    audio = audio_functional.resample(torch.from_numpy(waveform), sample_rate, 16_000).numpy()
    features = processor.feature_extractor(audio, sampling_rate=16_000, return_tensors="pt").input_features
    budget = 16 + round(10 * len(audio) / 16_000)
    found: dict[str, Any] = {}

    def timed() -> None:
        with torch.inference_mode():
            found["out"] = model.generate(
                features, language="en", task="transcribe", max_new_tokens=budget,
                return_token_timestamps=True, return_dict_in_generate=True,
            )  # fmt: skip

    timed()
    return median_time(timed, runs), int(found["out"]["token_timestamps"].shape[1])


def quality_models_on_clip(device: str, runs: int, *, tiny: bool = False, seconds: float = 10.0) -> dict:
    """The aligner and recogniser on ``seconds`` of audio on ``device``: at their real sizes (wav2vec2-base,
    Whisper large-v3 turbo) with random weights, or the tiny builds (``tiny``, a check of the code path).
    Whisper decodes exactly the token budget verification gives a clip this long. Also the GPU check's."""
    import numpy as np
    import torch
    from transformers import (
        AutoProcessor,
        Wav2Vec2Config,
        Wav2Vec2ForCTC,
        WhisperForConditionalGeneration,
    )

    from higgs_worker.quality.alignment import CTCAligner
    from higgs_worker.quality.tiny_models import CTC_VOCAB, build_tiny_aligner, build_tiny_recogniser
    from higgs_worker.quality.words import transcript_words

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    audio = np.random.default_rng(0).standard_normal(round(seconds * 24_000)).astype(np.float32) * 0.1
    with tempfile.TemporaryDirectory() as scratch:
        # the tiny build's processor: the real English CTC vocabulary's shape and the real 16 kHz input
        tiny_aligner = build_tiny_aligner(Path(scratch) / "aligner")
        processor = AutoProcessor.from_pretrained(tiny_aligner)
        ctc = (
            CTCAligner.load(tiny_aligner, device).model
            if tiny
            else Wav2Vec2ForCTC(Wav2Vec2Config(vocab_size=len(CTC_VOCAB))).to(device).eval()  # 12 x 768
        )
        whisper = (
            WhisperForConditionalGeneration.from_pretrained(build_tiny_recogniser(Path(scratch) / "whisper"))
            if tiny
            else WhisperForConditionalGeneration(_turbo())
        ).to(device, dtype)
    aligner = CTCAligner(ctc, processor, device)
    words = transcript_words(TEXT)

    def synchronised(function: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            function()
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        return run

    align = synchronised(lambda: aligner.align(audio, 24_000, words))
    align()  # warm-up
    alignment = median_time(align, runs)
    features = torch.randn(1, whisper.config.num_mel_bins, 3000, device=device, dtype=dtype)
    tokens = 16 + round(10 * seconds)

    def transcribe() -> None:
        with torch.inference_mode():
            whisper.generate(features, max_new_tokens=tokens, min_new_tokens=tokens)

    run = synchronised(transcribe)
    run()  # warm-up
    verification = median_time(run, runs)
    return {
        "clip_s": seconds,
        "geometry": "tiny" if tiny else "real, random weights",
        "aligner_params_m": round(sum(p.numel() for p in ctc.parameters()) / 1e6, 1),
        "align_ms": round(alignment * 1000, 1),
        "recogniser_params_m": round(sum(p.numel() for p in whisper.parameters()) / 1e6, 1),
        "recogniser_tokens": tokens,
        "transcribe_ms": round(verification * 1000, 1),
    }


# Whisper large-v3 turbo's geometry: 32 encoder layers, 4 decoder layers, d=1280, 128 mel bins
TURBO_GEOMETRY = {
    "vocab_size": 51866, "num_mel_bins": 128, "d_model": 1280, "encoder_layers": 32, "decoder_layers": 4,
    "encoder_attention_heads": 20, "decoder_attention_heads": 20, "encoder_ffn_dim": 5120,
    "decoder_ffn_dim": 5120, "max_source_positions": 1500, "max_target_positions": 448,
    "decoder_start_token_id": 50258, "pad_token_id": 50257, "bos_token_id": 50257, "eos_token_id": 50257,
}  # fmt: skip


def _turbo() -> Any:
    from transformers import WhisperConfig

    return WhisperConfig(**TURBO_GEOMETRY)


if __name__ == "__main__":
    raise SystemExit(main())
