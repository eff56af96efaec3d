"""Turning the engine's waveform into the bytes a user asked for, and reading user audio back.

Why soundfile: its wheel bundles libsndfile 1.2 with LAME, mpg123, Vorbis and Opus, so every output format
(WAV, FLAC, MP3, Ogg Vorbis, Ogg Opus, raw PCM) is written and read by one library with no ffmpeg in the
image. The lossy encoders run at libsndfile's default quality, which for 24 kHz speech is about 48 kbps
(MP3), 55 kbps (Vorbis) and 40 kbps (Opus): small enough to return inline, clean enough for speech.

Sample rates: a format that cannot store a rate (Opus: 8/12/16/24/48 kHz; MP3: the MPEG rates) gets a clear
``ValueError`` naming the allowed rates instead of a silent resample, because the user asked for that rate
explicitly and should learn it is impossible rather than receive something else.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile as sf

from higgs_worker.errors import AudioDecodeError

MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 48_000
MIN_SPEED = 0.25
MAX_SPEED = 4.0

_MPEG_RATES = (8_000, 11_025, 12_000, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000)
_OPUS_RATES = (8_000, 12_000, 16_000, 24_000, 48_000)


@dataclass(frozen=True)
class AudioFormat:
    """One output format: how libsndfile writes it and what HTTP/S3 content type describes it."""

    name: str
    mimetype: str
    sf_format: str
    sf_subtype: str
    lossless: bool
    # its encoder never goes back to the header, so one file can be sent while it grows (stream_encoding)
    streamable: bool
    sample_rates: tuple[int, ...] | None = None  # None: any rate from MIN_SAMPLE_RATE to MAX_SAMPLE_RATE

    def check_sample_rate(self, rate: int) -> None:
        if self.sample_rates is not None:
            if rate not in self.sample_rates:
                allowed = ", ".join(str(r) for r in self.sample_rates)
                raise ValueError(
                    f"sample_rate {rate} is not supported by output_format '{self.name}'; "
                    f"use one of: {allowed}"
                )
        elif not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
            raise ValueError(
                f"sample_rate {rate} is not supported by output_format '{self.name}'; "
                f"use a rate from {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE}"
            )


FORMATS: dict[str, AudioFormat] = {
    "wav": AudioFormat("wav", "audio/wav", "WAV", "PCM_16", lossless=True, streamable=True),
    "flac": AudioFormat("flac", "audio/flac", "FLAC", "PCM_16", lossless=True, streamable=False),
    "mp3": AudioFormat(
        "mp3",
        "audio/mpeg",
        "MP3",
        "MPEG_LAYER_III",
        lossless=False,
        streamable=True,
        sample_rates=_MPEG_RATES,
    ),
    "ogg": AudioFormat("ogg", "audio/ogg", "OGG", "VORBIS", lossless=False, streamable=False),
    "opus": AudioFormat(
        "opus",
        "audio/ogg; codecs=opus",
        "OGG",
        "OPUS",
        lossless=False,
        streamable=True,
        sample_rates=_OPUS_RATES,
    ),
    # OpenAI's "pcm": headerless 16-bit little-endian mono samples, for players that want no container.
    "pcm": AudioFormat("pcm", "audio/pcm", "RAW", "PCM_16", lossless=True, streamable=True),
}


@dataclass(frozen=True)
class EncodedAudio:
    """An encoded clip and the facts about it that the job output reports."""

    data: bytes
    format: str
    mimetype: str
    sample_rate: int
    duration_s: float
    num_samples: int

    def metadata(self) -> dict[str, Any]:
        """Everything but the bytes, as JSON-ready values: what the result cache stores beside the audio."""
        return {
            "format": self.format,
            "mimetype": self.mimetype,
            "sample_rate": self.sample_rate,
            "duration_s": self.duration_s,
            "num_samples": self.num_samples,
        }

    @classmethod
    def from_metadata(cls, data: bytes, metadata: dict[str, Any]) -> EncodedAudio:
        """Rebuild a clip from cached bytes and ``metadata()``: a cache hit is delivered like a fresh clip."""
        return cls(
            data=data,
            format=str(metadata["format"]),
            mimetype=str(metadata["mimetype"]),
            sample_rate=int(metadata["sample_rate"]),
            duration_s=float(metadata["duration_s"]),
            num_samples=int(metadata["num_samples"]),
        )


def supported_formats() -> str:
    return ", ".join(FORMATS)


def _as_mono_float32(waveform: np.ndarray) -> np.ndarray:
    wave = np.asarray(waveform, dtype=np.float32)
    if wave.ndim == 2 and 1 in wave.shape:
        wave = wave.reshape(-1)
    if wave.ndim != 1:
        raise ValueError(f"waveform must be mono (one dimension), got shape {wave.shape}")
    return wave


def resample(waveform: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Band-limited (windowed sinc) resampling via torchaudio; returns float32 mono."""
    wave = _as_mono_float32(waveform)
    if orig_sr == new_sr:
        return wave
    # Imported here so that modules needing only EncodedAudio (delivery, result cache) stay torch-free.
    import torch
    import torchaudio.functional as audio_f

    return audio_f.resample(torch.from_numpy(wave.copy()), orig_sr, new_sr).numpy().astype(np.float32)


def change_tempo(waveform: np.ndarray, sample_rate: int, speed: float) -> np.ndarray:
    """Play ``speed`` times faster (OpenAI's ``speed``: 0.25 to 4.0) while keeping the voice's pitch.

    WSOLA (waveform-similarity overlap-add): 30 ms Hann frames are laid down every 15 ms of output, each taken
    from near its nominal input position (output time × speed), shifted by up to ±10 ms to the offset whose
    waveform best continues the previous frame. Resampling instead would turn a faster voice into a chipmunk;
    a plain phase vocoder smears the phase of speech transients, most audibly when slowing down, while WSOLA
    only ever copies real stretches of the input, which is why speech players use it.
    """
    if not MIN_SPEED <= speed <= MAX_SPEED:
        raise ValueError(f"speed {speed} is out of range; use a value from {MIN_SPEED} to {MAX_SPEED}")
    wave = _as_mono_float32(waveform)
    if speed == 1.0 or wave.size == 0:
        return wave.copy()
    hop = max(1, round(0.015 * sample_rate))
    frame = 2 * hop
    tolerance = round(0.010 * sample_rate)
    window = np.hanning(frame + 1)[:-1]  # periodic Hann: frames at 50 % overlap sum to exactly one
    n_out = round(wave.size / speed)
    n_frames = -(-(n_out + hop) // hop) + 1
    reach = round((n_frames + 1) * hop * speed) + frame + 2 * tolerance
    source = np.concatenate([np.zeros(hop + tolerance), wave, np.zeros(max(0, reach - wave.size))])
    n_fft = 1 << (frame + 2 * tolerance).bit_length()
    out = np.zeros(n_frames * hop + frame)
    previous = -1
    for k in range(n_frames):
        nominal = tolerance + round(k * hop * speed)
        start = nominal
        if previous >= 0:
            template = source[previous + hop : previous + hop + frame]
            region = source[nominal - tolerance : nominal + tolerance + frame]
            spectrum = np.fft.rfft(region, n_fft) * np.conj(np.fft.rfft(template, n_fft))
            similarity = np.fft.irfft(spectrum, n_fft)[: 2 * tolerance + 1]
            start = nominal - tolerance + int(np.argmax(similarity))
        out[k * hop : k * hop + frame] += window * source[start : start + frame]
        previous = start
    return out[hop : hop + n_out].astype(np.float32)


def encode_audio(
    waveform: np.ndarray, sample_rate: int, fmt: str, *, target_sample_rate: int | None = None
) -> EncodedAudio:
    """Encode a float mono waveform (nominally in [-1, 1]) as ``fmt``, optionally at another sample rate.

    Samples are clipped to [-1, 1] and NaN/inf become silence first: an out-of-range peak from the model must
    not wrap around in 16-bit PCM, and one bad frame must not make the encoder reject the whole clip.
    """
    audio_format = FORMATS.get(fmt)
    if audio_format is None:
        raise ValueError(f"output_format '{fmt}' is not supported; use one of: {supported_formats()}")
    rate = target_sample_rate or sample_rate
    audio_format.check_sample_rate(rate)
    wave = _as_mono_float32(waveform)
    if wave.size == 0:
        raise ValueError("the waveform is empty: there is no audio to encode")
    wave = resample(wave, sample_rate, rate)
    wave = np.clip(np.nan_to_num(wave, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
    buffer = io.BytesIO()
    sf.write(buffer, wave, rate, format=audio_format.sf_format, subtype=audio_format.sf_subtype)
    return EncodedAudio(
        data=buffer.getvalue(),
        format=audio_format.name,
        mimetype=audio_format.mimetype,
        sample_rate=rate,
        duration_s=wave.size / rate,
        num_samples=int(wave.size),
    )


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Decode WAV, FLAC, MP3, Ogg Vorbis or Ogg Opus bytes (also AIFF and other libsndfile formats).

    Returns float32 mono (channels averaged) at the file's own sample rate.
    """
    if not data:
        raise AudioDecodeError("the audio data is empty")
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except sf.LibsndfileError as exc:
        raise AudioDecodeError(
            "the data is not audio in a readable format (WAV, FLAC, MP3, OGG Vorbis, Opus): "
            f"{exc.error_string}"
        ) from None
    except (sf.SoundFileRuntimeError, ValueError, EOFError) as exc:
        raise AudioDecodeError(f"the audio data is damaged or truncated: {exc}") from None
    return samples.mean(axis=1, dtype=np.float32), int(rate)
