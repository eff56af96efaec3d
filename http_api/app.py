"""The HTTP door: OpenAI's speech API, the voice library and the queue's own route, over one pipeline.

Routes: ``POST /v1/audio/speech`` (audio bytes, streamed while generated where the format allows, or
OpenAI's server-sent events), ``GET /v1/models``, ``POST/GET /v1/audio/voices``, ``GET/DELETE
/v1/audio/voices/{name}``, ``POST /generate`` (a queue job's body in, ``/runsync``'s answer out) and the
health route RunPod's load balancer polls. Each generation holds one of ``CONCURRENCY`` slots from the first
byte it reads to the last byte it sends; a request that finds none free gets 503 at once.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from higgs_worker.errors import JobAbandoned, answer
from higgs_worker.pipeline import Clip, Pipeline, PreparedJob
from higgs_worker.request_plan import StreamKind
from higgs_worker.runtime import Readiness
from higgs_worker.thread_iteration import iterate_in_threads
from higgs_worker.voice_library import VoiceLibrary
from http_api.captioned import captioned_body, captioned_json, captioned_lines, words_without_a_place
from http_api.errors import error_response, failure_response
from http_api.limits import RETRY_AFTER_S, Slots

logger = logging.getLogger("http_api")

T = TypeVar("T")
STREAM_FORMATS = ("audio", "sse")
OPENAI_DEFAULT_FORMAT = "mp3"  # what /v1/audio/speech returns when the body names no format
DISCONNECT_POLL_S = 0.5


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its body iterator, at once, also when the client left.

    Closing the iterator is what cancels a generation and frees its slot; left to the garbage collector it
    would happen at some later time, or never.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if isinstance(self.body_iterator, AsyncGenerator):  # ours always are; starlette types it wider
                await self.body_iterator.aclose()


def _busy() -> JSONResponse:
    return error_response(
        503,
        "the worker is busy with as many generations as it runs at once (CONCURRENCY); retry shortly",
        kind="server_error",
        code="overloaded",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def _not_ready(pipeline: Pipeline) -> JSONResponse | None:
    runtime = pipeline.runtime
    if runtime.readiness is Readiness.READY:
        return None
    if runtime.readiness is Readiness.FAILED:
        message = f"the worker could not prepare its models: {runtime.failure}"
    else:
        message = "the worker is still preparing its models; retry shortly"
    return error_response(
        503, message, kind="server_error", code="not_ready", headers={"Retry-After": str(RETRY_AFTER_S * 5)}
    )


def _sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


def create_app(pipeline: Pipeline, *, with_health: bool = True) -> FastAPI:
    settings = pipeline.settings
    slots = Slots(settings.concurrency)
    # Threads for generations (one per slot) plus room for the short blocking steps around them.
    threads = ThreadPoolExecutor(settings.concurrency + 4, thread_name_prefix="http-job")
    voices = VoiceLibrary(settings)
    voices.adopt_earlier_uploads()
    app = FastAPI(title="Higgs Audio V2 text-to-speech", docs_url=None, redoc_url=None)

    def take_slot() -> Response | None:
        """A generation slot for this request, or the answer that refuses it (not ready, or busy)."""
        refusal = _not_ready(pipeline)
        if refusal is not None:
            return refusal
        return None if slots.take() else _busy()

    async def in_thread(function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(threads, function, *args)

    async def whole_clip(request: Request, prepared: PreparedJob) -> Clip:
        """The clip, generated on a job thread that owns the request's slot: it gives the slot back when
        the work ends, however it ends; a client that leaves first cancels the work."""
        job = threads.submit(pipeline.clip, prepared)
        job.add_done_callback(_release(slots, prepared.job_id))
        return await _unless_client_leaves(request, job, prepared.cancel)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException) -> JSONResponse:
        code = "not_found" if error.status_code == 404 else None
        return error_response(error.status_code, str(error.detail), code=code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        field = str(first["loc"][-1]) if first.get("loc") else None
        return error_response(400, f"{field}: {first['msg']}", param=field)

    if with_health:
        app.add_api_route(settings.health_path, health_route(pipeline), methods=["GET"])

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        model = {"id": settings.model_repo, "object": "model", "created": 0, "owned_by": "bosonai"}
        return {"object": "list", "data": [model]}

    # -- speech ------------------------------------------------------------------------------------------
    @app.post("/v1/audio/speech")
    async def speech(request: Request) -> Response:
        body = await _json_object(request)
        if isinstance(body, Response):
            return body
        stream_format = body.pop("stream_format", "audio")
        if stream_format not in STREAM_FORMATS:
            return error_response(
                400, f"stream_format: must be one of {', '.join(STREAM_FORMATS)}", param="stream_format"
            )
        if "response_format" not in body and "output_format" not in body:
            body["response_format"] = OPENAI_DEFAULT_FORMAT
        unsent = words_without_a_place(body, stream_format)
        if unsent is not None:
            return error_response(400, unsent, param=unsent.split(":")[0])
        if body.get("dry_run") is True:  # no models, no slot: how the request would be read, as JSON
            try:
                request_ = pipeline.validate(body, openai_names=True)
                return JSONResponse(await in_thread(lambda: pipeline.dry_run(request_)))
            except Exception as error:
                return failure_response(error, "dry run")
        refusal = take_slot()
        if refusal is not None:
            return refusal
        job_id = f"speech-{uuid.uuid4().hex[:12]}"
        handed_over = False  # once a response body owns the slot, it gives it back
        try:
            request_ = pipeline.validate(body, openai_names=True)
            prepared = await in_thread(lambda: pipeline.prepare(job_id, request_, stream="bytes"))
            clip = pipeline.cached(prepared)
            if clip is None and prepared.plan.stream is not None:
                found: dict[str, Any] = {}
                encoded = _encoded_stream(pipeline, prepared, found, sse=stream_format == "sse")
                pieces = iterate_in_threads(encoded, threads)
                first = await anext(pieces, b"")  # a failure before any audio still gets its own status
                handed_over = True
                return ClosingStreamingResponse(
                    _sent(first, pieces, stream_format, slots, found, prepared.cancel),
                    media_type="text/event-stream"
                    if stream_format == "sse"
                    else _mimetype(request_.output_format),
                )
            if clip is None:
                handed_over = True
                clip = await whole_clip(request, prepared)
            return _whole(clip, stream_format)
        except JobAbandoned:
            return Response(status_code=499)
        except Exception as error:
            return failure_response(error, job_id)
        finally:
            if not handed_over:
                slots.give_back()

    # -- Kokoro-FastAPI's captioned speech: the audio with its word timestamps (and captions) -----------
    @app.post("/dev/captioned_speech")
    async def captioned_speech(request: Request) -> Response:
        body = await _json_object(request)
        if isinstance(body, Response):
            return body
        try:
            stream, body = captioned_body(body, OPENAI_DEFAULT_FORMAT)
        except ValueError as error:
            return error_response(400, str(error), param=str(error).split(":")[0])
        if body.get("dry_run") is True:
            try:
                request_ = pipeline.validate(body, openai_names=True)
                return JSONResponse(await in_thread(lambda: pipeline.dry_run(request_)))
            except Exception as error:
                return failure_response(error, "dry run")
        refusal = take_slot()
        if refusal is not None:
            return refusal
        job_id = f"captioned-{uuid.uuid4().hex[:12]}"
        handed_over = False
        try:
            request_ = pipeline.validate(body, openai_names=True)
            kind: StreamKind | None = "files" if stream else None
            prepared = await in_thread(lambda: pipeline.prepare(job_id, request_, stream=kind))
            clip = pipeline.cached(prepared)
            if clip is None and prepared.plan.stream is not None:
                lines = iterate_in_threads(captioned_lines(pipeline, prepared), threads)
                first = await anext(lines, b"")
                handed_over = True
                return ClosingStreamingResponse(
                    _sent(first, lines, "audio", slots, {}, prepared.cancel),
                    media_type="application/x-ndjson",
                )
            if clip is None:
                handed_over = True
                clip = await whole_clip(request, prepared)
            return JSONResponse(captioned_json(clip))
        except JobAbandoned:
            return Response(status_code=499)
        except Exception as error:
            return failure_response(error, job_id)
        finally:
            if not handed_over:
                slots.give_back()

    # -- the queue's route -------------------------------------------------------------------------------
    @app.post("/generate")
    async def generate(request: Request) -> Response:
        """A queue job's body (``{"input": {...}}``) in; what ``/runsync`` answers out, S3 included."""
        body = await _json_object(request)
        if isinstance(body, Response):
            return body
        refusal = take_slot()
        if refusal is not None:
            return refusal
        job_id = f"generate-{uuid.uuid4().hex[:12]}"
        try:
            output = await in_thread(pipeline.run, job_id, body.get("input"))
        except Exception as error:
            failed = answer(error, job_id, logger)
            return JSONResponse(
                {"id": job_id, "status": "FAILED", "error": failed.message}, status_code=failed.status
            )
        finally:
            slots.give_back()
        return JSONResponse({"id": job_id, "status": "COMPLETED", "output": output})

    # -- voices ------------------------------------------------------------------------------------------
    @app.post("/v1/audio/voices", status_code=201)
    async def save_voice(
        name: Annotated[str, Form()],
        file: Annotated[UploadFile, Form()],
        ref_text: Annotated[str | None, Form()] = None,
        replace: Annotated[bool, Form()] = False,
    ) -> Response:
        data = await file.read(settings.max_reference_bytes + 1)
        try:
            voice = await in_thread(lambda: voices.save(name, data, ref_text, replace=replace))
        except Exception as error:
            return failure_response(error, f"voice {name!r}")
        return JSONResponse(voice.describe(), status_code=201)

    @app.get("/v1/audio/voices")
    async def list_voices() -> dict[str, Any]:
        found = await in_thread(voices.list)
        return {"object": "list", "data": [voice.describe() for voice in found]}

    @app.get("/v1/audio/voices/{name}")
    async def get_voice(name: str) -> Response:
        try:
            return JSONResponse((await in_thread(voices.get, name)).describe())
        except Exception as error:
            return failure_response(error, f"voice {name!r}")

    @app.delete("/v1/audio/voices/{name}")
    async def delete_voice(name: str) -> Response:
        try:
            await in_thread(voices.delete, name)
        except Exception as error:
            return failure_response(error, f"voice {name!r}")
        return JSONResponse({"id": name, "object": "voice", "deleted": True})

    return app


def health_route(pipeline: Pipeline) -> Callable[[], Any]:
    """RunPod's health check: 204 while preparing, 200 once ready, 503 when preparing failed."""

    async def ping() -> Response:
        readiness = pipeline.runtime.readiness
        if readiness is Readiness.READY:
            return JSONResponse({"status": "ready"})
        if readiness is Readiness.FAILED:
            return JSONResponse({"status": "failed", "reason": pipeline.runtime.failure}, status_code=503)
        return Response(status_code=204)

    return ping


def health_app(pipeline: Pipeline) -> FastAPI:
    """The health route alone, for a PORT_HEALTH that differs from PORT."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.add_api_route(pipeline.settings.health_path, health_route(pipeline), methods=["GET"])
    return app


async def _json_object(request: Request) -> dict[str, Any] | Response:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return error_response(400, "the request body is not valid JSON")
    if not isinstance(body, dict):
        return error_response(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _mimetype(fmt: str) -> str:
    from higgs_worker.audio_encoding import FORMATS

    return FORMATS[fmt].mimetype


def _encoded_stream(
    pipeline: Pipeline, prepared: PreparedJob, found: dict[str, Any], *, sse: bool
) -> Generator[bytes, None, None]:
    """The clip's bytes in the requested format while it is generated (runs on job threads); with ``sse``,
    as ``speech.audio.delta`` events, each with the words its audio said when the request asks for words.

    What the quality layer found (words, captions, verification) is put in ``found`` before the last bytes.
    """
    words = prepared.request.timestamps == "word"
    pieces = pipeline.stream_audio(prepared)
    try:
        for piece in pieces:
            found |= piece.quality
            if sse and (piece.data or piece.words):
                event = {"type": "speech.audio.delta", "audio": base64.b64encode(piece.data).decode()}
                yield _sse(event | ({"words": piece.words} if words else {}))
            elif piece.data:
                yield piece.data
    finally:
        pieces.close()


async def _sent(
    first: bytes,
    rest: AsyncIterator[bytes],
    stream_format: str,
    slots: Slots,
    found: dict[str, Any],
    cancel: threading.Event,
) -> AsyncIterator[bytes]:
    """The response body (audio bytes, or SSE delta events as ``_encoded_stream`` makes them); closing it
    stops the generation and frees the slot. With SSE, the ``speech.audio.done`` event closes the stream,
    carrying the clip's words, captions and verification when asked for.

    ``cancel`` is set when the body ends, so a stream that is still making its whole clip first (a tempo
    change, verification) stops at its next check instead of running to the end for nobody.
    """
    try:
        if first:
            yield first
        async for data in rest:
            yield data
        if stream_format == "sse":
            yield _sse({"type": "speech.audio.done", **found})
    finally:
        cancel.set()
        await rest.aclose()  # type: ignore[attr-defined]
        slots.give_back()


def _whole(clip: Clip, stream_format: str) -> Response:
    if stream_format == "sse":
        events = _sse({"type": "speech.audio.delta", "audio": base64.b64encode(clip.audio.data).decode()})
        events += _sse({"type": "speech.audio.done", **clip.quality})
        return Response(events, media_type="text/event-stream")
    return Response(clip.audio.data, media_type=clip.audio.mimetype)


def _release(slots: Slots, job_id: str) -> Callable[[Future[Clip]], None]:
    """The done callback of a whole-file generation: the slot is free when the work is, however it ended."""

    def done(job: Future[Clip]) -> None:
        slots.give_back()
        if isinstance(job.exception(), JobAbandoned):
            logger.info("%s: the client went away; its generation was cancelled", job_id)

    return done


async def _unless_client_leaves(request: Request, job: Future[Clip], cancel: threading.Event) -> Clip:
    """The job's result; if the client disconnects first, ``cancel`` is set and JobAbandoned raised."""
    wrapped = asyncio.wrap_future(job)
    while True:
        done, _ = await asyncio.wait({wrapped}, timeout=DISCONNECT_POLL_S)
        if done:
            return wrapped.result()
        if await request.is_disconnected():
            cancel.set()
            # Nobody awaits the job now: take its outcome (JobAbandoned, expected) when it comes, so asyncio
            # does not log it as an error ("Future exception was never retrieved").
            wrapped.add_done_callback(lambda job: job.cancelled() or job.exception())
            raise JobAbandoned("the client went away")
