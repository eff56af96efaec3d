"""A spy on the real engine's submissions, for tests that check what became of a sequence."""

from __future__ import annotations

import pytest


def record_submissions(engine, monkeypatch: pytest.MonkeyPatch) -> list:
    """Every handle ``engine.submit`` returns from now on, in order (the engine still does the work)."""
    handles: list = []
    submit = engine.submit

    def recording_submit(*args, **kwargs):
        handles.append(submit(*args, **kwargs))
        return handles[-1]

    monkeypatch.setattr(engine, "submit", recording_submit)
    return handles
