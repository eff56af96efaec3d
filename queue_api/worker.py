"""The queue door: RunPod serverless jobs in, the job pipeline's JSON output back.

Translation only: :mod:`higgs_worker.pipeline` carries a job from its input to its output; this module turns
RunPod jobs into pipeline calls, failures into the job's error string, and hands its handler to
``runpod.serverless.start``. ``serverless_handler.py`` (the composition root) builds the pipeline and calls
:func:`serve` when ``ENDPOINT_TYPE`` is ``QUEUE``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import threading
from collections.abc import AsyncIterator, Generator
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

from higgs_worker.errors import answer
from higgs_worker.pipeline import Pipeline, Progress
from higgs_worker.thread_iteration import iterate_in_threads

logger = logging.getLogger("queue_api")


def _job_id(job: dict[str, Any]) -> str:
    return str(job.get("id", "job"))


def failure(job: dict[str, Any], error: Exception) -> dict[str, str]:
    """A job's error string: the reason for errors the client can act on, the type for anything else."""
    return {"error": answer(error, f"job {job.get('id')}", logger).message}


def run_job(pipeline: Pipeline, job: dict[str, Any]) -> dict[str, Any]:
    """Run one job; every failure becomes ``{"error": "<string>"}`` and the worker keeps serving."""
    try:
        return pipeline.run(_job_id(job), job.get("input"), progress=_progress_reporter(job))
    except Exception as error:  # the worker must survive anything a job triggers
        return failure(job, error)


def stream_job(
    pipeline: Pipeline, job: dict[str, Any], cancel: threading.Event | None = None
) -> Generator[dict[str, Any], None, None]:
    """``Pipeline.stream`` with failures as a final ``{"error": ...}`` item (the SDK then fails the job)."""
    try:
        yield from pipeline.stream(_job_id(job), job.get("input"), cancel)
    except Exception as error:  # the worker must survive anything a job triggers
        yield failure(job, error)


def _progress_reporter(job: dict[str, Any]) -> Progress:
    """Long-form progress: logged, and sent to RunPod as the job's interim output when deployed."""
    deployed = bool(os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"))  # the local API has nowhere to send it

    def report(done: int, total: int) -> None:
        logger.info("job %s: piece %d of %d generated", job.get("id"), done, total)
        # progress_update posts from a thread of its own: after the last piece it could overtake the result
        # and show a finished job as in progress again, so the result itself reports the last piece.
        if deployed and done < total:
            import runpod

            runpod.serverless.progress_update(job, {"pieces_done": done, "pieces_total": total})

    return report


class QueueDoor:
    """The handlers the runpod SDK calls, over one pipeline.

    Jobs run on a pool of one thread per concurrent job (asyncio's default pool is sized by CPU count, not by
    ``CONCURRENCY``), so the SDK's event loop keeps answering heartbeats while they generate.
    """

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.threads = ThreadPoolExecutor(pipeline.settings.most_concurrent, thread_name_prefix="job")

    async def handler(self, job: dict[str, Any]) -> dict[str, Any]:
        return await asyncio.get_running_loop().run_in_executor(self.threads, run_job, self.pipeline, job)

    async def stream_handler(self, job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The handler with STREAMING=true: each audio chunk is yielded as soon as it is encoded.

        When RunPod cancels the job, closing the stream stops the generation (after the chunk in flight; a
        stream still making its whole clip first, for a tempo change or verification, at its next check).
        """
        cancel = threading.Event()
        try:
            async for item in iterate_in_threads(stream_job(self.pipeline, job, cancel), self.threads):
                yield item
        finally:
            cancel.set()

    def concurrency_modifier(self, _current: int) -> int:
        """The SDK asks again and again: the answer grows once the engine is sized from GPU memory."""
        return self.pipeline.runtime.concurrency()

    def sdk_config(self) -> dict[str, Any]:
        """What ``runpod.serverless.start`` takes. The SDK fixes the handler's kind at start, so streaming
        is a per-endpoint mode: /run and /runsync get the aggregated chunks, /stream gets them as they come.
        """
        if self.pipeline.settings.streaming:
            config: dict[str, Any] = {"handler": self.stream_handler, "return_aggregate_stream": True}
        else:
            config = {"handler": self.handler}
        return config | {"concurrency_modifier": self.concurrency_modifier}


def serve(pipeline: Pipeline) -> None:
    """Take jobs from RunPod's queue (or the SDK's local API with ``--rp_serve_api``) until stopped."""
    runpod = import_runpod()
    if pipeline.settings.preload_models:
        logger.info("PRELOAD_MODELS=true: fetching and loading the models before taking jobs")
        # Keep serving if it fails: each job then reports why the models are missing, and retries.
        pipeline.runtime.prepare()
    runpod.serverless.start(QueueDoor(pipeline).sdk_config())


def cpu_brand() -> str:
    """The CPU's name as the kernel reports it (``model name`` in /proc/cpuinfo), or the platform's."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def import_runpod() -> ModuleType:
    """The runpod SDK, imported without its CPU probe.

    Importing the SDK names the CPU for its ``--rp_debugger`` output (``rp_debugger.PROCESSOR``) with
    py-cpuinfo's ``get_cpu_info()``, which starts a second Python interpreter and runs CPUID probes in it:
    about a second of every worker start, before the worker can take a job (workhorsy/py-cpuinfo#155). The
    name from /proc/cpuinfo serves that field; py-cpuinfo is itself again once the SDK is imported.
    """
    import cpuinfo

    probe = cpuinfo.get_cpu_info
    cpuinfo.get_cpu_info = lambda: {"brand_raw": cpu_brand()}
    try:
        import runpod
    finally:
        cpuinfo.get_cpu_info = probe
    return runpod
