"""Real speech for tests, from espeak-ng (the one program the tests need beyond Python: see
``scripts/system-packages.txt``), and voices shaped like the upstream examples' files."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

EXAMPLES = Path(__file__).resolve().parent.parent / "upstream_examples"

SPOKEN = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "Every morning the baker opens the shop, lights the ovens and sets out fresh bread for the town."
)


def speak(text: str, path: Path, voice: str = "en") -> Path:
    """Real speech from espeak-ng, as a 22.05 kHz WAV file."""
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, capture_output=True)
    return path


def data_uri(path: Path) -> str:
    """A WAV file as the data URI a client sends in ``ref_audio``."""
    return "data:audio/wav;base64," + base64.b64encode(path.read_bytes()).decode()


def make_voice(path: Path, rate: int, channels: int, seconds: float, text: str = SPOKEN) -> Path:
    """espeak-ng speech, looped when short, made exactly ``seconds`` long in the given shape (16-bit WAV).

    Resampled by torchaudio and written by soundfile, so no program beyond espeak-ng is needed.
    """
    spoken = speak(text, path.with_suffix(".espeak.wav"))
    audio, source_rate = sf.read(spoken, dtype="float32", always_2d=True)
    mono = torch.from_numpy(audio.mean(axis=1))
    resampled = torchaudio.functional.resample(mono, source_rate, rate).numpy()
    length = round(seconds * rate)
    looped = np.tile(resampled, -(-length // len(resampled)))[:length]
    sf.write(path, np.repeat(looped[:, None], channels, axis=1), rate, subtype="PCM_16")
    return path
