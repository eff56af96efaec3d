"""Keep secrets out of logs, error strings and job outputs.

Why a safety net on top of careful messages: exceptions raised deep inside boto3, huggingface_hub or the
runpod SDK can quote headers, URLs or configuration. Every string the worker emits — log records included —
passes through ``redact``, which replaces the value of every secret environment variable with a marker.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

SECRET_VARIABLES = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "RUNPOD_API_KEY",
    "RUNPOD_AI_API_KEY",
)
MIN_SECRET_LENGTH = 6  # shorter values would redact ordinary words
# Credentials that look like credentials even when they are not in this process's environment.
TOKEN_PATTERNS = (
    re.compile(r"hf_[A-Za-z0-9]{20,}"),
    re.compile(r"(?i)(authorization:\s*bearer\s+)\S+"),
    re.compile(r"(?i)(X-Amz-Signature=|X-Amz-Credential=|X-Amz-Security-Token=)[^&\s\"']+"),
)
MARKER = "[REDACTED]"


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    env = os.environ if env is None else env
    values = {env.get(name, "").strip() for name in SECRET_VARIABLES}
    return sorted((v for v in values if len(v) >= MIN_SECRET_LENGTH), key=len, reverse=True)


def redact(text: str, env: Mapping[str, str] | None = None) -> str:
    for value in secret_values(env):
        text = text.replace(value, MARKER)
    for pattern in TOKEN_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + MARKER, text)
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that renders each record and redacts secrets from the final text."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg, record.args = redact(message), None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install_log_redaction() -> None:
    """Attach the filter to every handler of the root logger (records from all libraries pass there)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
