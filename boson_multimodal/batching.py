"""Concurrent requests on one worker, generated together when they can share a batch.

Why: a decode step of the real model reads every weight once (~5.7 GB) whatever the batch size, so on a GPU
eight clips in one batch cost little more than one. RunPod hands a worker several jobs at once when its
``concurrency_modifier`` says so; each job's handler submits its request here and waits on a future, and a
single background thread gathers what arrived within a short window and runs ``generate_batch`` on the
compatible groups. Which requests are compatible is the engine's call (``batchable``): transformers cannot
mix conversations with and without reference audio, and a deterministic (greedy or seeded) request must run
alone so that its audio never depends on its neighbours.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

from boson_multimodal.engine import Speech, SpeechRequest, batchable

logger = logging.getLogger(__name__)


class BatchGenerator(Protocol):
    """What the batcher needs from an engine (``HiggsAudioEngine`` is one)."""

    def generate_batch(self, requests: Sequence[SpeechRequest]) -> list[Speech]: ...


@dataclass(frozen=True)
class _Pending:
    request: SpeechRequest
    future: Future[Speech]


_CLOSE = object()  # put on the queue by close(): the thread finishes what it holds and stops


class BatchingEngine:
    """Collects submitted requests for up to ``max_wait_ms`` (or until ``max_batch``) and generates them in
    compatible batches on one background thread; every request gets its own future.

    A failing batch is retried one request at a time, so an error reaches only the futures of the requests
    that cause it. Futures cancelled before their batch starts are dropped.
    """

    def __init__(self, engine: BatchGenerator, *, max_batch: int = 8, max_wait_ms: float = 30.0) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must not be negative, got {max_wait_ms}")
        self._engine = engine
        self._max_batch = max_batch
        self._max_wait_s = max_wait_ms / 1000
        self._queue: queue.SimpleQueue[_Pending | object] = queue.SimpleQueue()
        self._closed = False
        self._close_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="speech-batcher", daemon=True)
        self._thread.start()

    def submit(self, request: SpeechRequest) -> Future[Speech]:
        """Queue one request; await it from asyncio with ``asyncio.wrap_future(batcher.submit(r))``."""
        future: Future[Speech] = Future()
        with self._close_lock:
            if self._closed:
                raise RuntimeError("the batching engine is closed")
            self._queue.put(_Pending(request, future))
        return future

    def close(self) -> None:
        """Generate what was already submitted, then stop the background thread."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_CLOSE)
        self._thread.join()

    def __enter__(self) -> BatchingEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the background thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        closing = False
        while not closing:
            window, closing = self._collect()
            for group in self._groups(window):
                self._generate(group)

    def _collect(self) -> tuple[list[_Pending], bool]:
        """Block for the first request, then gather more until the window closes or a batch is full.

        A deterministic first request is generated at once: nothing may join it, so waiting gains nothing.
        """
        first = self._queue.get()
        if first is _CLOSE:
            return [], True
        window: list[_Pending] = [first]
        deadline = time.monotonic() + (0 if first.request.sampling.deterministic else self._max_wait_s)
        while len(window) < self._max_batch:
            try:
                item = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if item is _CLOSE:
                return window, True
            window.append(item)
        return window, False

    def _groups(self, window: list[_Pending]) -> list[list[_Pending]]:
        """Arrival order; each request joins the first earlier group it is batchable with."""
        groups: list[list[_Pending]] = []
        for pending in window:
            for group in groups:
                if len(group) < self._max_batch and batchable([g.request for g in group] + [pending.request]):
                    group.append(pending)
                    break
            else:
                groups.append([pending])
        return groups

    def _generate(self, group: list[_Pending]) -> None:
        live = [p for p in group if p.future.set_running_or_notify_cancel()]
        if len(live) > 1:
            try:
                results = list(zip(live, self._engine.generate_batch([p.request for p in live]), strict=True))
            except Exception as error:
                logger.warning("a batch of %d failed (%s); generating them one by one", len(live), error)
            else:
                for pending, speech in results:
                    pending.future.set_result(speech)
                return
        for pending in live:
            self._generate_alone(pending)

    def _generate_alone(self, pending: _Pending) -> None:
        try:
            (speech,) = self._engine.generate_batch([pending.request])
        except Exception as error:
            pending.future.set_exception(error)
        else:
            pending.future.set_result(speech)
