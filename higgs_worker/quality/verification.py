"""Verification: does the clip say its text? Transcribe it, score it, and regenerate it while it does not.

Why: Higgs Audio sometimes skips, repeats or garbles words, or adds sounds nobody asked for
(boson-ai/higgs-audio #149 recommends checking every clip with Whisper). So each clip is transcribed by a
Whisper recogniser and compared with the normalised transcript: word error rate for spaced languages,
character error rate for Chinese and Japanese (which put no spaces between words), both after Whisper's own
text normalisers (transformers' ``EnglishTextNormalizer`` for English, ``BasicTextNormalizer`` otherwise),
so punctuation, case and spelling variants ("25"/"twenty-five", "Mr."/"mister") are not errors.

``max_wer`` defaults to 0.2: a clean clip transcribed by Whisper large-v3 turbo scores a few percent (names
and numbers it spells differently), while a skipped sentence, a loop or a garbled stretch scores far above;
0.2 lets the first pass and catches the second. A failing clip is generated again with a seed derived from
the request's seed (so a seeded request stays deterministic) up to ``max_attempts`` times, and the attempt
with the lowest error is returned, marked ``passed: false`` when none passed. Greedy requests
(``temperature: 0``) make the same clip whatever the seed, so they are checked once. Long texts are checked
piece by piece, and only a failing piece is generated again.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from higgs_worker.quality.words import join_words, transcript_words

if TYPE_CHECKING:
    from boson_multimodal.engine import Speech, SpeechRequest

DEFAULT_MAX_WER = 0.2
DEFAULT_MAX_ATTEMPTS = 3
MAX_ATTEMPTS = 8
SEED_STEP = 0x9E3779B1  # an odd step (the golden ratio's): the attempts' seeds are distinct modulo 2**32
RECOGNISER_RATE = 16_000
_KANA = re.compile(r"[\u3040-\u30ff]")
_HAN = re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf]")

T = TypeVar("T")


class Recogniser(Protocol):
    """What verification needs of a speech recogniser."""

    def transcribe(self, waveform: np.ndarray, sample_rate: int, language: str | None) -> str:
        """The text heard in ``waveform`` (``language``: a Whisper language code, or None to detect it)."""
        ...


class WhisperRecogniser:
    """A Whisper checkpoint (``WhisperForConditionalGeneration`` via transformers), greedy decoding."""

    def __init__(self, model: Any, processor: Any, device: str) -> None:
        self.model = model
        self.processor = processor
        self.device = device
        self._lock = threading.Lock()  # one transcription at a time on the shared model

    @classmethod
    def load(cls, path: Path, device: str) -> WhisperRecogniser:
        import torch
        from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForSpeechSeq2Seq.from_pretrained(path, dtype=dtype).to(device).eval()
        return cls(model, processor, device)

    def transcribe(self, waveform: np.ndarray, sample_rate: int, language: str | None) -> str:
        """Whisper reads 30 s windows: a longer clip is transcribed window by window and the texts joined."""
        import torch
        import torchaudio.functional as audio_functional

        audio = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))
        if sample_rate != RECOGNISER_RATE:
            audio = audio_functional.resample(audio, sample_rate, RECOGNISER_RATE)
        window = 30 * RECOGNISER_RATE
        pieces = [audio[i : i + window].numpy() for i in range(0, max(len(audio), 1), window)]
        features = self.processor.feature_extractor(
            pieces, sampling_rate=RECOGNISER_RATE, return_tensors="pt"
        ).input_features.to(self.device, self.model.dtype)
        with self._lock, torch.inference_mode():
            ids = self.model.generate(
                features, language=language, task="transcribe", max_new_tokens=_token_budget(len(audio))
            )
        texts = self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return " ".join(text.strip() for text in texts).strip()


def _token_budget(samples: int) -> int:
    """Tokens a window may need: speech runs below 10 tokens a second; Whisper's own cap is 448 in all."""
    seconds = min(samples / RECOGNISER_RATE, 30.0)
    return min(440, 16 + round(10 * seconds))


# -- scoring ---------------------------------------------------------------------------------------------


def language_of(text: str) -> str | None:
    """Japanese (kana), Chinese (Han without kana), English (ASCII letters only), else None: detect."""
    if _KANA.search(text):
        return "ja"
    if _HAN.search(text):
        return "zh"
    letters = [c for c in text if c.isalpha()]
    return "en" if letters and all(c.isascii() for c in letters) else None


def normalise(text: str, language: str | None) -> str:
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

    if language == "en":
        return EnglishTextNormalizer({})(text)
    return BasicTextNormalizer()(text)


def error_rate(reference: str, hypothesis: str, language: str | None) -> float:
    """WER (CER for Chinese and Japanese) of ``hypothesis`` against ``reference``, both normalised."""
    ref, hyp = normalise(reference, language), normalise(hypothesis, language)
    if language in ("zh", "ja"):
        ref_units, hyp_units = list(ref.replace(" ", "")), list(hyp.replace(" ", ""))
    else:
        ref_units, hyp_units = ref.split(), hyp.split()
    if not ref_units:
        return 0.0 if not hyp_units else 1.0
    return _edits(ref_units, hyp_units) / len(ref_units)


def _edits(a: list[str], b: list[str]) -> int:
    """Levenshtein distance between two token lists (substitutions, insertions, deletions)."""
    row = list(range(len(b) + 1))
    for i, token in enumerate(a, start=1):
        previous, row[0] = row[0], i
        for j, other in enumerate(b, start=1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (token != other))
    return row[-1]


# -- attempts --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One piece's (or one clip's) verification: the best attempt's score."""

    error: float
    attempts: int
    passed: bool
    recognised: str
    reference_units: int  # the reference's words (characters for zh/ja), to weigh pieces together
    metric: str  # "wer", or "cer" for Chinese and Japanese


@dataclass(frozen=True)
class VerifyOptions:
    max_wer: float = DEFAULT_MAX_WER
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    retry: bool = True  # False for greedy requests: another seed would give the same clip

    @classmethod
    def of(cls, max_wer: float | None, max_attempts: int | None, temperature: float) -> VerifyOptions:
        """A request's options: its own values, else the defaults; one attempt when it decodes greedily."""
        return cls(
            max_wer=DEFAULT_MAX_WER if max_wer is None else max_wer,
            max_attempts=max_attempts or DEFAULT_MAX_ATTEMPTS,
            retry=temperature > 0,
        )

    @property
    def attempts(self) -> int:
        """How many clips verification may make at most."""
        return self.max_attempts if self.retry else 1


def attempt_seed(seed: int | None, attempt: int) -> int | None:
    """The seed of attempt ``attempt`` (0 is the request's own); None stays None (unseeded: fresh draws)."""
    if seed is None or attempt == 0:
        return seed
    return (seed + attempt * SEED_STEP) % 2**32


def best_attempt(
    make: Callable[[int], T], score: Callable[[T], tuple[float, str]], options: VerifyOptions
) -> tuple[T, float, str, int]:
    """Attempts ``make(0)``, ``make(1)``… until one scores at most ``max_wer``; the best, its score, what
    was recognised, and how many attempts were made."""
    best: tuple[T, float, str] | None = None
    attempts = options.max_attempts if options.retry else 1
    made = 0
    for attempt in range(attempts):
        result = make(attempt)
        made += 1
        error, recognised = score(result)
        if best is None or error < best[1]:
            best = (result, error, recognised)
        if error <= options.max_wer:
            break
    assert best is not None
    return best[0], best[1], best[2], made


class Verifier:
    """Verification for one job: wraps the engine's generate so every piece is checked (and redone)."""

    def __init__(
        self, recogniser: Recogniser, options: VerifyOptions, on_transcribe: Callable[[float], None]
    ) -> None:
        self.recogniser = recogniser
        self.options = options
        self.checks: list[Check] = []
        self._on_transcribe = on_transcribe  # seconds spent transcribing, for the job's timings

    def generate(self, generate: Callable[[SpeechRequest], Speech]) -> Callable[[SpeechRequest], Speech]:
        """``generate`` with verification: the best of up to ``max_attempts`` seeds for each request.

        A piece with no words (only a sound event, such as ``[laugh]``) has nothing to check: it is generated
        once and passes.
        """

        def verified(request: SpeechRequest) -> Speech:
            def make(attempt: int) -> Speech:
                seed = attempt_seed(request.sampling.seed, attempt)
                return generate(replace(request, sampling=replace(request.sampling, seed=seed)))

            reference = join_words([w.text for w in transcript_words(request.text, normalised=True)])
            language = language_of(reference)
            if not normalise(reference, language).strip():
                self.checks.append(Check(0.0, 1, True, "", 0, "wer"))
                return make(0)
            speech, error, recognised, made = best_attempt(
                make, lambda s: self._score(s, reference, language), self.options
            )
            metric = "cer" if language in ("zh", "ja") else "wer"
            normalised = normalise(reference, language)
            units = len(normalised.replace(" ", "")) if metric == "cer" else len(normalised.split())
            passed = error <= self.options.max_wer
            self.checks.append(Check(error, made, passed, recognised, units, metric))
            return speech

        return verified

    def _score(self, speech: Speech, reference: str, language: str | None) -> tuple[float, str]:
        started = time.perf_counter()
        heard = self.recogniser.transcribe(speech.waveform, speech.sample_rate, language)
        self._on_transcribe(time.perf_counter() - started)
        return error_rate(reference, heard, language), heard

    def report(self) -> dict[str, Any]:
        """The job's ``verification``: pieces weighed by length; ``attempts`` counts every generation."""
        total = sum(c.reference_units for c in self.checks) or 1
        report: dict[str, Any] = {
            "wer": round(sum(c.error * c.reference_units for c in self.checks) / total, 4),
            "attempts": sum(c.attempts for c in self.checks),
            "passed": all(c.passed for c in self.checks),
            "recognised": " ".join(c.recognised for c in self.checks),
            "max_wer": self.options.max_wer,
            "metric": "cer" if all(c.metric == "cer" for c in self.checks) else "wer",
        }
        if len(self.checks) > 1:
            report["pieces"] = [
                {"wer": round(c.error, 4), "attempts": c.attempts, "passed": c.passed} for c in self.checks
            ]
        return report
