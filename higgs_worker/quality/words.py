"""The words of a transcript as the model reads them: what timestamps, captions and verification count.

Why from the normalised transcript: that is the text the model is given (``normalize_transcript``: sound
events as tags, units spelled out, parentheses dropped), so it is what the clip says. Sound-event tags and
their names (``<SE>[Laughter]</SE>``) are not words, speaker tags only say who speaks, and a token with no
letter or digit (a dash, a lone ``!``) is punctuation: it joins the word before it (or after it, first).
Chinese and Japanese put no spaces between words, so there each character is a word (as WhisperX times
them), and :func:`join_words` writes such words back without spaces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from boson_multimodal.transcript import SPEAKER_TAG, normalize_transcript

SOUND_EVENT = re.compile(r"<(SE|SE_s|SE_e)>.*?</\1>", re.S)
_SPEAKER_SPLIT = re.compile(r"(\[SPEAKER\d+\])")
_WORDLIKE = re.compile(r"\w")
_CJK_CHARS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff"
CJK = re.compile(f"[{_CJK_CHARS}]")
_UNITS = re.compile(
    f"[{_CJK_CHARS}][^\\w\\s]*|[^{_CJK_CHARS}]+"
)  # a character and its punctuation, or the rest


@dataclass(frozen=True)
class TranscriptWord:
    text: str  # as written, with the punctuation attached to it
    speaker: int | None  # the [SPEAKERi] turn it belongs to, None outside dialogue


def transcript_words(transcript: str, *, normalised: bool = False) -> list[TranscriptWord]:
    """The transcript's words in order (normalising it first unless ``normalised``)."""
    text = transcript if normalised else normalize_transcript(transcript)
    words: list[TranscriptWord] = []
    speaker: int | None = None
    loose = ""  # punctuation seen before the first word
    for part in _SPEAKER_SPLIT.split(SOUND_EVENT.sub(" ", text)):
        tag = SPEAKER_TAG.fullmatch(part)
        if tag:
            speaker = int(tag.group(1))
            continue
        for token in (unit for spaced in part.split() for unit in _UNITS.findall(spaced)):
            if _WORDLIKE.search(token):
                words.append(TranscriptWord(loose + token, speaker))
                loose = ""
            elif words and words[-1].speaker == speaker:
                words[-1] = TranscriptWord(words[-1].text + token, speaker)
            else:
                loose += token
    return words


def join_words(words: list[str]) -> str:
    """Words as text: spaces between them, none between two Chinese or Japanese characters."""
    text, previous = "", ""
    for word in words:
        seam = "" if not text or (CJK.match(previous) and CJK.match(word)) else " "
        text, previous = text + seam + word, word
    return text
