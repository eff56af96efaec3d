"""Faults around the worker, judged by what the client sees: the hub gone, a killed download, a damaged
store, a full volume, S3 unreachable.

The model store's own guarantees are unit-tested in ``test_model_store.py``; here the same faults go through
the whole worker (a real process under the runpod SDK's local API where the environment matters, the
handler in-process where it does not), and each test checks the job result and that the worker keeps serving.
"""

from __future__ import annotations

import base64
import contextlib
import shutil
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from higgs_worker.pipeline import Pipeline
from higgs_worker.settings import load_settings
from higgs_worker.store.model_store import MARKER_NAME
from queue_api.worker import run_job, stream_job
from tests.support.checkpoints import MODEL_REPO, TOKENIZER_REPO, TinyCheckpoint, complete_store
from tests.support.error_clauses import offending_fields
from tests.support.fixtures_hub import tiny_filesystem
from tests.support.hub_server import HubServer
from tests.support.worker_process import LocalWorker, free_port, worker_env

SHORT_JOB = {"transcript": "Still serving.", "max_new_tokens": 16}
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def stored_volume(hub: HubServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A volume whose model store is complete; tests work on copies of it."""
    volume = tmp_path_factory.mktemp("stored") / "volume"
    complete_store(load_settings({"RUNPOD_VOLUME_PATH": str(volume)}), hub.url)
    return volume


def copy_volume(stored_volume: Path, tmp_path: Path) -> Path:
    volume = tmp_path / "volume"
    shutil.copytree(stored_volume, volume)
    return volume


class PortRelay:
    """Relays every TCP connection on a fixed loopback port to ``target_port``: a hub that "comes back".

    The worker is started with ``HF_ENDPOINT`` at a port where nothing listens; starting the relay there later
    makes the hub reachable at the very address the worker was configured with.
    """

    def __init__(self, port: int, target_port: int) -> None:
        target = ("127.0.0.1", target_port)

        class Relay(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with socket.create_connection(target) as upstream:
                    back = threading.Thread(target=_pipe, args=(upstream, self.request), daemon=True)
                    back.start()
                    _pipe(self.request, upstream)
                    back.join()

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", port), Relay)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def assert_failed_with(result: dict, *needles: str) -> str:
    assert result["status"] == "FAILED", result
    error = result["error"]
    assert isinstance(error, str) and "Traceback" not in error
    for needle in needles:
        assert needle in error, error
    return error


# -- the hub -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_without_a_hub_an_empty_store_fails_clearly_recovers_when_it_returns_then_serves_alone(
    hub: HubServer, tmp_path: Path
) -> None:
    port = free_port()
    env = worker_env(tmp_path / "volume", f"http://127.0.0.1:{port}")
    with LocalWorker(env, tmp_path / "worker.log") as worker:
        error = assert_failed_with(
            worker.runsync(SHORT_JOB), MODEL_REPO, f"http://127.0.0.1:{port}", "HF_ENDPOINT"
        )
        assert "put a complete copy of the repo on the volume" in error
        blank = assert_failed_with(worker.runsync({"transcript": ""}))  # still answering
        assert offending_fields(blank) == {"transcript"}, blank

        relay = PortRelay(port, int(hub.url.rsplit(":", 1)[1]))
        try:
            result = worker.runsync(SHORT_JOB)
        finally:
            relay.close()
        assert result["status"] == "COMPLETED", result
        assert (tmp_path / "volume" / MODEL_REPO / MARKER_NAME).is_file()
        assert (tmp_path / "volume" / TOKENIZER_REPO / MARKER_NAME).is_file()

    # The hub is gone again: a fresh worker serves from the complete store alone.
    with LocalWorker(env, tmp_path / "restarted.log") as restarted:
        result = restarted.runsync(SHORT_JOB)
    assert result["status"] == "COMPLETED", result
    assert result["output"]["model"]["generation"]["commit"] == hub.commit(MODEL_REPO)


@pytest.mark.slow
def test_a_worker_killed_mid_download_leaves_a_store_the_next_worker_completes(
    tiny_checkpoint: TinyCheckpoint, tmp_path: Path
) -> None:
    volume = tmp_path / "volume"
    repos = {MODEL_REPO: tiny_checkpoint.model_dir, TOKENIZER_REPO: tiny_checkpoint.codec_dir}
    with HubServer(repos, throttle_bps=200 * 1024) as slow_hub:
        env = worker_env(volume, slow_hub.url, DOWNLOAD_LOCK_STALE_S="3")
        first = LocalWorker(env, tmp_path / "killed.log")
        try:
            first.wait_ready()
            threading.Thread(target=_ignore_errors, args=(first.runsync, SHORT_JOB), daemon=True).start()
            weights = f"{MODEL_REPO}/{WEIGHTS}"
            deadline = time.monotonic() + 60
            while not slow_hub.file_gets[weights]:
                assert time.monotonic() < deadline, f"the download never reached the weights:\n{first.log}"
                time.sleep(0.05)
            time.sleep(0.5)
            first.process.kill()
            first.process.wait()
        finally:
            first.stop()
        assert not (volume / MODEL_REPO / MARKER_NAME).exists()

        slow_hub.throttle_bps = None
        with LocalWorker(env, tmp_path / "next.log") as second:
            result = second.runsync(SHORT_JOB)
        assert result["status"] == "COMPLETED", result
    store = volume / MODEL_REPO
    assert (store / MARKER_NAME).is_file()
    assert (store / WEIGHTS).read_bytes() == (tiny_checkpoint.model_dir / WEIGHTS).read_bytes()
    assert not any((store / ".cache").rglob("*.incomplete"))


def _ignore_errors(call: Callable[..., object], *args: object) -> None:
    with contextlib.suppress(OSError):  # the worker serving this request is killed on purpose
        call(*args)


@pytest.mark.slow
def test_a_truncated_weight_file_in_a_complete_store_is_fetched_again(
    hub: HubServer, stored_volume: Path, tiny_checkpoint: TinyCheckpoint, tmp_path: Path
) -> None:
    volume = copy_volume(stored_volume, tmp_path)
    weights = volume / MODEL_REPO / WEIGHTS
    with weights.open("r+b") as file:
        file.truncate(weights.stat().st_size // 3)
    hub.reset_counts()

    with LocalWorker(worker_env(volume, hub.url), tmp_path / "worker.log") as worker:
        result = worker.runsync(SHORT_JOB)

    assert result["status"] == "COMPLETED", result
    assert dict(hub.file_gets) == {f"{MODEL_REPO}/{WEIGHTS}": 1}
    assert weights.read_bytes() == (tiny_checkpoint.model_dir / WEIGHTS).read_bytes()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Not enough free disk space")
def test_a_full_volume_is_a_clear_error_and_the_worker_keeps_answering(
    hub: HubServer, tmp_path: Path
) -> None:
    volume = tmp_path / "volume"
    with tiny_filesystem(volume, size_kib=2048) as mounted:
        if not mounted:
            pytest.fail("mounting a tmpfs needs root (or passwordless sudo); CI runs these tests as root")
        with LocalWorker(worker_env(volume, hub.url), tmp_path / "worker.log") as worker:
            first = assert_failed_with(worker.runsync(SHORT_JOB), "the volume is full", "free space")
            assert MODEL_REPO in first or TOKENIZER_REPO in first
            assert_failed_with(worker.runsync(SHORT_JOB), "the volume is full")
            bad_speed = assert_failed_with(worker.runsync({"transcript": "hi", "speed": 9}))
            assert offending_fields(bad_speed) == {"speed"}, bad_speed


# -- S3 ----------------------------------------------------------------------------------------------------


@pytest.fixture
def dead_s3(monkeypatch: pytest.MonkeyPatch) -> str:
    """Credentials and an S3 endpoint on a loopback port where nothing listens (boto3 reads them per call)."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return endpoint


@pytest.fixture(scope="module")
def in_process_volume(stored_volume: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_volume(stored_volume, tmp_path_factory.mktemp("in-process"))


def in_process_worker(volume: Path, **env: str) -> Pipeline:
    return Pipeline(load_settings({"RUNPOD_VOLUME_PATH": str(volume), "RESULT_CACHE": "off", **env}))


def test_s3_down_still_delivers_the_audio_inline_with_the_upload_error(
    dead_s3: str, in_process_volume: Path
) -> None:
    worker = in_process_worker(in_process_volume)
    job = {**SHORT_JOB, "s3_bucket": "audio-out", "s3_key": "clips/a.wav"}

    output = run_job(worker, {"id": "s3-down", "input": job})

    assert "error" not in output, output
    assert base64.b64decode(output["audio_base64"])[:4] == b"RIFF"
    assert "s3" not in output
    assert output["s3_error"].startswith("upload to bucket 'audio-out' failed: "), output["s3_error"]
    assert "wJalrXUtnFEMI" not in output["s3_error"]


def test_s3_down_and_a_clip_over_the_inline_limit_fails_naming_the_bucket(
    dead_s3: str, in_process_volume: Path
) -> None:
    worker = in_process_worker(in_process_volume, MAX_INLINE_BYTES="16384")
    job = {**SHORT_JOB, "s3_bucket": "audio-out"}

    output = run_job(worker, {"id": "s3-down-big", "input": job})

    assert set(output) == {"error"}, output
    assert output["error"].startswith("upload to bucket 'audio-out' failed: "), output["error"]
    assert "inline result limit" in output["error"]
    assert "internal error" not in output["error"]


def inline_audio_bytes(items: list[dict]) -> int:
    """Base64 audio in a streaming job's aggregated result (what /run and /runsync return), wherever it is."""
    return sum(
        len(item.get("audio_base64", "")) + len(item.get("summary", {}).get("audio_base64", ""))
        for item in items
    )


@pytest.mark.parametrize("return_base64", [False, True])
def test_a_streamed_job_whose_upload_fails_reports_it_without_the_clip_again(
    dead_s3: str, in_process_volume: Path, return_base64: bool
) -> None:
    """The chunks already carried the audio: the failed upload is reported, never answered with a second,
    whole copy of the clip inline (which would double the aggregated result past RunPod's limit)."""
    worker = in_process_worker(in_process_volume)
    job = {"transcript": "Streamed, then stored.", "max_new_tokens": 40, "seed": 2, "s3_bucket": "audio-out"}

    items = list(
        stream_job(worker, {"id": "stream-s3-down", "input": job | {"return_base64": return_base64}})
    )

    assert "error" not in items[-1], items[-1]
    summary = items[-1]["summary"]
    assert summary["s3_error"].startswith("upload to bucket 'audio-out' failed: "), summary
    assert "s3" not in summary and "audio_base64" not in summary
    chunks_audio = [base64.b64decode(item["audio_base64"]) for item in items if "audio_base64" in item]
    assert len(chunks_audio) == len(items) >= 2, "every chunk went inline, and only the chunks"
    assert inline_audio_bytes(items) == sum(len(item["audio_base64"]) for item in items)


def test_a_streamed_job_over_the_inline_limit_whose_upload_fails_stays_within_the_limit(
    dead_s3: str, in_process_volume: Path
) -> None:
    """Past the budget the chunks leave the audio to S3; when S3 then fails, the job fails naming the bucket,
    and what went inline never exceeds MAX_INLINE_BYTES."""
    limit = 60000  # the first chunk (12 frames of WAV, ~31 kB of base64) fits, the clip does not
    worker = in_process_worker(in_process_volume, MAX_INLINE_BYTES=str(limit))
    job = {
        "transcript": "A longer stream to store.",
        "max_new_tokens": 80,
        "seed": 2,
        "s3_bucket": "audio-out",
    }

    items = list(stream_job(worker, {"id": "stream-s3-down-big", "input": job}))

    assert any("audio_omitted" in item for item in items), "the budget ran out before the clip ended"
    assert set(items[-1]) == {"error"}, items[-1]
    assert items[-1]["error"].startswith("upload to bucket 'audio-out' failed: "), items[-1]["error"]
    assert "cannot be returned inline either" in items[-1]["error"]
    assert 0 < inline_audio_bytes(items) <= limit
