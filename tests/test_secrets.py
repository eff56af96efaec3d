"""Secrets never leave the worker: not in results, not in error strings, not in the worker's log.

Real worker processes (the runpod SDK's local API) get fake but realistic credentials in their environment —
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``HF_TOKEN`` (``hf_...``), ``RUNPOD_API_KEY`` — and run good
and failing jobs against a real S3 server (SeaweedFS, which checks signatures) and a gated hub stand-in.

What counts as a leak: the AWS secret key, the HF token and the RunPod key anywhere at all. The AWS access key
id is an identifier, not a secret (AWS: "the access key ID is not secret"), and a presigned URL must carry it
in ``X-Amz-Credential`` to work; so it may appear there, in the ``url`` of an uploaded clip, and nowhere else
(the worker's redaction masks it in logs and errors too).
"""

from __future__ import annotations

import json
import secrets
import string
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.support.checkpoints import MODEL_REPO, TOKENIZER_REPO, TinyCheckpoint
from tests.support.hub_server import HubRepo, HubServer
from tests.support.worker_process import LocalWorker, free_port, worker_env

if TYPE_CHECKING:  # imported for real by pytest_plugins, so that pytest can rewrite its asserts
    from tests.support.s3_server import S3Server

pytest_plugins = ["tests.support.s3_server"]

BUCKET = "secrets-test"
SHORT_JOB = {"transcript": "Nothing to hide.", "max_new_tokens": 16}


def _random(alphabet: str, length: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


def aws_secret_key() -> str:
    return _random(string.ascii_letters + string.digits + "+/", 40)


def hf_token() -> str:
    return "hf_" + _random(string.ascii_letters, 34)


@dataclass(frozen=True)
class Secrets:
    access_key_id: str
    secret_access_key: str
    hf_token: str
    runpod_api_key: str

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "HF_TOKEN": self.hf_token,
            "RUNPOD_API_KEY": self.runpod_api_key,
        }

    def never_shown(self) -> list[str]:
        return [self.secret_access_key, self.hf_token, self.runpod_api_key]


def runpod_api_key() -> str:
    return "rpa_" + _random(string.ascii_uppercase + string.digits, 40)


def assert_nothing_leaks(text: str, secrets_: Secrets, *, allow_access_key_id: bool = False) -> None:
    for value in secrets_.never_shown():
        assert value not in text, f"a secret ({value[:4]}...) leaked"
    if not allow_access_key_id:
        assert secrets_.access_key_id not in text, "the access key id appears outside a presigned URL"


@pytest.fixture(scope="module")
def gated_hub(tiny_checkpoint: TinyCheckpoint) -> Iterator[tuple[HubServer, str]]:
    """The tiny model behind a hub that wants a token, and that token."""
    token = hf_token()
    repos = {
        MODEL_REPO: HubRepo({"main": tiny_checkpoint.model_dir}, token=token),
        TOKENIZER_REPO: HubRepo({"main": tiny_checkpoint.codec_dir}, token=token),
    }
    with HubServer(repos) as server:
        yield server, token


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> str:
    return s3_server.create_bucket(BUCKET)


@pytest.fixture(scope="module")
def good(s3_server: S3Server, gated_hub: tuple[HubServer, str]) -> Secrets:
    return Secrets(s3_server.access_key, s3_server.secret_key, gated_hub[1], runpod_api_key())


@pytest.fixture(scope="module")
def shared_volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("secrets") / "volume"


def start(volume: Path, hub_url: str, secrets_: Secrets, s3_server: S3Server, log: Path) -> LocalWorker:
    """A worker with ``secrets_`` in its environment; preset voices would come from a closed loopback port."""
    env = worker_env(
        volume,
        hub_url,
        **{**s3_server.env(), **secrets_.env()},
        VOICES_BASE_URL=f"http://127.0.0.1:{free_port()}/voices",
    )
    return LocalWorker(env, log)


def test_good_and_failing_jobs_with_valid_credentials_leak_nothing(
    s3_server: S3Server,
    bucket: str,
    gated_hub: tuple[HubServer, str],
    good: Secrets,
    shared_volume: Path,
    tmp_path: Path,
) -> None:
    hub, _ = gated_hub
    results: list[dict[str, Any]] = []
    with start(shared_volume, hub.url, good, s3_server, tmp_path / "worker.log") as worker:
        inline = worker.runsync(SHORT_JOB)
        uploaded = worker.runsync({**SHORT_JOB, "s3_bucket": bucket, "s3_key": "secrets/clip.wav"})
        failures = [
            # a reference URL that fails, carrying credentials in its user info and query
            {
                **SHORT_JOB,
                "ref_audio": f"https://{good.access_key_id}:{good.secret_access_key}@127.0.0.1:1/a.wav"
                f"?token={good.hf_token}&X-Amz-Signature=0123456789abcdef",
            },
            # validation errors that would echo a secret if they quoted the input
            {"transcript": "hi", good.runpod_api_key: 1},
            {"transcript": "hi", "temperature": good.secret_access_key},
            {"transcript": "hi", "ref_audio": good.hf_token},
            # an upload to a bucket that does not exist: the S3 error comes back, the credentials do not
            {**SHORT_JOB, "s3_bucket": "no-such-bucket-here"},
        ]
        results = [inline, uploaded, *(worker.runsync(job) for job in failures)]
        log = worker.log

    assert inline["status"] == "COMPLETED", inline
    assert uploaded["status"] == "COMPLETED", uploaded
    assert [r["status"] for r in results[2:6]] == ["FAILED"] * 4, results[2:6]
    assert "s3_error" in results[6]["output"] and "audio_base64" in results[6]["output"], results[6]

    url = uploaded["output"]["s3"]["url"]
    credential = parse_qs(urlsplit(url).query)["X-Amz-Credential"][0]
    assert credential.startswith(f"{good.access_key_id}/")
    with urllib.request.urlopen(url, timeout=30) as response:  # the link works as handed out
        assert response.read(4) == b"RIFF"
    assert_nothing_leaks(url, good, allow_access_key_id=True)

    for result in results:
        shown = json.dumps(result)
        if result is uploaded:
            shown = shown.replace(url, "")
        assert_nothing_leaks(shown, good)
    assert_nothing_leaks(log, good)
    assert "[REDACTED]" in log  # the secret-named field was logged, masked


def test_a_wrong_aws_secret_leaks_neither_secret(
    s3_server: S3Server,
    bucket: str,
    gated_hub: tuple[HubServer, str],
    good: Secrets,
    shared_volume: Path,
    tmp_path: Path,
) -> None:
    wrong = replace(good, secret_access_key=aws_secret_key())
    hub, _ = gated_hub
    with start(shared_volume, hub.url, wrong, s3_server, tmp_path / "worker.log") as worker:
        result = worker.runsync({**SHORT_JOB, "s3_bucket": bucket, "s3_key": "secrets/wrong.wav"})
        log = worker.log

    assert result["status"] == "COMPLETED", result
    output = result["output"]
    assert "SignatureDoesNotMatch" in output["s3_error"], output["s3_error"]
    assert "audio_base64" in output and "s3" not in output
    for seen in (json.dumps(result), log):
        assert_nothing_leaks(seen, wrong)
        assert_nothing_leaks(seen, good)


def test_a_gated_repo_with_a_wrong_token_says_so_without_the_token(
    s3_server: S3Server, gated_hub: tuple[HubServer, str], good: Secrets, tmp_path: Path
) -> None:
    hub, right_token = gated_hub
    hub.reset_counts()
    wrong = Secrets(
        "AKIA" + _random(string.ascii_uppercase + string.digits, 16),
        aws_secret_key(),
        hf_token(),
        runpod_api_key(),
    )
    with start(tmp_path / "volume", hub.url, wrong, s3_server, tmp_path / "worker.log") as worker:
        result = worker.runsync(SHORT_JOB)
        log = worker.log

    assert result["status"] == "FAILED", result
    assert "HF_TOKEN" in result["error"] and MODEL_REPO in result["error"], result["error"]
    assert hub.file_gets == {}
    for seen in (json.dumps(result), log):
        assert_nothing_leaks(seen, wrong)
        assert right_token not in seen
