"""Shared fixtures: a tiny real Higgs Audio V2 checkpoint, a hub stand-in serving it, spoken references, the
bootstrap rig. What they are built from lives in ``tests/support``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.bootstrap_rig import Rig, build_wheelhouse
from tests.support.checkpoints import GEOMETRIES, MODEL_REPO, TOKENIZER_REPO, TinyCheckpoint
from tests.support.hub_server import HubServer
from tests.support.speech import speak


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    from boson_multimodal.tiny_model import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny-checkpoint")
    checkpoint = TinyCheckpoint(root / "model", root / "codec")
    build_tiny_checkpoint(checkpoint.model_dir, checkpoint.codec_dir)
    return checkpoint


@pytest.fixture(scope="module", params=sorted(GEOMETRIES))
def loaded(request, tmp_path_factory: pytest.TempPathFactory):
    """The tiny model loaded on the CPU, in each parity geometry in turn (a module that needs one geometry
    defines its own ``loaded``)."""
    from boson_multimodal.loading import load_model
    from boson_multimodal.tiny_model import build_tiny_checkpoint

    root: Path = tmp_path_factory.mktemp(request.param)
    build_tiny_checkpoint(root / "model", root / "codec", GEOMETRIES[request.param])
    return load_model(root / "model", root / "codec", device="cpu")


@pytest.fixture(scope="session")
def hub(tiny_checkpoint: TinyCheckpoint) -> Iterator[HubServer]:
    """The hub stand-in serving the tiny checkpoint under the default bosonai repo ids."""
    with HubServer(
        {MODEL_REPO: tiny_checkpoint.model_dir, TOKENIZER_REPO: tiny_checkpoint.codec_dir}
    ) as server:
        yield server


@pytest.fixture(scope="session")
def spoken_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return speak(
        "The quick brown fox jumps over the lazy dog.", tmp_path_factory.mktemp("voices") / "ref.wav"
    )


@pytest.fixture(scope="session")
def tiny_aligner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from higgs_worker.quality.tiny_models import build_tiny_aligner

    return build_tiny_aligner(tmp_path_factory.mktemp("tiny-aligner") / "aligner")


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheelhouse(tmp_path_factory.mktemp("wheels"))


@pytest.fixture
def rig(tmp_path: Path, wheelhouse: Path) -> Rig:
    return Rig(tmp_path, wheelhouse)
