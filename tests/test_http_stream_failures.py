"""What a client sees when a stream fails after its first byte, when the status is already sent: an SSE
client gets OpenAI's error event; a raw-audio client gets a transfer that breaks off, never a short clip
that looks whole. The body's own code, driven by a stream that fails as a generation would."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from contextlib import ExitStack
from types import SimpleNamespace
from typing import Any

from higgs_worker.errors import JobError
from http_api.door import _sent
from http_api.speech import speech_reply


async def failing_after_one_chunk() -> AsyncIterator[bytes]:
    yield b"data: first\n\n"
    raise JobError("require_verified: the clip did not say its text in 2 attempts")


def run(stream_format: str) -> tuple[list[bytes], BaseException | None, Any, list[str]]:
    prepared = SimpleNamespace(job_id="speech-test", cancel=threading.Event())
    released: list[str] = []
    slot = ExitStack()
    slot.callback(released.append, "slot")
    body = _sent(b"", failing_after_one_chunk(), speech_reply(stream_format), {}, prepared, slot)

    async def consume() -> tuple[list[bytes], BaseException | None]:
        sent: list[bytes] = []
        try:
            async for data in body:
                sent.append(data)
        except Exception as error:
            return sent, error
        return sent, None

    sent, error = asyncio.run(consume())
    return sent, error, prepared, released


def test_an_sse_stream_that_fails_midway_ends_with_an_error_event() -> None:
    sent, error, prepared, released = run("sse")
    assert error is None and sent[0] == b"data: first\n\n"
    event = json.loads(sent[-1].decode().removeprefix("data: "))
    assert event["type"] == "error"
    assert event["error"]["param"] == "require_verified" and event["error"]["type"] == "server_error"
    assert prepared.cancel.is_set() and released == ["slot"]


def test_a_raw_audio_stream_that_fails_midway_breaks_off() -> None:
    sent, error, prepared, released = run("audio")
    assert sent == [b"data: first\n\n"]
    assert isinstance(error, JobError)
    assert prepared.cancel.is_set() and released == ["slot"]
