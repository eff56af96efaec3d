"""Word timestamps and captions: the transcript's words, forced-aligned, on espeak speech and through the
pipeline; SRT and VTT parsed back with real parsers (``srt``, ``webvtt-py``)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import soundfile as sf
import srt
import webvtt

from higgs_worker.job.schema import RequestError
from higgs_worker.pipeline import Pipeline
from higgs_worker.quality.alignment import CTCAligner, WordTime
from higgs_worker.quality.captions import MAX_LINE_CHARS, MAX_LINES, render
from higgs_worker.quality.stream_alignment import StreamAligner
from higgs_worker.quality.words import transcript_words
from higgs_worker.settings import load_settings
from tests.support.checkpoints import complete_store
from tests.support.hub_server import HubServer
from tests.support.quality_models import place
from tests.support.speech import speak

if TYPE_CHECKING:
    from tests.support.s3_server import S3Server

pytest_plugins = ["tests.support.s3_server"]

SENTENCE = "Captions help everyone follow along. The quick brown fox jumps over the lazy dog, twice!"
DIALOGUE = "[SPEAKER0] Did you hear that? [laugh] It was loud. [SPEAKER1] I heard it - twenty-five times."


@pytest.fixture(scope="module")
def spoken(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, int]:
    audio, rate = sf.read(speak(SENTENCE, tmp_path_factory.mktemp("ts") / "s.wav"), dtype="float32")
    return audio, rate


@pytest.fixture(scope="module")
def aligner(tiny_aligner: Path) -> CTCAligner:
    return CTCAligner.load(tiny_aligner, "cpu")


def check_times(times: list[dict] | list[WordTime], duration: float) -> None:
    starts = [t["start_s"] if isinstance(t, dict) else t.start_s for t in times]
    ends = [t["end_s"] if isinstance(t, dict) else t.end_s for t in times]
    assert all(0 <= s <= e <= duration + 1e-3 for s, e in zip(starts, ends, strict=True))
    assert starts == sorted(starts) and ends == sorted(ends)
    assert all(e <= s + 1e-9 for e, s in zip(ends, starts[1:], strict=False))  # words do not overlap


def test_the_words_are_the_normalised_transcripts_without_tags() -> None:
    words = transcript_words(DIALOGUE)
    assert [w.text for w in words] == [
        "Did", "you", "hear", "that?", "It", "was", "loud.", "I", "heard", "it-", "twenty-five", "times.",
    ]  # fmt: skip
    assert [w.speaker for w in words] == [0] * 7 + [1] * 5
    assert [w.text for w in transcript_words("Hello (again) [cough], 25°C")] == [
        "Hello", "again,", "25", "degrees", "Celsius.",
    ]  # fmt: skip


def test_one_time_per_transcript_word_monotonic_inside_the_clip(
    aligner: CTCAligner, spoken: tuple[np.ndarray, int]
) -> None:
    audio, rate = spoken
    words = transcript_words(SENTENCE)
    times = aligner.align(audio, rate, words)
    assert [t.word for t in times] == [w.text for w in words]
    check_times(times, len(audio) / rate)
    assert times[-1].end_s > 0.5 * len(audio) / rate  # the words spread over the clip


def test_a_clip_too_short_for_its_text_gets_proportional_times(aligner: CTCAligner) -> None:
    words = transcript_words(SENTENCE)
    times = aligner.align(np.zeros(3_000, np.float32), 24_000, words)  # 0.125 s: 6 frames for 70 letters
    assert len(times) == len(words)
    check_times(times, 0.125)
    assert times[-1].end_s == pytest.approx(0.125, abs=1e-3)


def test_a_long_clip_is_aligned_in_parts_with_the_same_words(
    aligner: CTCAligner, spoken: tuple[np.ndarray, int]
) -> None:
    audio, rate = spoken
    long = np.concatenate([audio] * 3)
    words = transcript_words(" ".join([SENTENCE] * 3))
    whole = aligner.align(long, rate, words)
    aligner.max_cells = 20_000  # smaller than one pass needs: the clip is cut, and cut again
    parts = aligner.align(long, rate, words)
    assert [t.word for t in parts] == [t.word for t in whole]
    check_times(parts, len(long) / rate)


def test_words_without_letters_the_model_knows_share_the_gap(aligner: CTCAligner) -> None:
    audio = np.random.default_rng(1).standard_normal(48_000).astype(np.float32) * 0.1
    times = aligner.align(audio, 24_000, transcript_words("one 25 2026 three"))
    assert times[1].start_s == times[0].end_s and times[2].end_s == times[3].start_s
    assert times[1].end_s == times[2].start_s
    check_times(times, 2.0)


def dialogue_times() -> list[WordTime]:
    words = transcript_words(DIALOGUE + " " + " ".join(["and then it went on and on"] * 4) + ".")
    return [
        WordTime(w.text, round(0.3 * i, 3), round(0.3 * i + 0.25, 3), w.speaker) for i, w in enumerate(words)
    ]


def test_srt_parses_back_to_the_words_in_short_cues_per_speaker_turn() -> None:
    times = dialogue_times()
    cues = list(srt.parse(render(times, "srt")))
    assert " ".join(c.content.replace("\n", " ") for c in cues) == " ".join(t.word for t in times)
    for cue in cues:
        lines = cue.content.split("\n")
        assert len(lines) <= MAX_LINES and all(len(line) <= MAX_LINE_CHARS for line in lines)
        assert len(cue.content.split()) <= 12
    starts = [c.start.total_seconds() for c in cues]
    assert starts == sorted(starts) and starts[0] == times[0].start_s
    assert cues[-1].end.total_seconds() == pytest.approx(times[-1].end_s)
    # no cue spans two speakers: the first turn's words end a cue
    first_turn = sum(1 for t in times if t.speaker == 0)
    boundaries = np.cumsum([len(c.content.split()) for c in cues])
    assert first_turn in boundaries


def test_vtt_parses_back_with_voice_tags_for_each_turn() -> None:
    times = dialogue_times()
    captions = webvtt.from_string(render(times, "vtt"))
    assert " ".join(c.text.replace("\n", " ") for c in captions) == " ".join(t.word for t in times)
    voices = [c.voice for c in captions]
    assert voices[0] == "SPEAKER0" and voices[-1] == "SPEAKER1"
    assert voices == sorted(voices)  # one change of speaker, so one switch
    assert captions[0].start_in_seconds == pytest.approx(times[0].start_s, abs=1e-3)


# -- through the pipeline, with the tiny models -----------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(hub: HubServer, tiny_aligner: Path, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    volume = tmp_path_factory.mktemp("timestamps") / "volume"
    env = {"RUNPOD_VOLUME_PATH": str(volume), "DEMO_MODEL": "true", "LONGFORM_CHUNK_CHARS": "60"}
    settings = load_settings(env)
    complete_store(settings, hub.url)
    place(tiny_aligner, settings, "aligner")
    return Pipeline(settings)


def duration(output: dict) -> float:
    audio, rate = sf.read(io.BytesIO(base64.b64decode(output["audio_base64"])), dtype="float32")
    assert len(audio) / rate == pytest.approx(output["duration_s"], abs=1e-3)
    return len(audio) / rate


@pytest.mark.parametrize(
    "text", ["Captions help everyone.", DIALOGUE], ids=["one-shot", "dialogue-long-form"]
)
def test_a_job_returns_its_words_and_captions(pipeline: Pipeline, text: str) -> None:
    job = {"transcript": text, "max_new_tokens": 80, "seed": 1, "timestamps": "word", "captions": "vtt"}
    output = pipeline.run("words", job)
    long = pipeline.plan("words", pipeline.validate(job)).chunking is not None
    assert long == (text == DIALOGUE)  # pieces joined by crossfades
    assert [w["word"] for w in output["words"]] == [w.text for w in transcript_words(text)]
    check_times(output["words"], duration(output))
    assert output["captions_format"] == "vtt"
    parsed = webvtt.from_string(output["captions"])
    assert " ".join(c.text.replace("\n", " ") for c in parsed) == " ".join(w["word"] for w in output["words"])
    assert "align" in output["timings_ms"]


def test_words_follow_speed_and_trimming(pipeline: Pipeline) -> None:
    job = {"transcript": SENTENCE, "max_new_tokens": 80, "seed": 1, "timestamps": "word"}
    output = pipeline.run("fast", job | {"speed": 2.0, "trim_silence": True})
    check_times(output["words"], duration(output))


def test_a_cache_hit_returns_the_same_words(pipeline: Pipeline) -> None:
    job = {
        "transcript": "Cached words.",
        "max_new_tokens": 40,
        "seed": 11,
        "timestamps": "word",
        "captions": "srt",
    }
    first = pipeline.run("first", job)
    again = pipeline.run("again", job)
    assert again["cache_hit"] and again["words"] == first["words"] and again["captions"] == first["captions"]


def test_each_stream_chunk_carries_the_words_its_audio_said(pipeline: Pipeline) -> None:
    job = {"transcript": SENTENCE, "max_new_tokens": 150, "seed": 2, "timestamps": "word", "captions": "srt"}
    items = list(pipeline.stream("stream", job))
    said, sent = [], 0.0
    for item in items:
        sent += item.get("duration_s", 0.0)
        assert all(w["end_s"] <= sent + 1e-3 for w in item["words"])  # only words already heard
        said += item["words"]
    assert [w["word"] for w in said] == [w.text for w in transcript_words(SENTENCE)]
    assert any(item["words"] for item in items[:-1])  # words leave before the end
    check_times(said, sent)
    summary = items[-1]["summary"]
    assert summary["words"] == said
    assert " ".join(c.content.replace("\n", " ") for c in srt.parse(summary["captions"])) == " ".join(
        w["word"] for w in said
    )


@pytest.mark.parametrize("size", [2_205, 11_025, 44_100])
def test_stream_alignment_sends_each_word_once_in_order(
    aligner: CTCAligner, spoken: tuple[np.ndarray, int], size: int
) -> None:
    audio, rate = spoken
    words = transcript_words(SENTENCE)
    stream = StreamAligner(aligner, words, rate)
    said: list[WordTime] = []
    for start in range(0, len(audio), size):
        new = stream.feed(audio[start : start + size])
        assert all(t.end_s <= (start + size) / rate for t in new)
        said += new
    said += stream.close()
    assert [t.word for t in said] == [w.text for w in words]
    check_times(said, len(audio) / rate)


@pytest.mark.parametrize(
    ("field", "value", "clause"),
    [
        ("timestamps", "segment", "timestamps: must be one of none or word"),
        ("timestamps", True, "timestamps: must be one of none or word"),
        ("captions", "ass", "captions: must be one of srt or vtt"),
    ],
)
def test_bad_values_are_named(pipeline: Pipeline, field: str, value: object, clause: str) -> None:
    with pytest.raises(RequestError, match=clause):
        pipeline.validate({"transcript": "x", field: value})


def test_with_s3_the_captions_go_beside_the_audio(
    pipeline: Pipeline, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in s3_server.env().items():  # boto3 reads them when the job builds its client
        monkeypatch.setenv(name, value)
    s3_server.create_bucket("captions-beside")
    job = {
        "transcript": "Into the bucket.",
        "max_new_tokens": 30,
        "captions": "vtt",
        "s3_bucket": "captions-beside",
    }
    output = pipeline.run("s3-captions", job | {"s3_key": "clips/one.wav"})
    assert output["s3"]["key"] == "clips/one.wav"
    where = output["captions_s3"]
    assert where["key"] == "clips/one.wav.vtt" and where["uri"] == "s3://captions-beside/clips/one.wav.vtt"
    stored = s3_server.client().get_object(Bucket="captions-beside", Key=where["key"])
    assert stored["ContentType"] == "text/vtt; charset=utf-8"
    assert stored["Body"].read().decode() == output["captions"]
    assert len(webvtt.from_string(output["captions"])) >= 1


def test_chinese_and_japanese_words_are_characters_written_back_without_spaces(aligner: CTCAligner) -> None:
    words = transcript_words("你好，世界。 The end. こんにちは")
    assert [w.text for w in words] == ["你", "好,", "世", "界.", "The", "end.", "こ", "ん", "に", "ち", "は."]
    # an English aligner knows none of these characters: they share the clip evenly, in order
    times = aligner.align(np.zeros(48_000, np.float32), 24_000, words)
    check_times(times, 2.0)
    captions = webvtt.from_string(render(times, "vtt"))
    assert (
        "".join(c.text.replace("\n", "") for c in captions).replace(" ", "") == "你好,世界.Theend.こんにちは."
    )
    long = [WordTime(ch, i * 0.2, i * 0.2 + 0.1, None) for i, ch in enumerate("天气很好" * 10)]
    lines = [line for c in webvtt.from_string(render(long, "vtt")) for line in c.text.split("\n")]
    assert all(len(line) <= MAX_LINE_CHARS // 2 for line in lines)  # two columns a character


def test_the_aligner_is_downloaded_to_the_volume_once_then_read_from_it(
    tiny_aligner: Path, tmp_path: Path
) -> None:
    from higgs_worker.quality.models import QualityModels

    settings = load_settings({"RUNPOD_VOLUME_PATH": str(tmp_path / "volume")})
    with HubServer({settings.aligner_repo: tiny_aligner}) as aligner_hub:
        first = QualityModels(settings, endpoint=aligner_hub.url)
        first.aligner()
        assert first.stored["aligner"].source == "download"
        assert first.stored["aligner"].commit == aligner_hub.commit(settings.aligner_repo)
        assert settings.aligner_path.is_dir()
        aligner_hub.reset_counts()
        again = QualityModels(settings, endpoint=aligner_hub.url)  # another worker on the same volume
        again.aligner()
        assert again.stored["aligner"].source == "store" and aligner_hub.requests == []
        assert again.describe("aligner")["commit"] == first.stored["aligner"].commit
