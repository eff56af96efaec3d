"""Delivery against a real, signature-checking S3 server (SeaweedFS) on 127.0.0.1, configured by env vars."""

from __future__ import annotations

import base64
import json
import logging
import socket
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from higgs_worker.audio.encoding import EncodedAudio, encode_audio
from higgs_worker.delivery import (
    MAX_KEY_BYTES,
    OUTPUT_OVERHEAD_BYTES,
    DeliveryError,
    DeliveryPolicy,
    S3Target,
    default_s3_client,
    default_s3_key,
    deliver,
    validate_bucket_name,
    validate_s3_key,
)

if TYPE_CHECKING:  # imported for real by pytest_plugins, so that pytest can rewrite its asserts
    from tests.support.s3_server import S3Server

pytest_plugins = ["tests.support.s3_server"]

RATE = 24_000
BUCKET = "higgs-test-clips"
SMALL_POLICY = DeliveryPolicy(max_inline_bytes=1_000_000, presign_expiry_s=900, inline_requested=False)


def clip(seconds: float, fmt: str = "wav") -> EncodedAudio:
    t = np.arange(round(seconds * RATE)) / RATE
    wave = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * np.sin(2 * np.pi * 1320 * t)).astype(np.float32)
    return encode_audio(wave, RATE, fmt)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def clean_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No AWS settings leak in from the machine: no profile, no config files, no instance metadata lookups."""
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_DEFAULT_REGION",
        "AWS_REGION",
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


@pytest.fixture
def s3_env(clean_aws_env: pytest.MonkeyPatch, s3_server: S3Server) -> S3Server:
    """The worker's environment pointing at the real S3 server, with the test bucket present."""
    for name, value in s3_server.env().items():
        clean_aws_env.setenv(name, value)
    existing = {b["Name"] for b in s3_server.client().list_buckets().get("Buckets", [])}
    if BUCKET not in existing:
        s3_server.create_bucket(BUCKET)
    return s3_server


def curl(url: str) -> bytes:
    return subprocess.run(["curl", "-sSf", "--max-time", "20", url], check=True, capture_output=True).stdout


# --- keys and bucket names ---------------------------------------------------------------------------------


def test_default_key_is_dated_and_valid() -> None:
    now = datetime(2026, 11, 23, 14, 5, tzinfo=UTC)
    assert default_s3_key("sync-8f3a-12", "mp3", now) == "higgs-audio/2026/11/23/sync-8f3a-12.mp3"
    odd = default_s3_key("../weird id/ü\n", "opus", now)
    assert odd.startswith("higgs-audio/2026/11/23/") and odd.endswith(".opus")
    assert validate_s3_key(odd) == odd
    with pytest.raises(ValueError, match="output_format 'aac' is not supported"):
        default_s3_key("job", "aac", now)


@pytest.mark.parametrize(
    "key", ["a.wav", "clips/2026/take(1).mp3", "user=42/run_7/out-final*.flac", "x" * 1024]
)
def test_valid_keys_pass_unchanged(key: str) -> None:
    assert validate_s3_key(key) == key


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("", "empty"),
        ("/abs/path.wav", "must not start or end with '/'"),
        ("folder/", "must not start or end with '/'"),
        ("a/../b.wav", "must not contain '..'"),
        ("a//b.wav", "empty path segment"),
        (".", "just '.'"),
        ("a/./b.wav", "just '.'"),
        ("a/.", "just '.'"),
        ("bad\x00key", "no spaces or control characters"),
        ("line\nbreak", "no spaces or control characters"),
        ("with space.wav", "no spaces or control characters"),
        ("naïve.wav", "may contain only"),
        ("q?x=1", "may contain only"),
        ("x" * (MAX_KEY_BYTES + 1), "1025 bytes long; the limit is 1024"),
    ],
)
def test_invalid_keys_name_the_field_and_the_rule(key: str, message: str) -> None:
    with pytest.raises(ValueError, match="s3_key") as info:
        validate_s3_key(key)
    assert message in str(info.value)


@pytest.mark.parametrize("bucket", ["abc", "my-bucket.audio", "a" * 63, "r2-bucket-01"])
def test_valid_bucket_names(bucket: str) -> None:
    assert validate_bucket_name(bucket) == bucket


@pytest.mark.parametrize(
    ("bucket", "message"),
    [
        ("ab", "3-63 characters"),
        ("a" * 64, "3-63 characters"),
        ("My-Bucket", "lowercase"),
        ("-bucket", "starting and ending with a letter or digit"),
        ("bucket_name", "3-63 characters"),
        ("my..bucket", "adjacent"),
        ("192.168.1.10", "IP address"),
        ("xn--bucket", "reserves"),
        ("bucket-s3alias", "reserves"),
    ],
)
def test_invalid_bucket_names_name_the_field(bucket: str, message: str) -> None:
    with pytest.raises(ValueError, match="s3_bucket") as info:
        validate_bucket_name(bucket)
    assert message in str(info.value)


def test_presign_expiry_is_bounded_by_sigv4() -> None:
    with pytest.raises(ValueError, match="presign_expiry_s 604801 is out of range; use 1 to 604800"):
        DeliveryPolicy(max_inline_bytes=1024, presign_expiry_s=604_801, inline_requested=False)


# --- client configuration ---------------------------------------------------------------------------------


def test_client_uses_path_style_only_for_non_aws_endpoints(clean_aws_env: pytest.MonkeyPatch) -> None:
    clean_aws_env.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    aws = default_s3_client()
    assert urlsplit(aws.meta.endpoint_url).hostname.endswith(".amazonaws.com")
    assert (aws.meta.config.s3 or {}).get("addressing_style") != "path"
    clean_aws_env.setenv("AWS_ENDPOINT_URL", "http://localhost:9000")
    custom = default_s3_client()
    assert custom.meta.endpoint_url == "http://localhost:9000"
    assert custom.meta.config.s3["addressing_style"] == "path"


# --- uploads to the real server ---------------------------------------------------------------------------


def test_upload_sets_content_type_and_presigned_url_serves_the_bytes(s3_env: S3Server) -> None:
    audio = clip(1.0, "mp3")
    target = S3Target(BUCKET, "runs/upload-test.mp3")

    out = deliver(audio, target, SMALL_POLICY)

    assert set(out) == {"s3"}
    assert out["s3"]["bucket"] == BUCKET and out["s3"]["key"] == target.key
    assert out["s3"]["uri"] == f"s3://{BUCKET}/runs/upload-test.mp3"
    head = s3_env.client().head_object(Bucket=BUCKET, Key=target.key)
    assert head["ContentType"] == "audio/mpeg"
    assert head["ContentLength"] == len(audio.data)
    url = out["s3"]["url"]
    assert url.startswith(f"{s3_env.endpoint_url}/{BUCKET}/runs/upload-test.mp3?")  # path-style
    assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["900"]
    assert curl(url) == audio.data


def test_presigned_url_is_really_checked(s3_env: S3Server) -> None:
    out = deliver(clip(0.2), S3Target(BUCKET, "runs/tamper.wav"), SMALL_POLICY)
    tampered = out["s3"]["url"].replace("X-Amz-Expires=900", "X-Amz-Expires=901")
    with pytest.raises(subprocess.CalledProcessError):
        curl(tampered)


def test_inline_on_request_beside_the_upload(s3_env: S3Server) -> None:
    audio = clip(0.5, "opus")
    policy = DeliveryPolicy(max_inline_bytes=1_000_000, presign_expiry_s=60, inline_requested=True)
    out = deliver(audio, S3Target(BUCKET, "runs/both.opus"), policy)
    assert base64.b64decode(out["audio_base64"]) == audio.data
    assert curl(out["s3"]["url"]) == audio.data
    head = s3_env.client().head_object(Bucket=BUCKET, Key="runs/both.opus")
    assert head["ContentType"] == "audio/ogg; codecs=opus"


def test_inline_request_too_big_says_why_and_keeps_s3(s3_env: S3Server) -> None:
    audio = clip(1.0)  # 48 kB of WAV
    policy = DeliveryPolicy(max_inline_bytes=40_000, presign_expiry_s=60, inline_requested=True)
    out = deliver(audio, S3Target(BUCKET, "runs/big.wav"), policy)
    assert "audio_base64" not in out
    assert "inline result limit" in out["inline_error"] and "in S3 only" in out["inline_error"]
    assert curl(out["s3"]["url"]) == audio.data


@pytest.mark.parametrize(
    ("access_key", "code"), [(None, "SignatureDoesNotMatch"), ("AKNOBODY0000", "InvalidAccessKeyId")]
)
def test_bad_credentials_fall_back_inline_without_leaking_secrets(
    s3_env: S3Server,
    clean_aws_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    access_key: str | None,
    code: str,
) -> None:
    wrong_secret = "wrong-secret-Zq8vK2pLx9"
    clean_aws_env.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    if access_key:
        clean_aws_env.setenv("AWS_ACCESS_KEY_ID", access_key)
    caplog.set_level(logging.DEBUG, logger="higgs_worker")
    audio = clip(0.3)

    out = deliver(audio, S3Target(BUCKET, "runs/denied.wav"), SMALL_POLICY)

    assert base64.b64decode(out["audio_base64"]) == audio.data
    assert out["s3_error"].startswith(f"upload to bucket '{BUCKET}' failed: {code} (HTTP 403)")
    captured = capsys.readouterr()
    everything = json.dumps(out) + caplog.text + captured.out + captured.err
    for secret in (wrong_secret, s3_env.secret_key, s3_env.access_key, "X-Amz-Signature", "AWS4-HMAC-SHA256"):
        assert secret not in everything
    assert code in caplog.text  # the failure is logged, by cause only


def test_missing_bucket_falls_back_inline(s3_env: S3Server) -> None:
    out = deliver(clip(0.2), S3Target("no-such-bucket-here", "x.wav"), SMALL_POLICY)
    assert out["s3_error"].startswith("upload to bucket 'no-such-bucket-here' failed: NoSuchBucket")
    assert "audio_base64" in out


def test_no_credentials_at_all_falls_back_inline(clean_aws_env: pytest.MonkeyPatch) -> None:
    clean_aws_env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    out = deliver(clip(0.2), S3Target(BUCKET, "x.wav"), SMALL_POLICY)
    assert out["s3_error"] == f"upload to bucket '{BUCKET}' failed: Unable to locate credentials"


def test_server_down_loses_nothing_small_clip_comes_inline(
    s3_env: S3Server, clean_aws_env: pytest.MonkeyPatch
) -> None:
    clean_aws_env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    audio = clip(0.5)
    out = deliver(audio, S3Target(BUCKET, "runs/down.wav"), SMALL_POLICY)
    assert base64.b64decode(out["audio_base64"]) == audio.data
    assert out["s3_error"].startswith(
        f"upload to bucket '{BUCKET}' failed: Could not connect to the endpoint URL"
    )
    assert s3_env.secret_key not in json.dumps(out)


def test_server_down_big_clip_is_a_clear_error(s3_env: S3Server, clean_aws_env: pytest.MonkeyPatch) -> None:
    clean_aws_env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    policy = DeliveryPolicy(max_inline_bytes=50_000, presign_expiry_s=60, inline_requested=False)
    with pytest.raises(DeliveryError) as info:
        deliver(clip(2.0), S3Target(BUCKET, "runs/down-big.wav"), policy)
    message = str(info.value)
    assert f"upload to bucket '{BUCKET}' failed: Could not connect" in message
    assert "cannot be returned inline either" in message
    assert s3_env.secret_key not in message


def test_cached_clip_is_redelivered_to_s3(s3_env: S3Server) -> None:
    audio = clip(0.3, "flac")
    rebuilt = EncodedAudio.from_metadata(audio.data, json.loads(json.dumps(audio.metadata())))
    out = deliver(rebuilt, S3Target(BUCKET, "runs/from-cache.flac"), SMALL_POLICY)
    assert curl(out["s3"]["url"]) == audio.data
    assert (
        s3_env.client().head_object(Bucket=BUCKET, Key="runs/from-cache.flac")["ContentType"] == "audio/flac"
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.from_regex(r"[A-Za-z0-9!_.*'()=-]{1,40}(/[A-Za-z0-9!_.*'()=-]{1,40}){0,3}", fullmatch=True))
def test_every_accepted_key_round_trips_through_s3(s3_env: S3Server, key: str) -> None:
    """The validator's alphabet is safe in practice: every accepted key uploads, presigns and downloads."""
    try:
        validate_s3_key(key)
    except ValueError:
        return  # e.g. a '..' inside a segment: rejection is the validator's documented choice
    out = deliver(clip(0.05), S3Target(BUCKET, key), SMALL_POLICY)
    assert "s3_error" not in out
    assert curl(out["s3"]["url"]) == clip(0.05).data


# --- inline only -----------------------------------------------------------------------------------------


def test_no_target_returns_inline_base64() -> None:
    audio = clip(0.5)
    out = deliver(audio, None, SMALL_POLICY)
    assert set(out) == {"audio_base64"}
    assert base64.b64decode(out["audio_base64"]) == audio.data


def test_inline_limit_counts_the_json_and_a_margin() -> None:
    audio = clip(0.5)
    encoded_len = len(base64.b64encode(audio.data))
    just_enough = encoded_len + len('{"audio_base64": ""}') + OUTPUT_OVERHEAD_BYTES
    assert deliver(audio, None, DeliveryPolicy(just_enough, 60, False))["audio_base64"]
    # Room for the base64 alone is not enough: RunPod would drop the whole result.
    with pytest.raises(DeliveryError):
        deliver(audio, None, DeliveryPolicy(encoded_len + 100, 60, False))


def test_oversized_inline_without_bucket_explains_the_way_out() -> None:
    policy = DeliveryPolicy(max_inline_bytes=1_900_000, presign_expiry_s=60, inline_requested=True)
    with pytest.raises(DeliveryError) as info:
        deliver(clip(30.0), None, policy)  # 1.44 MB of WAV is 1.92 MB as base64
    assert str(info.value) == (
        "the audio is 1.92 MB, over the 1.89 MB inline result limit (RunPod drops larger results); "
        "set s3_bucket (and AWS credentials) or use a compressed output_format such as mp3 or opus"
    )
