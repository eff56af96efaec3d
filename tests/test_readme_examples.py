"""The README's examples, copied out of README.md and run as a reader would run them, in order, against the
worker as ``--local --demo`` starts it: the demo model and demo voices published by ``demo_model.py`` on a
volume with no hub, ``DEMO_MODEL=true``, no network. A changed example is tested as it now reads."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.support.speech import speak
from tests.support.worker_process import HttpWorker, LocalWorker, worker_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")
LOCAL = "http://127.0.0.1:8000"


def section(title: str) -> str:
    """The text of the README section headed ``title``, up to the next heading of its level or above
    (a ``#`` line inside a code block is a comment, not a heading)."""
    lines, level, found, fenced = [], 0, False, False
    for line in README.splitlines(keepends=True):
        fenced ^= line.startswith("```")
        heading = re.match(r"(#+) (.*)", line) if not fenced and not line.startswith("```") else None
        if heading and found and len(heading.group(1)) <= level:
            break
        if heading and heading.group(2).strip() == title:
            found, level = True, len(heading.group(1))
        elif found:
            lines.append(line)
    assert found, f"the README has no section {title!r}"
    return "".join(lines)


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.M | re.S)


def demo_volume(tmp: Path) -> dict[str, str]:
    """What ``./bootstrap.sh --local --demo`` prepares: the demo model and voices, DEMO_MODEL=true."""
    env = worker_env(tmp / "volume", None, DEMO_MODEL="true")
    done = subprocess.run(
        [sys.executable, "demo_model.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return env


def run_bash(script: str, url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A README block as bash, with the README's local address replaced by the test worker's."""
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script.replace(LOCAL, url)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{script}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    return done


def seconds_of(path: Path) -> float:
    audio, rate = sf.read(io.BytesIO(path.read_bytes()), dtype="float32")
    assert np.isfinite(audio).all()
    return len(audio) / rate


@pytest.fixture(scope="module")
def demo_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return demo_volume(tmp_path_factory.mktemp("readme"))


@pytest.fixture(scope="module")
def http_worker(demo_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpWorker]:
    with HttpWorker(demo_env, tmp_path_factory.mktemp("http-log") / "worker.log") as worker:
        yield worker


def test_the_quick_start_request_returns_a_clip(demo_env: dict[str, str], tmp_path: Path) -> None:
    [request] = [b for b in blocks(section("Quick start"), "bash") if "/runsync" in b]
    with LocalWorker(demo_env, tmp_path / "worker.log") as worker:
        done = run_bash(request, worker.url, tmp_path)
    assert "'format': 'wav'" in done.stdout and "error" not in done.stdout
    assert seconds_of(tmp_path / "hello.wav") > 0


def test_the_http_examples_run_in_order(http_worker: HttpWorker, tmp_path: Path) -> None:
    """The curl block, then the openai package's block, then the clean-up: as a reader copies them."""
    text = section("The HTTP endpoint (load balancer)")
    speak("The words spoken in my voice.", tmp_path / "my_voice.wav")
    [curl] = [b for b in blocks(text, "bash") if "/v1/audio/voices" in b]
    done = run_bash(curl, http_worker.url, tmp_path)  # its B=http://127.0.0.1:8000 becomes the worker's
    errors = re.findall(r'.{0,200}"error".{0,300}', done.stdout)
    assert not errors, errors
    assert '"name":"narrator"' in done.stdout and '"source":"upload"' in done.stdout
    for name in ("hello.mp3", "cloned.wav", "generate.wav"):
        assert seconds_of(tmp_path / name) > 0, name
    assert (tmp_path / "streamed.pcm").stat().st_size > 0

    [client] = blocks(text, "python")
    script = client.replace(f'base_url="{LOCAL}/v1"', f'base_url="{http_worker.url}/v1"')
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert seconds_of(tmp_path / "hello.mp3") > 0 and (tmp_path / "streamed.pcm").stat().st_size > 0

    cleanup = re.search(r"`(curl -s -X DELETE \$B/v1/audio/voices/narrator)`", text)
    assert cleanup, "the README no longer says how to delete the voice"
    run_bash(f"B={http_worker.url}\n{cleanup.group(1)}", http_worker.url, tmp_path)


def test_the_demo_voices_the_readme_names_work_offline(http_worker: HttpWorker, tmp_path: Path) -> None:
    assert "`demo_woman` and `demo_man`" in README
    for voice in ("demo_woman", "demo_man", "alloy"):
        body = {"input": "Offline.", "voice": voice, "response_format": "wav", "max_new_tokens": 20}
        script = (
            f"curl -sf {http_worker.url}/v1/audio/speech -H 'Content-Type: application/json' "
            f"-d '{json.dumps(body)}' -o {voice}.wav"
        )
        run_bash(script, http_worker.url, tmp_path)
        assert seconds_of(tmp_path / f"{voice}.wav") > 0
