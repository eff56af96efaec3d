"""OpenAI's error shape for every failure of the HTTP door, with a status that says whose fault it is.

``{"error": {"message", "type", "param", "code"}}``: the message is the pipeline's own (it already names the
field as the client sent it), ``param`` is that field's name, and the status and type are the error class's
own (:mod:`higgs_worker.errors`).
"""

from __future__ import annotations

import logging
import re

from fastapi.responses import JSONResponse

from higgs_worker.errors import answer

logger = logging.getLogger("http_api")

_FIELD = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?=[:.\[ ])")


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
    failed = answer(error, what, logger)
    return error_response(failed.status, failed.message, kind=failed.kind, param=param_of(failed.message))
