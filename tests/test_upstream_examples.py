"""The upstream examples (boson-ai/higgs-audio ``examples/README.md``), run as jobs of this worker.

Each case is one command of the upstream README. Its prompt, as the dry run renders it with the checkpoint's
chat template, must equal what the upstream script's rules give (:func:`script_prompts`, a restatement of
``examples/generation.py``'s message assembly, written for this test); and the tiny demo model must make
audio from it. Preset voices are spoken by espeak-ng and served by a loopback voices server; profiles come
from the vendored ``profile.yaml``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import pytest
import yaml

from boson_multimodal.engine import HiggsAudioEngine, SamplingConfig
from boson_multimodal.longform import generate_long
from higgs_worker.job.dry_run import dry_run
from higgs_worker.job.plan import Plan, plan_job
from higgs_worker.job.schema import DEFAULT_CHUNK_BUFFER, RequestLimits, TTSRequest, parse_request
from higgs_worker.settings import Settings, load_settings
from higgs_worker.voices.resolve import resolve_reference
from tests.support.loopback_http import LoopbackServer, send_body
from tests.support.speech import EXAMPLES, SPOKEN, make_voice

AUDIO = "<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>"
PLAIN_SYSTEM = "Generate audio following instruction."
MULTI_SYSTEM = (
    "You are an AI assistant designed to convert text into speech.\n"
    "If the user's message includes a [SPEAKER*] tag, do not read out the tag and generate speech for the "
    "following text, using the specified voice.\n"
    "If no speaker tag is present, select a suitable voice on your own."
)
# The voices the README's commands name, as (rate, channels, seconds) of the upstream files' kinds; short
# ones, as every piece encodes them again (tests/test_voice_prompt_shapes.py covers lengths up to 28 s).
PRESETS = {
    "belinda": (24_000, 1, 6.0),
    "broom_salesman": (44_100, 2, 6.0),
    "en_man": (48_000, 1, 6.0),
    "en_woman": (22_050, 1, 6.0),
    "zh_man_sichuan": (48_000, 2, 6.0),
}


def transcript(name: str) -> str:
    return (EXAMPLES / "transcript" / name).read_text(encoding="utf-8").strip()


def scene(name: str) -> str:
    return (EXAMPLES / name).read_text(encoding="utf-8").strip()


@dataclass(frozen=True)
class Example:
    """One README command: its options as a job, and as the script's arguments for the oracle."""

    transcript: str
    ref_audio: tuple[str, ...] = ()
    scene: str | None = "quiet_indoor.txt"  # the script's default; None is --scene_prompt empty
    in_system: bool = False
    chunk_method: str | None = None
    chunk_max_num_turns: int = 1
    buffer: int | None = None

    def job(self) -> dict:
        job: dict = {"transcript": transcript(self.transcript), "dry_run": True}
        if self.ref_audio:
            job["ref_audio"] = list(self.ref_audio) if len(self.ref_audio) > 1 else self.ref_audio[0]
        if self.scene is None:
            job["scene_prompt"] = ""
        elif self.scene != "quiet_indoor.txt":
            job["scene_prompt"] = scene(self.scene)
        if self.in_system:
            job["ref_audio_in_system_message"] = True
        job["chunk_method"] = self.chunk_method or "none"
        if self.chunk_max_num_turns != 1:
            job["chunk_max_num_turns"] = self.chunk_max_num_turns
        if self.buffer is not None:
            job["generation_chunk_buffer_size"] = self.buffer
        return job


README_COMMANDS = {
    "voice clone": Example("single_speaker/en_dl.txt", ("broom_salesman",)),
    "voice clone belinda": Example("single_speaker/en_dl.txt", ("belinda",)),
    "cross-lingual clone": Example("single_speaker/en_dl.txt", ("zh_man_sichuan",), scene=None),
    "smart voice": Example("single_speaker/en_dl.txt"),
    "smart voice chinese": Example("single_speaker/zh_ai.txt"),
    "smart voice basic": Example("single_speaker/en_basic.txt"),
    "profile male british": Example("single_speaker/en_dl.txt", ("profile:male_en_british",)),
    "profile female british": Example("single_speaker/en_dl.txt", ("profile:female_en_british",)),
    "long-form blog": Example(
        "single_speaker/en_higgs_audio_blog.md",
        ("en_man",),
        scene="reading_blog.txt",
        chunk_method="word",
        buffer=2,
    ),
    "humming": Example("single_speaker/experimental/en_humming.txt", ("en_woman",)),
    "background music": Example("single_speaker/experimental/en_bgm.txt", ("en_woman",), in_system=True),
    "multi-speaker smart voice": Example("multi_speaker/en_argument.txt"),
    "multi-voice clone": Example(
        "multi_speaker/en_argument.txt", ("belinda", "broom_salesman"), in_system=True, chunk_method="speaker"
    ),
    "multi-voice clone, two turns": Example(
        "multi_speaker/en_higgs.txt",
        ("broom_salesman", "belinda"),
        in_system=True,
        chunk_method="speaker",
        chunk_max_num_turns=2,
    ),
}


# --- the oracle: the upstream script's rules, restated ---------------------------------------------------


def script_prompts(
    example: Example, text: str, presets: dict[str, str], profiles: dict[str, str]
) -> list[str]:
    """The prompt of every chunk, as examples/generation.py assembles it, in the checkpoint's template.

    ``text`` is the normalised transcript (normalisation has tests of its own). Differences from upstream's
    own tokenisation that the checkpoint's template makes (audio as ``<|AUDIO_OUT|>``, texts trimmed, the
    generation prompt opening the audio) are the template's, and apply to every prompt alike.
    """
    scene_text = None if example.scene is None else scene(example.scene)
    refs = list(example.ref_audio)
    tags = sorted(set(_tags(text)))
    in_system = example.in_system or any(r.startswith("profile:") for r in refs)
    turns: list[tuple[str, str]] = []
    if refs and in_system:
        lines = [
            f"SPEAKER{i}: {profiles[r.removeprefix('profile:')] if r.startswith('profile:') else AUDIO}"
            for i, r in enumerate(refs)
        ]
        head = f"{scene_text}\n\n" if scene_text else ""
        system = f"{PLAIN_SYSTEM}\n\n<|scene_desc_start|>\n{head}" + "\n".join(lines) + "\n<|scene_desc_end|>"
    elif refs:
        system = PLAIN_SYSTEM + (
            f"\n\n<|scene_desc_start|>\n{scene_text}\n<|scene_desc_end|>" if scene_text else ""
        )
        for i, name in enumerate(refs):
            turns += [("user", f"[SPEAKER{i}] {presets[name]}" if len(refs) > 1 else presets[name])]
            turns += [("assistant", AUDIO)]
    elif len(tags) > 1:
        speakers = "\n".join(
            f"{tag}: {'feminine' if i % 2 == 0 else 'masculine'}" for i, tag in enumerate(tags)
        )
        desc = "\n\n".join([*([scene_text] if scene_text else []), speakers])
        system = f"{MULTI_SYSTEM}\n\n<|scene_desc_start|>\n{desc}\n<|scene_desc_end|>"
    else:
        system = PLAIN_SYSTEM + (
            f"\n\n<|scene_desc_start|>\n{scene_text}\n<|scene_desc_end|>" if scene_text else ""
        )
    prompts, generated = [], []
    for chunk in _script_chunks(text, example):
        generated.append(("user", chunk))
        messages = [("system", system), *turns, *generated]
        rendered = "<|begin_of_text|>" + "".join(
            f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>"
            for role, content in messages
        )
        prompts.append(rendered + "<|start_header_id|>assistant<|end_header_id|>\n\n<|audio_out_bos|>")
        generated.append(("assistant", AUDIO))
        # Upstream keeps every chunk unless told otherwise; the worker's buffer is always bounded.
        buffer = DEFAULT_CHUNK_BUFFER if example.buffer is None else example.buffer
        if len(generated) // 2 > buffer:
            generated = generated[-2 * buffer :]
    return prompts


def _tags(text: str) -> list[str]:
    import re

    return re.findall(r"\[(SPEAKER\d+)\]", text)


def _script_chunks(text: str, example: Example) -> list[str]:
    if example.chunk_method == "speaker":
        turns: list[str] = []
        for line in (line.strip() for line in text.split("\n")):
            if line.startswith("[SPEAKER") or not turns:
                turns.append(line)
            else:
                turns[-1] += "\n" + line
        n = example.chunk_max_num_turns
        return ["\n".join(turns[i : i + n]) for i in range(0, len(turns), n)]
    if example.chunk_method == "word":
        words = text.split(" ")
        return [" ".join(words[i : i + 200]) for i in range(0, len(words), 200)]
    return [text]


# --- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def voices_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackServer]:
    folder = tmp_path_factory.mktemp("upstream-voices")
    routes = {"/voices/profile.yaml": send_body((EXAMPLES / "profile.yaml").read_bytes(), "text/yaml")}
    for name, (rate, channels, seconds) in PRESETS.items():
        wav = make_voice(folder / f"{name}.wav", rate, channels, seconds)
        routes[f"/voices/{name}.wav"] = send_body(wav.read_bytes(), "audio/wav")
        routes[f"/voices/{name}.txt"] = send_body(f"{SPOKEN}\n".encode(), "text/plain")
    with LoopbackServer(routes).running() as running:
        yield running


@pytest.fixture(scope="module")
def settings(
    tmp_path_factory: pytest.TempPathFactory, voices_server: LoopbackServer, tiny_checkpoint
) -> Settings:
    return load_settings(
        {
            "RUNPOD_VOLUME_PATH": str(tmp_path_factory.mktemp("volume")),
            "VOICES_BASE_URL": voices_server.url("/voices/"),
            "MODEL_PATH": str(tiny_checkpoint.model_dir),
        }
    )


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> HiggsAudioEngine:
    return HiggsAudioEngine.load(tiny_checkpoint.model_dir, tiny_checkpoint.codec_dir, device="cpu")


def parsed(example: Example) -> TTSRequest:
    return parse_request(example.job(), RequestLimits(max_transcript_chars=20_000, max_new_tokens=4096))


def planned(request: TTSRequest, settings: Settings) -> Plan:
    """The job's plan, its voices resolved from the volume the test filled (as Pipeline.plan does)."""
    voices = [
        resolve_reference(value, None, field="ref_audio", settings=settings) for value in request.references
    ]
    return plan_job(request, voices, "example", settings)


# --- the checks -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", README_COMMANDS)
def test_prompt_is_what_the_upstream_script_builds(name: str, settings: Settings) -> None:
    example = README_COMMANDS[name]
    request = parsed(example)
    output = dry_run(planned(request, settings), settings)
    profiles = yaml.safe_load((EXAMPLES / "profile.yaml").read_text(encoding="utf-8"))["profiles"]
    expected = script_prompts(example, output["transcript"], dict.fromkeys(PRESETS, SPOKEN), profiles)
    assert [piece["prompt"] for piece in output["pieces"]] == expected
    assert output["chat_template"].startswith("checkpoint (")


def test_the_examples_exercise_every_rule(settings: Settings) -> None:
    """The vendored texts hold what the rules are for, and the rendering shows each rule applied."""
    rendered = {name: dry_run(planned(parsed(e), settings), settings) for name, e in README_COMMANDS.items()}
    assert (
        "<SE_s>[Humming]</SE_s> la la la la la <SE_e>[Humming]</SE_e> See?"
        in rendered["humming"]["transcript"]
    )
    assert rendered["background music"]["transcript"].endswith("<SE_e>[Music]</SE_e>")
    assert "That sounds... tricky." in transcript_of(rendered["multi-voice clone, two turns"])
    assert "speaker diarization - so" in transcript_of(rendered["multi-voice clone, two turns"])
    assert "大家好, 欢迎收听本期" in rendered["smart voice chinese"]["transcript"]
    assert "\n\n" not in rendered["smart voice"]["transcript"]  # en_dl's blank lines
    assert [s["description"] for s in rendered["multi-speaker smart voice"]["speakers"]] == [
        "feminine",
        "masculine",
    ]
    assert [s["voice"] for s in rendered["profile male british"]["speakers"]] == ["profile"]
    assert rendered["voice clone"]["voice_placement"] == "earlier turns"
    assert rendered["background music"]["voice_placement"] == "system message"
    assert [
        len(r["pieces"]) for r in (rendered["multi-voice clone"], rendered["multi-voice clone, two turns"])
    ] == [4, 3]
    blog = rendered["long-form blog"]
    assert blog["chunking"] == {"method": "word", "max_words": 200, "buffer_size": 2}
    # About 300 words: two pieces; the second is prompted with the reference and the first piece's audio.
    assert [[a["audio"] for a in piece["audio"]] for piece in blog["pieces"]] == [
        ["reference"],
        ["reference", "the audio generated for piece 0"],
    ]


def transcript_of(output: dict) -> str:
    return output["transcript"]


@pytest.mark.parametrize("name", README_COMMANDS)
def test_each_example_makes_audio_with_the_demo_model(
    name: str, settings: Settings, engine: HiggsAudioEngine
) -> None:
    request = parsed(README_COMMANDS[name])
    plan = planned(request, settings)
    speech_request = replace(plan.speech, sampling=SamplingConfig(max_new_tokens=16, seed=3))
    chunking = plan.chunking
    if chunking is not None:
        chunking = replace(chunking, max_words=150)  # three pieces, not two: the buffer is used
        speech = generate_long(engine, speech_request, chunking)
    else:
        speech = engine.generate(speech_request)
    assert speech.num_frames > 0 and speech.sample_rate == 24_000
    assert np.isfinite(speech.waveform).all() and np.abs(speech.waveform).max() > 0
