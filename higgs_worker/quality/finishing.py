"""Finishing a clip before it is encoded: trimming silence at its ends and normalising its loudness.

Silence is decided frame by frame (10 ms frames, RMS below −50 dBFS) with one absolute threshold, the same
for whole clips and streams, because a stream cannot know the loudest frame of the clip before it is sent.
A short margin (0.1 s) is kept before the first and after the last sound so words do not start or end
abruptly. Whole clips and streams trim through the same :class:`SilenceTrimmer`, so a trimmed stream
concatenates to exactly the trimmed whole clip: leading silence is dropped as it arrives, and a silent run
after speech is held back (adding latency only while it lasts) until more sound comes or the stream ends.

Loudness is integrated loudness as ITU-R BS.1770 defines it, measured by ``torchaudio.functional.loudness``.
A gain moves it to ``loudness_lufs``; a look-ahead peak limiter then keeps every sample within ±0.95, and
the gain is corrected (a few rounds) for the loudness the limiter took away. A whole clip reaches its target
(within 0.1 LU unless the limiter cannot give that much level). A stream has no look-ahead: its gain is
measured on its first 0.4 s or more of audio (BS.1770's block length; the audio is held until then) and kept
for the rest of the stream, so its loudness is only as close to the target as its start is typical of it;
the peak limit holds for every chunk. Silence (nothing above BS.1770's absolute gate) is left as it is.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from boson_multimodal.streaming import AudioChunk
    from higgs_worker.job.schema import TTSRequest

MIN_LOUDNESS_LUFS = -70.0  # BS.1770's absolute gate: below it there is nothing to measure
MAX_LOUDNESS_LUFS = -5.0
PEAK_CEILING = 0.95
SILENCE_DBFS = -50.0
FRAME_S = 0.01
TRIM_MARGIN_S = 0.1
LIMITER_LOOKAHEAD_S = 0.005
LOUDNESS_BLOCK_S = 0.4
LOUDNESS_ROUNDS = 8
LOUDNESS_TOLERANCE_LU = 0.05


@dataclass(frozen=True)
class Finishing:
    """What a request asks of the finished clip (``loudness_lufs``, ``trim_silence``)."""

    loudness_lufs: float | None = None
    trim_silence: bool = False

    @property
    def active(self) -> bool:
        return self.loudness_lufs is not None or self.trim_silence


def finish(waveform: np.ndarray, sample_rate: int, finishing: Finishing) -> np.ndarray:
    """The whole clip trimmed (when asked), then brought to its loudness (when asked)."""
    wave = np.asarray(waveform, dtype=np.float32)
    if finishing.trim_silence:
        wave = trim_silence(wave, sample_rate)
    if finishing.loudness_lufs is not None:
        wave = normalise_loudness(wave, sample_rate, finishing.loudness_lufs)
    return wave


def trim_silence(waveform: np.ndarray, sample_rate: int) -> np.ndarray:
    """Leading and trailing silence removed, a short margin kept; a clip without sound is left as it is."""
    trimmer = SilenceTrimmer(sample_rate)
    kept = np.concatenate([trimmer.feed(waveform), trimmer.close()])
    return kept if trimmer.heard_sound else np.asarray(waveform, dtype=np.float32)


class SilenceTrimmer:
    """Trims a clip that arrives in pieces; what ``feed`` and ``close`` return concatenates to the result."""

    def __init__(self, sample_rate: int) -> None:
        self.frame = max(1, round(FRAME_S * sample_rate))
        # Whole frames, so every buffer starts on the clip's frame grid and chunking never moves a decision.
        self.margin = round(TRIM_MARGIN_S / FRAME_S) * self.frame
        self.heard_sound = False
        self._pending = np.zeros(0, dtype=np.float32)  # not sent yet: silence after sound, a partial frame
        self._threshold = 10 ** (SILENCE_DBFS / 20)

    def feed(self, waveform: np.ndarray) -> np.ndarray:
        buffer = np.concatenate([self._pending, np.asarray(waveform, dtype=np.float32)])
        whole = len(buffer) // self.frame * self.frame
        frames = buffer[:whole].reshape(-1, self.frame)
        rms = np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1))
        sound = np.flatnonzero(rms > self._threshold)
        if not self.heard_sound:
            if not sound.size:  # still leading silence: keep only what may become the margin before speech
                self._pending = buffer[max(0, whole - self.margin) :]
                return np.zeros(0, dtype=np.float32)
            self.heard_sound = True
            start = max(0, int(sound[0]) * self.frame - self.margin)
            buffer, sound_end = buffer[start:], (int(sound[-1]) + 1) * self.frame - start
        else:
            sound_end = (int(sound[-1]) + 1) * self.frame if sound.size else 0
        self._pending = buffer[sound_end:]
        return buffer[:sound_end]

    def close(self) -> np.ndarray:
        """The end of the clip: the margin after the last sound (nothing if there never was sound)."""
        rest = self._pending[: self.margin] if self.heard_sound else np.zeros(0, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)
        return rest


def measure_loudness(waveform: np.ndarray, sample_rate: int) -> float:
    """Integrated loudness in LUFS (BS.1770, torchaudio); −inf for silence or a clip shorter than 0.4 s."""
    import torch
    import torchaudio.functional as audio_functional

    if len(waveform) < round(LOUDNESS_BLOCK_S * sample_rate):
        return -math.inf
    tensor = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)).unsqueeze(0)
    value = float(audio_functional.loudness(tensor, sample_rate))
    return value if math.isfinite(value) else -math.inf


def normalise_loudness(waveform: np.ndarray, sample_rate: int, target_lufs: float) -> np.ndarray:
    """``waveform`` at ``target_lufs`` of integrated loudness, its samples within ±PEAK_CEILING."""
    wave = np.asarray(waveform, dtype=np.float32)
    measured = measure_loudness(wave, sample_rate)
    if not math.isfinite(measured):  # silence, or too short to measure: it cannot be made louder
        return limit_peaks(wave, sample_rate)
    gain_db = target_lufs - measured
    out = wave
    for _ in range(LOUDNESS_ROUNDS):
        out = limit_peaks(wave * np.float32(10 ** (gain_db / 20)), sample_rate)
        error = target_lufs - measure_loudness(out, sample_rate)
        if abs(error) <= LOUDNESS_TOLERANCE_LU or not math.isfinite(error):
            break
        gain_db += error
    return out


def limit_peaks(waveform: np.ndarray, sample_rate: int, ceiling: float = PEAK_CEILING) -> np.ndarray:
    """A look-ahead limiter: the gain each sample needs, min-filtered then smoothed, so no sample passes
    ``ceiling`` and the gain eases in over a few milliseconds before a peak instead of cutting it off.

    The smoothing window is half the min-filter's, so each smoothed gain averages values that are all at or
    below the gain its own sample needs: the ceiling holds exactly, with no clipping left to do.
    """
    import torch

    wave = np.asarray(waveform, dtype=np.float32)
    peak = float(np.max(np.abs(wave))) if wave.size else 0.0
    if peak <= ceiling:
        return wave
    half = max(1, round(LIMITER_LOOKAHEAD_S * sample_rate) // 2 * 2)  # even, so the smoothing is centred
    needed = np.minimum(1.0, ceiling / np.maximum(np.abs(wave), 1e-12)).astype(np.float32)
    pool = torch.nn.functional
    gain = torch.from_numpy(needed).view(1, 1, -1)
    gain = -pool.max_pool1d(-gain, 2 * half + 1, stride=1, padding=half)
    gain = pool.avg_pool1d(gain, half + 1, stride=1, padding=half // 2, count_include_pad=False)
    limited = wave * gain.view(-1).numpy()
    return np.clip(limited, -ceiling, ceiling).astype(np.float32)  # float rounding only: a few 1e-7 over


class StreamFinisher:
    """Finishing for a stream, chunk by chunk, without look-ahead (see the module docstring)."""

    def __init__(self, sample_rate: int, finishing: Finishing) -> None:
        self.sample_rate = sample_rate
        self.finishing = finishing
        self._trimmer = SilenceTrimmer(sample_rate) if finishing.trim_silence else None
        self._gain: float | None = None
        self._held = np.zeros(0, dtype=np.float32)  # audio waiting for the gain to be measured

    def feed(self, waveform: np.ndarray) -> np.ndarray:
        """What of the stream can be sent now that ``waveform`` came."""
        wave = np.asarray(waveform, dtype=np.float32)
        if self._trimmer is not None:
            wave = self._trimmer.feed(wave)
        return self._level(wave, last=False)

    def close(self) -> np.ndarray:
        """The rest of the stream, at its end."""
        rest = self._trimmer.close() if self._trimmer is not None else np.zeros(0, dtype=np.float32)
        return self._level(rest, last=True)

    def _level(self, wave: np.ndarray, *, last: bool) -> np.ndarray:
        target = self.finishing.loudness_lufs
        if target is None:
            return wave
        if self._gain is None:
            self._held = np.concatenate([self._held, wave])
            if len(self._held) < round(LOUDNESS_BLOCK_S * self.sample_rate) and not last:
                return np.zeros(0, dtype=np.float32)
            measured = measure_loudness(self._held, self.sample_rate)
            self._gain = 10 ** ((target - measured) / 20) if math.isfinite(measured) else 1.0
            wave, self._held = self._held, np.zeros(0, dtype=np.float32)
        return limit_peaks(wave * np.float32(self._gain), self.sample_rate)


def finishing_for(request: TTSRequest) -> Finishing:
    return Finishing(loudness_lufs=request.loudness_lufs, trim_silence=request.trim_silence)


def finished_chunks(
    chunks: Generator[AudioChunk, None, None], finishing: Finishing
) -> Generator[AudioChunk, None, None]:
    """A stream's chunks finished as they come; closing this closes ``chunks`` (and stops the generation).

    Chunks are renumbered and their ``start_sample`` recounted, since trimming and the loudness hold move
    audio between them; a chunk left with no audio is not sent (the final one always is).
    """
    if not finishing.active:
        yield from chunks
        return
    finisher: StreamFinisher | None = None
    index = sent = 0
    try:
        for chunk in chunks:
            finisher = finisher or StreamFinisher(chunk.sample_rate, finishing)
            wave = finisher.feed(chunk.waveform)
            if chunk.final:
                wave = np.concatenate([wave, finisher.close()])
            if len(wave) or chunk.final:
                yield replace(chunk, waveform=wave, index=index, start_sample=sent)
                index, sent = index + 1, sent + len(wave)
    finally:
        chunks.close()
