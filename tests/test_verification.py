"""Verification: WER/CER against the normalised transcript, and regeneration driven by a recogniser whose
answers the test writes (a real class with the recogniser's interface, served by the pipeline's models)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from higgs_worker.errors import NotVerified
from higgs_worker.job.schema import RequestError
from higgs_worker.pipeline import Pipeline
from higgs_worker.quality.verification import (
    DEFAULT_MAX_ATTEMPTS,
    attempt_seed,
    error_rate,
    language_of,
)
from higgs_worker.settings import load_settings
from tests.support.checkpoints import complete_store
from tests.support.hub_server import HubServer
from tests.support.quality_models import place

TEXT = "The garden gate was open."
LONG = "The first piece is about the garden. The second piece is about the gate. The third one closes it."


class ScriptedRecogniser:
    """Hears what the test says it hears, in order; records each call's clip length and language."""

    def __init__(self) -> None:
        self.answers: list[str] = []
        self.calls: list[tuple[int, str | None]] = []

    def script(self, *answers: str) -> ScriptedRecogniser:
        self.answers, self.calls = list(answers), []
        return self

    def transcribe(self, waveform: np.ndarray, sample_rate: int, language: str | None) -> str:
        assert sample_rate == 24_000 and len(waveform) > 0
        self.calls.append((len(waveform), language))
        return self.answers.pop(0)


@pytest.fixture(scope="module")
def recogniser() -> ScriptedRecogniser:
    return ScriptedRecogniser()


@pytest.fixture(scope="module")
def pipeline(
    hub: HubServer, recogniser: ScriptedRecogniser, tmp_path_factory: pytest.TempPathFactory
) -> Pipeline:
    volume = tmp_path_factory.mktemp("verification") / "volume"
    env = {"RUNPOD_VOLUME_PATH": str(volume), "RESULT_CACHE": "false", "LONGFORM_CHUNK_CHARS": "50"}
    settings = load_settings(env)
    complete_store(settings, hub.url)
    built = Pipeline(settings)
    built.quality.models.use_recogniser(recogniser)
    return built


def audio_of(output: dict) -> np.ndarray:
    return sf.read(io.BytesIO(base64.b64decode(output["audio_base64"])), dtype="float32")[0]


def job(**fields: object) -> dict:
    return {"transcript": TEXT, "max_new_tokens": 40, "seed": 21, "verify": True} | fields


def test_error_rates_use_whispers_normalisers() -> None:
    assert error_rate("Mr. Smith has twenty-five cats!", "mister smith has 25 cats", "en") == 0.0
    assert error_rate("The gate was open.", "the gate open", "en") == pytest.approx(1 / 4)
    assert error_rate("The gate was open.", "", "en") == 1.0
    assert error_rate("你好，世界。", "你好世界", "zh") == 0.0  # characters, punctuation aside
    assert error_rate("今日は良い天気です", "今日は天気です", "ja") == pytest.approx(2 / 9)
    assert [language_of(t) for t in ("Hello.", "你好", "こんにちは", "Grüß Gott")] == ["en", "zh", "ja", None]


def test_attempt_seeds_are_derived_and_distinct() -> None:
    seeds = [attempt_seed(7, attempt) for attempt in range(8)]
    assert seeds[0] == 7 and len(set(seeds)) == 8 and all(0 <= s < 2**32 for s in seeds if s is not None)
    assert attempt_seed(None, 3) is None


def test_a_clip_that_passes_first_is_generated_once(
    pipeline: Pipeline, recogniser: ScriptedRecogniser
) -> None:
    recogniser.script("the garden gate was open")
    output = pipeline.run("pass-first", job())
    assert output["verification"] | {"recognised": None} == {
        "wer": 0.0, "attempts": 1, "passed": True, "recognised": None, "max_wer": 0.2, "metric": "wer",
    }  # fmt: skip
    assert output["verification"]["recognised"] == "the garden gate was open"
    assert recogniser.calls[0][1] == "en"
    assert "verify" in output["timings_ms"]


def test_a_clip_that_passes_later_is_the_derived_seeds_clip(
    pipeline: Pipeline, recogniser: ScriptedRecogniser
) -> None:
    recogniser.script("the garden", "the garden gate", "the garden gate was open")
    output = pipeline.run("pass-third", job())
    assert output["verification"]["attempts"] == 3 and output["verification"]["passed"] is True
    # deterministic: the clip is exactly what the third attempt's seed makes without verification
    plain = pipeline.run("plain", job(verify=False, seed=attempt_seed(21, 2)))
    assert np.array_equal(audio_of(output), audio_of(plain))


def test_a_clip_that_never_passes_returns_the_best_attempt(
    pipeline: Pipeline, recogniser: ScriptedRecogniser
) -> None:
    recogniser.script("nothing like it", "the garden gate", "garden")  # the second is the closest
    output = pipeline.run("never", job())
    verification = output["verification"]
    assert verification["passed"] is False and verification["attempts"] == DEFAULT_MAX_ATTEMPTS
    assert verification["wer"] == pytest.approx(0.4) and verification["recognised"] == "the garden gate"
    best = pipeline.run("best", job(verify=False, seed=attempt_seed(21, 1)))
    assert np.array_equal(audio_of(output), audio_of(best))


def test_max_wer_and_max_attempts_are_the_requests(
    pipeline: Pipeline, recogniser: ScriptedRecogniser
) -> None:
    recogniser.script(*["the garden gate"] * 5)
    output = pipeline.run("five", job(max_attempts=5, max_wer=0.1))
    assert output["verification"]["attempts"] == 5 and output["verification"]["max_wer"] == 0.1
    recogniser.script("the garden gate")
    assert pipeline.run("lenient", job(max_wer=0.5))["verification"]["passed"] is True


def test_require_verified_fails_the_job_clearly(pipeline: Pipeline, recogniser: ScriptedRecogniser) -> None:
    recogniser.script("no", "no", "no")
    with pytest.raises(NotVerified, match=r"require_verified: the clip did not say its text in 3 attempts"):
        pipeline.run("required", job(require_verified=True))
    recogniser.script("the garden gate was open")
    assert pipeline.run("required-ok", job(require_verified=True))["verification"]["passed"] is True


def test_a_greedy_request_is_checked_once(pipeline: Pipeline, recogniser: ScriptedRecogniser) -> None:
    recogniser.script("no")
    output = pipeline.run("greedy", job(temperature=0.0, seed=None))
    assert output["verification"]["attempts"] == 1 and output["verification"]["passed"] is False


def test_long_texts_are_checked_piece_by_piece_and_only_failing_pieces_redone(
    pipeline: Pipeline, recogniser: ScriptedRecogniser
) -> None:
    request = pipeline.validate(job(transcript=LONG))
    pieces = pipeline.plan("long", request).chunking
    assert pieces is not None
    recogniser.script(
        "the first piece is about the garden",
        "something else",  # the second piece fails once...
        "the second piece is about the gate",  # ...and passes on its second attempt
        "the third one closes it",
    )
    output = pipeline.run("long", job(transcript=LONG))
    verification = output["verification"]
    assert [p["attempts"] for p in verification["pieces"]] == [1, 2, 1]
    assert verification["attempts"] == 4 and verification["passed"] is True and verification["wer"] == 0.0
    assert verification["recognised"].startswith("the first piece")
    assert not recogniser.answers


def test_a_stream_is_verified_before_its_first_chunk(
    pipeline: Pipeline, recogniser: ScriptedRecogniser
) -> None:
    recogniser.script("wrong", "the garden gate was open")
    items = list(pipeline.stream("stream", job()))
    assert items[-1]["summary"]["verification"]["attempts"] == 2
    streamed = np.concatenate([audio_of(i) for i in items if "audio_base64" in i])
    recogniser.script("wrong", "the garden gate was open")
    assert np.array_equal(streamed, audio_of(pipeline.run("whole", job())))


def test_a_piece_without_words_is_not_checked(pipeline: Pipeline, recogniser: ScriptedRecogniser) -> None:
    recogniser.script()  # nothing to hear: a transcription would fail the test
    output = pipeline.run("laugh", job(transcript="[laugh]"))
    assert output["verification"] | {"recognised": ""} == {
        "wer": 0.0, "attempts": 1, "passed": True, "recognised": "", "max_wer": 0.2, "metric": "wer",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "clause"),
    [
        ({"max_attempts": 9}, "max_attempts: Input should be less than or equal to 8"),
        ({"max_attempts": 0}, "max_attempts: Input should be greater than or equal to 1"),
        ({"max_wer": 1.5}, "max_wer: Input should be less than or equal to 1"),
        ({"verify": "yes"}, "verify: Input should be a valid boolean"),
        ({"verify": False, "max_wer": 0.3}, "max_wer: only used with verify: true"),
        ({"verify": False, "require_verified": True}, "require_verified: only used with verify: true"),
    ],
)
def test_bad_verification_fields_are_named(pipeline: Pipeline, fields: dict, clause: str) -> None:
    with pytest.raises(RequestError, match=clause):
        pipeline.validate(job(**fields))


def test_the_tiny_whisper_recogniser_runs_the_real_path(
    hub: HubServer, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from higgs_worker.quality.tiny_models import build_tiny_recogniser

    settings = load_settings({"RUNPOD_VOLUME_PATH": str(tmp_path / "volume"), "DEMO_MODEL": "true"})
    complete_store(settings, hub.url)
    place(build_tiny_recogniser(tmp_path_factory.mktemp("whisper") / "whisper"), settings, "recogniser")
    output = Pipeline(settings).run("whisper", job(max_attempts=2))
    verification = output["verification"]
    assert 1 <= verification["attempts"] <= 2 and isinstance(verification["recognised"], str)
    assert verification["passed"] == (verification["wer"] <= 0.2)


def test_the_result_cache_keeps_the_verified_clip_and_its_report(
    hub: HubServer, recogniser: ScriptedRecogniser, tmp_path: Path
) -> None:
    settings = load_settings({"RUNPOD_VOLUME_PATH": str(tmp_path / "volume")})
    complete_store(settings, hub.url)
    cached = Pipeline(settings)
    cached.quality.models.use_recogniser(recogniser)
    recogniser.script("wrong", "the garden gate was open")
    first = cached.run("first", job())
    hit = cached.run("hit", job())  # the script is used up: a transcription now would fail the test
    assert hit["cache_hit"] and not first["cache_hit"]
    assert hit["verification"] == first["verification"] and hit["verification"]["attempts"] == 2
    assert np.array_equal(audio_of(hit), audio_of(first))
    recogniser.script("the garden gate was open")
    assert not cached.run("other", job(max_wer=0.3))["cache_hit"]  # other verification, other result


def test_a_long_stream_checks_each_piece_before_sending_it(
    pipeline: Pipeline, recogniser: ScriptedRecogniser
) -> None:
    recogniser.script(
        "the first piece is about the garden",
        "something else",
        "the second piece is about the gate",
        "the third one closes it",
    )
    stream = pipeline.stream("long-stream", job(transcript=LONG))
    first = next(stream)
    assert len(recogniser.calls) == 1  # the first piece left once it passed, before the second was made
    items = [first, *stream]
    verification = items[-1]["summary"]["verification"]
    assert [p["attempts"] for p in verification["pieces"]] == [1, 2, 1] and verification["passed"]


def test_a_long_stream_stops_at_a_piece_that_never_passes_when_required(
    pipeline: Pipeline, recogniser: ScriptedRecogniser
) -> None:
    recogniser.script("the first piece is about the garden", "no", "no", "no")
    received = []
    with pytest.raises(NotVerified, match="require_verified"):
        for item in pipeline.stream("required-stream", job(transcript=LONG, require_verified=True)):
            received.append(item)
    assert received and not any(item["final"] for item in received)  # the first piece was sent, no more
    assert not recogniser.answers
