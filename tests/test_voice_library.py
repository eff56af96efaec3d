"""The voice library's namespace: a saved voice never stands in for a preset or an OpenAI voice, and deleting
one never touches a preset. Real files on a volume folder, real audio, the real resolver."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from higgs_worker.errors import VoiceExists, VoiceNotFound, WorkerError
from higgs_worker.settings import Settings, load_settings
from higgs_worker.voices.library import VoiceLibrary
from higgs_worker.voices.resolve import resolve_reference


def wav(seconds: float = 1.0, frequency: float = 220.0) -> bytes:
    t = np.arange(int(16_000 * seconds)) / 16_000
    buffer = io.BytesIO()
    sf.write(buffer, 0.3 * np.sin(2 * np.pi * frequency * t), 16_000, format="WAV")
    return buffer.getvalue()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # a voices server nobody answers: presets exist only where the test puts them
    return load_settings(
        {"RUNPOD_VOLUME_PATH": str(tmp_path / "volume"), "VOICES_BASE_URL": "http://127.0.0.1:9/voices"}
    )


@pytest.fixture
def library(settings: Settings) -> VoiceLibrary:
    return VoiceLibrary(settings)


def put_preset(settings: Settings, name: str) -> Path:
    settings.voices_dir.mkdir(parents=True, exist_ok=True)
    path = settings.voices_dir / f"{name}.wav"
    path.write_bytes(wav(frequency=440.0))
    (settings.voices_dir / f"{name}.txt").write_text("The preset's words.")
    return path


@pytest.mark.parametrize(
    ("name", "collision"),
    [
        ("alloy", "one of OpenAI's voice names"),
        ("en_woman", "the preset voice behind an OpenAI voice"),
        ("belinda", "the preset voice behind an OpenAI voice"),
    ],
)
def test_names_that_mean_another_voice_are_refused(library: VoiceLibrary, name: str, collision: str) -> None:
    with pytest.raises(VoiceExists, match=f"^name: '{name}' is {collision}; choose another name$"):
        library.save(name, wav(), None)
    assert library.list() == []


def test_a_preset_on_the_volume_keeps_its_name(library: VoiceLibrary, settings: Settings) -> None:
    put_preset(settings, "house")
    with pytest.raises(VoiceExists, match=r"^name: 'house' is a preset voice on this worker"):
        library.save("house", wav(), None)


def test_a_saved_voice_is_found_by_name_and_labelled_saved(library: VoiceLibrary, settings: Settings) -> None:
    library.save("narrator", wav(), "My own words.")
    voice = resolve_reference("narrator", None, field="voice", settings=settings)
    assert voice.kind == "saved" and voice.description == "saved voice 'narrator'"
    assert voice.text == "My own words."
    assert [saved.name for saved in library.list()] == ["narrator"]


def test_deleting_a_saved_voice_never_touches_a_preset(library: VoiceLibrary, settings: Settings) -> None:
    preset = put_preset(settings, "house")
    library.save("narrator", wav(), None)
    library.delete("narrator")
    assert preset.is_file() and (settings.voices_dir / "house.txt").is_file()
    with pytest.raises(VoiceNotFound, match=r"^name: no saved voice named 'house' on this worker$"):
        library.delete("house")  # a preset is not the library's to delete
    assert preset.is_file()
    with pytest.raises(VoiceNotFound, match=r"^name: no saved voice named 'narrator' on this worker$"):
        library.get("narrator")


def test_a_deleted_voice_in_a_job_says_no_saved_voice_has_the_name(
    library: VoiceLibrary, settings: Settings
) -> None:
    put_preset(settings, "house")
    library.save("narrator", wav(), None)
    library.save("guest", wav(), None)
    library.delete("narrator")
    with pytest.raises(WorkerError) as raised:  # 422 here: the voices server (for a preset) is down
        resolve_reference("narrator", None, field="voice", settings=settings)
    assert str(raised.value).startswith("voice: no saved voice named 'narrator', and preset voice"), (
        raised.value
    )


def test_an_openai_voice_uses_its_preset_even_beside_saved_voices(
    library: VoiceLibrary, settings: Settings
) -> None:
    put_preset(settings, "en_woman")
    library.save("mine", wav(), None)
    voice = resolve_reference("alloy", None, field="voice", settings=settings)
    assert voice.description == "OpenAI voice 'alloy': preset voice 'en_woman'"


def test_uploads_saved_beside_the_presets_by_earlier_versions_are_adopted(
    library: VoiceLibrary, settings: Settings
) -> None:
    put_preset(settings, "house")
    (settings.voices_dir / "old.wav").write_bytes(wav())
    (settings.voices_dir / "old.txt").write_text("Saved long ago.")
    facts = {"source": "upload", "duration_s": 1.0, "sample_rate": 16_000, "created_at": 1}
    (settings.voices_dir / "old.json").write_text(json.dumps(facts))
    library.adopt_earlier_uploads()
    assert [(v.name, v.ref_text) for v in library.list()] == [("old", "Saved long ago.")]
    assert not (settings.voices_dir / "old.wav").exists()
    assert (settings.voices_dir / "house.wav").is_file()  # a preset has no .json: it stays
    library.delete("old")
    assert library.list() == []
