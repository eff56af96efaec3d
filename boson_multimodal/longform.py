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

Other ways to cut, as the upstream generation script offers them (``Chunking.method``):

* ``"speaker"`` — one piece per speaker turn (a line starting with ``[SPEAKERn]``), or ``max_turns`` turns;
* ``"word"`` — pieces of at most ``max_words`` words (CJK text: characters count as words).

With these, the voice is kept the script's way: every piece is prompted with the references and with up to
``buffer_size`` of the pieces generated just before it (their text and audio as earlier turns), so the prompt
stays bounded however long the text.

``request.sampling.max_new_tokens`` is the budget of each piece, not of the whole clip: a piece holds at
most ``max_chars`` characters (or words, or turns), so the budget a caller would give one request of that
size fits one piece.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Generic, Literal, TypeVar

import numpy as np

from boson_multimodal.prompt import PromptRequest, Voice, default_voices
from boson_multimodal.transcript import SPEAKER_TAG

if TYPE_CHECKING:  # the engine needs torch; planning pieces (dry runs) must not
    from boson_multimodal.engine import HiggsAudioEngine, Speech, SpeechRequest
    from boson_multimodal.streaming import AudioChunk, ChunkSchedule

ProgressCallback = Callable[[int, int], None]  # (pieces done, pieces in all)

DEFAULT_CROSSFADE_S = 0.02
ChunkMethod = Literal["sentence", "speaker", "word"]


@dataclass(frozen=True)
class Chunking:
    """How a long text is cut: the method, and the one limit that method uses."""

    method: ChunkMethod = "sentence"
    max_chars: int = 400  # sentence: characters per piece
    max_words: int = 200  # word: words per piece
    max_turns: int = 1  # speaker: turns per piece
    buffer_size: int = 2  # speaker, word: earlier generated pieces kept in the prompt

    def __post_init__(self) -> None:
        for name in ("max_chars", "max_words", "max_turns"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.buffer_size < 0:
            raise ValueError(f"buffer_size must be at least 0, got {self.buffer_size}")


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
    Chunking(max_chars=max_chars)  # checks the limit
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


def plan_pieces(text: str, chunking: Chunking) -> list[Piece]:
    """The pieces ``text`` is generated in, by ``chunking.method``."""
    if chunking.method == "sentence":
        return split_pieces(text, chunking.max_chars)
    chunks = _by_turns(text, chunking.max_turns) if chunking.method == "speaker" else None
    if chunks is None:
        chunks = _by_words(text, chunking.max_words)
    return [Piece(None, chunk.strip()) for chunk in chunks if chunk.strip()]


def _by_turns(text: str, max_turns: int) -> list[str]:
    """A piece per turn: a line starting with a speaker tag opens a turn, other lines continue it."""
    turns: list[str] = []
    for line in (line.strip() for line in text.split("\n")):
        if turns and not SPEAKER_TAG.match(line):
            turns[-1] += "\n" + line
        else:
            turns.append(line)
    return ["\n".join(turns[i : i + max_turns]) for i in range(0, len(turns), max_turns)]


_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_CJK_WORD = re.compile(rf"[{_CJK}]|[^ {_CJK}]+")


def _by_words(text: str, max_words: int) -> list[str]:
    """Pieces of at most ``max_words`` words, paragraph by paragraph.

    Words are what spaces separate, as in the upstream script (a line break alone does not separate them);
    in CJK text, which has no spaces, each character counts as a word (the script segments Chinese with
    jieba, whose words are a character or two). The cuts fall just before a word, so the text between words
    stays as it was.
    """
    chunks: list[str] = []
    for paragraph in text.split("\n\n"):
        starts = [match.start() for match in _CJK_WORD.finditer(paragraph)]
        cuts = [*starts[::max_words][1:], len(paragraph)]
        chunks += [paragraph[a:b] for a, b in zip([0, *cuts[:-1]], cuts, strict=True)]
    return chunks


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
    chunking: Chunking | int,
    on_progress: ProgressCallback | None = None,
    crossfade_s: float = DEFAULT_CROSSFADE_S,
    generate_piece: Callable[[SpeechRequest], Speech] | None = None,
) -> Speech:
    """Speak ``request.text`` piece by piece (see the module docstring) and join the pieces into one clip.

    ``chunking`` says how to cut the text; a number is the sentence splitter's piece length. ``num_frames``
    counts the frames of all pieces; the waveform is shorter than ``num_frames`` frames by the crossfade
    overlaps. ``generate_piece`` makes each piece (``engine.generate`` unless given: a caller may check a
    piece and make it again before the next piece is prompted with it).
    """
    from boson_multimodal.engine import Speech

    chunking = chunking if isinstance(chunking, Chunking) else Chunking(max_chars=chunking)
    pieces = plan_pieces(request.text, chunking)
    if not pieces:
        raise ValueError("text has nothing to speak")
    history = PieceHistory(request, chunking)
    speeches: list[Speech] = []
    for done, piece in enumerate(pieces, start=1):
        speech = (generate_piece or engine.generate)(history.request_for(piece))
        history.add(piece, Voice(speech.waveform, speech.sample_rate, piece.text))
        speeches.append(speech)
        if on_progress is not None:
            on_progress(done, len(pieces))
    return Speech(
        waveform=crossfade_join([s.waveform for s in speeches], round(crossfade_s * engine.sample_rate)),
        sample_rate=engine.sample_rate,
        num_frames=sum(s.num_frames for s in speeches),
        finished=all(s.finished for s in speeches),
    )


def stream_long(
    engine: HiggsAudioEngine,
    request: SpeechRequest,
    chunking: Chunking | int,
    on_progress: ProgressCallback | None = None,
    schedule: ChunkSchedule | None = None,
    crossfade_s: float = DEFAULT_CROSSFADE_S,
    generate_piece: Callable[[SpeechRequest], Speech] | None = None,
) -> Generator[AudioChunk, None, None]:
    """``generate_long`` as a stream: each piece's chunks leave while it is generated, the next piece starts
    when the previous one ends, and each seam gets the same crossfade, so the chunks concatenate to what
    ``generate_long`` returns. The first audio therefore comes after the first piece's first chunk, not after
    the whole text.

    The last ``overlap`` samples of every piece but the last are held back (a rolling tail: the piece's last
    chunk may be too short, or empty) until the next piece's first audio arrives to be crossfaded with.
    Closing the iterator cancels the piece being generated. With ``generate_piece`` each piece is made whole
    by it (a caller checking a piece before any of it is sent) and then sent in chunks.
    """
    from boson_multimodal.streaming import AudioChunk, chunk_speech, stream_speech

    chunking = chunking if isinstance(chunking, Chunking) else Chunking(max_chars=chunking)
    pieces = plan_pieces(request.text, chunking)
    if not pieces:
        raise ValueError("text has nothing to speak")
    history = PieceHistory(request, chunking)
    overlap = round(crossfade_s * engine.sample_rate)
    held = np.zeros(0, dtype=np.float32)  # the previous pieces' tail, waiting for the next seam
    index = frames_before = samples_sent = 0
    finished_so_far = True  # every earlier piece was ended by the model, not by max_new_tokens
    for done, piece in enumerate(pieces, start=1):
        last_piece = done == len(pieces)
        parts: list[np.ndarray] = []
        tail = np.zeros(0, dtype=np.float32)  # this piece's newest samples, not sent yet
        piece_request = history.request_for(piece)
        piece_chunks = (
            chunk_speech(generate_piece(piece_request), engine.frame_rate)
            if generate_piece is not None
            else stream_speech(engine, piece_request, schedule)
        )
        for chunk in piece_chunks:
            parts.append(chunk.waveform)
            audio = chunk.waveform
            if len(audio) and len(held):
                audio = crossfade_join([held, audio], overlap)
                held = held[:0]
            if not last_piece:
                audio = np.concatenate([tail, audio])
                cut = max(len(audio) - overlap, 0)
                audio, tail = audio[:cut], audio[cut:]
                if chunk.final and len(tail):  # (an empty piece leaves the earlier pieces' tail held)
                    held = tail
            final = chunk.final and last_piece
            if final and len(held):  # the last piece said nothing: what was held closes the clip
                audio = np.concatenate([audio, held])
            if len(audio) or final:
                yield AudioChunk(
                    waveform=audio,
                    sample_rate=chunk.sample_rate,
                    index=index,
                    start_frame=frames_before + chunk.start_frame,
                    num_frames=chunk.num_frames,
                    frame_rate=chunk.frame_rate,
                    final=final,
                    finished=final and chunk.finished and finished_so_far,
                    start_sample=samples_sent,
                )
                index, samples_sent = index + 1, samples_sent + len(audio)
            if chunk.final:
                frames_before += chunk.end_frame
                finished_so_far = finished_so_far and chunk.finished
        waveform = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
        history.add(piece, Voice(waveform, engine.sample_rate, piece.text))
        if on_progress is not None:
            on_progress(done, len(pieces))


R = TypeVar("R", bound=PromptRequest)  # what PieceHistory hands back is what it was given


class PieceHistory(Generic[R]):
    """What each piece is prompted with, given the pieces generated before it.

    Sentence pieces without reference audio: each speaker's first piece becomes its anchor (see the module
    docstring); until then a dialogue's pieces keep the whole text's default voices, as one generation of the
    whole text would have them. Speaker and word pieces: the caller's voices plus the last ``buffer_size``
    generated pieces as context. Dry runs use the same class with stand-in audio.
    """

    def __init__(self, request: R, chunking: Chunking) -> None:
        self._request = request
        self._chunking = chunking
        self._voices = request.voices or default_voices(request.text)
        self._anchored = chunking.method == "sentence" and not request.has_audio
        self._anchors: dict[int | None, Voice] = {}
        self._context: list[Voice] = []

    def request_for(self, piece: Piece) -> R:
        """The request for one piece. An anchored piece is a single-voice cloning prompt, so its speaker tag
        is dropped: the reference turn already says who speaks."""
        if self._anchored and piece.speaker in self._anchors:
            return replace(self._request, text=piece.body, voices=(self._anchors[piece.speaker],))
        size = self._chunking.buffer_size
        kept = tuple(self._context[-size:]) if size else ()
        return replace(self._request, text=piece.text, voices=self._voices, context=kept)

    def add(self, piece: Piece, generated: Voice) -> None:
        if self._anchored:
            if piece.speaker not in self._anchors and generated.waveform.size:
                self._anchors[piece.speaker] = replace(generated, transcript=piece.body)
        elif self._chunking.method != "sentence":
            self._context.append(generated)
