"""Long-form speech: a transcript too long for one generation, spoken piece by piece in one voice.

Why pieces: quality drops and the KV cache grows as one generation runs long, and a single generation that
hits ``max_new_tokens`` cuts the text off. So the text is split at natural pauses (sentences, then clauses,
then words — never inside a word), each piece is generated on its own with the same voice, and the pieces
are joined with a short equal-power crossfade so no click or gap marks the seams.

Keeping the voice: cloned voices are simply passed again with every piece. With no reference (smart voice)
the model would pick a new voice each time, so each speaker's first generated piece — its audio and its
text — becomes that speaker's reference for the rest. Always the *first* piece rather than the latest: a
rolling reference lets the voice drift a little further with every piece, and one piece keeps the prompt
bounded.

``request.sampling.max_new_tokens`` is the budget of each piece, not of the whole clip: a piece holds at
most ``max_chars`` characters, so the budget a caller would give one request of that size fits one piece.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from boson_multimodal.engine import HiggsAudioEngine, Speech, SpeechRequest
from boson_multimodal.prompt import SPEAKER_TAG, Voice

ProgressCallback = Callable[[int, int], None]  # (pieces done, pieces in all)

DEFAULT_CROSSFADE_S = 0.02

# Where a piece may end, coarsest first. Each pattern matches the punctuation and the whitespace after it;
# the cut goes at the end of the match. Latin punctuation counts only before whitespace, so "3.14", "1,000"
# and "e.g.x" are never cut; CJK punctuation needs no space after it.
_CLOSERS = "\"'”’»)\\]」』"
_BOUNDARIES = (
    re.compile(rf"[.!?…]+[{_CLOSERS}]*\s+|[。！？]+[{_CLOSERS}]*\s*|\n\s*"),  # sentences, lines
    re.compile(rf"[,;:]+[{_CLOSERS}]*\s+|[，、；：]\s*"),  # clauses
    re.compile(r"\s+"),  # words
)


@dataclass(frozen=True)
class Piece:
    """One generation's worth of text: the speaker tag it belongs to (if any) and the words to say."""

    speaker: int | None
    body: str

    @property
    def text(self) -> str:
        return self.body if self.speaker is None else f"[SPEAKER{self.speaker}] {self.body}"


def split_text(text: str, max_chars: int) -> list[str]:
    """Pieces of at most ``max_chars`` characters (speaker tags not counted), cut at the coarsest boundary.

    Every piece of a speaker's turn starts with that speaker's tag, so a turn split in two is still spoken
    by the same speaker. Only a single word longer than ``max_chars`` makes a longer piece.
    """
    return [piece.text for piece in split_pieces(text, max_chars)]


def split_pieces(text: str, max_chars: int) -> list[Piece]:
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, got {max_chars}")
    pieces = []
    for speaker, turn in _turns(text):
        pieces += [Piece(speaker, part.strip()) for part in _fit(turn, max_chars, level=0)]
    return [piece for piece in pieces if piece.body]


def _turns(text: str) -> list[tuple[int | None, str]]:
    """``"a [SPEAKER1] b"`` → ``[(None, "a "), (1, " b")]``: the text between speaker tags."""
    parts = SPEAKER_TAG.split(text)  # [before, index, after, index, after, ...]
    turns: list[tuple[int | None, str]] = [(None, parts[0])]
    turns += [(int(parts[i]), parts[i + 1]) for i in range(1, len(parts), 2)]
    return turns


def _fit(text: str, max_chars: int, level: int) -> list[str]:
    """Cut ``text`` into consecutive substrings that fit, preferring the coarsest boundaries."""
    if len(text.strip()) <= max_chars or level == len(_BOUNDARIES):
        return [text]
    units = []
    for unit in _cut(text, _BOUNDARIES[level]):
        units += _fit(unit, max_chars, level + 1)
    return _pack(units, max_chars)


def _cut(text: str, boundary: re.Pattern[str]) -> list[str]:
    ends = [match.end() for match in boundary.finditer(text)]
    starts = [0, *ends]
    return [text[start:end] for start, end in zip(starts, [*ends, len(text)], strict=True) if end > start]


def _pack(units: list[str], max_chars: int) -> list[str]:
    """Greedily merge neighbouring units while they fit, so pieces are few and as long as allowed."""
    packed: list[str] = []
    for unit in units:
        if packed and len((packed[-1] + unit).strip()) <= max_chars:
            packed[-1] += unit
        else:
            packed.append(unit)
    return packed


def crossfade_join(waveforms: list[np.ndarray], overlap: int) -> np.ndarray:
    """Concatenate with an equal-power crossfade of ``overlap`` samples at each seam.

    Equal power (sine/cosine) because the pieces are independent generations: for uncorrelated signals it
    keeps the loudness constant through the seam, where a linear fade dips by 3 dB. Empty pieces (a piece
    the model ended at once) are skipped so they do not break a seam; a seam is shortened when a piece is
    shorter than the overlap.
    """
    parts: list[np.ndarray] = []
    tail = np.zeros(0, dtype=np.float32)
    for waveform in (np.asarray(w, dtype=np.float32) for w in waveforms if len(w)):
        n = min(overlap, len(tail), len(waveform))
        if n:
            phase = (np.arange(n, dtype=np.float32) + 0.5) / n * (np.pi / 2)
            parts.append(tail[:-n])
            parts.append(tail[-n:] * np.cos(phase) + waveform[:n] * np.sin(phase))
        else:
            parts.append(tail)
        tail = waveform[n:]
    parts.append(tail)
    return np.concatenate(parts).astype(np.float32)


def generate_long(
    engine: HiggsAudioEngine,
    request: SpeechRequest,
    max_chars: int,
    on_progress: ProgressCallback | None = None,
    crossfade_s: float = DEFAULT_CROSSFADE_S,
) -> Speech:
    """Speak ``request.text`` piece by piece (see the module docstring) and join the pieces into one clip.

    ``num_frames`` counts the frames of all pieces; the waveform is shorter than ``num_frames`` frames by
    the crossfade overlaps.
    """
    pieces = split_pieces(request.text, max_chars)
    if not pieces:
        raise ValueError("text has nothing to speak")
    anchors: dict[int | None, Voice] = {}  # smart voice: each speaker's first generated piece
    speeches: list[Speech] = []
    for done, piece in enumerate(pieces, start=1):
        speech = engine.generate(_piece_request(request, piece, anchors))
        if not request.voices and piece.speaker not in anchors and speech.waveform.size:
            anchors[piece.speaker] = Voice(speech.waveform, speech.sample_rate, piece.body)
        speeches.append(speech)
        if on_progress is not None:
            on_progress(done, len(pieces))
    return Speech(
        waveform=crossfade_join([s.waveform for s in speeches], round(crossfade_s * engine.sample_rate)),
        sample_rate=engine.sample_rate,
        num_frames=sum(s.num_frames for s in speeches),
        finished=all(s.finished for s in speeches),
    )


def _piece_request(request: SpeechRequest, piece: Piece, anchors: dict[int | None, Voice]) -> SpeechRequest:
    """The request for one piece: the caller's voices, else the speaker's anchor voice once there is one.

    An anchored piece is a single-voice cloning prompt, so its speaker tag is dropped: the reference turn
    already says who speaks.
    """
    if request.voices or piece.speaker not in anchors:
        return replace(request, text=piece.text)
    return replace(request, text=piece.body, voices=(anchors[piece.speaker],))
