"""Per-phase timings of one job, as the job output reports them.

Why a class: a job passes through phases in different orders (a cache hit skips generation, a long text in
streaming mode generates before it chunks), and a phase may be entered twice (loading asked for by two
steps). Each phase's time is added, never overwritten, so a phase that ran is never reported as 0 because a
later step found its work already done.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Timings:
    def __init__(self) -> None:
        self._started = time.perf_counter()
        self._seconds: dict[str, float] = {}

    def add(self, phase: str, seconds: float) -> None:
        self._seconds[phase] = self._seconds.get(phase, 0.0) + seconds

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the ``with`` block as (part of) phase ``name``, also when it raises."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def since_start(self) -> float:
        return time.perf_counter() - self._started

    def as_ms(self) -> dict[str, float]:
        """Every phase so far, and ``total`` since the job started, in milliseconds."""
        phases = self._seconds | {"total": self.since_start()}
        return {name: round(seconds * 1000, 1) for name, seconds in phases.items()}
