"""The demo model sits where the real one goes, but never passes for it and never overwrites it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from demo_model import DEMO_VOICE_TEXT, publish_demo, publish_demo_voices
from higgs_worker.errors import DemoRefused, ModelStoreError
from higgs_worker.settings import Settings, load_settings
from higgs_worker.store.model_store import LOCAL_BUILD, RepoSpec, ensure_repo, read_marker, read_store
from higgs_worker.voices.resolve import ReferenceAudio, resolve_reference
from tests.support.fixtures_hub import make_repo
from tests.support.hub_server import HubServer

MODEL_REPO = "bosonai/higgs-audio-v2-generation-3B-base"


def settings_for(volume: Path) -> Settings:
    volume.mkdir(parents=True, exist_ok=True)
    return load_settings({"RUNPOD_VOLUME_PATH": str(volume)})


def model_spec(settings: Settings) -> RepoSpec:
    return RepoSpec(settings.model_repo, settings.model_revision, settings.model_path)


def test_demo_is_served_only_when_asked_for(tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "volume")
    publish_demo(settings)
    spec = model_spec(settings)
    assert read_marker(spec).commit == LOCAL_BUILD
    assert (settings.model_path / "TINY_RANDOM_MODEL.json").is_file()
    assert read_store(spec) is None  # not the hub's model
    stored = ensure_repo(spec, lock_dir=settings.lock_dir, runpod_cache_hub_dir=None, accept_local=True)
    assert stored.source == "store" and stored.commit == LOCAL_BUILD

    before = (settings.model_path / "config.json").stat().st_mtime_ns
    publish_demo(settings)  # already in place: nothing is rebuilt
    assert (settings.model_path / "config.json").stat().st_mtime_ns == before


def test_without_the_demo_flag_the_hub_replaces_the_demo(tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "volume")
    publish_demo(settings)
    demo_files = {p.name for p in settings.model_path.iterdir()}
    real = make_repo(tmp_path / "real-files")
    with HubServer({MODEL_REPO: real}) as hub:
        stored = ensure_repo(
            model_spec(settings), lock_dir=settings.lock_dir, runpod_cache_hub_dir=None, endpoint=hub.url
        )
        assert stored.source == "download" and stored.commit == hub.commit(MODEL_REPO)
    left = {p.name for p in settings.model_path.iterdir() if not p.name.startswith(".")}
    assert left == {p.name for p in real.iterdir()}
    assert (
        "TINY_RANDOM_MODEL.json" in demo_files
        and not (settings.model_path / "TINY_RANDOM_MODEL.json").exists()
    )


@pytest.mark.parametrize("hub_has_the_repo", [False, True], ids=["hub down", "download cut short"])
def test_the_demo_stays_whole_until_the_hubs_model_is_complete(
    tmp_path: Path, hub_has_the_repo: bool
) -> None:
    """A boot without --demo must not leave an empty store when the hub cannot replace the demo."""
    settings = settings_for(tmp_path / "volume")
    publish_demo(settings)
    spec = model_spec(settings)
    before = {p.name: p.read_bytes() for p in settings.model_path.iterdir() if p.is_file()}
    real = make_repo(tmp_path / "real-files")
    with HubServer({MODEL_REPO: real}) as hub:
        endpoint = hub.url if hub_has_the_repo else "http://127.0.0.1:9"
        if hub_has_the_repo:  # the hub lists a file it then cannot serve: the download ends incomplete
            (real / "model.safetensors").unlink()
        with pytest.raises(ModelStoreError):
            ensure_repo(spec, lock_dir=settings.lock_dir, runpod_cache_hub_dir=None, endpoint=endpoint)
    after = {p.name: p.read_bytes() for p in settings.model_path.iterdir() if p.is_file()}
    assert after == before
    assert read_store(spec, accept_local=True) is not None  # a --demo boot still serves it


def test_demo_never_overwrites_real_model_files(tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "volume")
    with HubServer({MODEL_REPO: make_repo(tmp_path / "real-files")}) as hub:
        ensure_repo(
            model_spec(settings), lock_dir=settings.lock_dir, runpod_cache_hub_dir=None, endpoint=hub.url
        )
    with pytest.raises(DemoRefused, match="never overwrites"):
        publish_demo(settings)
    assert read_marker(model_spec(settings)).commit != LOCAL_BUILD

    partial = settings_for(tmp_path / "partial")
    partial.model_path.mkdir(parents=True)
    (partial.model_path / "model-00001-of-00002.safetensors").write_bytes(b"half a download")
    with pytest.raises(DemoRefused):
        publish_demo(partial)
    assert (partial.model_path / "model-00001-of-00002.safetensors").read_bytes() == b"half a download"


def test_the_demo_voices_work_with_no_network_and_never_replace_a_voice(tmp_path: Path) -> None:
    settings = load_settings(
        {"RUNPOD_VOLUME_PATH": str(tmp_path / "volume"), "VOICES_BASE_URL": "http://127.0.0.1:9/voices"}
    )
    settings.voices_dir.mkdir(parents=True)
    (settings.voices_dir / "demo_man.wav").write_bytes(b"the operator's own file")
    publish_demo_voices(settings)
    voice = resolve_reference("demo_woman", None, field="voice", settings=settings)
    assert isinstance(voice, ReferenceAudio) and voice.kind == "preset" and voice.text == DEMO_VOICE_TEXT
    assert voice.sample_rate == 24_000 and 2.5 < voice.waveform.size / voice.sample_rate < 3.5
    spectrum = np.abs(np.fft.rfft(voice.waveform))
    assert 150 < np.argmax(spectrum) * voice.sample_rate / voice.waveform.size < 2500  # voiced, not noise
    assert (settings.voices_dir / "demo_man.wav").read_bytes() == b"the operator's own file"
