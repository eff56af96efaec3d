"""OpenAI's error shape for every failure of the HTTP door, with a status that says whose fault it is.

``{"error": {"message", "type", "param", "code"}}``: the message is the pipeline's own (it already names the
field as the client sent it), ``param`` is that field's name, and the status follows the kind of failure.
"""

from __future__ import annotations

import logging
import re
import traceback

from fastapi.responses import JSONResponse

from boson_multimodal.errors import SpeechRequestError
from higgs_worker.delivery import DeliveryError
from higgs_worker.model_store import ModelStoreError
from higgs_worker.pipeline import JobError
from higgs_worker.quality.service import NotVerified
from higgs_worker.redaction import redact
from higgs_worker.references import ReferenceAudioError, UnknownVoiceError
from higgs_worker.request_plan import RequestPlanError
from higgs_worker.runtime import RuntimeConfigError
from higgs_worker.schema import RequestError
from higgs_worker.voice_library import InvalidVoice, VoiceExists, VoiceNotFound, VoiceTooLarge

logger = logging.getLogger("http_api")

_FIELD = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?=[:.\[ ])")

# exception type → (HTTP status, OpenAI error type); the first match wins, so subclasses come first
STATUS: tuple[tuple[type[Exception], int, str], ...] = (
    (UnknownVoiceError, 404, "invalid_request_error"),
    (VoiceNotFound, 404, "invalid_request_error"),
    (VoiceExists, 409, "invalid_request_error"),
    (VoiceTooLarge, 413, "invalid_request_error"),
    (InvalidVoice, 400, "invalid_request_error"),
    (RequestError, 400, "invalid_request_error"),
    (SpeechRequestError, 400, "invalid_request_error"),
    (ReferenceAudioError, 422, "invalid_request_error"),
    (RequestPlanError, 422, "invalid_request_error"),
    (DeliveryError, 502, "server_error"),
    (ModelStoreError, 503, "server_error"),
    (RuntimeConfigError, 503, "server_error"),
    (JobError, 500, "server_error"),
    (NotVerified, 500, "server_error"),  # no attempt said the text: not the request's fault
)


def error_response(
    status: int,
    message: str,
    *,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def param_of(message: str) -> str | None:
    """The field a pipeline message starts with (``"temperature: must be…"`` → ``temperature``)."""
    match = _FIELD.match(message)
    return match.group(1) if match else None


def failure_response(error: Exception, what: str) -> JSONResponse:
    """The response for an exception raised while serving ``what`` (a request id, for the log)."""
    for kind, status, error_type in STATUS:
        if isinstance(error, kind):
            message = redact(str(error))
            logger.warning("%s failed (%d): %s", what, status, message)
            return error_response(status, message, kind=error_type, param=param_of(message))
    logger.error("%s crashed: %s", what, redact(traceback.format_exc()))
    return error_response(
        500, redact(f"internal error ({type(error).__name__}): {error}"), kind="server_error"
    )
