"""Publish tiny random-weight Higgs Audio V2 model, codec, aligner and recogniser into the store (``--demo``).

Why: a machine that cannot reach the Hugging Face Hub (CI, an air-gapped laptop) can still run the whole
worker — store, loading, prompt, generation, word timestamps, verification, encoding, delivery — for
real. The checkpoints land exactly where the real ones would (``MODEL_PATH``, ``TOKENIZER_PATH``,
``ALIGNER_PATH``, ``RECOGNISER_PATH``), marked as local builds: the worker loads them without asking the hub
only when started with ``DEMO_MODEL=true`` (``bootstrap.sh --demo`` sets it); without it, the hub's files
replace the demo. Its audio is noise. Real model files on the volume are never overwritten.

It also puts two voices in the offline voice kit, ``VOICES_DIR`` (``<name>.wav`` with its transcript in
``<name>.txt``, the folder presets are fetched into): ``demo_woman`` and ``demo_man``, synthesised here, so
the examples that name a voice work with no network. Voices already there are never overwritten.

Usage: ``python demo_model.py`` (settings from the environment, as for the worker).
"""

from __future__ import annotations

import io
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from higgs_worker.errors import DemoRefused
from higgs_worker.settings import Settings, load_settings
from higgs_worker.store.atomic_file import publish
from higgs_worker.store.model_store import LOCAL_BUILD, RepoSpec, publish_local, read_marker, read_store

logger = logging.getLogger("demo_model")


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


# name → (pitch in Hz, formant scale): a higher, brighter voice and a lower, darker one
DEMO_VOICES = {"demo_woman": (210.0, 1.15), "demo_man": (115.0, 0.9)}
DEMO_VOICE_TEXT = "This voice was made on this machine for the demo."
DEMO_VOICE_RATE = 24_000
# The first two formants (Hz) of the vowels /a/, /i/, /u/, /e/, /o/: one per syllable.
VOWELS = ((730, 1090), (270, 2290), (300, 870), (530, 1840), (570, 840))


def demo_voice(pitch_hz: float, formant_scale: float, seconds: float = 3.0) -> np.ndarray:
    """A voiced, vowel-like signal: harmonics of a gently moving pitch, shaped by the formants of one vowel
    per syllable. Not speech, but audio with a pitch and a timbre of its own, which is what a reference
    voice gives the model."""
    rate, syllable_s = DEMO_VOICE_RATE, 0.24
    t = np.arange(int(seconds * rate)) / rate
    pitch = pitch_hz * (1 + 0.04 * np.sin(2 * np.pi * 0.7 * t) + 0.01 * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    syllable = (t / syllable_s).astype(int)
    vowels = np.array(VOWELS, dtype=np.float64)[syllable % len(VOWELS)] * formant_scale  # (samples, 2)
    wave = np.zeros_like(t)
    for harmonic in range(1, int(4000 / pitch_hz)):
        frequency = harmonic * pitch
        gain = sum(np.exp(-(((frequency - vowels[:, i]) / 120.0) ** 2)) for i in range(2)) + 0.05
        wave += gain / harmonic**0.5 * np.sin(harmonic * phase)
    envelope = np.sin(np.pi * ((t / syllable_s) % 1.0)) ** 0.6  # each syllable swells and fades
    wave *= envelope * (syllable % 6 != 5)  # a short pause after every five syllables
    return (0.5 * wave / np.max(np.abs(wave))).astype(np.float32)


def publish_demo_voices(settings: Settings) -> None:
    """Put the demo voices in the voice kit folder, unless voices of those names are already there."""
    settings.voices_dir.mkdir(parents=True, exist_ok=True)
    for name, (pitch, formants) in DEMO_VOICES.items():
        audio = settings.voices_dir / f"{name}.wav"
        if audio.exists():
            continue
        buffer = io.BytesIO()
        sf.write(buffer, demo_voice(pitch, formants), DEMO_VOICE_RATE, format="WAV", subtype="PCM_16")
        publish(settings.voices_dir / f"{name}.txt", DEMO_VOICE_TEXT.encode())
        publish(audio, buffer.getvalue())  # last: the voice exists once its audio does
        logger.info("made the demo voice %r in %s", name, settings.voices_dir)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings()
    settings.volume_path.mkdir(parents=True, exist_ok=True)
    publish_demo(settings)
    publish_demo_voices(settings)


if __name__ == "__main__":
    main()
