"""Run the real worker (``serverless_handler.py`` under the runpod SDK's local API) as a subprocess.

Why a real process: the SDK decides how the handler is called (async, generator, aggregation, error
wrapping), and the model store's guarantees are about processes sharing a volume. Tests talk to it over HTTP
exactly as a client of ``/run``, ``/runsync``, ``/status`` and ``/stream`` would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SECRET_NAMES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "HF_TOKEN",
    "RUNPOD_API_KEY",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_env(volume: Path, hub_url: str | None, **extra: str) -> dict[str, str]:
    """The environment of a worker on ``volume``: no inherited secrets, the hub stand-in as the hub."""
    env = {k: v for k, v in os.environ.items() if k not in SECRET_NAMES and not k.startswith("RUNPOD_")}
    env.update(
        RUNPOD_VOLUME_PATH=str(volume),
        RUNPOD_LOG_LEVEL="INFO",
        HF_HOME=str(volume.parent / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONUNBUFFERED="1",
        UVICORN_LOG_LEVEL="warning",
    )
    env["HF_ENDPOINT"] = hub_url or "http://127.0.0.1:9"  # port 9 (discard): nothing listens
    env.update(extra)
    return env


class WorkerProcess:
    """``serverless_handler.py`` with ``args``, its output in ``log_path``; stopping leaves nothing behind.

    Started in its own process group: the SDK forks a heartbeat process that stopping must not leave behind.
    """

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "serverless_handler.py", *args],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def __enter__(self):
        self.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def ready(self) -> bool:
        """One look at whether the worker serves (a subclass knows where to look)."""
        raise NotImplementedError

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log}")
            try:
                if self.ready():
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout} s:\n{self.log}")

    @property
    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM (the SDK finishes in-flight jobs and leaves its loop), then the group if it lingers."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(ProcessLookupError):  # the heartbeat process, if it outlived the worker
            os.killpg(self.process.pid, signal.SIGKILL)
        self._log.close()


class LocalWorker(WorkerProcess):
    """The worker under the SDK's local API (``--rp_serve_api``) on a free loopback port."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        api = ["--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", str(self.port)]
        super().__init__(api, env, log_path)

    def ready(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/docs", timeout=2):
            return True

    def post(self, path: str, body: dict[str, Any] | None = None, timeout: float = 300.0) -> dict[str, Any]:
        data = json.dumps(body or {}).encode()
        request = urllib.request.Request(
            f"{self.url}{path}", data=data, headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def runsync(self, job_input: Any, timeout: float = 300.0) -> dict[str, Any]:
        return self.post("/runsync", {"input": job_input}, timeout)

    def run_and_poll(self, job_input: Any, timeout: float = 300.0) -> dict[str, Any]:
        """``/run`` then ``/status`` (the local API executes the job inside the first status call)."""
        submitted = self.post("/run", {"input": job_input})
        assert submitted["status"] == "IN_PROGRESS", submitted
        return self.post(f"/status/{submitted['id']}", timeout=timeout)


class HttpWorker(WorkerProcess):
    """The worker in HTTP mode (``ENDPOINT_TYPE=LOAD_BALANCER``) on a free loopback port.

    ``health_statuses`` records what ``GET /ping`` answered while the worker came up, in order.
    """

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.health_statuses: list[int] = []
        env = env | {"ENDPOINT_TYPE": "LOAD_BALANCER", "HTTP_HOST": "127.0.0.1", "PORT": str(self.port)}
        super().__init__([], env, log_path)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as response:
                self.health_statuses.append(response.status)
                return response.status == 200
        except urllib.error.HTTPError as error:  # (a URLError too: caught here, before wait_ready sees it)
            self.health_statuses.append(error.code)
            return False
