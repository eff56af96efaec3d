"""bootstrap.sh, run for real with bash against a temporary volume.

The runtime lock is two tiny wheels built here, pinned with their sha256, and installed by the real installer
(uv, --require-hashes) from a local directory with no index, so each boot really creates a venv, installs,
import-checks, renames and reuses. `uv` is reached through a PATH shim that records each call: that is how
"the installer was not called" is observed. The handler is a stand-in that reports its interpreter, its
arguments and the volume.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.bootstrap_rig import BOOTSTRAP, HANDLER_SOURCE, Rig, build_wheel, finish, write_lock


def test_first_boot_installs_then_execs_the_handler_with_the_runtime_python(rig: Rig) -> None:
    boot = rig.boot("--test_input", '{"input": {"transcript": "Hello"}}')

    assert boot.returncode == 0, boot.log
    assert boot.installed
    (env_dir,) = rig.runtime_envs()
    assert (env_dir / ".bootstrap-complete").is_file()
    assert boot.handler == {
        "python": str(env_dir / "bin" / "python"),
        "prefix": str(env_dir),
        "argv": ["--test_input", '{"input": {"transcript": "Hello"}}'],
        "volume": str(rig.volume),
        "alpha": "alpha",
    }
    assert "import check: tinydep_alpha" in boot.log
    assert not list((rig.volume / "runtime").glob(".lock-*")), "the lock must be released"
    assert not list((rig.volume / "runtime").glob(".tmp-*")), "the temporary env must be renamed into place"
    for line in boot.log.splitlines():
        if line.startswith("[bootstrap"):
            assert line[11:32].endswith("Z]") and line[21] == "T", line


def test_second_boot_reuses_the_runtime_without_calling_the_installer(rig: Rig) -> None:
    assert rig.boot().returncode == 0
    (env_dir,) = rig.runtime_envs()
    marker_mtime = (env_dir / ".bootstrap-complete").stat().st_mtime_ns
    calls_before = rig.calls.read_text()

    boot = rig.boot()

    assert boot.returncode == 0, boot.log
    assert f"reusing runtime {env_dir}" in boot.log
    assert not boot.installed
    assert rig.calls.read_text() == calls_before, "the installer must not run on a warm boot"
    assert (env_dir / ".bootstrap-complete").stat().st_mtime_ns == marker_mtime
    assert boot.handler is not None and boot.handler["prefix"] == str(env_dir)


def test_a_changed_lock_gets_a_new_runtime(rig: Rig) -> None:
    assert rig.boot().returncode == 0
    rig.pin(["tinydep-alpha==1.0", "tinydep-beta==1.1"], "tinydep-alpha==1.0", "tinydep-beta==1.1")

    boot = rig.boot()

    assert boot.returncode == 0 and boot.installed, boot.log
    assert len(rig.runtime_envs()) == 2
    assert "import check: tinydep_alpha tinydep_beta" in boot.log
    assert "pip install --require-hashes" in rig.install_calls()[-1]


def test_the_same_lock_never_reinstalls_even_when_the_requirement_set_is_reworded(rig: Rig) -> None:
    assert rig.boot().returncode == 0
    rig.requirements.write_text("# reworded, same pins\ntinydep-alpha == 1.0\n")

    boot = rig.boot()

    assert boot.returncode == 0 and not boot.installed, boot.log
    assert len(rig.runtime_envs()) == 1


def test_a_wheel_whose_hash_is_not_the_locked_one_is_refused(rig: Rig) -> None:
    alpha, beta = re.findall(r"sha256:(\w+)", rig.lock.read_text())
    swapped = rig.lock.read_text().replace(alpha, "ALPHA").replace(beta, alpha).replace("ALPHA", beta)
    rig.lock.write_text(swapped)  # real digests, each of the other wheel

    boot = rig.boot()

    assert boot.returncode != 0 and boot.handler is None, boot.log
    assert "hash" in boot.log.lower() and f"check RUNTIME_LOCK={rig.lock}" in boot.log
    assert list((rig.volume / "runtime").iterdir()) == []


def test_two_concurrent_boots_install_once_and_both_start(rig: Rig) -> None:
    first = rig.start(UV_SHIM_HOLD="2")
    deadline = time.monotonic() + 60
    while not Path(f"{rig.calls}.holding").exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first boot never installed"
        time.sleep(0.05)
    second = rig.start(UV_SHIM_HOLD="2")

    boots = [finish(first), finish(second)]

    assert [b.returncode for b in boots] == [0, 0], [b.log for b in boots]
    assert len(rig.install_calls()) == 1
    assert "waiting for the runtime install" in boots[1].log
    assert "installed by another boot while this one waited" in boots[1].log
    assert boots[0].handler == boots[1].handler


def test_a_boot_killed_mid_install_leaves_nothing_trusted_and_the_next_boot_rebuilds(rig: Rig) -> None:
    doomed = rig.start(UV_SHIM_HOLD="60")
    deadline = time.monotonic() + 60
    while not Path(f"{rig.calls}.holding").exists():
        assert doomed.poll() is None and time.monotonic() < deadline, "the boot never reached the install"
        time.sleep(0.05)
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait()
    runtime = rig.volume / "runtime"
    assert list(runtime.glob(".lock-*")), "precondition: the killed boot left its lock behind"
    assert list(runtime.glob(".tmp-*")), "precondition: the killed boot left a half-built env behind"
    assert rig.runtime_envs() == []

    boot = rig.boot()

    assert boot.returncode == 0, boot.log
    assert "removing a stale runtime lock" in boot.log
    assert boot.installed and len(rig.install_calls()) == 2
    assert not list(runtime.glob(".tmp-*")) and not list(runtime.glob(".lock-*"))
    assert boot.handler is not None and boot.handler["alpha"] == "alpha"


def test_a_lock_from_another_host_is_waited_for_until_it_is_stale(rig: Rig) -> None:
    assert rig.boot().returncode == 0
    (env_dir,) = rig.runtime_envs()
    shutil.rmtree(env_dir)
    lock_dir = rig.volume / "runtime" / f".lock-{env_dir.name}"
    lock_dir.mkdir()
    (lock_dir / "owner").write_text(f"4242 some-other-host {int(time.time()) - 10}\n")

    boot = rig.boot(BOOTSTRAP_LOCK_STALE_S="12")

    assert boot.returncode == 0, boot.log
    assert "waiting for the runtime install by pid 4242 on some-other-host" in boot.log
    assert "removing a stale runtime lock (owner: 4242 some-other-host" in boot.log
    assert boot.installed


def test_a_broken_runtime_is_removed_and_rebuilt(rig: Rig) -> None:
    assert rig.boot().returncode == 0
    (env_dir,) = rig.runtime_envs()
    (site_packages,) = env_dir.glob("lib/python*/site-packages")
    shutil.rmtree(site_packages / "tinydep_alpha")

    boot = rig.boot()

    assert boot.returncode == 0, boot.log
    assert "is incomplete or broken: rebuilding it" in boot.log
    assert boot.installed and boot.handler is not None and boot.handler["alpha"] == "alpha"


def test_a_runtime_without_its_completion_marker_is_rebuilt(rig: Rig) -> None:
    assert rig.boot().returncode == 0
    (env_dir,) = rig.runtime_envs()
    (env_dir / ".bootstrap-complete").unlink()

    boot = rig.boot()

    assert boot.returncode == 0 and boot.installed, boot.log
    assert (env_dir / ".bootstrap-complete").is_file()


def test_a_bad_lock_fails_with_the_installer_error_and_leaves_nothing(rig: Rig) -> None:
    rig.pin(["tinydep-gamma==9.9"], "tinydep-gamma==9.9")

    boot = rig.boot()

    assert boot.returncode != 0
    assert "tinydep-gamma" in boot.log, "the installer's own error must be shown"
    assert f"check RUNTIME_LOCK={rig.lock}" in boot.log
    assert boot.handler is None
    assert list((rig.volume / "runtime").iterdir()) == []


def test_a_package_that_installs_but_does_not_import_fails_the_import_check(rig: Rig, tmp_path: Path) -> None:
    wheels = tmp_path / "broken-wheels"
    wheels.mkdir()
    build_wheel(wheels, "tinydep-broken", "1.0", "raise ImportError('needs a missing native library')\n")
    rig.pin(["tinydep-broken==1.0"], "tinydep-broken==1.0", wheels=wheels)

    boot = rig.boot(UV_FIND_LINKS=str(wheels))

    assert boot.returncode != 0
    assert "needs a missing native library" in boot.log
    assert "does not import" in boot.log
    assert rig.runtime_envs() == []


def test_an_unreachable_package_index_says_so(rig: Rig) -> None:
    boot = rig.boot(
        UV_NO_INDEX=None, UV_FIND_LINKS=None, UV_INDEX_URL="http://127.0.0.1:9/simple", UV_HTTP_RETRIES="0"
    )

    assert boot.returncode != 0
    assert "could not reach the package index: check network / UV_INDEX_URL" in boot.log


def test_a_volume_too_small_for_the_runtime_fails_before_installing(rig: Rig) -> None:
    boot = rig.boot(RUNTIME_SIZE_GB="1000000")

    assert boot.returncode != 0
    assert "the volume is full:" in boot.log and "the runtime needs ~1000000 GB" in boot.log
    assert rig.install_calls() == []


def test_an_unwritable_volume_is_fatal(rig: Rig, tmp_path: Path) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")

    boot = rig.boot(RUNPOD_VOLUME_PATH=str(not_a_directory))

    assert boot.returncode != 0
    assert f"the volume {not_a_directory} is not writable" in boot.log


def test_without_a_volume_it_warns_and_uses_a_local_directory(tmp_path: Path, wheelhouse: Path) -> None:
    assert not Path("/runpod-volume").exists(), "precondition: this machine has no network volume"
    rig = Rig(tmp_path, wheelhouse, script=app_copy(tmp_path))
    app = rig.script.parent

    boot = rig.boot(RUNPOD_VOLUME_PATH=None)

    assert boot.returncode == 0, boot.log
    assert "WARNING: no network volume mounted at /runpod-volume" in boot.log
    assert "EVERY cold start will reinstall the runtime" in boot.log
    assert boot.handler is not None and boot.handler["volume"] == str(app / ".volume")
    assert boot.handler["prefix"].startswith(str(app / ".volume" / "runtime"))


def test_local_mode_serves_the_local_api_on_the_given_port_and_passes_arguments(rig: Rig) -> None:
    image_set = rig.root / "image.lock"
    write_lock(image_set, rig.wheels, "tinydep-beta==1.0")

    boot = rig.boot("--local", "--port", "8123", "--rp_log_level", "INFO", IMAGE_LOCK=str(image_set))

    assert boot.returncode == 0, boot.log
    assert boot.handler is not None
    assert boot.handler["argv"] == [
        "--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", "8123", "--rp_log_level", "INFO",
    ]  # fmt: skip
    assert "mode: local" in boot.log
    install = rig.install_calls()[0]
    assert str(rig.lock) in install and str(image_set) in install, "local mode installs the image's lock too"


def test_local_mode_takes_the_port_from_the_environment(rig: Rig) -> None:
    image_set = rig.root / "image.lock"
    image_set.write_text("")

    boot = rig.boot("--local", PORT="9100", IMAGE_LOCK=str(image_set))

    assert boot.returncode == 0, boot.log
    assert boot.handler is not None and boot.handler["argv"][-1] == "9100"


@pytest.mark.parametrize("port", ["http", "0", "70000"])
def test_a_bad_port_is_rejected_before_anything_runs(rig: Rig, port: str) -> None:
    boot = rig.boot("--local", "--port", port)

    assert boot.returncode != 0
    assert f"--port/PORT must be a TCP port number 1-65535, got '{port}'" in boot.log
    assert not rig.calls.exists()


def test_a_double_dash_passes_everything_after_it_to_the_handler(rig: Rig) -> None:
    boot = rig.boot("--test_input", "{}", "--", "--local", "--demo")

    assert boot.returncode == 0, boot.log
    assert boot.handler is not None and boot.handler["argv"] == ["--test_input", "{}", "--local", "--demo"]
    assert "mode: container" in boot.log


def app_copy(root: Path, demo_source: str | None = None) -> Path:
    """bootstrap.sh in an app directory of its own, where its `.volume` fallback and demo_model.py live."""
    app = root / "app"
    app.mkdir()
    shutil.copy2(BOOTSTRAP, app / "bootstrap.sh")
    if demo_source is not None:
        (app / "demo_model.py").write_text(demo_source)
    return app / "bootstrap.sh"


def test_demo_publishes_the_demo_model_before_the_handler_starts(tmp_path: Path, wheelhouse: Path) -> None:
    demo = (
        "import os, pathlib, sys\n"
        "pathlib.Path(os.environ['RUNPOD_VOLUME_PATH'], 'demo').write_text(sys.executable)\n"
    )
    rig = Rig(tmp_path, wheelhouse, script=app_copy(tmp_path, demo))
    rig.handler.write_text(
        HANDLER_SOURCE + "assert os.path.exists(os.path.join(os.environ['RUNPOD_VOLUME_PATH'], 'demo'))\n"
    )

    boot = rig.boot("--demo", "--test_input", "{}")

    assert boot.returncode == 0, boot.log
    assert "publishing the demo model" in boot.log
    assert boot.handler is not None and boot.handler["argv"] == ["--test_input", "{}"]
    assert (rig.volume / "demo").read_text() == boot.handler["python"]


def test_a_failing_demo_stops_the_boot(tmp_path: Path, wheelhouse: Path) -> None:
    rig = Rig(tmp_path, wheelhouse, script=app_copy(tmp_path, "raise SystemExit('no space for the demo')\n"))

    boot = rig.boot("--demo")

    assert boot.returncode != 0
    assert "no space for the demo" in boot.log and "the demo model could not be published" in boot.log
    assert boot.handler is None


def test_secrets_in_the_environment_never_reach_the_log(rig: Rig) -> None:
    secrets = {
        "HF_TOKEN": "hf_SECRET123",
        "AWS_SECRET_ACCESS_KEY": "aws/SECRET+key",
        "RUNPOD_API_KEY": "rpa_X",
    }
    rig.pin(["tinydep-gamma==9.9"], "tinydep-gamma==9.9")  # the failure path prints the most

    failed = finish(rig.start(**secrets))
    rig.pin(["tinydep-alpha==1.0"], "tinydep-alpha==1.0", "tinydep-beta==1.0")
    started = finish(rig.start(**secrets))

    assert failed.returncode != 0 and started.returncode == 0
    for value in secrets.values():
        assert value not in failed.log and value not in started.log


def test_bootstrap_is_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))
    result = subprocess.run([shellcheck, str(BOOTSTRAP)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
