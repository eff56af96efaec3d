"""The conversation Higgs Audio V2 expects, built from a transcript, a scene and reference voices.

Why a module of its own: the prompt format is the contract with the checkpoint (its ``chat_template.jinja``),
and three ways of asking for a voice map onto it differently:

* smart voice — no reference: ``system``, optional ``scene``, ``user`` text;
* one cloned voice with its transcript — the reference is shown as an earlier turn: ``user`` (reference
  transcript) → ``assistant`` (reference audio) → ``user`` (target text);
* several speakers, or a reference without a transcript — each reference is attached to a ``SPEAKERn:`` line
  in the scene, and the text carries ``[SPEAKERn]`` tags.

The messages are plain data; the checkpoint's own chat template renders them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SYSTEM_MESSAGE = "Generate audio following instruction."
DEFAULT_SCENE = "Audio is recorded from a quiet room."
SPEAKER_TAG = re.compile(r"\[SPEAKER(\d+)\]")

# The chat template shipped with the tiny offline model. It renders the same strings as the hub checkpoint's
# template for the message shapes this module produces (Llama-3 headers, scene block, audio placeholders).
CHAT_TEMPLATE = """{{- bos_token -}}
{%- if not messages or messages[0]['role'] != 'system' -%}
{{- raise_exception('the first message must be the system message') -}}
{%- endif -%}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + messages[0]['content'][0]['text'] | trim -}}
{%- set turns = messages[1:] -%}
{%- if turns and turns[0]['role'] == 'scene' -%}
{{- '\\n\\n<|scene_desc_start|>\\n' -}}
{%- for item in turns[0]['content'] -%}
{%- if item['type'] == 'text' -%}
{%- if loop.index0 == 1 -%}{{- '\\n\\n' -}}{%- elif loop.index0 > 1 -%}{{- '\\n' -}}{%- endif -%}
{{- item['text'] | trim -}}
{%- else -%}
{{- ' <|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>' -}}
{%- endif -%}
{%- endfor -%}
{{- '\\n<|scene_desc_end|>' -}}
{%- set turns = turns[1:] -%}
{%- endif -%}
{{- '<|eot_id|>' -}}
{%- for message in turns -%}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}
{%- if message['role'] == 'assistant' -%}
{{- '<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>' -}}
{%- else -%}
{{- message['content'][0]['text'] | trim -}}
{%- endif -%}
{{- '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n<|audio_out_bos|>' -}}
{%- endif -%}
"""


@dataclass(frozen=True)
class Voice:
    """A reference voice: mono float32 audio, its sample rate, and what it says (if known)."""

    waveform: np.ndarray
    sample_rate: int
    transcript: str | None = None


@dataclass(frozen=True)
class Prompt:
    """Chat messages plus the reference voices, in the order their audio placeholders appear."""

    messages: list[dict]
    voices: list[Voice]


def _text(role: str, text: str) -> dict:
    return {"role": role, "content": [{"type": "text", "text": text}]}


def speakers_in(text: str) -> list[int]:
    """Speaker indices tagged in the text, sorted (``[SPEAKER1] hi [SPEAKER0] yo`` → ``[0, 1]``)."""
    return sorted({int(index) for index in SPEAKER_TAG.findall(text)})


def build_prompt(text: str, *, scene: str | None = None, voices: Sequence[Voice] = ()) -> Prompt:
    """Messages for one generation; ``voices[i]`` is the voice of ``[SPEAKERi]`` (or of the whole text)."""
    system = _text("system", SYSTEM_MESSAGE)
    if len(voices) == 1 and voices[0].transcript:
        messages = [system]
        if scene:
            messages.append(_text("scene", scene))
        messages += [
            _text("user", voices[0].transcript),
            {"role": "assistant", "content": [{"type": "audio"}]},
            _text("user", text),
        ]
        return Prompt(messages=messages, voices=[voices[0]])
    if voices:
        items: list[dict] = [{"type": "text", "text": scene or DEFAULT_SCENE}]
        for index in range(len(voices)):
            items += [{"type": "text", "text": f"SPEAKER{index}:"}, {"type": "audio"}]
        if not speakers_in(text):
            text = f"[SPEAKER0] {text}"
        messages = [system, {"role": "scene", "content": items}, _text("user", text)]
        return Prompt(messages=messages, voices=list(voices))
    messages = [system]
    if scene:
        messages.append(_text("scene", scene))
    messages.append(_text("user", text))
    return Prompt(messages=messages, voices=[])
