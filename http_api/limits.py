"""What keeps an HTTP worker responsive under load: slots for generations and a cap on request bodies.

A load balancer has no queue: a request the worker cannot start now must be refused at once (503 with
``Retry-After``) so the balancer or the client tries elsewhere, instead of piling up behind the engine. A body
over the limit is refused from its ``Content-Length`` before any of it is read, and a body without one
(chunked) is cut off as soon as it passes the limit.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

RETRY_AFTER_S = 1


class Slots:
    """As many generations at a time as ``capacity()`` says; taking a slot never waits.

    The capacity is asked at every take: with slots sized from GPU memory it grows once the engine is loaded.
    """

    def __init__(self, capacity: Callable[[], int]) -> None:
        self._capacity = capacity
        self._taken = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self._taken >= self._capacity():
                return False
            self._taken += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            if self._taken == 0:
                raise RuntimeError("a slot was given back that nobody held")
            self._taken -= 1


def _too_large_body(limit: int) -> bytes:
    message = f"the request body is over the limit of {limit} bytes (MAX_REQUEST_BYTES)"
    error: dict[str, Any] = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    return json.dumps({"error": error}).encode()


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``limit`` bytes, before it is read whole."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        # Read the body here, stopping as soon as it passes the limit; the app then gets it replayed.
        chunks: list[bytes] = []
        seen, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its whole body
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            more = message.get("more_body", False)
            if seen > self.limit:
                await self._refuse(send)
                return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: http.disconnect when the client leaves

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        body = _too_large_body(self.limit)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
