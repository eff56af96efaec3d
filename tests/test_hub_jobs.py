"""The Hub's test jobs (.runpod/tests.json) through the real worker, at the log level local runs use: each
good job completes, the bad one fails naming its fields, and no log line carries audio or reference bytes."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.bootstrap_rig import Rig
from tests.support.error_clauses import offending_fields
from tests.support.hub_server import HubServer
from tests.support.speech import speak
from tests.support.worker_process import LocalWorker, worker_env

REPO = Path(__file__).resolve().parent.parent
HUB_TESTS = json.loads((REPO / ".runpod" / "tests.json").read_text())["tests"]
BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{120,}={0,2}")  # longer than any id, hash or path in a log line


def shrink(job: dict) -> dict:
    """The same job on the tiny model: fewer decode steps, nothing else changed."""
    return {**job, "max_new_tokens": 24} if "max_new_tokens" in job else job


@pytest.fixture(scope="module")
def local_level(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> str:
    """The RUNPOD_LOG_LEVEL that `bootstrap.sh --local` hands to the handler."""
    local = Rig(tmp_path_factory.mktemp("level"), wheelhouse)
    local.handler.write_text(
        'import json, os\nprint("HANDLER " + json.dumps({"level": os.environ.get("RUNPOD_LOG_LEVEL")}))\n'
    )
    boot = local.boot("--local")
    assert boot.returncode == 0, boot.log
    return boot.handler["level"]


@pytest.fixture(scope="module")
def worker(
    hub: HubServer, local_level: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalWorker]:
    volume = tmp_path_factory.mktemp("hub-jobs") / "volume"
    voices = volume / "voices"
    voices.mkdir(parents=True)
    speak("A preset voice for the hub test.", voices / "en_woman.wav")  # an operator-placed preset
    (voices / "en_woman.txt").write_text("A preset voice for the hub test.")
    env = worker_env(volume, hub.url, RUNPOD_LOG_LEVEL=local_level)
    with LocalWorker(env, tmp_path_factory.mktemp("logs") / "worker.log") as local_worker:
        yield local_worker


def test_the_hub_jobs_behave_as_listed(worker: LocalWorker) -> None:
    outcomes = {test["name"]: worker.runsync(shrink(test["input"])) for test in HUB_TESTS}
    for name, result in outcomes.items():
        if name == "bad_input_fails_cleanly":
            assert result["status"] == "FAILED", result
            assert offending_fields(result["error"]) == {"temperature", "colour"}, result["error"]
            assert "Traceback" not in result["error"]
        else:
            assert result["status"] == "COMPLETED", (name, result)
            assert base64.b64decode(result["output"]["audio_base64"])
    assert outcomes["mp3_at_16_khz"]["output"]["format"] == "mp3"
    assert outcomes["mp3_at_16_khz"]["output"]["sample_rate"] == 16000


def test_no_log_line_carries_audio_or_reference_bytes(worker: LocalWorker, spoken_reference: Path) -> None:
    reference = base64.b64encode(spoken_reference.read_bytes()).decode()
    result = worker.runsync(
        {"transcript": "Cloned.", "ref_audio": f"data:audio/wav;base64,{reference}", "max_new_tokens": 24}
    )
    assert result["status"] == "COMPLETED", result
    audio = result["output"]["audio_base64"]
    assert BASE64_RUN.search(audio) and BASE64_RUN.search(reference)  # the pattern finds what it looks for
    log = worker.log
    assert audio[100:200] not in log and reference[100:200] not in log
    assert not BASE64_RUN.search(log), BASE64_RUN.search(log).group(0)[:80]
