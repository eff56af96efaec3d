"""Encoding, decoding, resampling and tempo change, on real speech from espeak-ng and on pure tones."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from higgs_worker.audio.encoding import (
    FORMATS,
    MAX_SPEED,
    MIN_SPEED,
    AudioDecodeError,
    EncodedAudio,
    change_tempo,
    decode_audio,
    encode_audio,
    resample,
)

RATE = 24_000
LOSSLESS = [name for name, fmt in FORMATS.items() if fmt.lossless]
LOSSY = [name for name, fmt in FORMATS.items() if not fmt.lossless]


def tone(freq: float, seconds: float, rate: int = RATE, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_frequency(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(wave.size)))
    return float(np.argmax(spectrum) * rate / wave.size)


def best_correlation(decoded: np.ndarray, reference: np.ndarray, max_lag: int = 8) -> float:
    """Correlation at the best alignment within ``max_lag`` samples.

    Lossy decoders may shift the signal by a sample or two (libsndfile's Opus decoder at 24 kHz starts one
    sample early, 42 µs); that is inaudible and not what these tests are about.
    """
    core = slice(max_lag, reference.size - max_lag)
    return max(
        float(np.corrcoef(decoded[core.start + lag : core.stop + lag], reference[core])[0, 1])
        for lag in range(-max_lag, max_lag + 1)
    )


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """About four seconds of real speech at 24 kHz, spoken by espeak-ng (apt-get install espeak-ng)."""
    espeak = shutil.which("espeak-ng")
    assert espeak, "espeak-ng is required for these tests: apt-get install -y espeak-ng"
    path: Path = tmp_path_factory.mktemp("speech") / "speech.wav"
    sentence = "The quick brown fox jumps over the lazy dog. Higgs Audio speaks clearly."
    subprocess.run([espeak, "-w", str(path), sentence], check=True, capture_output=True)
    wave, rate = decode_audio(path.read_bytes())
    return resample(wave, rate, RATE)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("target_rate", [None, 16_000])
def test_every_format_round_trips(speech: np.ndarray, fmt: str, target_rate: int | None) -> None:
    encoded = encode_audio(speech, RATE, fmt, target_sample_rate=target_rate)
    rate = target_rate or RATE
    reference = resample(speech, RATE, rate)

    if fmt == "pcm":  # headerless: the samples themselves, 16-bit little-endian, at the stated rate
        decoded = np.frombuffer(encoded.data, "<i2").astype(np.float32) / 32768
        decoded_rate = encoded.sample_rate
    else:
        decoded, decoded_rate = decode_audio(encoded.data)

    assert encoded.format == fmt
    assert encoded.mimetype == FORMATS[fmt].mimetype
    assert decoded_rate == encoded.sample_rate == rate
    assert encoded.num_samples == reference.size
    assert encoded.duration_s == pytest.approx(speech.size / RATE, abs=1e-3)
    assert decoded.size / decoded_rate == pytest.approx(encoded.duration_s, abs=0.01)
    assert decoded.dtype == np.float32
    if FORMATS[fmt].lossless:
        assert decoded.size == reference.size
        np.testing.assert_allclose(decoded, np.clip(reference, -1, 1), atol=1.5 / 32768)
    else:
        assert best_correlation(decoded, reference) > 0.98
        assert len(encoded.data) < reference.size * 2 / 4  # well below 16-bit PCM: it really compresses


def test_mimetypes_are_the_registered_ones() -> None:
    assert {name: fmt.mimetype for name, fmt in FORMATS.items()} == {
        "wav": "audio/wav",
        "flac": "audio/flac",
        "mp3": "audio/mpeg",
        "ogg": "audio/ogg",
        "opus": "audio/ogg; codecs=opus",
        "pcm": "audio/pcm",
    }


def test_container_signatures_match_the_format(speech: np.ndarray) -> None:
    magic = {"wav": b"RIFF", "flac": b"fLaC", "ogg": b"OggS", "opus": b"OggS"}
    for fmt, prefix in magic.items():
        assert encode_audio(speech, RATE, fmt).data.startswith(prefix), fmt
    mp3 = encode_audio(speech, RATE, "mp3").data
    assert mp3.startswith(b"ID3") or mp3[0] == 0xFF
    assert b"OpusHead" in encode_audio(speech, RATE, "opus").data[:64]
    assert b"vorbis" in encode_audio(speech, RATE, "ogg").data[:64]


@pytest.mark.parametrize(
    ("fmt", "rate", "allowed"),
    [
        ("opus", 22_050, "8000, 12000, 16000, 24000, 48000"),
        ("mp3", 20_000, "22050"),
        ("wav", 96_000, "48000"),
    ],
)
def test_unsupported_sample_rate_is_a_clear_error(fmt: str, rate: int, allowed: str) -> None:
    with pytest.raises(
        ValueError, match=f"sample_rate {rate} is not supported by output_format '{fmt}'"
    ) as info:
        encode_audio(tone(440, 0.5), RATE, fmt, target_sample_rate=rate)
    assert allowed in str(info.value)


def test_unknown_format_lists_the_allowed_ones() -> None:
    with pytest.raises(
        ValueError, match="output_format 'aac' is not supported; use one of: wav, flac, mp3, ogg, opus"
    ):
        encode_audio(tone(440, 0.5), RATE, "aac")


def test_out_of_range_and_non_finite_samples_are_clipped_not_wrapped() -> None:
    wave = np.array([0.0, 1.7, -2.5, np.nan, np.inf, -np.inf, 0.25] * 100, dtype=np.float32)
    decoded, _ = decode_audio(encode_audio(wave, RATE, "wav").data)
    expected = np.array([0.0, 1.0, -1.0, 0.0, 1.0, -1.0, 0.25] * 100, dtype=np.float32)
    np.testing.assert_allclose(decoded, expected, atol=1.5 / 32768)


def test_bad_waveforms_are_rejected() -> None:
    with pytest.raises(ValueError, match="empty"):
        encode_audio(np.zeros(0, dtype=np.float32), RATE, "wav")
    with pytest.raises(ValueError, match="mono"):
        encode_audio(np.zeros((2, 100), dtype=np.float32), RATE, "wav")
    # A (1, N) batch of one is mono and accepted.
    assert encode_audio(np.zeros((1, 100), dtype=np.float32), RATE, "wav").num_samples == 100


def test_metadata_rebuilds_the_same_clip(speech: np.ndarray) -> None:
    encoded = encode_audio(speech, RATE, "opus")
    assert EncodedAudio.from_metadata(encoded.data, encoded.metadata()) == encoded


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"this is plain text, not audio at all" * 10, "not audio in a readable format"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt " + bytes(40), "not audio in a readable format"),
    ],
)
def test_decoding_non_audio_names_the_problem(data: bytes, message: str) -> None:
    with pytest.raises(AudioDecodeError, match=message) as info:
        decode_audio(data)
    assert "BytesIO" not in str(info.value)  # no Python object reprs leak into a user-facing message


def test_truncated_audio_is_a_decode_error(speech: np.ndarray) -> None:
    flac = encode_audio(speech, RATE, "flac").data
    with pytest.raises(AudioDecodeError):
        decode_audio(flac[:2000])


def test_decode_mixes_stereo_to_mono_at_native_rate() -> None:
    left, right = tone(300, 0.5, rate=44_100), tone(300, 0.5, rate=44_100, amplitude=0.1)
    buffer = io.BytesIO()
    sf.write(buffer, np.stack([left, right], axis=1), 44_100, format="WAV", subtype="FLOAT")
    decoded, rate = decode_audio(buffer.getvalue())
    assert rate == 44_100
    np.testing.assert_allclose(decoded, (left + right) / 2, atol=1e-6)


def test_resample_keeps_duration_and_pitch() -> None:
    wave = tone(1000, 1.0)
    down = resample(wave, RATE, 16_000)
    assert down.size == 16_000
    assert down.dtype == np.float32
    assert dominant_frequency(down, 16_000) == pytest.approx(1000, abs=2)
    np.testing.assert_array_equal(resample(wave, RATE, RATE), wave)


@pytest.mark.parametrize("speed", [0.5, 1.5, 2.0])
def test_change_tempo_changes_duration_but_not_pitch(speed: float) -> None:
    wave = tone(440, 2.0)
    changed = change_tempo(wave, RATE, speed)
    assert changed.size == round(wave.size / speed)
    assert dominant_frequency(changed, RATE) == pytest.approx(440, abs=5)
    # Energy is preserved in the steady part (no fade to silence, no blow-up).
    middle = changed[changed.size // 4 : 3 * changed.size // 4]
    assert np.sqrt(np.mean(middle**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.15)


def rms_envelope(wave: np.ndarray, window: int = 480) -> np.ndarray:
    frames = wave.size // window
    return np.sqrt(np.mean(wave[: frames * window].reshape(frames, window) ** 2, axis=1))


@pytest.mark.parametrize("speed", [0.5, 2.0])
def test_change_tempo_keeps_speech_in_order(speech: np.ndarray, speed: float) -> None:
    """The loudness contour follows the input's at ``speed`` times the pace: the same words, in order."""
    changed = change_tempo(speech, RATE, speed)
    original, result = rms_envelope(speech), rms_envelope(changed)
    at_nominal_time = original[np.minimum((np.arange(result.size) * speed).astype(int), original.size - 1)]
    assert changed.size == round(speech.size / speed)
    assert np.corrcoef(result, at_nominal_time)[0, 1] > 0.85


def test_change_tempo_identity_and_range_limits() -> None:
    wave = tone(440, 0.3)
    np.testing.assert_array_equal(change_tempo(wave, RATE, 1.0), wave)
    assert change_tempo(wave, RATE, MAX_SPEED).size == round(wave.size / MAX_SPEED)
    assert change_tempo(wave, RATE, MIN_SPEED).size == round(wave.size / MIN_SPEED)


@pytest.mark.parametrize("speed", [0.0, 0.2, 4.5, float("nan")])
def test_change_tempo_rejects_out_of_range_speed(speed: float) -> None:
    with pytest.raises(ValueError, match=r"speed .* is out of range; use a value from 0.25 to 4.0"):
        change_tempo(tone(440, 0.2), RATE, speed)
