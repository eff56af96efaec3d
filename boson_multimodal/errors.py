"""Errors the caller can act on, importable without torch (the worker checks for them before loading it)."""

from __future__ import annotations


class SpeechRequestError(ValueError):
    """The request cannot be generated as asked; the message says why and what to change."""


class SequenceTooLong(SpeechRequestError):
    """A prompt plus its ``max_new_tokens`` does not fit one sequence of the scheduler's cache."""
