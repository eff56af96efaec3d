"""Transcript normalisation: each step of the upstream generation script, shown by an input that needs it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from boson_multimodal.transcript import SOUND_EVENTS, normalize_transcript, speakers_in


@pytest.mark.parametrize(
    ("tag", "markup"),
    [
        ("[laugh]", "<SE>[Laughter]</SE>"),
        ("[music]", "<SE>[Music]</SE>"),
        ("[music start]", "<SE_s>[Music]</SE_s>"),
        ("[music end]", "<SE_e>[Music]</SE_e>"),
        ("[humming start]", "<SE_s>[Humming]</SE_s>"),
        ("[humming end]", "<SE_e>[Humming]</SE_e>"),
        ("[sing start]", "<SE_s>[Singing]</SE_s>"),
        ("[sing end]", "<SE_e>[Singing]</SE_e>"),
        ("[applause]", "<SE>[Applause]</SE>"),
        ("[cheering]", "<SE>[Cheering]</SE>"),
        ("[cough]", "<SE>[Cough]</SE>"),
    ],
)
def test_sound_event_tags_become_the_model_markup(tag: str, markup: str) -> None:
    assert normalize_transcript(f"Well {tag} that was fun!") == f"Well {markup} that was fun!"


def test_every_sound_event_is_covered_and_music_start_is_not_read_as_music() -> None:
    assert len(SOUND_EVENTS) == 11
    music = normalize_transcript("[music start] Hi. [music end]")
    assert music == "<SE_s>[Music]</SE_s> Hi. <SE_e>[Music]</SE_e>"


def test_full_width_punctuation_becomes_ascii() -> None:
    assert normalize_transcript("你好，世界。他说：“好！”") == '你好, 世界.他说:"好!"'
    assert normalize_transcript("「引用」、《书》…") == '"引用",<书>...'


def test_parentheses_are_dropped_and_their_words_kept() -> None:
    assert normalize_transcript("The model (a big one) works.") == "The model a big one works."
    assert normalize_transcript("全角（括号）也是。") == "全角 括号 也是."


def test_temperatures_are_spelled_out() -> None:
    assert normalize_transcript("It is 70°F or 21°C outside.") == (
        "It is 70 degrees Fahrenheit or 21 degrees Celsius outside."
    )


def test_whitespace_collapses_per_line_and_blank_lines_go() -> None:
    text = "  First   line\t here. \n\n\n   Second\u00a0 line.  \n  \n"
    assert normalize_transcript(text) == "First line here.\nSecond line."


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("No ending", "No ending."),
        ("Question?", "Question?"),
        ("Wow!", "Wow!"),
        ("A list,", "A list,"),
        ("Clause;", "Clause;"),
        ('He said "yes"', 'He said "yes"'),
        ("It's 'fine'", "It's 'fine'"),
        ("Ends in a laugh [laugh]", "Ends in a laugh <SE>[Laughter]</SE>"),
        ("[music start] la la [music end]", "<SE_s>[Music]</SE_s> la la <SE_e>[Music]</SE_e>"),
        ("Ends with a colon:", "Ends with a colon:."),
        ("中文结尾", "中文结尾."),
        ("中文句号。", "中文句号."),
    ],
)
def test_final_period_unless_punctuation_or_sound_event(text: str, expected: str) -> None:
    assert normalize_transcript(text) == expected


def test_speaker_tags_are_kept_and_found() -> None:
    text = "[SPEAKER1] Hi (there)\n\n[SPEAKER0] Hello"
    assert normalize_transcript(text) == "[SPEAKER1] Hi there\n[SPEAKER0] Hello."
    assert speakers_in(text) == [0, 1]


@given(st.text(alphabet=st.sampled_from(list("ab ,.!?()\n\t，。（）°FC[]laugh")), max_size=60))
def test_normalising_twice_changes_nothing(text: str) -> None:
    once = normalize_transcript(text)
    assert normalize_transcript(once) == once
    assert "\n\n" not in once and "(" not in once and ")" not in once
