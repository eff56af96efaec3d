"""``dry_run: true``: how a job would be read, without loading the model or generating.

Why: a transcript is rendered through several rules (normalisation, sound events, default and described
voices, voice placement, long-form pieces, the checkpoint's chat template) and a user debugging one should
not pay for a GPU run to see the outcome. The output is built from the same functions generation uses
(:mod:`higgs_worker.job.rendering`, :class:`boson_multimodal.longform.PieceHistory`,
:func:`boson_multimodal.prompt.build_prompt`) and the chat template the model would use: the checkpoint's
``chat_template.jinja`` when the model is on this worker's volume, else the built-in copy (``chat_template``
says which). Pieces that would be generated earlier appear in later prompts as stand-in audio.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from boson_multimodal.longform import Chunking, Piece, PieceHistory, plan_pieces
from boson_multimodal.prompt import (
    CHAT_TEMPLATE,
    PromptRequest,
    Voice,
    VoiceDescription,
    build_prompt,
    default_voices,
    in_system_message,
)
from boson_multimodal.transcript import speakers_in
from higgs_worker.job.plan import Plan
from higgs_worker.quality.plan import quality_plan
from higgs_worker.settings import Settings
from higgs_worker.voices.resolve import DescribedVoice, ResolvedVoice

TEMPLATE_FILE = "chat_template.jinja"
# The special tokens a chat template may use, with the checkpoint's values when its tokenizer is not on disk.
SPECIAL_TOKENS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|end_of_text|>"}


def dry_run(plan: Plan, settings: Settings) -> dict[str, Any]:
    """The dry-run output: the job's plan (:mod:`higgs_worker.job.plan`), as generation would read it."""
    prompt, chunking, voices = plan.speech, plan.chunking, plan.references
    template, template_source = _chat_template(settings.model_path)
    pieces = _pieces(prompt, chunking)
    rendered = [_render(piece, template, settings.model_path) for piece in pieces]
    return {
        "dry_run": True,
        "transcript": prompt.text,
        "speakers": _speakers(prompt, voices),
        "voice_placement": _placement(prompt),
        "chunking": _chunking(chunking),
        "pieces": rendered,
        "prompt": rendered[0]["prompt"] if rendered else "",
        "chat_template": template_source,
        "quality": quality_plan(plan.request, settings, len(pieces)),
    }


def _pieces(prompt: PromptRequest, chunking: Chunking | None) -> list[tuple[Piece, PromptRequest, dict]]:
    """Each piece with its request, and which audio each of its prompt's voices stands for."""
    if chunking is None:
        return [(Piece(None, prompt.text), prompt, {})]
    history = PieceHistory(prompt, chunking)
    planned = []
    generated: dict[int, str] = {}  # id of a stand-in waveform → which piece it stands for
    for index, piece in enumerate(plan_pieces(prompt.text, chunking)):
        planned.append((piece, history.request_for(piece), dict(generated)))
        stand_in = Voice(np.zeros(1, dtype=np.float32), 24_000, piece.text)
        generated[id(stand_in.waveform)] = f"the audio generated for piece {index}"
        history.add(piece, stand_in)
    return planned


def _render(planned: tuple[Piece, PromptRequest, dict], template: str, model_dir: Path) -> dict[str, Any]:
    from transformers.utils.chat_template_utils import render_jinja_template  # no torch needed

    piece, piece_request, generated = planned
    built = build_prompt(piece_request)
    [text], _ = render_jinja_template(
        [built.messages],
        chat_template=template,
        add_generation_prompt=True,
        **_special_tokens(model_dir),
    )
    return {
        "text": piece.text,
        "prompt": text,
        "audio": [_audio_entry(voice, generated) for voice in built.voices],
    }


def _audio_entry(voice: Voice, generated: dict[int, str]) -> dict[str, Any]:
    """What fills one ``<|AUDIO_OUT|>`` placeholder of the prompt, in order."""
    if id(voice.waveform) in generated:
        return {"audio": generated[id(voice.waveform)], "text": voice.transcript}
    seconds = voice.waveform.shape[-1] / voice.sample_rate
    return {"audio": "reference", "seconds": round(seconds, 2), "text": voice.transcript}


def _speakers(prompt: PromptRequest, voices: list[ResolvedVoice]) -> list[dict]:
    """Each speaker and the voice it gets: reference, preset, profile, description or default."""
    cast = prompt.voices or default_voices(prompt.text)
    count = max(len(cast), (speakers_in(prompt.text) or [-1])[-1] + 1, 1)
    speakers = []
    for index in range(count):
        entry: dict[str, Any] = {"speaker": f"SPEAKER{index}"}
        voice = cast[index] if index < len(cast) else None
        if index < len(voices):
            resolved = voices[index]
            entry |= {"voice": resolved.kind, "source": resolved.description}
            if isinstance(resolved, DescribedVoice):
                entry["description"] = resolved.text
            else:
                entry |= {"seconds": round(resolved.waveform.shape[-1] / resolved.sample_rate, 2)}
                entry["transcript"] = resolved.text
        elif isinstance(voice, VoiceDescription) and not voice.default:
            entry |= {"voice": "description", "source": "voice_description", "description": voice.text}
        elif isinstance(voice, VoiceDescription) and voice.text:
            entry |= {"voice": "default", "description": voice.text}
        else:
            entry |= {"voice": "default", "description": None}  # the model picks one
        speakers.append(entry)
    if len(speakers) == 1 and not speakers_in(prompt.text):
        speakers[0]["speaker"] = "the whole text"
    return speakers


def _placement(prompt: PromptRequest) -> str | None:
    if not prompt.voices:
        return None
    return "system message" if in_system_message(prompt) else "earlier turns"


def _chunking(chunking: Chunking | None) -> dict[str, Any]:
    if chunking is None:
        return {"method": "none"}
    limit = {"sentence": "max_chars", "speaker": "max_turns", "word": "max_words"}[chunking.method]
    described: dict[str, Any] = {"method": chunking.method, limit: getattr(chunking, limit)}
    if chunking.method != "sentence":
        described["buffer_size"] = chunking.buffer_size
    return described


def _chat_template(model_dir: Path) -> tuple[str, str]:
    path = model_dir / TEMPLATE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8"), f"checkpoint ({path})"
    return CHAT_TEMPLATE, "built-in (the model is not on this worker's volume yet)"


def _special_tokens(model_dir: Path) -> dict[str, str]:
    tokens = dict(SPECIAL_TOKENS)
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        saved = json.loads(config.read_text(encoding="utf-8"))
        for name in tokens:
            value = saved.get(name)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                tokens[name] = value
    return tokens
