"""The job schema: strict types, limits from settings, OpenAI-shaped aliases, errors that name fields."""

from __future__ import annotations

import pytest

from higgs_worker.errors import RequestError
from higgs_worker.job.schema import RequestLimits, parse_request
from tests.support.error_clauses import offending_fields

LIMITS = RequestLimits(max_transcript_chars=100, max_new_tokens=2048)


def error_of(raw: object) -> str:
    with pytest.raises(RequestError) as caught:
        parse_request(raw, LIMITS)
    return str(caught.value)


def test_defaults() -> None:
    request = parse_request({"transcript": "Hello."}, LIMITS)
    assert request.output_format == "wav"
    assert request.temperature == 0.7 and request.top_p == 0.95 and request.top_k == 50
    assert request.references == [] and request.seed is None and request.speed == 1.0


def test_every_problem_is_reported_with_its_field() -> None:
    message = error_of({"temperature": "hot", "top_p": 0, "colour": "red"})
    assert offending_fields(message) == {"transcript", "temperature", "top_p", "colour"}
    assert "transcript: required" in message.split("; ")
    assert "colour: unknown field" in message and "allowed fields are" in message


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"transcript": "hi", "seed": True}, "seed"),
        ({"transcript": "hi", "max_new_tokens": 12.0}, "max_new_tokens"),
        ({"transcript": "hi", "temperature": float("nan")}, "temperature"),
        ({"transcript": "hi", "sample_rate": 96000}, "sample_rate"),
        ({"transcript": "hi", "sample_rate": 22050, "output_format": "opus"}, "sample_rate"),
        ({"transcript": "   "}, "transcript"),
        ({"transcript": "x" * 101}, "transcript"),
        ({"transcript": "hi", "max_new_tokens": 4096}, "max_new_tokens"),
        ({"transcript": "hi", "output_format": "aac"}, "output_format"),
        ({"transcript": "hi", "ref_audio": ["a", "b"], "ref_text": "one"}, "ref_text"),
        ({"transcript": "hi", "ref_audio": ["a", "b"], "ref_text": ["one"]}, "ref_text"),
        ({"transcript": "[SPEAKER2] hi", "ref_audio": ["a", "b"]}, "transcript"),
        ({"transcript": "hi", "speed": 9}, "speed"),
        ({"transcript": {"nested": ["garbage"]}}, "transcript"),
    ],
)
def test_invalid_field_is_named(raw: dict, field: str) -> None:
    assert offending_fields(error_of(raw)) == {field}, error_of(raw)


def test_non_object_input() -> None:
    assert error_of("hello").startswith("input:")
    assert error_of(None).startswith("input:")


def test_limits_name_their_bound() -> None:
    assert "at most 100 characters" in error_of({"transcript": "x" * 101})
    assert "between 16 and 2048" in error_of({"transcript": "hi", "max_new_tokens": 5000})


def test_openai_speech_body_works_unchanged() -> None:
    request = parse_request(
        {"model": "tts-1", "input": "Hello!", "voice": "en_woman", "response_format": "mp3", "speed": 1.25},
        LIMITS,
    )
    assert request.transcript == "Hello!"
    assert request.references == ["en_woman"]
    assert request.output_format == "mp3"
    assert request.speed == 1.25


def test_alias_conflict_names_both_fields() -> None:
    message = error_of({"input": "one", "transcript": "two"})
    assert message.startswith("input and transcript: ")
    assert offending_fields(message) == {"input", "transcript"}
    assert parse_request({"input": "same", "transcript": "same"}, LIMITS).transcript == "same"


def test_unsupported_openai_format_lists_allowed() -> None:
    message = error_of({"input": "hi", "response_format": "aac"})
    assert message.startswith("response_format:") and "wav" in message and "opus" in message


def test_an_openai_client_reads_its_own_field_names_inside_a_message_too() -> None:
    limits = RequestLimits(1000, 4096)
    with pytest.raises(RequestError) as raised:
        parse_request(
            {"input": "x", "response_format": "opus", "sample_rate": 44100}, limits, openai_names=True
        )
    assert str(raised.value).startswith("sample_rate: 44100 is not supported by response_format 'opus'")
    with pytest.raises(RequestError) as raised:
        parse_request({"input": "x", "voice": ["a", "b"], "ref_text": ["t"]}, limits, openai_names=True)
    assert str(raised.value) == "ref_text: a list must have one entry per voice entry (2)"
    with pytest.raises(RequestError) as raised:  # this worker's own names stay its own
        parse_request({"transcript": "x", "output_format": "opus", "sample_rate": 44100}, limits)
    assert "not supported by output_format 'opus'" in str(raised.value)
