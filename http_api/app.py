"""The HTTP door: OpenAI's speech API, the voice library and the queue's own route, over one pipeline.

Routes: ``POST /v1/audio/speech`` (audio bytes, streamed while generated where the format allows, or
OpenAI's server-sent events), ``POST /dev/captioned_speech`` (the audio with its word timestamps), ``GET
/v1/models``, the voice library (``/v1/audio/voices``, :mod:`http_api.voices`), ``POST /generate`` (a queue
job's body in, ``/runsync``'s answer out) and the health route RunPod's load balancer polls. What the
generating routes share is :class:`http_api.door.HttpDoor`; how each answers, :mod:`http_api.speech`.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from higgs_worker.errors import answer
from higgs_worker.pipeline import Pipeline
from higgs_worker.runtime import Readiness
from http_api.captioned import captioned_body, words_without_a_place
from http_api.door import HttpDoor
from http_api.errors import error_response
from http_api.speech import STREAM_FORMATS, captioned_reply, speech_reply
from http_api.voices import voice_routes

logger = logging.getLogger("http_api")


def create_app(pipeline: Pipeline, *, with_health: bool = True) -> FastAPI:
    settings = pipeline.settings
    door = HttpDoor(pipeline)
    app = FastAPI(title="Higgs Audio V2 text-to-speech", docs_url=None, redoc_url=None)

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

    @app.post("/v1/audio/speech")
    async def speech(request: Request) -> Response:
        body = await _json_object(request)
        if isinstance(body, Response):
            return body
        stream_format = body.pop("stream_format", "audio")
        if stream_format not in STREAM_FORMATS:
            message = f"stream_format: must be one of {', '.join(STREAM_FORMATS)}"
            return error_response(400, message, param="stream_format")
        unsent = words_without_a_place(body, stream_format)
        if unsent is not None:
            return error_response(400, unsent, param=unsent.split(":")[0])
        return await door.speak(request, body, speech_reply(stream_format), "speech")

    @app.post("/dev/captioned_speech")
    async def captioned_speech(request: Request) -> Response:
        """Kokoro-FastAPI's captioned speech: the audio with its word timestamps (and captions)."""
        body = await _json_object(request)
        if isinstance(body, Response):
            return body
        try:
            stream, body = captioned_body(body)
        except ValueError as error:
            return error_response(400, str(error), param=str(error).split(":")[0])
        return await door.speak(request, body, captioned_reply(stream), "captioned")

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        """A queue job's body (``{"input": {...}}``) in; what ``/runsync`` answers out, S3 included."""
        body = await _json_object(request)
        if isinstance(body, Response):
            return body
        refusal = door.refusal()
        if refusal is not None:
            return refusal
        job_id = f"generate-{uuid.uuid4().hex[:12]}"
        try:
            output = await door.in_thread(pipeline.run, job_id, body.get("input"))
        except Exception as error:
            failed = answer(error, job_id, logger)
            return JSONResponse(
                {"id": job_id, "status": "FAILED", "error": failed.message}, status_code=failed.status
            )
        finally:
            door.slots.give_back()
        return JSONResponse({"id": job_id, "status": "COMPLETED", "output": output})

    app.include_router(voice_routes(door))
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
