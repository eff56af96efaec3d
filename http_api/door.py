"""What every HTTP route that generates shares: one pipeline, its generation slots and job threads, and how
one request becomes a response (:meth:`HttpDoor.speak`).

Slots: each generation holds one of ``CONCURRENCY`` slots from the first byte it reads to the last byte it
sends; a request that finds none free gets 503 at once. The slot belongs to the route until something else
takes it over: the streamed response body, or the job thread of a whole clip. That hand-over is an
``ExitStack.pop_all()``: whoever holds the stack gives the slot back, exactly once, however the request ends.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from higgs_worker.errors import Answer, JobAbandoned, answer
from higgs_worker.job.plan import StreamKind
from higgs_worker.pipeline import Clip, Pipeline, PreparedJob
from higgs_worker.runtime import Readiness
from higgs_worker.thread_iteration import iterate_in_threads
from http_api.errors import error_response, failure_response
from http_api.limits import RETRY_AFTER_S, Slots

logger = logging.getLogger("http_api")

T = TypeVar("T")
DISCONNECT_POLL_S = 0.5
OPENAI_DEFAULT_FORMAT = "mp3"  # what OpenAI's speech API returns when the body names no format
StreamBody = Callable[[Pipeline, PreparedJob, dict[str, Any]], Generator[bytes, None, None]]


@dataclass(frozen=True)
class SpeechReply:
    """How one route answers a generation: the stream it asks the plan for, and how it sends either."""

    stream: StreamKind | None  # what the route streams (None: it always answers with the whole clip)
    body: StreamBody  # the stream's bytes, made on job threads; what it finds (words…) goes in the dict
    media_type: Callable[[PreparedJob], str]
    closing: Callable[[dict[str, Any]], bytes]  # the last bytes of a stream, from what its body found
    whole: Callable[[Clip], Response]
    # A failure after the first byte (the status is sent by then): the stream's error event; b"": none.
    failed: Callable[[Answer], bytes] = lambda _answer: b""


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its body iterator, at once, also when the client left.

    Closing the iterator is what cancels a generation and frees its slot; left to the garbage collector it
    would happen at some later time, or never.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if isinstance(self.body_iterator, AsyncGenerator):  # ours always are; starlette types it wider
                await self.body_iterator.aclose()


class HttpDoor:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.slots = Slots(pipeline.runtime.concurrency)
        # Threads for generations (one per slot) plus room for the short blocking steps around them.
        most = pipeline.settings.most_concurrent + 4
        self.threads = ThreadPoolExecutor(most, thread_name_prefix="http-job")

    async def in_thread(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.threads, function, *args)

    def refusal(self) -> Response | None:
        """Take a generation slot for this request, or the answer that refuses it (not ready, or busy)."""
        runtime = self.pipeline.runtime
        if runtime.readiness is not Readiness.READY:
            if runtime.readiness is Readiness.FAILED:
                message = f"the worker could not prepare its models: {runtime.failure}"
            else:
                message = "the worker is still preparing its models; retry shortly"
            retry = {"Retry-After": str(RETRY_AFTER_S * 5)}
            return error_response(503, message, kind="server_error", code="not_ready", headers=retry)
        if self.slots.take():
            return None
        return error_response(
            503,
            "the worker is busy with as many generations as it runs at once (CONCURRENCY); retry shortly",
            kind="server_error",
            code="overloaded",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    async def dry_run(self, body: dict[str, Any]) -> Response:
        """No models, no slot: how the request would be read, as JSON."""
        try:
            request = self.pipeline.validate(body, openai_names=True)
            return JSONResponse(await self.in_thread(self.pipeline.dry_run, request))
        except Exception as error:
            return failure_response(error, "dry run")

    async def speak(self, request: Request, body: dict[str, Any], reply: SpeechReply, name: str) -> Response:
        """One generation, from an OpenAI-shaped body to the route's response, streamed where it can be."""
        if "response_format" not in body and "output_format" not in body:
            body = body | {"response_format": OPENAI_DEFAULT_FORMAT}
        if body.get("dry_run") is True:
            return await self.dry_run(body)
        refusal = self.refusal()
        if refusal is not None:
            return refusal
        job_id = f"{name}-{uuid.uuid4().hex[:12]}"
        with ExitStack() as slot:
            slot.callback(self.slots.give_back)
            try:
                job = self.pipeline.validate(body, openai_names=True)
                prepared = await self.in_thread(
                    lambda: self.pipeline.prepare(job_id, job, reply.stream, to_s3=False)
                )
                clip = self.pipeline.cached(prepared)
                if clip is None and prepared.plan.stream is not None:
                    found: dict[str, Any] = {}
                    pieces = iterate_in_threads(reply.body(self.pipeline, prepared, found), self.threads)
                    first = await anext(pieces, b"")  # a failure before any audio still gets its own status
                    sent = _sent(first, pieces, reply, found, prepared, slot.pop_all())
                    return ClosingStreamingResponse(sent, media_type=reply.media_type(prepared))
                if clip is None:
                    clip = await self._whole_clip(request, prepared, slot.pop_all())
                return reply.whole(clip)
            except JobAbandoned:
                return Response(status_code=499)
            except Exception as error:
                return failure_response(error, job_id)

    async def _whole_clip(self, request: Request, prepared: PreparedJob, slot: ExitStack) -> Clip:
        """The clip, generated on a job thread that owns the request's slot: it gives the slot back when
        the work ends, however it ends; a client that leaves first cancels the work."""
        job = self.threads.submit(self.pipeline.clip, prepared)
        job.add_done_callback(_release(slot, prepared.job_id))
        return await _unless_client_leaves(request, job, prepared.cancel)


async def _sent(
    first: bytes,
    rest: AsyncIterator[bytes],
    reply: SpeechReply,
    found: dict[str, Any],
    prepared: PreparedJob,
    slot: ExitStack,
) -> AsyncIterator[bytes]:
    """The response body; closing it stops the generation and gives the slot back.

    The job's cancel is set when the body ends, so a stream that is still making its whole clip first (a
    tempo change, verification) stops at its next check instead of running to the end for nobody. A failure
    after the first byte ends the body with the reply's error event (SSE has one); a body with no such event
    (raw audio) breaks off instead, so the client sees an incomplete transfer rather than a short clip.
    """
    try:
        if first:
            yield first
        try:
            async for data in rest:
                yield data
        except JobAbandoned:
            return
        except Exception as error:
            last = reply.failed(answer(error, prepared.job_id, logger))
            if not last:  # raw audio has no way to say it: the transfer breaks off, so the client knows
                raise
        else:
            last = reply.closing(found)
        if last:
            yield last
    finally:
        prepared.cancel.set()
        await rest.aclose()  # type: ignore[attr-defined]
        slot.close()


def _release(slot: ExitStack, job_id: str) -> Callable[[Future[Clip]], None]:
    """The done callback of a whole-clip generation: the slot is free when the work is, however it ended."""

    def done(job: Future[Clip]) -> None:
        slot.close()
        if isinstance(job.exception(), JobAbandoned):
            logger.info("%s: the client went away; its generation was cancelled", job_id)

    return done


async def _unless_client_leaves(request: Request, job: Future[Clip], cancel: threading.Event) -> Clip:
    """The job's result; if the client disconnects first, ``cancel`` is set and JobAbandoned raised."""
    wrapped = asyncio.wrap_future(job)
    while True:
        done, _ = await asyncio.wait({wrapped}, timeout=DISCONNECT_POLL_S)
        if done:
            return wrapped.result()
        if await request.is_disconnected():
            cancel.set()
            # Nobody awaits the job now: take its outcome (JobAbandoned, expected) when it comes, so asyncio
            # does not log it as an error ("Future exception was never retrieved").
            wrapped.add_done_callback(lambda job: job.cancelled() or job.exception())
            raise JobAbandoned("the client went away")
