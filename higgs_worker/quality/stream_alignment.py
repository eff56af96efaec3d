"""Word timestamps for a stream, chunk by chunk: each chunk carries the words its audio finished saying.

Why not wait for the whole clip: captions and karaoke-style highlighting want words while the audio plays.
After each chunk the audio not yet accounted for is aligned against the words not yet sent, as a prefix
(:meth:`CTCAligner.align_prefix`: the clip may go on); a word is sent once it ends at least
``SETTLE_GUARD_S`` before the end of the audio so far, since a word at the very end may still be growing.
Sent words are final: later alignments start after the last sent word, so the times never move and stay
monotonic. At the end of the stream the remaining words are aligned to the remaining audio as a whole clip.
Each pass reads only the audio since the last sent word: while words settle, the work per chunk stays
bounded; audio in which no word settles (silence, music, a clip that skips its text) keeps growing the pass,
so such a stream costs more the longer it goes, up to one alignment of the whole clip per pass.
"""

from __future__ import annotations

import numpy as np

from higgs_worker.quality.alignment import CTCAligner, WordTime
from higgs_worker.quality.words import TranscriptWord

SETTLE_GUARD_S = 0.5
MIN_NEW_AUDIO_S = 0.5  # align again only once this much audio has come since the last pass


class StreamAligner:
    def __init__(self, aligner: CTCAligner, words: list[TranscriptWord], sample_rate: int) -> None:
        self.aligner = aligner
        self.sample_rate = sample_rate
        self._words = words
        self._next = 0  # the first word not sent yet
        self._pending = np.zeros(0, dtype=np.float32)  # the audio after the last sent word
        self._pending_start = 0  # where it starts in the clip, in samples
        self._since_pass = 0  # samples arrived since the last alignment pass

    def feed(self, waveform: np.ndarray) -> list[WordTime]:
        """The words this chunk's audio finished, in clip time."""
        self._pending = np.concatenate([self._pending, np.asarray(waveform, dtype=np.float32)])
        self._since_pass += len(waveform)
        if self._next >= len(self._words) or self._since_pass < MIN_NEW_AUDIO_S * self.sample_rate:
            return []
        self._since_pass = 0
        times = self.aligner.align_prefix(self._pending, self.sample_rate, self._words[self._next :])
        limit = len(self._pending) / self.sample_rate - SETTLE_GUARD_S
        settled = []
        for time in times:
            if time.end_s > limit:
                break
            settled.append(time)
        if not settled:
            return []
        cut = min(round(settled[-1].end_s * self.sample_rate), len(self._pending))
        sent = [self._shifted(time) for time in settled]
        self._next += len(settled)
        self._pending, self._pending_start = self._pending[cut:], self._pending_start + cut
        return sent

    def close(self) -> list[WordTime]:
        """At the end of the stream: every word not sent yet, aligned to the audio left."""
        rest = self._words[self._next :]
        self._next = len(self._words)
        if not rest:
            return []
        return [self._shifted(t) for t in self.aligner.align(self._pending, self.sample_rate, rest)]

    def _shifted(self, time: WordTime) -> WordTime:
        offset = self._pending_start / self.sample_rate
        return WordTime(
            time.word, round(time.start_s + offset, 3), round(time.end_s + offset, 3), time.speaker
        )
