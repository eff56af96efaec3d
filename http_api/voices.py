"""The voice library's routes: save (a multipart upload), list, describe and delete saved voices (see
:mod:`higgs_worker.voices.library`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, UploadFile
from fastapi.responses import JSONResponse, Response

from higgs_worker.voices.library import VoiceLibrary
from http_api.door import HttpDoor
from http_api.errors import failure_response


def voice_routes(door: HttpDoor) -> APIRouter:
    voices = VoiceLibrary(door.pipeline.settings)
    voices.adopt_earlier_uploads()
    limit = door.pipeline.settings.max_reference_bytes
    router = APIRouter()

    @router.post("/v1/audio/voices", status_code=201)
    async def save_voice(
        name: Annotated[str, Form()],
        file: Annotated[UploadFile, Form()],
        ref_text: Annotated[str | None, Form()] = None,
        replace: Annotated[bool, Form()] = False,
    ) -> Response:
        data = await file.read(limit + 1)  # one byte over is enough to refuse it
        try:
            voice = await door.in_thread(lambda: voices.save(name, data, ref_text, replace=replace))
        except Exception as error:
            return failure_response(error, f"voice {name!r}")
        return JSONResponse(voice.describe(), status_code=201)

    @router.get("/v1/audio/voices")
    async def list_voices() -> dict[str, Any]:
        found = await door.in_thread(voices.list)
        return {"object": "list", "data": [voice.describe() for voice in found]}

    @router.get("/v1/audio/voices/{name}")
    async def get_voice(name: str) -> Response:
        try:
            return JSONResponse((await door.in_thread(voices.get, name)).describe())
        except Exception as error:
            return failure_response(error, f"voice {name!r}")

    @router.delete("/v1/audio/voices/{name}")
    async def delete_voice(name: str) -> Response:
        try:
            await door.in_thread(voices.delete, name)
        except Exception as error:
            return failure_response(error, f"voice {name!r}")
        return JSONResponse({"id": name, "object": "voice", "deleted": True})

    return router
