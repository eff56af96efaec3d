"""Captioned speech over HTTP, as Kokoro-FastAPI's ``/dev/captioned_speech`` shapes it.

Its clients send OpenAI's speech body plus ``stream`` (default true) and ``return_timestamps`` (default true)
and read ``{"audio": <base64>, "audio_format", "timestamps": [{"word", "start_time", "end_time"}]}`` back:
one JSON object, or with ``stream`` one such object per line (NDJSON) while the clip is generated. Each
line of a stream carries the words its audio finished saying (``higgs_worker.quality.stream_alignment``) and
its audio as a complete file in ``audio_format``; the last line adds captions and verification. This worker's
own fields (``captions``, ``verify``, ``loudness_lufs``…) work here too.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Generator
from typing import Any

from higgs_worker.pipeline import Clip, Pipeline, PreparedJob
from higgs_worker.quality.service import OUTPUT_KEYS

FLAGS = ("stream", "return_timestamps")


def captioned_body(body: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """Whether to stream, and the job's body with word timestamps asked for; ValueError names a bad flag."""
    body = dict(body)
    values = {}
    for name in FLAGS:
        value = body.pop(name, True)
        if not isinstance(value, bool):
            raise ValueError(f"{name}: must be true or false")
        values[name] = value
    if values["return_timestamps"]:
        body.setdefault("timestamps", "word")
    return values["stream"], body


def words_without_a_place(body: dict[str, Any], stream_format: str) -> str | None:
    """``/v1/audio/speech`` answering with bare audio has nowhere to put words or captions: say so."""
    if stream_format == "sse":
        return None
    for name in ("timestamps", "captions"):
        if body.get(name) not in (None, "none"):
            return (
                f"{name}: an audio response carries only audio; use stream_format 'sse' (the "
                "speech.audio.done event carries them) or POST /dev/captioned_speech"
            )
    return None


def _timestamps(words: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"word": w["word"], "start_time": w["start_s"], "end_time": w["end_s"]} for w in words]


def _annotations(quality: dict[str, Any]) -> dict[str, Any]:
    extra = {key: quality[key] for key in OUTPUT_KEYS if key in quality}
    if "words" in quality:
        extra["timestamps"] = _timestamps(quality["words"])
    return extra


def captioned_json(clip: Clip) -> dict[str, Any]:
    """The whole clip and its words as one JSON object."""
    audio = {"audio": base64.b64encode(clip.audio.data).decode(), "audio_format": clip.audio.format}
    return audio | _annotations(clip.quality)


def captioned_lines(pipeline: Pipeline, prepared: PreparedJob) -> Generator[bytes, None, None]:
    """One JSON line per chunk while it is generated (runs on job threads), with the words its audio said;
    the last line adds the captions and the verification."""
    pieces = pipeline.stream_audio(prepared)
    try:
        for piece in pieces:
            line: dict[str, Any] = {"audio_format": prepared.request.output_format}
            if piece.audio is not None:
                line["audio"] = base64.b64encode(piece.audio.data).decode()
            if prepared.request.timestamps == "word":
                line["timestamps"] = _timestamps(piece.words)
            if piece.chunk.final:
                line |= {
                    key: value
                    for key, value in piece.quality.items()
                    if key in ("captions", "captions_format", "verification")
                }
            if "audio" in line or line.get("timestamps") or piece.chunk.final:
                yield (json.dumps(line) + "\n").encode()
    finally:
        pieces.close()
