"""Word timestamps: the transcript's own words forced-aligned to the finished clip with a CTC model.

Why CTC forced alignment (WhisperX's method: a wav2vec2/MMS CTC model, ``torchaudio.functional.forced_align``)
rather than Whisper's cross-attention timestamps: the text is known, so alignment gives exactly one time span
per transcript word, in order, by construction, whatever the clip says. Cross-attention timestamps belong to
the words a recogniser *heard*; they must be matched back to the transcript and break exactly on the clips
that matter (a skipped or garbled word), and they are coarser (attention peaks, not frame-level posteriors:
WhisperX reports them off by hundreds of milliseconds). The aligner is also small (wav2vec2-base: 95M
parameters, one forward pass at 50 frames per second of audio), so timestamps cost a fraction of generation.

Alignment runs on the clip as it is delivered (after ``speed`` and finishing), so the times are the times in
the file, across long-form pieces and their crossfades alike. Emissions are computed in 20 s windows with 1 s
of context each side (the model's attention is quadratic in length); the Viterbi pass over the whole clip
takes about T × 2L bytes (T frames, L characters), so beyond ``MAX_CELLS`` the clip is cut at its quietest
frame near the middle of the text and each half aligned alone. Characters the model's vocabulary lacks
(digits for an English model) are skipped; a word with none left shares the gap between its neighbours, and a
clip too short for its text (each character needs a frame) gets times in proportion to word length. The
word-delimiter token is not aligned: the pauses between words are blank frames, and each word's span runs
from its first character's first frame to its last character's last frame. (torchaudio 2.9 marks
``forced_align`` as moving out of torchaudio in a later release; the pinned 2.9.1 has it, and it is the one
call to replace if it goes.)
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from higgs_worker.quality.words import TranscriptWord

if TYPE_CHECKING:
    import torch

WINDOW_S = 20.0
CONTEXT_S = 1.0
MAX_CELLS = 400_000_000  # frames × alignment states held by one Viterbi pass (~1 byte each)
SPLIT_SEARCH = 0.1  # where a long clip is cut: the quietest frame within ±10 % of the text's middle

Span = tuple[float, float]  # (start_s, end_s)


@dataclass(frozen=True)
class WordTime:
    word: str
    start_s: float
    end_s: float
    speaker: int | None  # for captions (a cue per turn); not part of the output

    def as_json(self) -> dict[str, Any]:
        return {"word": self.word, "start_s": self.start_s, "end_s": self.end_s}


class CTCAligner:
    """A CTC model (``Wav2Vec2ForCTC`` or any ``AutoModelForCTC``) and its processor, loaded once."""

    def __init__(self, model: Any, processor: Any, device: str) -> None:
        self.model = model
        self.processor = processor
        self.device = device
        self.sample_rate = int(processor.feature_extractor.sampling_rate)
        self.stride = math.prod(model.config.conv_stride)  # input samples per emission frame
        tokenizer = processor.tokenizer
        self.vocab: dict[str, int] = tokenizer.get_vocab()
        self.blank = int(tokenizer.pad_token_id)  # CTC's blank is the tokenizer's padding token
        self.max_cells = MAX_CELLS

    @classmethod
    def load(cls, path: Path, device: str) -> CTCAligner:
        from transformers import AutoModelForCTC, AutoProcessor

        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForCTC.from_pretrained(path).to(device).eval()
        return cls(model, processor, device)

    def align(self, waveform: np.ndarray, sample_rate: int, words: list[TranscriptWord]) -> list[WordTime]:
        """Each word's start and end in seconds, monotonic and inside the clip."""
        duration = len(waveform) / sample_rate
        if not words:
            return []
        emission = self.emission(waveform, sample_rate)
        tokens = [self._tokens(word.text) for word in words]
        spans = _Spans(self.blank, self.stride / self.sample_rate, self.max_cells)
        aligned = spans.align(emission, tokens)
        if aligned is None:  # too short for its text: in proportion to the words' lengths
            aligned = _proportional([len(w.text) for w in words], duration)
        times = []
        for word, (start, end) in zip(words, _fill_gaps(aligned, duration), strict=True):
            start, end = min(max(start, 0.0), duration), min(max(end, 0.0), duration)
            times.append(WordTime(word.text, round(start, 3), round(max(end, start), 3), word.speaker))
        return times

    def align_prefix(
        self, waveform: np.ndarray, sample_rate: int, words: list[TranscriptWord]
    ) -> list[WordTime]:
        """Times for ``words`` when the clip may go on past ``waveform`` (a stream so far).

        The emission is extended by uninformative frames (every label equally likely) with room for all the
        words: the Viterbi pass puts on the real frames the words they hold and lets the rest run into the
        extension, so a word that ends inside the real audio is one the audio has said. Words timed past the
        end of ``waveform`` are not said yet; the caller keeps only words that end well before it.
        """
        import torch

        if not words:
            return []
        emission = self.emission(waveform, sample_rate)
        tokens = [self._tokens(word.text) for word in words]
        count = sum(len(t) for t in tokens)
        extension = torch.full((2 * count + 1, emission.shape[1]), -math.log(emission.shape[1]))
        spans = _Spans(self.blank, self.stride / self.sample_rate, self.max_cells)
        aligned = spans.align(torch.cat([emission, extension]), tokens)
        if aligned is None:
            return []
        extended = (len(emission) + len(extension)) * spans.frame_s
        filled = _fill_gaps(aligned, extended)
        return [
            WordTime(w.text, round(a, 3), round(max(a, b), 3), w.speaker)
            for w, (a, b) in zip(words, filled, strict=True)
        ]

    def emission(self, waveform: np.ndarray, sample_rate: int) -> torch.Tensor:
        """Log-probabilities per frame (T, vocabulary), computed window by window."""
        import torch
        import torchaudio.functional as audio_functional

        audio = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))
        if sample_rate != self.sample_rate:
            audio = audio_functional.resample(audio, sample_rate, self.sample_rate)
        values = self.processor.feature_extractor(
            audio.numpy(), sampling_rate=self.sample_rate, return_tensors="pt"
        ).input_values[0]
        window = round(WINDOW_S * self.sample_rate) // self.stride * self.stride
        context = round(CONTEXT_S * self.sample_rate) // self.stride * self.stride
        parts = []
        with torch.inference_mode():
            for start in range(0, max(len(values), 1), window):
                low, high = max(0, start - context), min(len(values), start + window + context)
                piece = values[low:high]
                if len(piece) < self.stride * 2:  # shorter than the convolutions' reach: pad it
                    piece = torch.nn.functional.pad(piece, (0, self.stride * 2 - len(piece)))
                logits = self.model(piece[None].to(self.device)).logits[0].float().cpu()
                first = (start - low) // self.stride
                count = max(1, (min(window, len(values) - start) + self.stride - 1) // self.stride)
                parts.append(logits[first : first + count])
        return torch.cat(parts).log_softmax(-1)

    def _tokens(self, word: str) -> list[int]:
        ids = []
        for char in word:
            for form in (char, char.upper(), char.lower()):
                if form in self.vocab and self.vocab[form] != self.blank:
                    ids.append(self.vocab[form])
                    break
        return ids


class _Spans:
    """Viterbi forced alignment of token groups (one per word) to an emission, cut when too large."""

    def __init__(self, blank: int, frame_s: float, max_cells: int) -> None:
        self.blank = blank
        self.frame_s = frame_s
        self.max_cells = max_cells

    def align(self, emission: torch.Tensor, tokens: list[list[int]]) -> list[Span | None] | None:
        """Per word (start_s, end_s), None for a word without tokens; None when the clip is too short."""
        count = sum(len(t) for t in tokens)
        if count == 0:
            return [None] * len(tokens)
        if len(emission) * (2 * count + 1) > self.max_cells and len([t for t in tokens if t]) > 1:
            return self._halves(emission, tokens, count)
        flat = [token for group in tokens for token in group]
        repeats = sum(a == b for a, b in itertools.pairwise(flat))
        if len(emission) < count + repeats:
            return None
        import torch
        import torchaudio.functional as audio_functional

        with warnings.catch_warnings():  # torchaudio marks its alignment API as moving, not as broken
            warnings.simplefilter("ignore", UserWarning)
            path, scores = audio_functional.forced_align(
                emission[None], torch.tensor([flat], dtype=torch.int32), blank=self.blank
            )
            spans = audio_functional.merge_tokens(path[0], scores[0].exp(), blank=self.blank)
        assert len(spans) == count, "one span per target token"
        result: list[Span | None] = []
        position = 0
        for group in tokens:
            if not group:
                result.append(None)
                continue
            first, last = spans[position], spans[position + len(group) - 1]
            result.append((first.start * self.frame_s, last.end * self.frame_s))
            position += len(group)
        return result

    def _halves(
        self, emission: torch.Tensor, tokens: list[list[int]], count: int
    ) -> list[Span | None] | None:
        sizes = np.cumsum([len(t) for t in tokens])
        cut_word = int(np.searchsorted(sizes, count / 2)) + 1
        cut_word = min(max(cut_word, 1), len(tokens) - 1)
        share = sizes[cut_word - 1] / count
        frames = len(emission)
        low, high = (
            int(frames * max(share - SPLIT_SEARCH, 0.01)),
            int(frames * min(share + SPLIT_SEARCH, 0.99)),
        )
        cut_frame = low + int(emission[low:high, self.blank].argmax())  # the most certainly silent frame
        first = self.align(emission[:cut_frame], tokens[:cut_word])
        second = self.align(emission[cut_frame:], tokens[cut_word:])
        if first is None or second is None:
            return None
        offset = cut_frame * self.frame_s
        return first + [None if s is None else (s[0] + offset, s[1] + offset) for s in second]


def _proportional(lengths: list[int], duration: float) -> list[Span | None]:
    edges = np.concatenate([[0.0], np.cumsum(lengths)]) / max(sum(lengths), 1) * duration
    return [(float(a), float(b)) for a, b in itertools.pairwise(edges)]


def _fill_gaps(times: list[Span | None], duration: float) -> list[Span]:
    """Words without times share the gap between the aligned words around them."""
    filled: list[Span] = []
    index = 0
    while index < len(times):
        known = times[index]
        if known is not None:
            filled.append(known)
            index += 1
            continue
        run_end = index
        while run_end < len(times) and times[run_end] is None:
            run_end += 1
        after = times[run_end] if run_end < len(times) else None
        start = filled[-1][1] if filled else 0.0
        end = after[0] if after is not None else duration
        step = max(end - start, 0.0) / (run_end - index)
        filled += [(start + i * step, start + (i + 1) * step) for i in range(run_end - index)]
        index = run_end
    return filled
