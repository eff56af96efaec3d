"""The tiny quality models placed in a worker's model store, as ``--demo`` places them."""

from __future__ import annotations

import shutil
from pathlib import Path

from higgs_worker.settings import Settings
from higgs_worker.store.model_store import RepoSpec, publish_local


def place(built: Path, settings: Settings, role: str) -> None:
    """Copy a tiny model built once per session into the store of ``settings`` for ``role``."""
    repo, revision, path = {
        "aligner": (settings.aligner_repo, settings.aligner_revision, settings.aligner_path),
        "recogniser": (settings.recogniser_repo, settings.recogniser_revision, settings.recogniser_path),
    }[role]
    shutil.copytree(built, path)
    publish_local(RepoSpec(repo, revision, path))
