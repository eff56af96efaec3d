"""Publish tiny random-weight Higgs Audio V2 model, codec, aligner and recogniser into the store (``--demo``).

Why: a machine that cannot reach the Hugging Face Hub (CI, an air-gapped laptop) can still run the whole
worker — store, loading, prompt, generation, word timestamps, verification, encoding, delivery — for
real. The checkpoints land exactly where the real ones would (``MODEL_PATH``, ``TOKENIZER_PATH``,
``ALIGNER_PATH``, ``RECOGNISER_PATH``), marked as local builds: the worker loads them without asking the hub
only when started with ``DEMO_MODEL=true`` (``bootstrap.sh --demo`` sets it); without it, the hub's files
replace the demo. Its audio is noise. Real model files on the volume are never overwritten.

Usage: ``python demo_model.py`` (settings from the environment, as for the worker).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from higgs_worker.model_store import LOCAL_BUILD, RepoSpec, publish_local, read_marker, read_store
from higgs_worker.settings import Settings, load_settings

logger = logging.getLogger("demo_model")


class DemoRefused(SystemExit):
    """The volume already holds something the demo must not overwrite."""


def publish_demo(settings: Settings) -> None:
    specs = (
        RepoSpec(settings.model_repo, settings.model_revision, settings.model_path),
        RepoSpec(settings.tokenizer_repo, settings.tokenizer_revision, settings.tokenizer_path),
        # the quality models (word timestamps, verification): tiny random ones too
        RepoSpec(settings.aligner_repo, settings.aligner_revision, settings.aligner_path),
        RepoSpec(settings.recogniser_repo, settings.recogniser_revision, settings.recogniser_path),
    )
    for spec in specs:
        marker = read_marker(spec)
        foreign = (
            marker.commit != LOCAL_BUILD
            if marker
            else spec.local_dir.exists() and any(spec.local_dir.iterdir())
        )
        if foreign:
            raise DemoRefused(
                f"{spec.local_dir} already holds files of {spec.repo_id} that are not the demo model; --demo "
                "never overwrites them: use another RUNPOD_VOLUME_PATH (or MODEL_PATH / TOKENIZER_PATH)"
            )
    if all(read_store(spec, accept_local=True) is not None for spec in specs):
        logger.info("the demo model is already in place at %s and %s", *(s.local_dir for s in specs[:2]))
        return
    # Imported only to build: it loads torch and transformers (~6 s), which a warm restart must not wait for.
    from boson_multimodal.tiny_model import build_tiny_checkpoint
    from higgs_worker.quality.tiny_models import build_tiny_aligner, build_tiny_recogniser

    with tempfile.TemporaryDirectory(dir=settings.volume_path) as scratch:
        staging = Path(scratch)
        build_tiny_checkpoint(staging / "model", staging / "codec")
        build_tiny_aligner(staging / "aligner")
        build_tiny_recogniser(staging / "recogniser")
        built_dirs = [staging / name for name in ("model", "codec", "aligner", "recogniser")]
        for spec, built in zip(specs, built_dirs, strict=True):
            if spec.local_dir.exists():
                shutil.rmtree(spec.local_dir)  # an older or damaged demo build (checked above)
            spec.local_dir.parent.mkdir(parents=True, exist_ok=True)
            built.rename(spec.local_dir)
            publish_local(spec)
            logger.info("published the tiny demo checkpoint for %s at %s", spec.repo_id, spec.local_dir)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings()
    settings.volume_path.mkdir(parents=True, exist_ok=True)
    publish_demo(settings)


if __name__ == "__main__":
    main()
