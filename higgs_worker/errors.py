"""Every error the worker raises, in one hierarchy: what the client is told, and with which status.

Why one module: both doors answer from it. The queue door sends a :class:`WorkerError`'s message as the
job's error and anything else as "internal error"; the HTTP door answers a :class:`WorkerError` with its
``status`` and OpenAI error ``kind``, and anything else with 500. An error class added anywhere but here would
be an internal error to the client, so ``tests/test_errors.py`` fails for any class raised in the shipped code
that is neither built in nor defined here.

The message of a :class:`WorkerError` is written for the client: it starts with the field it is about,
named as the client sent it (``input``, not ``transcript``, for an OpenAI client), and says what is allowed.
It holds no secret and no user audio.

::

    WorkerError                       500  the message is the answer
    ├── BadRequest                    400  a field's value is not allowed
    │   ├── RequestError                   the job input, field by field (schema)
    │   ├── RequestPlanError               valid JSON that cannot be carried out as asked (S3 fields)
    │   ├── InvalidVoiceValue              a ref_audio / voice value of no allowed form
    │   ├── InvalidVoice                   a voice library upload's name or transcript
    │   └── SpeechNotPossible              the engine cannot generate it as asked (too long for a sequence)
    ├── NotFound                      404
    │   ├── UnknownVoiceError              a voice name in a job that no voice has
    │   └── VoiceNotFound                  a saved voice the library does not hold
    ├── VoiceExists                   409  the name is taken (a saved voice, a preset, an OpenAI voice)
    ├── VoiceTooLarge                 413
    ├── ReferenceAudioError           422  a voice that cannot be used: not audio, too short, not fetched
    │   └── InvalidVoiceAudio              a voice library upload that is not usable audio
    ├── JobError                      500  the generation itself failed (no audio)
    │   └── NotVerified                    require_verified, and no attempt said the text well enough
    ├── DeliveryError                 502  the clip could not be delivered (S3)
    └── Unavailable                   503  the worker cannot serve it now
        ├── ModelStoreError                the models could not be fetched or checked
        └── RuntimeConfigError             the settings ask for more than this machine has

    JobAbandoned                           the client went away: nobody is told anything
    SettingsError                          a bad environment variable: the worker does not start
    DemoRefused                            --demo would overwrite a real model: the boot stops
    FetchError, AudioDecodeError           inside steps; each caller turns them into one of the above
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from typing import ClassVar

from higgs_worker.redaction import redact


class WorkerError(Exception):
    """An error whose message is the client's answer."""

    status: ClassVar[int] = 500
    kind: ClassVar[str] = "server_error"  # OpenAI's error ``type``


class BadRequest(WorkerError):
    status, kind = 400, "invalid_request_error"


class RequestError(BadRequest, ValueError):
    """The job input is invalid; the message names every offending field and what is allowed."""


class RequestPlanError(BadRequest, ValueError):
    """The request is valid JSON but cannot be carried out as asked; the message names the field."""


class SpeechNotPossible(BadRequest):
    """The engine refused the request as asked (``boson_multimodal.errors.SpeechRequestError``)."""


class NotFound(WorkerError):
    status, kind = 404, "invalid_request_error"


class VoiceExists(WorkerError):
    """A voice of that name is already saved, or the name belongs to a preset or an OpenAI voice."""

    status, kind = 409, "invalid_request_error"


class VoiceTooLarge(WorkerError):
    """The uploaded file is larger than a reference may be."""

    status, kind = 413, "invalid_request_error"


class ReferenceAudioError(WorkerError, ValueError):
    """A voice the worker cannot use; the message starts with the job field's name."""

    status, kind = 422, "invalid_request_error"


class InvalidVoiceValue(BadRequest, ValueError):
    """A ``ref_audio`` / ``voice`` value of no allowed form (``../x``, an ftp:// URL…)."""


class UnknownVoiceError(NotFound):
    """A voice name in a job that no saved voice, preset or OpenAI voice has."""


class InvalidVoice(BadRequest):
    """A voice library upload's name or transcript is not acceptable."""


class InvalidVoiceAudio(ReferenceAudioError):
    """A voice library upload that is not usable audio (not audio, too short, too long)."""


class VoiceNotFound(NotFound):
    """No saved voice of that name on this volume."""


class JobError(WorkerError):
    """A job that cannot complete; the message goes to the client as the job's error."""


class NotVerified(JobError):
    """``require_verified``: no attempt said the text well enough; the message says how close it came.

    A 500, not a 4xx: the request was fine and the model fell short (a retry without a seed may pass).
    """


class DeliveryError(WorkerError):
    """The clip could not reach the user; the message is meant for the user and holds no secrets."""

    status = 502


class Unavailable(WorkerError):
    status = 503


class ModelStoreError(Unavailable):
    """The repo could not be made available; the message is meant for the user and never holds the token."""


class RuntimeConfigError(Unavailable):
    """The settings ask for something this machine cannot give (the message names the settings)."""


class JobAbandoned(Exception):
    """The client went away; the generation was stopped and nobody is waiting for an answer."""


class SettingsError(ValueError):
    """An environment variable holds a value the worker cannot use."""


class DemoRefused(SystemExit):
    """``demo_model.py``: the volume already holds something the demo must not overwrite (the boot stops)."""


class FetchError(Exception):
    """The URL could not be fetched under the policy. The message never holds a query string or credentials.

    ``status`` is the HTTP status when the server answered with an error, so callers can tell "not found"
    from other failures.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AudioDecodeError(ValueError):
    """Bytes that were supposed to be audio could not be decoded; the message says why, for the user."""


@dataclass(frozen=True)
class Answer:
    """What a door tells the client about a failed job or request."""

    status: int
    kind: str  # OpenAI's error type
    message: str  # redacted: no secret reaches the client


def answer(error: BaseException, what: str, logger: logging.Logger) -> Answer:
    """The client's answer for ``error`` raised while serving ``what`` (a job or request id), logged once:
    a :class:`WorkerError` as a warning with its message, anything else as an error with its traceback."""
    if isinstance(error, WorkerError):
        message = redact(str(error))
        logger.warning("%s failed (%d): %s", what, error.status, message)
        return Answer(error.status, error.kind, message)
    logger.error("%s crashed: %s", what, redact(traceback.format_exc()))
    return Answer(500, "server_error", redact(f"internal error ({type(error).__name__}): {error}"))
