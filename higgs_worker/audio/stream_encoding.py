"""Encoding audio chunk by chunk, so an HTTP response carries sound while the rest is still generated.

Which formats can stream, and how:

* ``pcm``: the samples as 16-bit little-endian integers, nothing else.
* ``wav``: a header whose sizes say "unknown length" (0xFFFFFFFF, as streaming servers send), then PCM.
* ``mp3`` and ``opus``: libsndfile's encoder writing into a file object; each chunk sends the bytes it
  appended. libsndfile rewrites the start of an MP3 at close (LAME's gapless tag), which a stream cannot
  take back, so the stream encodes at a constant bit rate (a decoder then needs no tag to know the length)
  and leaves out the placeholder frame the tag would have filled. Without the tag a decoder also plays the
  encoder's delay and padding: about 60 ms more than the clip.
* ``flac`` and ``ogg`` (Vorbis) cannot: their encoders go back to the header at the end. They are sent whole.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import soundfile as sf

from higgs_worker.audio.encoding import FORMATS

STREAMABLE = tuple(name for name, audio_format in FORMATS.items() if audio_format.streamable)
MP3_STREAM_QUALITY = 0.5  # libsndfile's compression level: 80 kbps CBR at 24 kHz, plenty for speech

_MPEG_RATES = {3: (44_100, 48_000, 32_000), 2: (22_050, 24_000, 16_000), 0: (11_025, 12_000, 8_000)}
_MPEG1_KBPS = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
_MPEG2_KBPS = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)


def _pcm16(waveform: np.ndarray) -> bytes:
    wave = np.clip(np.nan_to_num(np.asarray(waveform, dtype=np.float32)), -1.0, 1.0)
    return (wave * 32767.0).round().astype("<i2").tobytes()


def streaming_wav_header(sample_rate: int) -> bytes:
    """A 16-bit mono WAV header for a stream of unknown length (RIFF and data sizes 0xFFFFFFFF)."""
    unknown = 0xFFFFFFFF
    fmt = struct.pack("<HHIIHH", 1, 1, sample_rate, sample_rate * 2, 2, 16)
    return (
        b"RIFF"
        + struct.pack("<I", unknown)
        + b"WAVEfmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + (struct.pack("<I", unknown))
    )


def mpeg_frame_length(header: bytes) -> int:
    """The length in bytes of the MPEG layer III frame that starts with ``header`` (4 bytes)."""
    if len(header) < 4 or header[0] != 0xFF or header[1] & 0xE0 != 0xE0:
        raise ValueError("not an MPEG frame header")
    version, bitrate, rate, padding = (
        (header[1] >> 3) & 3,
        header[2] >> 4,
        (header[2] >> 2) & 3,
        (header[2] >> 1) & 1,
    )
    sample_rate = _MPEG_RATES[version][rate]
    if version == 3:  # MPEG-1: 1152 samples a frame
        return 144 * _MPEG1_KBPS[bitrate] * 1000 // sample_rate + padding
    return 72 * _MPEG2_KBPS[bitrate] * 1000 // sample_rate + padding


class _Appended(io.RawIOBase):
    """A seekable in-memory file that hands out what was appended since the last call."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._position = 0
        self._sent = 0

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        end = self._position + len(data)
        if end > len(self._data):
            self._data.extend(bytes(end - len(self._data)))
        self._data[self._position : end] = data
        self._position = end
        return len(data)

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        count = max(0, min(len(buffer), len(self._data) - self._position))
        buffer[:count] = self._data[self._position : self._position + count]
        self._position += count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._data)}[whence]
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def take(self) -> bytes:
        new = bytes(self._data[self._sent :])
        self._sent = len(self._data)
        return new


class StreamEncoder:
    """``encode(chunk)`` returns the bytes to send now; ``finish()`` the last ones. Together: one file."""

    def __init__(self, fmt: str, sample_rate: int) -> None:
        if fmt not in STREAMABLE:
            raise ValueError(f"output_format '{fmt}' cannot be streamed; use one of: {', '.join(STREAMABLE)}")
        self.format = FORMATS[fmt]
        self.sample_rate = sample_rate
        self._header_sent = False
        self._file: sf.SoundFile | None = None
        self._sink: _Appended | None = None
        self._skip: int | None = None if fmt == "mp3" else 0  # bytes still to leave out (mp3: unknown yet)
        self._pending = b""  # mp3 bytes held until the first frame's header can be read
        if fmt in ("mp3", "opus"):
            FORMATS[fmt].check_sample_rate(sample_rate)
            self._sink = _Appended()
            options = (
                {"compression_level": MP3_STREAM_QUALITY, "bitrate_mode": "CONSTANT"} if fmt == "mp3" else {}
            )
            self._file = sf.SoundFile(
                self._sink,
                mode="w",
                samplerate=sample_rate,
                channels=1,
                format=self.format.sf_format,
                subtype=self.format.sf_subtype,
                **options,
            )

    def encode(self, waveform: np.ndarray) -> bytes:
        if self._file is None:
            header = b""
            if self.format.name == "wav" and not self._header_sent:
                header = streaming_wav_header(self.sample_rate)
            self._header_sent = True
            return header + _pcm16(waveform)
        wave = np.clip(np.nan_to_num(np.asarray(waveform, dtype=np.float32)), -1.0, 1.0)
        self._file.write(wave)
        return self._taken()

    def finish(self) -> bytes:
        if self._file is None:
            return b"" if self._header_sent else self.encode(np.zeros(0, np.float32))
        self._file.close()
        return self._taken()

    def _taken(self) -> bytes:
        assert self._sink is not None
        data = self._pending + self._sink.take()
        self._pending = b""
        if self._skip is None:
            if len(data) < 4:
                self._pending = data
                return b""
            self._skip = mpeg_frame_length(data[:4])
        dropped = min(self._skip, len(data))
        self._skip -= dropped
        return data[dropped:]
