"""Consume a blocking iterator from asyncio without blocking the event loop, and close it safely.

Why: both doors serve from one event loop (the runpod SDK's, or uvicorn's) while generation blocks a thread.
Each ``next`` runs on a job thread. When the consumer goes away (RunPod cancels the job, an HTTP client
disconnects) the iterator must be closed, which is what cancels its generation; but a generator cannot be
closed while it runs on another thread, so the close waits for the item in flight (the lock) and then runs.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Generator
from concurrent.futures import Executor
from typing import TypeVar, cast

T = TypeVar("T")


async def iterate_in_threads(items: Generator[T, None, None], executor: Executor) -> AsyncIterator[T]:
    """Yield ``items`` one by one, each produced on ``executor``; closing this closes ``items``."""
    loop = asyncio.get_running_loop()
    turn = threading.Lock()
    done = object()

    def advance() -> object:
        with turn:
            return next(items, done)

    def close() -> None:
        with turn:
            items.close()

    try:
        while (item := await loop.run_in_executor(executor, advance)) is not done:
            yield cast(T, item)  # not `done`, so one of the items
    finally:
        await asyncio.shield(loop.run_in_executor(executor, close))
