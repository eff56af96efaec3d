"""Secrets never leave the worker: redaction of strings and of every log record."""

from __future__ import annotations

import logging

from higgs_worker.redaction import MARKER, RedactingFilter, redact

ENV = {
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "HF_TOKEN": "hf_abcdefghijklmnopqrstuvwxyz123456",
}


def test_values_of_secret_variables_are_replaced() -> None:
    text = f"boom with {ENV['AWS_SECRET_ACCESS_KEY']} and {ENV['HF_TOKEN']}"
    cleaned = redact(text, ENV)
    assert ENV["AWS_SECRET_ACCESS_KEY"] not in cleaned and ENV["HF_TOKEN"] not in cleaned
    assert cleaned.count(MARKER) == 2


def test_token_shapes_are_replaced_even_when_unknown() -> None:
    cleaned = redact(
        "Authorization: Bearer abc.def and hf_ZZZZZZZZZZZZZZZZZZZZZZZZ and X-Amz-Signature=deadbeef&x=1", {}
    )
    assert "abc.def" not in cleaned and "hf_ZZZZ" not in cleaned and "deadbeef" not in cleaned
    assert "x=1" in cleaned


def test_short_values_are_not_treated_as_secrets() -> None:
    assert redact("the word abc stays", {"HF_TOKEN": "abc"}) == "the word abc stays"


def test_log_records_are_redacted(monkeypatch, caplog) -> None:
    monkeypatch.setenv("RUNPOD_API_KEY", "rpa_SECRETSECRETSECRET")
    logger = logging.getLogger("test.redaction")
    caplog.handler.addFilter(RedactingFilter())
    try:
        logger.warning("key is %s", "rpa_SECRETSECRETSECRET")
        try:
            raise RuntimeError("rpa_SECRETSECRETSECRET")
        except RuntimeError:
            logger.exception("failed")
    finally:
        caplog.handler.filters.clear()
    assert "rpa_SECRETSECRETSECRET" not in caplog.text
    assert MARKER in caplog.text
