"""Settings are checked when the worker starts: a bad value stops it with the variable's name and what is
allowed, instead of failing every job (or, worse, silently meaning something else)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from higgs_worker.errors import SettingsError
from higgs_worker.settings import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent


def settings_with(tmp_path: Path, **env: str) -> Settings:
    return load_settings({"RUNPOD_VOLUME_PATH": str(tmp_path), **env})


def refusal(tmp_path: Path, **env: str) -> str:
    with pytest.raises(SettingsError) as caught:
        settings_with(tmp_path, **env)
    return str(caught.value)


# --- RESULT_CACHE and other booleans --------------------------------------------------------------------


@pytest.mark.parametrize("typo", ["of", "no way", "2", "enabled"])
def test_a_boolean_that_is_neither_true_nor_false_is_refused(tmp_path: Path, typo: str) -> None:
    message = refusal(tmp_path, RESULT_CACHE=typo)
    assert message == f"RESULT_CACHE={typo!r} is not a boolean; use true or false"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", True), ("on", True), ("TRUE", True), ("1", True), ("off", False), ("false", False), ("0", False)],
)
def test_result_cache_reads_the_usual_spellings(tmp_path: Path, value: str, expected: bool) -> None:
    assert settings_with(tmp_path, RESULT_CACHE=value).result_cache is expected


# --- S3_BUCKET ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bucket", "rule"),
    [
        ("My_Bucket", "3-63 characters of lowercase letters"),
        ("ab", "3-63 characters"),
        ("audio..out", "adjacent '.'/'-'"),
        ("192.168.1.10", "looks like an IP address"),
        ("xn--audio", "prefix or suffix that S3 reserves"),
        ("s3://audio-out", "3-63 characters"),  # a URI where a name belongs
    ],
)
def test_a_malformed_s3_bucket_is_refused_at_start(tmp_path: Path, bucket: str, rule: str) -> None:
    message = refusal(tmp_path, S3_BUCKET=bucket)
    assert message.startswith("S3_BUCKET: ") and rule in message, message


def test_a_valid_s3_bucket_is_kept_and_none_is_no_default(tmp_path: Path) -> None:
    assert settings_with(tmp_path, S3_BUCKET=" audio-out.eu ").s3_default_bucket == "audio-out.eu"
    assert settings_with(tmp_path).s3_default_bucket is None


# --- the HTTP door: endpoint type, ports, health path, body limit ----------------------------------------


def test_the_http_settings_default_to_runpods_own(tmp_path: Path) -> None:
    settings = settings_with(tmp_path)
    assert settings.endpoint_type == "QUEUE"
    assert (settings.port, settings.port_health, settings.health_path) == (80, 80, "/ping")
    assert settings.http_host == "0.0.0.0"
    assert settings.max_request_bytes == 30 * 1024 * 1024


def test_the_health_port_follows_port_unless_set(tmp_path: Path) -> None:
    assert settings_with(tmp_path, PORT="8000").port_health == 8000
    assert settings_with(tmp_path, PORT="8000", PORT_HEALTH="8001").port_health == 8001


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ENDPOINT_TYPE": "load_balancer"}, "ENDPOINT_TYPE='load_balancer' is not allowed; use one of"),
        ({"ENDPOINT_TYPE": "HTTP"}, "ENDPOINT_TYPE='HTTP' is not allowed; use one of QUEUE, LOAD_BALANCER"),
        ({"PORT": "0"}, "PORT=0 must be at least 1"),
        ({"PORT": "65536"}, "PORT=65536 is not a TCP port; use 1 to 65535"),
        ({"PORT": "http"}, "PORT='http' is not an integer"),
        ({"PORT_HEALTH": "99999"}, "PORT_HEALTH=99999 is not a TCP port; use 1 to 65535"),
        ({"PORT_HEALTH": "-1"}, "PORT_HEALTH=-1 must be at least 1"),
        ({"HEALTH_CHECK_PATH": "ping"}, "HEALTH_CHECK_PATH='ping' is not a URL path such as /ping"),
        ({"HEALTH_CHECK_PATH": "/"}, "HEALTH_CHECK_PATH='/' is not a URL path such as /ping"),
        ({"HEALTH_CHECK_PATH": "/ping?x=1"}, "HEALTH_CHECK_PATH='/ping?x=1' is not a URL path such as /ping"),
        ({"HEALTH_CHECK_PATH": "https://x/ping"}, "HEALTH_CHECK_PATH='https://x/ping' is not a URL path"),
        ({"MAX_REQUEST_BYTES": "30MB"}, "MAX_REQUEST_BYTES='30MB' is not an integer"),
        ({"MAX_REQUEST_BYTES": "1000"}, "MAX_REQUEST_BYTES=1000 must be at least 65536"),
    ],
)  # fmt: skip
def test_a_bad_http_setting_is_refused_naming_the_variable(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    assert refusal(tmp_path, **env).startswith(message)


def test_good_http_settings_are_read(tmp_path: Path) -> None:
    settings = settings_with(
        tmp_path,
        ENDPOINT_TYPE="LOAD_BALANCER",
        PORT="8000",
        PORT_HEALTH="8001",
        HEALTH_CHECK_PATH="/health/live",
        HTTP_HOST="127.0.0.1",
        MAX_REQUEST_BYTES="65536",
    )
    assert settings.endpoint_type == "LOAD_BALANCER"
    assert (settings.port, settings.port_health, settings.health_path) == (8000, 8001, "/health/live")
    assert (settings.http_host, settings.max_request_bytes) == ("127.0.0.1", 65536)


# --- at start-up, not at the first job --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"S3_BUCKET": "Not_A_Bucket"}, "S3_BUCKET: "),
        ({"RESULT_CACHE": "of"}, "RESULT_CACHE='of' is not a boolean"),
        ({"ENDPOINT_TYPE": "LOAD_BALANCER", "PORT": "70000"}, "PORT=70000 is not a TCP port"),
    ],
)
def test_the_worker_refuses_to_start_with_a_bad_setting(
    tmp_path: Path, env: dict[str, str], named: str
) -> None:
    """The real entry point, as bootstrap.sh starts it: it exits before serving anything, saying why."""
    base = {"PATH": "/usr/bin:/bin", "RUNPOD_VOLUME_PATH": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9"}
    done = subprocess.run(
        [sys.executable, str(REPO / "serverless_handler.py")],
        env=base | env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert named in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "bosonai").exists(), "nothing was fetched"


def test_the_compiled_decode_step_is_off_unless_asked_for(tmp_path: Path) -> None:
    assert settings_with(tmp_path).compile_step is False
    assert settings_with(tmp_path, COMPILE_STEP="true").compile_step is True
    assert "COMPILE_STEP='fast' is not a boolean" in refusal(tmp_path, COMPILE_STEP="fast")


def test_prompts_are_prefilled_together_on_a_gpu_unless_told(tmp_path: Path) -> None:
    assert settings_with(tmp_path).prefill_together is None  # auto: the engine decides by device
    assert settings_with(tmp_path, PREFILL_TOGETHER="true").prefill_together is True
    assert settings_with(tmp_path, PREFILL_TOGETHER="false").prefill_together is False
    assert "PREFILL_TOGETHER='sometimes' is not allowed; use one of auto, true, false" in refusal(
        tmp_path, PREFILL_TOGETHER="sometimes"
    )
