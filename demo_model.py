"""Publish a tiny random-weight Higgs Audio V2 model and codec into the model store (``--demo``).

Why: a machine that cannot reach the Hugging Face Hub (CI, an air-gapped laptop) can still run the whole
worker — store, loading, prompt, generation, encoding, delivery — for real. The checkpoint lands exactly where
the real one would (``MODEL_PATH`` / ``TOKENIZER_PATH``) with a completion marker, so the worker loads it
without asking the hub. Its audio is noise. An existing complete store of the same repo is left alone.

Usage: ``python demo_model.py`` (settings from the environment, as for the worker).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from boson_multimodal.tiny_model import build_tiny_checkpoint
from higgs_worker.model_store import RepoSpec, publish_local, read_store
from higgs_worker.settings import Settings, load_settings

DEMO_COMMIT = "0" * 40  # not a hub commit: marks the store as the local demo build

logger = logging.getLogger("demo_model")


def publish_demo(settings: Settings) -> None:
    specs = (
        RepoSpec(settings.model_repo, settings.model_revision, settings.model_path),
        RepoSpec(settings.tokenizer_repo, settings.tokenizer_revision, settings.tokenizer_path),
    )
    if all(read_store(spec) is not None for spec in specs):
        logger.info("model store already complete at %s and %s; nothing to do", *(s.local_dir for s in specs))
        return
    with tempfile.TemporaryDirectory(dir=settings.volume_path) as scratch:
        staging = Path(scratch)
        build_tiny_checkpoint(staging / "model", staging / "codec")
        for spec, built in zip(specs, (staging / "model", staging / "codec"), strict=True):
            if spec.local_dir.exists():
                shutil.rmtree(spec.local_dir)
            spec.local_dir.parent.mkdir(parents=True, exist_ok=True)
            built.rename(spec.local_dir)
            publish_local(spec, DEMO_COMMIT)
            logger.info("published the tiny demo checkpoint for %s at %s", spec.repo_id, spec.local_dir)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings()
    settings.volume_path.mkdir(parents=True, exist_ok=True)
    publish_demo(settings)


if __name__ == "__main__":
    main()
