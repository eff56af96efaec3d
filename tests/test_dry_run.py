"""dry_run through the worker: no model fetched, loaded or run; the prompt is the one the model would get;
plus described voices, OpenAI voice names and the new job fields' errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from boson_multimodal.engine import HiggsAudioEngine, SamplingConfig, SpeechRequest
from boson_multimodal.prompt import build_prompt
from higgs_worker.errors import RequestError, UnknownVoiceError
from higgs_worker.job.rendering import prompt_request
from higgs_worker.job.schema import RequestLimits, parse_request
from higgs_worker.pipeline import Pipeline
from higgs_worker.settings import Settings, load_settings
from higgs_worker.voices.resolve import OPENAI_VOICES, DescribedVoice, ReferenceAudio, resolve_reference
from tests.support.loopback_http import LoopbackServer, send_body
from tests.support.speech import EXAMPLES, SPOKEN, make_voice

LIMITS = RequestLimits(max_transcript_chars=20_000, max_new_tokens=4096)


@pytest.fixture(scope="module")
def voices_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackServer]:
    wav = make_voice(tmp_path_factory.mktemp("v") / "en_woman.wav", 24_000, 1, 6.0)
    routes = {
        "/voices/profile.yaml": send_body((EXAMPLES / "profile.yaml").read_bytes(), "text/yaml"),
        "/voices/en_woman.wav": send_body(wav.read_bytes(), "audio/wav"),
        "/voices/en_woman.txt": send_body(SPOKEN.encode(), "text/plain"),
    }
    with LoopbackServer(routes).running() as running:
        yield running


def make_settings(tmp_path: Path, voices_url: str, **env: str) -> Settings:
    return load_settings(
        {
            "RUNPOD_VOLUME_PATH": str(tmp_path / "volume"),
            "VOICES_BASE_URL": voices_url,
            "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing listens: a download attempt would fail the job
            **env,
        }
    )


def test_dry_run_returns_the_reading_without_fetching_the_model(tmp_path: Path, voices_server) -> None:
    settings = make_settings(tmp_path, voices_server.url("/voices/"))
    job = {
        "id": "dry",
        "input": {
            "transcript": "[SPEAKER0] It is 70°F (warm) [laugh]\n\n[SPEAKER1] 你好，世界",
            "ref_audio": "en_woman",
            "voice_description": [None, "A deep, slow voice."],
            "dry_run": True,
        },
    }
    output = Pipeline(settings).run(job["id"], job["input"])
    assert output["dry_run"] is True
    assert output["transcript"] == (
        "[SPEAKER0] It is 70 degrees Fahrenheit warm <SE>[Laughter]</SE>\n[SPEAKER1] 你好, 世界."
    )
    assert [(s["speaker"], s["voice"]) for s in output["speakers"]] == [
        ("SPEAKER0", "preset"),
        ("SPEAKER1", "description"),
    ]
    assert output["speakers"][1]["description"] == "A deep, slow voice."
    assert output["voice_placement"] == "system message"  # a described voice puts every voice there
    assert "SPEAKER1: A deep, slow voice.\n<|scene_desc_end|>" in output["prompt"]
    assert output["pieces"][0]["audio"] == [{"audio": "reference", "seconds": 6.0, "text": SPOKEN}]
    assert output["chat_template"].startswith("built-in")
    assert not settings.model_path.exists()  # nothing downloaded
    json.dumps(output)  # a job result must be JSON


def test_dry_run_prompt_is_what_the_processor_renders(tmp_path: Path, voices_server, tiny_checkpoint) -> None:
    settings = make_settings(
        tmp_path, voices_server.url("/voices/"), MODEL_PATH=str(tiny_checkpoint.model_dir)
    )
    raw = {"transcript": "Hello (again) [cough]", "ref_audio": "en_woman", "dry_run": True}
    output = Pipeline(settings).run("dry", raw)
    assert output["chat_template"] == f"checkpoint ({tiny_checkpoint.model_dir / 'chat_template.jinja'})"

    engine = HiggsAudioEngine.load(tiny_checkpoint.model_dir, tiny_checkpoint.codec_dir, device="cpu")
    request = parse_request(raw, LIMITS)
    voices = [resolve_reference("en_woman", None, field="ref_audio", settings=settings)]
    speech_request = SpeechRequest(**vars(prompt_request(request, voices)), sampling=SamplingConfig())
    processor = engine._loaded.processor
    expected = processor.apply_chat_template(
        build_prompt(speech_request).messages, tokenize=False, add_generation_prompt=True
    )
    assert output["prompt"] == expected
    assert "Hello again <SE>[Cough]</SE>" in expected


def test_word_chunks_keep_a_bounded_buffer(tmp_path: Path, voices_server) -> None:
    settings = make_settings(tmp_path, voices_server.url("/voices/"))
    words = " ".join(f"word{i}" for i in range(50))
    raw = {
        "transcript": words,
        "chunk_method": "word",
        "chunk_max_word_num": 10,
        "generation_chunk_buffer_size": 2,
        "dry_run": True,
    }
    output = Pipeline(settings).run("dry", raw)
    assert output["pieces"][0]["text"] == " ".join(f"word{i}" for i in range(10))
    assert len(output["pieces"]) == 5
    assert [len(p["audio"]) for p in output["pieces"]] == [0, 1, 2, 2, 2]
    assert output["pieces"][4]["audio"][0]["audio"] == "the audio generated for piece 2"


def test_dry_run_never_imports_torch(tmp_path: Path, voices_server) -> None:
    env = {"RUNPOD_VOLUME_PATH": str(tmp_path), "VOICES_BASE_URL": voices_server.url("/voices/")}
    job = {"id": "x", "input": {"transcript": "[SPEAKER0] a [SPEAKER1] b", "dry_run": True}}
    script = f"""
import sys
from higgs_worker.settings import load_settings
from higgs_worker.pipeline import Pipeline
out = Pipeline(load_settings({env!r})).run({job["id"]!r}, {job["input"]!r})
assert out["speakers"][1]["description"] == "masculine", out
assert "torch" not in sys.modules, "torch was imported"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_profiles_are_fetched_once_and_cached(tmp_path: Path, voices_server) -> None:
    settings = make_settings(tmp_path, voices_server.url("/voices/"))
    voice = resolve_reference("profile:male_en", None, field="ref_audio", settings=settings)
    assert isinstance(voice, DescribedVoice) and voice.kind == "profile"
    assert voice.text.startswith("Male, American accent")
    before = len(voices_server.requests)
    resolve_reference("profile:female_en_story", None, field="ref_audio", settings=settings)
    assert len(voices_server.requests) == before  # read from the volume
    with pytest.raises(
        UnknownVoiceError, match=r"^ref_audio\[1\]: unknown profile 'nope'; profiles: female_en_british"
    ):
        resolve_reference("profile:nope", None, field="ref_audio[1]", settings=settings)


@pytest.mark.parametrize("name", sorted(OPENAI_VOICES))
def test_openai_voice_names_never_fail(name: str, tmp_path: Path, voices_server) -> None:
    settings = make_settings(tmp_path, voices_server.url("/voices/"))
    voice = resolve_reference(name, None, field="voice", settings=settings)
    target = OPENAI_VOICES[name].target
    if target == "en_woman" or target.startswith("profile:"):  # what this voices server has
        assert voice.description.startswith(f"OpenAI voice {name!r}: ")
        assert isinstance(voice, ReferenceAudio if target == "en_woman" else DescribedVoice)
    else:  # a preset the server does not have: the table's own words stand in
        assert voice == DescribedVoice(
            OPENAI_VOICES[name].fallback, f"OpenAI voice {name!r}, described", "description"
        )
    offline = make_settings(tmp_path / "offline", "http://127.0.0.1:9/voices/")
    described = resolve_reference(name, None, field="voice", settings=offline)
    assert isinstance(described, DescribedVoice) and described.text == OPENAI_VOICES[name].fallback


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"voice_description": ["a", "b"], "ref_audio": "x"}, "voice_description[0]: speaker 0 already has"),
        ({"voice_description": [None, None]}, "voice_description[0]: speaker 0 has no voice"),
        ({"voice_description": "  "}, "voice_description: must contain words"),
        ({"voice_description": 5}, "voice_description: must be a string or a list"),
        ({"ref_audio": "profile:male_en", "ref_text": "x"}, "ref_text: a profile voice has no audio"),
        ({"ref_audio_in_system_message": True}, "ref_audio_in_system_message: needs ref_audio"),
        ({"chunk_method": "paragraph"}, "chunk_method: must be one of sentence, speaker, word or none"),
        ({"chunk_max_word_num": 50}, "chunk_max_word_num: only used with chunk_method 'word'"),
        ({"chunk_method": "word", "chunk_max_num_turns": 2}, "chunk_max_num_turns: only used with"),
        ({"generation_chunk_buffer_size": 1}, "generation_chunk_buffer_size: only used with"),
        (
            {"chunk_method": "speaker", "generation_chunk_buffer_size": 9},
            "generation_chunk_buffer_size: Input",
        ),
        ({"dry_run": "yes"}, "dry_run: Input should be a valid boolean"),
        ({"transcript": "[SPEAKER2] x", "voice_description": ["a", "b"]}, "transcript: tags [SPEAKER2]"),
    ],
)
def test_new_fields_name_themselves_in_errors(raw: dict, message: str) -> None:
    with pytest.raises(RequestError) as error:
        parse_request({"transcript": "Hi.", **raw}, LIMITS)
    assert any(clause.startswith(message) for clause in str(error.value).split("; ")), error.value
