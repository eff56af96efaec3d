"""Fixtures around the hub stand-in: a tiny repo on disk, a hub serving it, and a deliberately tiny volume."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.hub_server import HubServer

TINY_REPO_ID = "test-org/tiny-higgs"


def make_repo(root: Path, *, config: str = '{"model_type": "higgs_audio_v2"}', seed: int = 0) -> Path:
    """A small repo with the shape of a real one: small JSON files (plain git) and LFS-sized weights."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(config)
    (root / "tokenizer.json").write_text('{"version": "1.0", "vocab": {}}' + " " * 500)
    (root / "merges.txt").write_bytes(rng.randbytes(3000))  # above the LFS threshold, not a weight file
    (root / "model.safetensors").write_bytes(rng.randbytes(256 * 1024))
    (root / "audio").mkdir(exist_ok=True)
    (root / "audio" / "preprocessor_config.json").write_text('{"sampling_rate": 24000}')
    return root


# Named through ``name=`` so that a test module can import the functions without its parameters
# shadowing the imports.
@pytest.fixture(name="tiny_repo")
def tiny_repo_fixture(tmp_path: Path) -> Path:
    """The files of :data:`TINY_REPO_ID` on disk, as the hub serves them."""
    return make_repo(tmp_path / "hub-files")


@pytest.fixture(name="tiny_hub")
def tiny_hub_fixture(tiny_repo: Path) -> Iterator[HubServer]:
    """A hub stand-in serving the tiny repo as :data:`TINY_REPO_ID` (revision ``main``)."""
    with HubServer({TINY_REPO_ID: tiny_repo}) as server:
        yield server


@contextlib.contextmanager
def tiny_filesystem(path: Path, size_kib: int) -> Iterator[bool]:
    """Mount a ``size_kib`` tmpfs at ``path`` (as root or with passwordless sudo); yield whether it worked."""
    path.mkdir(parents=True, exist_ok=True)
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    mount = [*sudo, "mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)]
    try:
        mounted = subprocess.run(mount, capture_output=True, check=False).returncode == 0
    except FileNotFoundError:
        mounted = False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run([*sudo, "umount", str(path)], check=True)
