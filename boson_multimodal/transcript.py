"""The text the model reads: a transcript normalised the way Higgs Audio's own generation script does it.

Why: the checkpoint was trained on text in one shape, and users learn the model from the upstream script
(boson-ai/higgs-audio ``examples/generation.py``), which normalises every transcript before the model sees
it. Text that skips these steps is read differently: ``[laugh]`` would be spoken as a word instead of
being the model's sound-event markup, a full-width comma is a rare token, a missing final period lets the
model trail off. So every transcript goes through :func:`normalize_transcript` once, before it is cut
into pieces.

The steps, in the script's order:

1. full-width (CJK) punctuation becomes its ASCII counterpart (``，`` → ``", "``, ``。`` → ``"."`` …);
2. parentheses become spaces (the words inside are kept);
3. ``°F`` and ``°C`` are spelled out (``" degrees Fahrenheit"``, ``" degrees Celsius"``);
4. sound-event tags become the model's markup (:data:`SOUND_EVENTS`);
5. whitespace is collapsed within each line and blank lines are removed;
6. a final ``"."`` is added unless the text already ends in punctuation, a quote, or a sound event.
"""

from __future__ import annotations

import re

# Full-width punctuation → ASCII. The comma gains a space: CJK text has none after its commas.
FULL_WIDTH_PUNCTUATION: dict[str, str] = {
    "，": ", ",
    "。": ".",
    "：": ":",
    "；": ";",
    "？": "?",
    "！": "!",
    "（": "(",
    "）": ")",
    "【": "[",
    "】": "]",
    "《": "<",
    "》": ">",
    "“": '"',
    "”": '"',
    "‘": "'",
    "’": "'",
    "、": ",",
    "—": "-",
    "…": "...",
    "·": ".",
    "「": '"',
    "」": '"',
    "『": '"',
    "』": '"',
}

UNITS: dict[str, str] = {"°F": " degrees Fahrenheit", "°C": " degrees Celsius"}

# What a user writes → the model's sound-event markup. ``<SE>`` is a one-off event; ``<SE_s>``/``<SE_e>``
# open and close an event that lasts while the words between them are spoken (music under speech).
# "[music start]" must be replaced before "[music]" could match inside it: the table is applied in order.
SOUND_EVENTS: dict[str, str] = {
    "[laugh]": "<SE>[Laughter]</SE>",
    "[humming start]": "<SE_s>[Humming]</SE_s>",
    "[humming end]": "<SE_e>[Humming]</SE_e>",
    "[music start]": "<SE_s>[Music]</SE_s>",
    "[music end]": "<SE_e>[Music]</SE_e>",
    "[music]": "<SE>[Music]</SE>",
    "[sing start]": "<SE_s>[Singing]</SE_s>",
    "[sing end]": "<SE_e>[Singing]</SE_e>",
    "[applause]": "<SE>[Applause]</SE>",
    "[cheering]": "<SE>[Cheering]</SE>",
    "[cough]": "<SE>[Cough]</SE>",
}

# A transcript ending in one of these needs no final period.
FINAL_ENDINGS = (".", "!", "?", ",", ";", '"', "'", "</SE_e>", "</SE>")

SPEAKER_TAG = re.compile(r"\[SPEAKER(\d+)\]")


def normalize_transcript(text: str) -> str:
    """The transcript as the model should read it (the module docstring lists the steps)."""
    for full_width, ascii_mark in FULL_WIDTH_PUNCTUATION.items():
        text = text.replace(full_width, ascii_mark)
    text = text.replace("(", " ").replace(")", " ")
    for unit, words in UNITS.items():
        text = text.replace(unit, words)
    for tag, markup in SOUND_EVENTS.items():
        text = text.replace(tag, markup)
    text = "\n".join(" ".join(line.split()) for line in text.split("\n") if line.strip())
    if text and not text.endswith(FINAL_ENDINGS):
        text += "."
    return text


def speakers_in(text: str) -> list[int]:
    """Speaker indices tagged in the text, sorted (``[SPEAKER1] hi [SPEAKER0] yo`` → ``[0, 1]``)."""
    return sorted({int(index) for index in SPEAKER_TAG.findall(text)})
