"""A loopback stand-in for RunPod's job queue, and the real worker process running against it.

Why: the runpod SDK's production loop (job-take, concurrency, job-done, streaming, heartbeat) is what runs on
the platform, and it differs from the local ``--rp_serve_api`` server: it takes jobs in batches, wraps errors
its own way and posts results over HTTP. The SDK (1.12.0) builds its URLs from environment variables, so a
small HTTP server on 127.0.0.1 can stand in for the platform and record exactly what the worker sends:

- ``RUNPOD_WEBHOOK_GET_JOB`` with ``$ID`` → the worker id; the SDK appends ``&job_in_progress=0|1`` and,
  when it wants N > 1 jobs, swaps ``/job-take/`` for ``/job-take-batch/`` and appends ``&batch_size=N``. The
  answer is a job ``{"id", "input"}`` (single) or a list of jobs (batch), or 204 when there is none. Like the
  platform, the server holds the request open for a moment before a 204 (else the SDK polls in a spin).
- ``/job-stop/`` (derived from the job-take URL): long-polled; 204 means no job to stop.
- ``RUNPOD_WEBHOOK_POST_OUTPUT`` / ``RUNPOD_WEBHOOK_POST_STREAM`` with ``$RUNPOD_POD_ID`` and ``$ID`` (the
  job id); the SDK appends ``&isStream=true|false`` and POSTs the JSON result with a form content type.
- ``RUNPOD_WEBHOOK_PING`` with ``$RUNPOD_POD_ID``: GET with ``job_id`` (in-progress ids), ``runpod_version``.

It also notes when each job became visible and when each of its stream chunks and its result arrived
(``time.perf_counter()`` in this process), which is what a client measures as latency (benchmarks/).
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from tests.support.worker_process import WorkerProcess

ENDPOINT_ID = "loopback-endpoint"
WORKER_ID = "loopback-worker"
API_KEY = "rp-fake-key-for-the-loopback-queue"  # not a secret: the stand-in only checks it is sent
ROUTE = re.compile(r"^/v2/(?P<endpoint>[^/]+)/(?P<action>[a-z-]+)/(?P<worker>[^/]+)(?:/(?P<job>[^/]+))?$")


@dataclass(frozen=True)
class Take:
    """One job-take request as the SDK sent it, and the job ids it was given."""

    batch: bool
    batch_size: int
    job_in_progress: bool
    job_ids: tuple[str, ...]


@dataclass(frozen=True)
class JobOutcome:
    """What a client polling ``/status`` would see once the worker posted the result."""

    status: Literal["COMPLETED", "FAILED"]
    output: Any
    error: Any
    stream: list[Any]  # the ``output`` of each streamed chunk, in order
    progress: list[Any]  # the ``output`` of each progress update, in order
    done_posts: int  # how many times the worker posted a result for this job (1 unless it retried)
    enqueued_at: float  # perf_counter() when the job became visible to the worker
    stream_at: list[float]  # perf_counter() when each streamed chunk arrived
    done_at: float  # perf_counter() when the (last) result arrived

    @property
    def first_chunk_s(self) -> float:
        """Seconds from the job becoming visible to its first stream chunk reaching the platform."""
        return self.stream_at[0] - self.enqueued_at

    @property
    def latency_s(self) -> float:
        """Seconds from the job becoming visible to its result reaching the platform."""
        return self.done_at - self.enqueued_at


@dataclass
class _Job:
    id: str
    input: Any
    done: threading.Event = field(default_factory=threading.Event)
    results: list[dict[str, Any]] = field(default_factory=list)
    stream: list[dict[str, Any]] = field(default_factory=list)
    progress: list[Any] = field(default_factory=list)
    enqueued_at: float = field(default_factory=time.perf_counter)
    stream_at: list[float] = field(default_factory=list)
    done_at: float = 0.0


class RunPodQueue:
    """The platform's side of the worker protocol on 127.0.0.1; thread-safe; use as a context manager."""

    def __init__(self, *, long_poll_s: float = 0.5) -> None:
        self.long_poll_s = long_poll_s
        self.takes: list[Take] = []
        self.pings: list[dict[str, list[str]]] = []
        self.authorizations: set[str] = set()  # every Authorization header value the worker sent
        self.unexpected: list[str] = []  # requests outside the protocol
        self._jobs: dict[str, _Job] = {}
        self._pending: deque[str] = deque()
        self._changed = threading.Condition()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v2/{ENDPOINT_ID}"

    def __enter__(self) -> RunPodQueue:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def worker_env(self) -> dict[str, str]:
        """The variables that put the runpod SDK into production mode against this queue."""
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{self.base_url}/job-take/$ID?gpu=loopback",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{self.base_url}/job-done/$RUNPOD_POD_ID/$ID?gpu=loopback",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{self.base_url}/job-stream/$RUNPOD_POD_ID/$ID?gpu=loopback",
            "RUNPOD_WEBHOOK_PING": f"{self.base_url}/ping/$RUNPOD_POD_ID?gpu=loopback",
            "RUNPOD_POD_ID": WORKER_ID,
            "RUNPOD_AI_API_KEY": API_KEY,
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "RUNPOD_SKIP_GPU_CHECK": "true",
        }

    # -- the test's side ---------------------------------------------------------------------------------
    def enqueue(self, job_input: Any) -> str:
        return self.enqueue_many([job_input])[0]

    def enqueue_many(self, inputs: list[Any]) -> list[str]:
        """Jobs made visible at the same instant (a burst of client requests)."""
        jobs = [_Job(f"job-{uuid.uuid4().hex[:12]}", job_input) for job_input in inputs]
        with self._changed:
            for job in jobs:
                self._jobs[job.id] = job
                self._pending.append(job.id)
            self._changed.notify_all()
        return [job.id for job in jobs]

    def wait(self, job_id: str, timeout: float = 300.0) -> JobOutcome:
        job = self._jobs[job_id]
        if not job.done.wait(timeout):
            raise TimeoutError(f"job {job_id} got no result within {timeout} s")
        result = job.results[-1]
        failed = "error" in result
        return JobOutcome(
            status="FAILED" if failed else "COMPLETED",
            output=result.get("output"),
            error=result.get("error"),
            stream=[chunk.get("output") for chunk in job.stream],
            progress=list(job.progress),
            done_posts=len(job.results),
            enqueued_at=job.enqueued_at,
            stream_at=list(job.stream_at),
            done_at=job.done_at,
        )

    def wait_for_take(self, timeout: float = 120.0) -> None:
        """Until the worker asks for work: the production loop has started."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not self.takes:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no job-take request within {timeout} s")
                self._changed.wait(remaining)

    # -- the worker's side -------------------------------------------------------------------------------
    def _take(self, limit: int, wait_s: float) -> list[_Job]:
        with self._changed:
            self._changed.wait_for(lambda: self._pending, timeout=wait_s)
            taken: list[_Job] = []
            while self._pending and len(taken) < limit:
                taken.append(self._jobs[self._pending.popleft()])
            return taken

    def _hold(self) -> None:
        """The stop channel: nothing to stop here, answered after a long-poll's pause."""
        with self._changed:
            self._changed.wait(timeout=self.long_poll_s)

    def _record_take(self, take: Take) -> None:
        with self._changed:
            self.takes.append(take)
            self._changed.notify_all()

    def _record_post(self, action: str, job_id: str, body: dict[str, Any]) -> bool:
        arrived = time.perf_counter()
        job = self._jobs.get(job_id)
        if job is None:
            return False
        if action == "job-stream":
            job.stream.append(body)
            job.stream_at.append(arrived)
        elif body.get("status") == "IN_PROGRESS":  # runpod.serverless.progress_update: not the result yet
            job.progress.append(body.get("output"))
        else:
            job.results.append(body)
            job.done_at = arrived
            job.done.set()
        return True

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        queue = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                route, query = self._route()
                if route is None:
                    return
                action = route["action"]
                if action in {"job-take", "job-take-batch"}:
                    batch = action == "job-take-batch"
                    size = int(query.get("batch_size", ["1"])[0])
                    jobs = queue._take(size, queue.long_poll_s)
                    in_progress = query.get("job_in_progress", ["0"])[0] == "1"
                    queue._record_take(Take(batch, size, in_progress, tuple(j.id for j in jobs)))
                    if not jobs:
                        return self._reply(204)
                    payload = [{"id": j.id, "input": j.input} for j in jobs]
                    return self._reply(200, payload if batch else payload[0])
                if action == "job-stop":
                    queue._hold()
                    return self._reply(204)
                if action == "ping":
                    queue.pings.append(query)
                    return self._reply(200, {})
                self._unexpected()

            def do_POST(self) -> None:
                route, _query = self._route()
                if route is None:
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if route["action"] not in {"job-done", "job-stream"} or not route["job"]:
                    return self._unexpected()
                if not queue._record_post(route["action"], route["job"], json.loads(body)):
                    return self._reply(404, {"error": f"unknown job {route['job']}"})
                self._reply(200, {})

            def _route(self) -> tuple[dict[str, str] | None, dict[str, list[str]]]:
                queue.authorizations.add(self.headers.get("Authorization", ""))
                parts = urlsplit(self.path)
                match = ROUTE.match(parts.path)
                if match is None or match["endpoint"] != ENDPOINT_ID or match["worker"] != WORKER_ID:
                    self._unexpected()
                    return None, {}
                return match.groupdict(), parse_qs(parts.query)

            def _unexpected(self) -> None:
                queue.unexpected.append(f"{self.command} {self.path}")
                self._reply(404, {"error": "not part of the worker protocol"})

            def _reply(self, status: int, payload: Any = None) -> None:
                data = b"" if status == 204 else json.dumps(payload).encode()
                self.send_response(status)
                if data:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:  # quiet test output
                pass

        return Handler


class ProductionWorker(WorkerProcess):
    """``serverless_handler.py`` without ``--rp_serve_api``: the SDK's production loop against ``queue``."""

    def __init__(self, queue: RunPodQueue, env: dict[str, str], log_path: Path) -> None:
        self.queue = queue
        super().__init__([], {**env, **queue.worker_env()}, log_path)

    def __enter__(self) -> ProductionWorker:
        try:
            self.queue.wait_for_take()
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"the worker never asked for a job:\n{self.log}") from None
        return self
