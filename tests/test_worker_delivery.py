"""Delivery and caching as a client sees them: a worker process, the real S3 server, the local API."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.hub_server import HubServer
from tests.support.s3_server import S3Server
from tests.support.worker_process import LocalWorker, worker_env

pytest_plugins = ["tests.support.s3_server"]

BUCKET = "worker-delivery"


@pytest.fixture(scope="module")
def worker(
    hub: HubServer, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalWorker]:
    s3_server.create_bucket(BUCKET)
    root = tmp_path_factory.mktemp("delivery")
    env = worker_env(root / "volume", hub.url, **s3_server.env(), S3_PRESIGN_EXPIRY_S="600")
    with LocalWorker(env, root / "worker.log") as local_worker:
        yield local_worker


def test_upload_to_s3_with_content_type_and_a_working_presigned_url(
    worker: LocalWorker, s3_server: S3Server, tmp_path: Path
) -> None:
    result = worker.runsync(
        {"transcript": "Into the bucket.", "max_new_tokens": 24, "output_format": "mp3", "s3_bucket": BUCKET}
    )
    assert result["status"] == "COMPLETED", result
    output = result["output"]
    assert "audio_base64" not in output  # inline only when asked for
    s3 = output["s3"]
    assert s3["bucket"] == BUCKET and s3["key"].endswith(".mp3") and s3["uri"] == f"s3://{BUCKET}/{s3['key']}"
    head = s3_server.client().head_object(Bucket=BUCKET, Key=s3["key"])
    assert head["ContentType"] == "audio/mpeg"
    fetched = tmp_path / "fetched.mp3"
    subprocess.run(["curl", "-sf", "-o", str(fetched), s3["url"]], check=True)
    stored = s3_server.client().get_object(Bucket=BUCKET, Key=s3["key"])["Body"].read()
    assert fetched.read_bytes() == stored and len(stored) == head["ContentLength"] > 0


def test_explicit_key_and_inline_copy(worker: LocalWorker, s3_server: S3Server) -> None:
    result = worker.runsync(
        {
            "transcript": "Both ways.",
            "max_new_tokens": 20,
            "s3_bucket": BUCKET,
            "s3_key": "tts/both-ways.wav",
            "return_base64": True,
        }
    )
    assert result["status"] == "COMPLETED", result
    stored = s3_server.client().get_object(Bucket=BUCKET, Key="tts/both-ways.wav")["Body"].read()
    assert base64.b64decode(result["output"]["audio_base64"]) == stored


def test_unsafe_key_is_refused_before_generating(worker: LocalWorker) -> None:
    result = worker.runsync({"transcript": "x", "s3_bucket": BUCKET, "s3_key": "../escape\nkey.wav"})
    assert result["status"] == "FAILED" and result["error"].startswith("s3_key"), result


def test_missing_bucket_falls_back_to_inline_with_the_cause(worker: LocalWorker) -> None:
    result = worker.runsync(
        {"transcript": "No such bucket.", "max_new_tokens": 20, "s3_bucket": "not-created-here"}
    )
    assert result["status"] == "COMPLETED", result
    output = result["output"]
    assert output["audio_base64"] and "not-created-here" in output["s3_error"]


def test_deterministic_requests_hit_the_cache(worker: LocalWorker) -> None:
    request = {"transcript": "Cache me.", "max_new_tokens": 24, "seed": 11}
    first, second = worker.runsync(request), worker.runsync(request)
    assert first["output"]["cache_hit"] is False and second["output"]["cache_hit"] is True
    assert first["output"]["audio_base64"] == second["output"]["audio_base64"]
    for field in ("num_frames", "truncated", "duration_s", "format"):
        assert first["output"][field] == second["output"][field]
    other_format = worker.runsync({**request, "output_format": "flac"})
    assert other_format["output"]["cache_hit"] is False


def test_sampling_without_a_seed_is_never_cached(worker: LocalWorker) -> None:
    request = {"transcript": "Fresh every time.", "max_new_tokens": 24}
    assert [worker.runsync(request)["output"]["cache_hit"] for _ in range(2)] == [False, False]
