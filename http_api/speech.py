"""The speech routes' replies: OpenAI's ``/v1/audio/speech`` (audio bytes, or OpenAI's server-sent events)
and Kokoro-FastAPI's ``/dev/captioned_speech`` (the audio with its word timestamps), over one
:meth:`http_api.door.HttpDoor.speak`.

``pcm``, ``wav``, ``mp3`` and ``opus`` stream as one file while it is generated; ``flac``, ``ogg`` and a
changed ``sample_rate`` are sent once complete (the plan decides: :mod:`higgs_worker.job.plan`).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Generator
from typing import Any

from fastapi.responses import JSONResponse, Response

from higgs_worker.audio.encoding import FORMATS
from higgs_worker.errors import Answer
from higgs_worker.pipeline import Clip, Pipeline, PreparedJob
from http_api.captioned import captioned_json, captioned_lines
from http_api.door import SpeechReply
from http_api.errors import param_of

STREAM_FORMATS = ("audio", "sse")


def sse_event(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


def speech_reply(stream_format: str) -> SpeechReply:
    """``/v1/audio/speech``: the clip's bytes, or with ``stream_format: "sse"`` OpenAI's events."""
    events = stream_format == "sse"

    def body(
        pipeline: Pipeline, prepared: PreparedJob, found: dict[str, Any]
    ) -> Generator[bytes, None, None]:
        return _encoded_stream(pipeline, prepared, found, events=events)

    def media_type(prepared: PreparedJob) -> str:
        return "text/event-stream" if events else FORMATS[prepared.request.output_format].mimetype

    def closing(found: dict[str, Any]) -> bytes:
        return sse_event({"type": "speech.audio.done", **found}) if events else b""

    def whole(clip: Clip) -> Response:
        if not events:
            return Response(clip.audio.data, media_type=clip.audio.mimetype)
        delta = sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(clip.audio.data).decode()})
        return Response(delta + closing(clip.quality), media_type="text/event-stream")

    def failed(error: Answer) -> bytes:
        if not events:
            return b""
        described = {"message": error.message, "type": error.kind, "param": param_of(error.message)}
        return sse_event({"type": "error", "error": described | {"code": None}})

    return SpeechReply("bytes", body, media_type, closing, whole, failed)


def captioned_reply(stream: bool) -> SpeechReply:
    """``/dev/captioned_speech``: one JSON object, or with ``stream`` one per chunk (NDJSON)."""

    def whole(clip: Clip) -> Response:
        return JSONResponse(captioned_json(clip))

    return SpeechReply(
        "files" if stream else None,
        lambda pipeline, prepared, _found: captioned_lines(pipeline, prepared),
        lambda _prepared: "application/x-ndjson",
        lambda _found: b"",
        whole,
    )


def _encoded_stream(
    pipeline: Pipeline, prepared: PreparedJob, found: dict[str, Any], *, events: bool
) -> Generator[bytes, None, None]:
    """The clip's bytes in the requested format while it is generated (runs on job threads); with ``events``,
    as ``speech.audio.delta`` events, each with the words its audio said when the request asks for words.

    What the quality layer found (words, captions, verification) is put in ``found`` before the last bytes.
    """
    words = prepared.request.timestamps == "word"
    pieces = pipeline.stream_audio(prepared)
    try:
        for piece in pieces:
            found |= piece.quality
            if events and (piece.data or piece.words):
                event = {"type": "speech.audio.delta", "audio": base64.b64encode(piece.data).decode()}
                yield sse_event(event | ({"words": piece.words} if words else {}))
            elif piece.data:
                yield piece.data
    finally:
        pieces.close()
