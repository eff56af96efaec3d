"""Shared fixtures: a tiny real Higgs Audio V2 checkpoint, a hub stand-in serving it, spoken references."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.hub_server import HubServer

MODEL_REPO = "bosonai/higgs-audio-v2-generation-3B-base"
TOKENIZER_REPO = "bosonai/higgs-audio-v2-tokenizer"


@dataclass(frozen=True)
class TinyCheckpoint:
    model_dir: Path
    codec_dir: Path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    from boson_multimodal.tiny_model import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny-checkpoint")
    checkpoint = TinyCheckpoint(root / "model", root / "codec")
    build_tiny_checkpoint(checkpoint.model_dir, checkpoint.codec_dir)
    return checkpoint


@pytest.fixture(scope="session")
def hub(tiny_checkpoint: TinyCheckpoint) -> Iterator[HubServer]:
    """The hub stand-in serving the tiny checkpoint under the default bosonai repo ids."""
    with HubServer(
        {MODEL_REPO: tiny_checkpoint.model_dir, TOKENIZER_REPO: tiny_checkpoint.codec_dir}
    ) as server:
        yield server


def speak(text: str, path: Path, voice: str = "en") -> Path:
    """Real speech from espeak-ng, as a 22.05 kHz WAV file."""
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def spoken_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return speak(
        "The quick brown fox jumps over the lazy dog.", tmp_path_factory.mktemp("voices") / "ref.wav"
    )


@pytest.fixture(scope="session")
def tiny_aligner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from higgs_worker.quality.tiny_models import build_tiny_aligner

    return build_tiny_aligner(tmp_path_factory.mktemp("tiny-aligner") / "aligner")
