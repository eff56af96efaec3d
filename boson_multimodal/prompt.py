"""The conversation Higgs Audio V2 expects, built the way the upstream generation script builds it.

Why a module of its own: the prompt is the contract with the checkpoint. Users learn the model from
boson-ai/higgs-audio's ``examples/generation.py``, so a request is turned into the messages that script would
send, and the checkpoint's own ``chat_template.jinja`` renders them. The shapes:

* **smart voice** (no voices): the system message, the scene (if any), the text;
* **dialogue without voices** (two or more ``[SPEAKERn]`` tags): the multi-speaker system message, and a
  scene giving each speaker a default voice, alternately feminine and masculine, so they do not sound alike;
* **reference turns** (the script's default for cloned voices): each reference as an earlier exchange, its
  transcript as a ``user`` turn (``[SPEAKERi] `` first when there are several) and its audio as the
  ``assistant`` turn, then the text;
* **voices in the system message** (``voices_in_system``, or forced as the script forces it): one
  ``SPEAKERi: …`` line per speaker in the scene, holding the reference audio or the words that describe the
  voice. Described voices have no audio turn to go to, and neither does a reference without a transcript, so
  either puts every voice there.

Long-form generation adds earlier generated pieces as ``context``: more user/assistant exchanges after the
references, exactly as the script keeps its buffer of generated chunks.

The text is expected already normalised (:func:`boson_multimodal.transcript.normalize_transcript`): it is
normalised once for the whole transcript, before it is cut into pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from boson_multimodal.transcript import speakers_in

SYSTEM_MESSAGE = "Generate audio following instruction."
MULTISPEAKER_SYSTEM_MESSAGE = (
    "You are an AI assistant designed to convert text into speech.\n"
    "If the user's message includes a [SPEAKER*] tag, do not read out the tag and generate speech for the "
    "following text, using the specified voice.\n"
    "If no speaker tag is present, select a suitable voice on your own."
)
# The script's default scene (its scene_prompts/quiet_indoor.txt). The checkpoint's template needs a scene
# line before voices placed in the system message, so it also stands in when a caller gives none.
DEFAULT_SCENE = "Audio is recorded from a quiet room."
# How a request becomes what the model reads (these messages, the normalisation, the pieces). Results are
# cached under it: bump it with any change to what the model reads for the same request, so no result made
# the old way is served again. 2: the upstream script's rendering (2026-12).
PROMPT_VERSION = 2
DEFAULT_DESCRIPTIONS = ("feminine", "masculine")  # alternating, for a dialogue without voices
AUDIO_PLACEHOLDER = "<|AUDIO_OUT|>"  # where the processor puts each voice's audio tokens

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
class VoiceDescription:
    """A voice described in words instead of cloned (``SPEAKERi: <text>`` in the scene).

    ``default`` marks the stand-in voices of a dialogue without voices, which go with the multi-speaker
    system message.
    """

    text: str
    default: bool = False


SpeakerVoice = Voice | VoiceDescription


@dataclass(frozen=True)
class PromptRequest:
    """What a prompt is built from; ``voices[i]`` speaks ``[SPEAKERi]`` (or the whole text if alone)."""

    text: str
    scene: str | None = None
    voices: tuple[SpeakerVoice, ...] = ()
    voices_in_system: bool = False  # the script's --ref_audio_in_system_message
    context: tuple[Voice, ...] = ()  # earlier generated pieces (audio + their text), oldest first

    @property
    def has_audio(self) -> bool:
        """Whether the prompt carries audio (references or context): transformers cannot batch mixes."""
        return bool(self.context) or any(isinstance(voice, Voice) for voice in self.voices)


@dataclass(frozen=True)
class Prompt:
    """Chat messages plus the voices whose audio they hold, in the order their audio placeholders appear."""

    messages: list[dict]
    voices: list[Voice]


def _text(role: str, text: str) -> dict:
    return {"role": role, "content": [{"type": "text", "text": text}]}


def _audio_turn() -> dict:
    return {"role": "assistant", "content": [{"type": "audio"}]}


def default_voices(text: str) -> tuple[VoiceDescription, ...]:
    """The voices of a dialogue nobody gave voices to: feminine, masculine, feminine… in tag order.

    Nothing for a single speaker: the model then picks a voice itself. The tuple is indexed by speaker
    number; a number the text skips gets an empty description, which puts no line in the scene.
    """
    speakers = speakers_in(text)
    if len(speakers) < 2:
        return ()
    voices = [VoiceDescription("", default=True)] * (speakers[-1] + 1)
    for position, speaker in enumerate(speakers):
        voices[speaker] = VoiceDescription(DEFAULT_DESCRIPTIONS[position % 2], default=True)
    return tuple(voices)


def in_system_message(request: PromptRequest) -> bool:
    """Where the voices go: the system message when asked, or when any voice cannot be an earlier turn."""
    return request.voices_in_system or any(
        not isinstance(voice, Voice) or not voice.transcript for voice in request.voices
    )


def build_prompt(request: PromptRequest) -> Prompt:
    """Messages for one generation (see the module docstring for the shapes)."""
    voices = request.voices or default_voices(request.text)
    if voices and all(isinstance(v, VoiceDescription) and v.default for v in voices):
        messages = [
            _text("system", MULTISPEAKER_SYSTEM_MESSAGE),
            _scene(request.scene, voices),
        ]
        audio: list[Voice] = []
    elif voices and in_system_message(request):
        messages = [_text("system", SYSTEM_MESSAGE), _scene(request.scene, voices)]
        audio = [v for v in voices if isinstance(v, Voice)]
    else:
        messages = [_text("system", SYSTEM_MESSAGE)]
        if request.scene:
            messages.append(_text("scene", request.scene))
        audio = []
        for index, voice in enumerate(voices):
            assert isinstance(voice, Voice) and voice.transcript  # in_system_message() said so
            tag = f"[SPEAKER{index}] " if len(voices) > 1 else ""
            messages += [_text("user", tag + voice.transcript), _audio_turn()]
            audio.append(voice)
    for earlier in request.context:
        messages += [_text("user", earlier.transcript or ""), _audio_turn()]
        audio.append(earlier)
    messages.append(_text("user", request.text))
    return Prompt(messages=messages, voices=audio)


def _scene(scene: str | None, voices: Sequence[SpeakerVoice]) -> dict:
    """The scene message: the scene, then one ``SPEAKERi:`` line per voice (audio or words).

    The checkpoint's template puts a blank line after the first item and a line break between the others,
    so the first item must be the scene: with voices' audio and no scene, the default scene stands in. Lines
    of words alone without a scene are one item, one per line.
    """
    lines: list[dict] = []
    for index, voice in enumerate(voices):
        if isinstance(voice, Voice):
            lines += [{"type": "text", "text": f"SPEAKER{index}:"}, {"type": "audio"}]
        elif voice.text:
            lines.append({"type": "text", "text": f"SPEAKER{index}: {voice.text}"})
    has_audio = any(item["type"] == "audio" for item in lines)
    if scene or has_audio:
        items = [{"type": "text", "text": scene or DEFAULT_SCENE}, *lines]
    else:
        items = [{"type": "text", "text": "\n".join(item["text"] for item in lines)}]
    return {"role": "scene", "content": items}
