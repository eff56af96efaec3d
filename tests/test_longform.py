"""Long-form speech: splitting (pure, property-tested), seams, and generation piece by piece (tiny model)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from boson_multimodal.engine import (
    GenerationCancelled,
    HiggsAudioEngine,
    SamplingConfig,
    Speech,
    SpeechRequest,
)
from boson_multimodal.longform import crossfade_join, generate_long, split_text, stream_long
from boson_multimodal.prompt import Voice, VoiceDescription
from boson_multimodal.streaming import ChunkSchedule
from boson_multimodal.transcript import SPEAKER_TAG
from tests.support.engine_spy import record_submissions

RATE = 24_000
CROSSFADE = 480  # the default 20 ms at 24 kHz

# --- splitting ------------------------------------------------------------------------------------------

words = st.text(alphabet="abcxyzé019", min_size=1, max_size=14)
punctuation = st.sampled_from([".", "!", "?", "…", "...", ",", ";", ":", "3.14", "1,000", '."', "?)"])
spaces = st.sampled_from([" ", "  ", "\n", " \n\n ", "\t"])
tags = st.integers(min_value=0, max_value=3).map(lambda index: f"[SPEAKER{index}]")
latin_texts = st.lists(st.one_of(words, words, punctuation, spaces, spaces, tags), max_size=60).map("".join)
cjk_texts = st.lists(st.sampled_from([*"你好世界今天天气", *"。！？，、；：", " "]), max_size=80).map("".join)


def attributed_words(text: str) -> list[tuple[int | None, str]]:
    """Each word of the text with the speaker whose turn it is in (None before any tag)."""
    parts = SPEAKER_TAG.split(text)
    attributed = [(None, word) for word in parts[0].split()]
    for index in range(1, len(parts), 2):
        attributed += [(int(parts[index]), word) for word in parts[index + 1].split()]
    return attributed


def body(piece: str) -> str:
    return SPEAKER_TAG.sub("", piece).strip()


@settings(max_examples=300, deadline=None)
@given(text=latin_texts, max_chars=st.integers(min_value=1, max_value=40))
def test_pieces_keep_every_word_and_its_speaker(text: str, max_chars: int) -> None:
    pieces = split_text(text, max_chars)
    # The words, in order, each with the same speaker: nothing lost, nothing cut inside a word.
    assert [pair for piece in pieces for pair in attributed_words(piece)] == attributed_words(text)
    for piece in pieces:
        assert body(piece), "no empty pieces"
        assert re.fullmatch(r"(\[SPEAKER\d\] )?[^\[]+", piece), "a tag only at the start"
        assert len(body(piece)) <= max_chars or len(body(piece).split()) == 1


@settings(max_examples=200, deadline=None)
@given(text=cjk_texts, max_chars=st.integers(min_value=1, max_value=12))
def test_cjk_text_is_cut_after_punctuation(text: str, max_chars: int) -> None:
    pieces = split_text(text, max_chars)
    assert "".join(pieces).replace(" ", "") == text.replace(" ", "")
    end = 0
    for piece in pieces[:-1]:
        end = text.index(piece, end) + len(piece)
        # A cut falls after CJK punctuation or at a space, never between two characters of a word.
        assert piece[-1] in "。！？，、；：" or text[end] == " ", (text, pieces)


def test_sentences_first_then_clauses_then_words() -> None:
    assert split_text("One two. Three, four five six.", 12) == ["One two.", "Three,", "four five", "six."]
    assert split_text("Short. Text.", 100) == ["Short. Text."]
    assert split_text("Pi is 3.14 today, 1,000 times", 12) == ["Pi is 3.14", "today,", "1,000 times"]
    assert split_text("A line\nanother line", 100) == ["A line\nanother line"]
    assert split_text("A line\nanother line", 15) == ["A line", "another line"]
    assert split_text("你好，世界。再见！", 6) == ["你好，世界。", "再见！"]
    assert split_text("antidisestablishment is long", 5) == ["antidisestablishment", "is", "long"]


def test_speaker_turns_start_pieces_and_continuations_repeat_the_tag() -> None:
    text = "Intro. [SPEAKER0] A one. A two. [SPEAKER1] B one.[SPEAKER0] A three. [SPEAKER1]"
    assert split_text(text, 10) == [
        "Intro.",
        "[SPEAKER0] A one.",
        "[SPEAKER0] A two.",
        "[SPEAKER1] B one.",
        "[SPEAKER0] A three.",
    ]
    assert split_text(text, 1000)[1] == "[SPEAKER0] A one. A two."


def test_bad_limits_and_empty_text() -> None:
    with pytest.raises(ValueError, match="max_chars must be at least 1, got 0"):
        split_text("Hello.", 0)
    assert split_text(" \n [SPEAKER0] ", 10) == []


# --- seams ----------------------------------------------------------------------------------------------


def tone(offset: float, seconds: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (offset + 0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_crossfade_removes_the_click_a_plain_join_makes() -> None:
    first, second = tone(+0.5), tone(-0.5)  # the seam would jump by 1.0
    steepest_inside = max(np.abs(np.diff(first)).max(), np.abs(np.diff(second)).max())
    plain = np.concatenate([first, second])
    joined = crossfade_join([first, second], CROSSFADE)
    assert np.abs(np.diff(plain)).max() > 20 * steepest_inside  # the check can see a click...
    assert np.abs(np.diff(joined)).max() < 2 * steepest_inside  # ...and the crossfade has none
    assert len(joined) == len(first) + len(second) - CROSSFADE
    assert np.array_equal(joined[: len(first) - CROSSFADE], first[: len(first) - CROSSFADE])
    assert np.array_equal(joined[len(first) :], second[CROSSFADE:])


def test_crossfade_keeps_loudness_through_the_seam() -> None:
    """No gap: across a seam of two independent signals the level stays that of the signals."""
    noise = np.random.default_rng(0)
    first, second = (noise.normal(0, 0.2, RATE).astype(np.float32) for _ in range(2))
    joined = crossfade_join([first, second], 2400)
    seam = joined[len(first) - 2400 : len(first)]
    assert 0.85 < np.sqrt(np.mean(seam**2)) / 0.2 < 1.15


def test_crossfade_edges() -> None:
    assert crossfade_join([tone(0)], CROSSFADE).shape == (RATE // 2,)
    empty = np.zeros(0, dtype=np.float32)
    with_empty = crossfade_join(
        [empty, tone(0), empty, tone(0)], CROSSFADE
    )  # the model ended a piece at once
    assert np.array_equal(with_empty, crossfade_join([tone(0), tone(0)], CROSSFADE))
    assert len(with_empty) == RATE - CROSSFADE
    short = np.ones(100, dtype=np.float32)  # shorter than the overlap: a shorter seam
    assert len(crossfade_join([tone(0), short], CROSSFADE)) == RATE // 2
    assert crossfade_join([], CROSSFADE).shape == (0,)


# --- generation -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> HiggsAudioEngine:
    return HiggsAudioEngine.load(tiny_checkpoint.model_dir, tiny_checkpoint.codec_dir, device="cpu")


@pytest.fixture
def calls(engine: HiggsAudioEngine, monkeypatch: pytest.MonkeyPatch) -> list[tuple[SpeechRequest, Speech]]:
    """A spy on the real engine: every piece's request and the speech it really got back."""
    recorded: list[tuple[SpeechRequest, Speech]] = []
    generate = engine.generate

    def spy(request: SpeechRequest) -> Speech:
        speech = generate(request)
        recorded.append((request, speech))
        return speech

    monkeypatch.setattr(engine, "generate", spy)
    return recorded


def speak_long(
    engine: HiggsAudioEngine, calls: list, text: str, max_chars: int, **fields
) -> tuple[Speech, list[tuple[int, int]]]:
    """``generate_long`` with the first seed for which no piece came back empty.

    The tiny random model ends about one clip in a hundred at once; an empty piece cannot be a reference,
    which would make the voice assertions below meaningless.
    """
    progress: list[tuple[int, int]] = []
    for seed in range(5):
        calls.clear()
        progress.clear()
        request = SpeechRequest(text, sampling=SamplingConfig(max_new_tokens=20, seed=seed), **fields)
        speech = generate_long(engine, request, max_chars, on_progress=lambda *done: progress.append(done))
        if all(piece.num_frames for _, piece in calls):
            return speech, progress
    raise AssertionError("every seed gave an empty piece")


def test_smart_voice_pieces_reuse_the_first_piece_as_reference(engine: HiggsAudioEngine, calls) -> None:
    speech, progress = speak_long(engine, calls, "First sentence here. Second one now. Third and last.", 21)

    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert [r.text for r, _ in calls] == ["First sentence here.", "Second one now.", "Third and last."]
    first_request, first_speech = calls[0]
    assert first_request.voices == ()
    for later, _ in calls[1:]:
        [anchor] = later.voices
        assert anchor.transcript == "First sentence here." and anchor.sample_rate == RATE
        assert np.array_equal(anchor.waveform, first_speech.waveform)
        assert later.sampling == first_request.sampling  # max_new_tokens is per piece

    pieces = [s for _, s in calls]
    assert speech.num_frames == sum(s.num_frames for s in pieces)
    assert speech.finished == all(s.finished for s in pieces)
    assert len(speech.waveform) == sum(len(s.waveform) for s in pieces) - 2 * CROSSFADE
    assert np.array_equal(speech.waveform, crossfade_join([s.waveform for s in pieces], CROSSFADE))


def test_cloned_voice_is_given_to_every_piece(engine: HiggsAudioEngine, calls) -> None:
    voice = Voice(tone(0, 1.0), RATE, "A reference sentence.")
    speak_long(engine, calls, "One piece. Another piece.", 14, scene="Studio.", voices=(voice,))
    assert [r.text for r, _ in calls] == ["One piece.", "Another piece."]
    assert all(r.voices == (voice,) and r.scene == "Studio." for r, _ in calls)


def test_smart_voice_keeps_one_anchor_per_speaker(engine: HiggsAudioEngine, calls) -> None:
    speak_long(engine, calls, "[SPEAKER0] A one. A two. [SPEAKER1] B one. [SPEAKER0] A three.", 10)
    requests = [r for r, _ in calls]
    # A speaker's first piece is generated from its tag; later ones clone that piece, untagged.
    assert [r.text for r in requests] == ["[SPEAKER0] A one.", "A two.", "[SPEAKER1] B one.", "A three."]
    # Until anchored, a piece keeps the dialogue's default voices, as the whole text would have had them.
    defaults = (VoiceDescription("feminine", default=True), VoiceDescription("masculine", default=True))
    assert [r.voices for r in requests[0::2]] == [defaults, defaults]
    assert [len(r.voices) for r in requests[1::2]] == [1, 1]
    assert requests[1].voices == requests[3].voices
    assert requests[1].voices[0].transcript == "A one."
    assert np.array_equal(requests[1].voices[0].waveform, calls[0][1].waveform)


def test_text_with_nothing_to_say_is_refused(engine: HiggsAudioEngine) -> None:
    with pytest.raises(ValueError, match="nothing to speak"):
        generate_long(engine, SpeechRequest("  \n"), 100)
    with pytest.raises(ValueError, match="max_chars"):
        generate_long(engine, SpeechRequest("Hi."), 0)


def test_a_long_text_streams_piece_by_piece_and_joins_as_generate_long(engine: HiggsAudioEngine) -> None:
    """The first audio leaves before the later pieces are generated, and the chunks, seams crossfaded,
    concatenate to generate_long's clip (a cloned voice: every piece's prompt is the same either way)."""
    voice = Voice(np.sin(np.arange(24_000) / 24_000 * 2 * np.pi * 200).astype(np.float32) * 0.3, RATE, "Hum.")
    text = "First sentence here. Second one now. Third and last."
    request = SpeechRequest(text, voices=(voice,), sampling=SamplingConfig(max_new_tokens=40, seed=5))
    whole = generate_long(engine, request, 21)

    chunks, pieces_done_at = [], []
    stream = stream_long(
        engine, request, 21, on_progress=lambda done, _: pieces_done_at.append(len(chunks)),
        schedule=ChunkSchedule(first_frames=4),
    )  # fmt: skip
    for chunk in stream:
        chunks.append(chunk)
    assert len(pieces_done_at) == 3 and pieces_done_at[0] >= 1  # audio left while pieces remained
    assert pieces_done_at[0] < pieces_done_at[1] < pieces_done_at[2] == len(chunks)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert [c.final for c in chunks] == [False] * (len(chunks) - 1) + [True]
    audio = np.concatenate([c.waveform for c in chunks])
    starts = np.cumsum([0] + [len(c.waveform) for c in chunks[:-1]])
    assert [c.start_sample for c in chunks] == starts.tolist()
    assert audio.shape == whole.waveform.shape  # the same two 20 ms seams
    assert np.abs(audio - whole.waveform).max() < 1e-4 * np.abs(whole.waveform).max()
    assert chunks[-1].end_frame == whole.num_frames and chunks[-1].finished == whole.finished


def test_closing_a_long_stream_cancels_the_piece_being_generated(
    engine: HiggsAudioEngine, monkeypatch
) -> None:
    handles = record_submissions(engine, monkeypatch)
    request = SpeechRequest("One long piece. " * 3, sampling=SamplingConfig(max_new_tokens=3000))
    stream = stream_long(engine, request, 20, schedule=ChunkSchedule(first_frames=2, lookahead_frames=0))
    assert not next(stream).final
    stream.close()
    assert len(handles) == 1  # the later pieces never started
    with pytest.raises(GenerationCancelled):
        handles[0].result(timeout=60)
