"""Saved voices on the volume: upload a reference once, then name it in any request.

Saved voices live in a folder of their own (``VOICES_DIR/saved``: ``<name>.wav``, ``<name>.txt`` when there is
a transcript, ``<name>.json`` with the upload's facts), apart from the presets fetched into ``VOICES_DIR``, so
deleting one never touches a preset. Every door resolves a plain voice name to a saved voice first, then to a
preset (:mod:`higgs_worker.voices.resolve`); so that a saved voice never silently stands in for something
else, the library refuses (409) the names OpenAI's voices use, the presets those stand for, and the presets
already on the volume.

The upload is decoded and checked with the same limits as a reference in a job, then stored as 16-bit WAV at
its own rate (one format to read back, whatever was uploaded). Files are published atomically, the audio
last, under a per-name lock on the volume, so workers sharing the volume never see half a voice and two
uploads of one name cannot interleave.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import soundfile as sf

from higgs_worker.audio.encoding import decode_audio
from higgs_worker.errors import (
    AudioDecodeError,
    InvalidVoice,
    InvalidVoiceAudio,
    VoiceExists,
    VoiceNotFound,
    VoiceTooLarge,
)
from higgs_worker.job.schema import MAX_REF_TEXT_CHARS
from higgs_worker.settings import Settings
from higgs_worker.store.atomic_file import publish
from higgs_worker.store.volume_lock import VolumeLock
from higgs_worker.voices.resolve import MIN_REFERENCE_SECONDS, OPENAI_VOICES, PRESET_NAME

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SavedVoice:
    name: str
    source: str  # "upload": saved through the library
    duration_s: float | None
    sample_rate: int | None
    ref_text: str | None
    created_at: int | None  # Unix time of the upload

    def describe(self) -> dict[str, object]:
        return {"object": "voice", **asdict(self)}


class VoiceLibrary:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.directory = settings.saved_voices_dir

    def _paths(self, name: str) -> tuple[Path, Path, Path]:
        base = self.directory / name
        return base.with_suffix(".wav"), base.with_suffix(".txt"), base.with_suffix(".json")

    def check_name(self, name: str) -> str:
        if not PRESET_NAME.fullmatch(name):
            raise InvalidVoice(
                "name: must be 1-64 letters, digits, '_' and '-', starting with a letter or digit"
            )
        return name

    def _check_free(self, name: str) -> None:
        """A saved voice may not take a name that already means another voice on this worker."""
        if name in OPENAI_VOICES:
            raise VoiceExists(f"name: {name!r} is one of OpenAI's voice names; choose another name")
        if name in {voice.target for voice in OPENAI_VOICES.values()}:
            raise VoiceExists(
                f"name: {name!r} is the preset voice behind an OpenAI voice; choose another name"
            )
        if (self.settings.voices_dir / f"{name}.wav").is_file():
            raise VoiceExists(f"name: {name!r} is a preset voice on this worker; choose another name")

    def save(self, name: str, data: bytes, ref_text: str | None, *, replace: bool = False) -> SavedVoice:
        """Check and store a voice; VoiceExists when ``name`` is taken and ``replace`` is False."""
        self.check_name(name)
        self._check_free(name)
        if len(data) > self.settings.max_reference_bytes:
            raise VoiceTooLarge(
                f"file: {len(data)} bytes is over the limit of {self.settings.max_reference_bytes} bytes"
            )
        if ref_text is not None:
            ref_text = ref_text.strip() or None
        if ref_text is not None and len(ref_text) > MAX_REF_TEXT_CHARS:
            raise InvalidVoice(f"ref_text: at most {MAX_REF_TEXT_CHARS} characters")
        wav, sample_rate, seconds = self._checked_audio(data)
        voice = SavedVoice(name, "upload", round(seconds, 3), sample_rate, ref_text, int(time.time()))
        self.directory.mkdir(parents=True, exist_ok=True)
        wav_path, txt_path, meta_path = self._paths(name)
        with self._lock(name):
            if wav_path.exists() and not replace:
                raise VoiceExists(
                    f"name: a voice named {name!r} already exists; delete it first or set replace=true"
                )
            metadata = {k: v for k, v in asdict(voice).items() if k not in ("name", "ref_text")}
            publish(meta_path, json.dumps(metadata).encode())
            if ref_text is None:
                txt_path.unlink(missing_ok=True)
            else:
                publish(txt_path, ref_text.encode())
            publish(wav_path, wav)  # last: a voice exists once its audio does
        return voice

    def _checked_audio(self, data: bytes) -> tuple[bytes, int, float]:
        try:
            waveform, sample_rate = decode_audio(data)
        except AudioDecodeError as error:
            raise InvalidVoiceAudio(f"file: {error}") from None
        seconds = waveform.size / sample_rate
        if seconds < MIN_REFERENCE_SECONDS:
            raise InvalidVoiceAudio(
                f"file: the audio is {seconds:.3f} s long; a voice needs {MIN_REFERENCE_SECONDS:g} s or more"
            )
        if seconds > self.settings.max_reference_seconds:
            limit = self.settings.max_reference_seconds
            raise InvalidVoiceAudio(f"file: the audio is {seconds:.1f} s long; the limit is {limit:g} s")
        buffer = io.BytesIO()
        sf.write(buffer, waveform, sample_rate, format="WAV", subtype="PCM_16")
        return buffer.getvalue(), sample_rate, seconds

    def get(self, name: str) -> SavedVoice:
        self.check_name(name)
        wav_path, txt_path, meta_path = self._paths(name)
        try:
            metadata = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            metadata = None
        if metadata is None or not wav_path.is_file():
            raise VoiceNotFound(f"name: no saved voice named {name!r} on this worker")
        ref_text = txt_path.read_text(encoding="utf-8").strip() or None if txt_path.is_file() else None
        return SavedVoice(
            name, "upload", metadata["duration_s"], metadata["sample_rate"], ref_text, metadata["created_at"]
        )

    def list(self) -> list[SavedVoice]:
        """The saved voices (presets are not the library's: they come and go with the voices server)."""
        if not self.directory.is_dir():
            return []
        names = sorted(p.stem for p in self.directory.glob("*.wav") if PRESET_NAME.fullmatch(p.stem))
        voices = []
        for name in names:
            try:
                voices.append(self.get(name))
            except VoiceNotFound:  # deleted meanwhile
                continue
        return voices

    def delete(self, name: str) -> None:
        self.check_name(name)
        wav_path, txt_path, meta_path = self._paths(name)
        with self._lock(name):
            if not wav_path.is_file():
                raise VoiceNotFound(f"name: no saved voice named {name!r} on this worker")
            wav_path.unlink()  # first: the voice is gone for every reader at once
            txt_path.unlink(missing_ok=True)
            meta_path.unlink(missing_ok=True)

    def adopt_earlier_uploads(self) -> None:
        """Move voices that earlier versions saved beside the presets (marked by ``<name>.json``) into the
        library's folder, so an upgrade loses none, under the voice's lock."""
        for meta in sorted(self.settings.voices_dir.glob("*.json")):
            name = meta.stem
            if not PRESET_NAME.fullmatch(name) or not meta.with_suffix(".wav").is_file():
                continue
            self.directory.mkdir(parents=True, exist_ok=True)
            with self._lock(name):
                # The facts and the transcript are copied first and the audio moved last, in one rename:
                # a reader finds the whole voice in one folder or the other, never audio without its text.
                kept = [path for path in (meta, meta.with_suffix(".txt")) if path.is_file()]
                for path in kept:
                    publish(self.directory / path.name, path.read_bytes())
                meta.with_suffix(".wav").replace(self.directory / f"{name}.wav")
                for path in kept:
                    path.unlink()
            logger.info("moved the saved voice %r into %s", name, self.directory)

    def _lock(self, name: str) -> VolumeLock:
        return VolumeLock(
            self.settings.lock_dir / f"voice-{name}.lock",
            stale_after_s=self.settings.download_lock_stale_s,
            purpose=f"voice {name}",
        )
