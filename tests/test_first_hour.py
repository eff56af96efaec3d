"""What a new user meets in the first hour: the log level of local runs, a warm `--demo` restart, the test
command on a small disk, and the S3 test server on a nearly full one."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.bootstrap_rig import Rig
from tests.support.s3_server import start_s3_server

REPO = Path(__file__).resolve().parent.parent
LEVEL_HANDLER = """\
import json, os, sys
level = os.environ.get("RUNPOD_LOG_LEVEL")
print("HANDLER " + json.dumps({"level": level, "argv": sys.argv[1:]}), flush=True)
"""


@pytest.fixture
def level_rig(rig: Rig) -> Rig:
    rig.handler.write_text(LEVEL_HANDLER)
    return rig


def test_local_runs_log_at_info_by_default(level_rig: Rig) -> None:
    boot = level_rig.boot("--local")
    assert boot.returncode == 0, boot.log
    assert boot.handler["level"] == "INFO"


@pytest.mark.parametrize("level", ["DEBUG", "trace"])
def test_levels_that_log_job_audio_are_raised_to_info(level_rig: Rig, level: str) -> None:
    boot = level_rig.boot("--local", RUNPOD_LOG_LEVEL=level)
    assert boot.returncode == 0, boot.log
    assert boot.handler["level"] == "INFO"
    assert f"RUNPOD_LOG_LEVEL={level} would log every job's audio: using INFO" in boot.log


def test_quieter_levels_are_kept(level_rig: Rig) -> None:
    boot = level_rig.boot(RUNPOD_LOG_LEVEL="WARN")
    assert boot.returncode == 0, boot.log
    assert boot.handler["level"] == "WARN"


@pytest.mark.parametrize("args", [["--rp_log_level", "DEBUG"], ["--rp_log_level=trace"]])
def test_a_handler_argument_that_logs_job_audio_is_refused(level_rig: Rig, args: list[str]) -> None:
    boot = level_rig.boot("--local", *args)
    assert boot.returncode == 1 and boot.handler is None
    assert "would log every job's audio" in boot.log
    ok = level_rig.boot("--local", "--rp_log_level", "WARN")
    assert ok.returncode == 0 and ok.handler["argv"][-2:] == ["--rp_log_level", "WARN"]


def test_a_warm_demo_restart_neither_rebuilds_nor_imports_torch(tmp_path: Path) -> None:
    env = {**os.environ, "RUNPOD_VOLUME_PATH": str(tmp_path / "volume")}
    (tmp_path / "volume").mkdir()
    probe = "import runpy, sys\nrunpy.run_path('demo_model.py', run_name='__main__')\n"
    probe += "print('torch' in sys.modules)"
    first = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "published the tiny demo checkpoint" in first.stderr and first.stdout.strip() == "True"
    config = next((tmp_path / "volume").rglob("config.json"))
    built = config.stat().st_mtime_ns
    warm = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True)
    assert warm.returncode == 0, warm.stderr
    assert "already in place" in warm.stderr
    assert warm.stdout.strip() == "False", "a warm restart must not pay for importing torch"
    assert config.stat().st_mtime_ns == built


# --- the test command's disk check --------------------------------------------------------------------------


def run_test_command(tmp_path: Path, free_kb: int, with_venv: bool) -> subprocess.CompletedProcess[str]:
    """scripts/test.sh in a copy of the repository's layout, with `df` reporting `free_kb` everywhere."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    (root / "scripts" / "test.sh").write_text((REPO / "scripts" / "test.sh").read_text())
    if with_venv:
        (root / ".venv" / "bin").mkdir(parents=True)
        (root / ".venv" / "bin" / "python").symlink_to(sys.executable)
    shims = tmp_path / "shims"
    shims.mkdir()
    (shims / "df").write_text(
        "#!/usr/bin/env bash\n"
        "echo 'Filesystem 1024-blocks Used Available Capacity Mounted on'\n"
        f"echo '/dev/fake 999999999 0 {free_kb} 0% /'\n"
    )
    (shims / "df").chmod(0o755)
    for tool in ("apt-get", "pip"):  # anything past the check would call these: make that visible
        (shims / tool).write_text("#!/usr/bin/env bash\necho CALLED-$0 >&2\nexit 3\n")
        (shims / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", str(root / "scripts" / "test.sh")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_test_command_stops_at_once_when_the_disk_cannot_hold_the_venv(tmp_path: Path) -> None:
    result = run_test_command(tmp_path, free_kb=5 * 1024**2, with_venv=False)
    assert result.returncode == 1
    assert "not enough disk" in result.stderr and "5 GB free, need ~9 GB" in result.stderr
    assert "CALLED" not in result.stderr and "installing" not in result.stdout


def test_an_existing_venv_needs_only_room_for_the_tests(tmp_path: Path) -> None:
    result = run_test_command(tmp_path, free_kb=512 * 1024, with_venv=True)
    assert result.returncode == 1
    assert "0 GB free, need ~1 GB" in result.stderr


# --- the S3 test server on a nearly full disk ---------------------------------------------------------------


@contextlib.contextmanager
def small_filesystem(megabytes: int) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as mount_point:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", mount_point], capture_output=True
        )
        if mounted.returncode != 0:
            pytest.skip("mounting a small tmpfs needs root: the nearly full disk cannot be staged here")
        try:
            yield Path(mount_point)
        finally:
            subprocess.run(["umount", "-l", mount_point], check=False)


def test_s3_server_works_on_a_disk_with_less_room_than_one_default_volume(tmp_path: Path) -> None:
    """48 MB free: sized from free space, SeaweedFS serves the first bucket and answers every later write with
    'No writable volumes and no free volumes left' (HTTP 500, then NoSuchKey on read)."""
    with small_filesystem(48) as disk:
        server = start_s3_server(disk)
        try:
            client = server.client()
            for number in range(3):  # each bucket is a collection with volumes of its own
                bucket = server.create_bucket(f"small-disk-{number}")
                client.put_object(Bucket=bucket, Key="clip.wav", Body=b"RIFF" + bytes(100_000))
                assert client.get_object(Bucket=bucket, Key="clip.wav")["Body"].read()[:4] == b"RIFF"
        finally:
            server.stop()
