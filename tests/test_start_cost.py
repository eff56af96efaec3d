"""What the queue door does before it serves: importing the runpod SDK starts no second interpreter.

Each check runs in a fresh interpreter (the SDK probes the CPU once, at its first import), with an audit hook
that records every process started. (Importing the SDK also runs `uname -p` and `file -b` through the standard
library's `platform`: milliseconds, left alone.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHILD = """\
import json, sys
spawned = []
sys.addaudithook(lambda event, args: spawned.append(list(args[1])) if event == "subprocess.Popen" else None)
{load}
import cpuinfo
from runpod.serverless.utils import rp_debugger
print(json.dumps({{"processor": rp_debugger.PROCESSOR, "spawned": spawned,
                  "probe": cpuinfo.get_cpu_info.__module__ + "." + cpuinfo.get_cpu_info.__name__}}))
"""


def interpreters(spawned: list[list[str]]) -> list[list[str]]:
    return [command for command in spawned if Path(command[0]).name.startswith("python")]


def import_in_child(load: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD.format(load=load)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_the_plain_sdk_import_starts_an_interpreter_to_name_the_cpu() -> None:
    """Why the door imports the SDK its own way; when this fails, the SDK stopped probing."""
    plain = import_in_child("import runpod")

    (probe,) = interpreters(plain["spawned"])
    assert Path(probe[1]).name == "cpuinfo.py", probe


def test_the_door_imports_the_sdk_without_starting_a_process_and_keeps_the_cpu_name() -> None:
    from queue_api.worker import cpu_brand

    door = import_in_child("import queue_api.worker; queue_api.worker.import_runpod()")

    assert interpreters(door["spawned"]) == [], door["spawned"]
    assert door["processor"] == cpu_brand() != "unknown"
    assert door["probe"] == "cpuinfo.cpuinfo.get_cpu_info", "py-cpuinfo must be itself again afterwards"


def test_the_worker_starts_without_the_s3_and_hub_clients(tmp_path: Path) -> None:
    """boto3 waits for the first S3 upload and huggingface_hub for the first download: neither is needed
    to serve, and a warm volume with inline jobs never needs them."""
    loaded = """\
import json, sys
import serverless_handler, queue_api.worker, http_api.app
from higgs_worker.pipeline import Pipeline
from higgs_worker.settings import load_settings
Pipeline(load_settings())
print(json.dumps(sorted(m for m in ("boto3", "botocore", "huggingface_hub", "torch") if m in sys.modules)))
"""
    env = {**os.environ, "RUNPOD_VOLUME_PATH": str(tmp_path / "volume")}
    done = subprocess.run(
        [sys.executable, "-c", loaded], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []
