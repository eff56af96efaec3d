"""What a user waits for: `./bootstrap.sh --local` and `./bootstrap.sh --local --demo`, from the launch to the
local API answering (time to serving) and to the first job's result (time to the first job), on a warm
volume and on a first boot, with their ratios.

Each case gets a volume of its own. Its first boot puts everything in place; then `--runs` restarts are
timed on the warm volume (median). The non-demo case downloads its model from the hub stand-in
(tests/hub_server.py serving the tiny checkpoint of boson_multimodal/tiny_model.py through HF_ENDPOINT): a
real download path, tiny files, so its first boot says nothing of the real ~12 GB download.

- Default: the runtime is not installed again. The first boot's installer call is answered by a shim that
  links the runtime environment to this interpreter's site-packages (a `.pth` file: torch, transformers…
  as installed here), so the volume holds a warm runtime in seconds and no 7 GB; that boot is not reported
  as a first boot, because it installed nothing.
- `--first-boot`: the first boot is real, on an empty volume: `bootstrap.sh` installs the runtime from the
  package index with an empty installer cache, as on a fresh machine (minutes, ~14 GB per case while it
  runs, removed at the end).

The serving probe is `POST /runsync` with an empty body (the local API answers 422 without running a job);
with `--http` the HTTP door is timed too: its first answer on `GET /ping` (204, preparing) and its first 200
(models loaded), then `POST /generate`.

    python benchmarks/serve_time.py [--runs 3] [--first-boot] [--http]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from boson_multimodal.tiny_model import build_tiny_checkpoint  # noqa: E402 - after the path
from tests.conftest import MODEL_REPO, TOKENIZER_REPO  # noqa: E402
from tests.support.hub_server import HubServer  # noqa: E402
from tests.support.worker_process import free_port, worker_env  # noqa: E402

FIRST_JOB = {"transcript": "Hello.", "max_new_tokens": 16}
MIN_FREE_GB_AFTER = 20  # what the machine must keep free beside a real runtime install
RUNTIME_INSTALL_GB = 14  # runtime (~7 GB) and the installer's cache (~7 GB), per case
# The installer in the default mode: `uv pip install` links the new environment to an existing one.
LINK_SHIM = """\
#!/usr/bin/env bash
if [[ "$1 $2" == "pip install" ]]; then
  while (($#)) && [[ "$1" != --python ]]; do shift; done
  site="$("$2" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
  echo "$REUSE_SITE_PACKAGES" >"$site/_serve_time_reuse.pth"
  exit 0
fi
exec "$REAL_UV" "$@"
"""


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]
    http: bool = False

    @property
    def demo(self) -> bool:
        return "--demo" in self.args


@dataclass(frozen=True)
class Timing:
    """Seconds from launching bootstrap.sh."""

    serving_s: float  # the API answers (the HTTP door: its first /ping answer, 204 or 200)
    ready_s: float  # the HTTP door's first 200 on /ping; the queue door: same as serving
    first_job_s: float  # the first job's result is back


def request(url: str, body: dict | None, timeout: float) -> tuple[int, dict | None]:
    """(status, JSON body or None); HTTP errors are answers too."""
    data = None if body is None else json.dumps(body).encode()
    method = "GET" if body is None else "POST"
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as error:
        return error.code, None


def wait_for(probe: Callable[[], bool], process: subprocess.Popen, log: Path, timeout: float) -> float:
    """Poll ``probe`` every 20 ms until it holds; the time it first held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"bootstrap.sh exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if probe():
                return time.monotonic()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.02)
    raise SystemExit(f"not serving after {timeout} s:\n{log.read_text()[-4000:]}")


def boot_once(case: Case, env: dict[str, str], log: Path, timeout: float) -> Timing:
    """Launch bootstrap.sh, time serving and the first job, stop it (SIGTERM, then its process group)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [*case.args, "--http"] if case.http else list(case.args)
    with open(log, "wb") as out:
        launched = time.monotonic()
        process = subprocess.Popen(
            ["bash", str(REPO / "bootstrap.sh"), *args, "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            if case.http:
                serving = wait_for(
                    lambda: request(f"{url}/ping", None, 2)[0] in {200, 204}, process, log, timeout
                )
                ready = wait_for(lambda: request(f"{url}/ping", None, 2)[0] == 200, process, log, timeout)
                status, result = request(f"{url}/generate", {"input": FIRST_JOB}, timeout)
            else:
                serving = ready = wait_for(
                    lambda: request(f"{url}/runsync", {}, 2)[0] == 422, process, log, timeout
                )
                status, result = request(f"{url}/runsync", {"input": FIRST_JOB}, timeout)
            done = time.monotonic()
            if status != 200 or not result or result.get("status") != "COMPLETED":
                raise SystemExit(f"the first job failed ({status}): {result}\n{log.read_text()[-4000:]}")
        finally:
            stop(process)
    return Timing(serving - launched, ready - launched, done - launched)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    with contextlib.suppress(ProcessLookupError):  # the SDK's heartbeat process, if it outlived the worker
        os.killpg(process.pid, signal.SIGKILL)


def case_env(root: Path, hub_url: str, first_boot: bool) -> dict[str, str]:
    """A user's environment, pointed at a volume of its own and the hub stand-in."""
    env = worker_env(root / "volume", hub_url)
    for key in [k for k in env if k.startswith("UV_") or k in {"VIRTUAL_ENV", "PORT", "HANDLER"}]:
        del env[key]
    env["UV_CACHE_DIR"] = str(root / "uv-cache")  # empty: a first boot downloads everything
    # This interpreter's base Python (a pyenv shim as python3 would add its own start-up to every call).
    env["BOOTSTRAP_PYTHON"] = getattr(sys, "_base_executable", sys.executable)
    if not first_boot:
        shim_dir = root / "shim"
        shim_dir.mkdir()
        (shim_dir / "uv").write_text(LINK_SHIM)
        (shim_dir / "uv").chmod(0o755)
        env["PATH"] = f"{shim_dir}{os.pathsep}{env['PATH']}"
        env["REAL_UV"] = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
        env["REUSE_SITE_PACKAGES"] = sysconfig.get_path("purelib")
    return env


def measure(
    case: Case, scratch: Path, hub_url: str, runs: int, first_boot: bool
) -> tuple[Timing, list[Timing]]:
    root = scratch / case.name.replace(" ", "_")
    root.mkdir()
    env = case_env(root, hub_url, first_boot)
    try:
        first = boot_once(case, env, root / "first.log", timeout=3600)
        print(f"{case.name}: first boot  {fmt(first, case)}", flush=True)
        warm = []
        for run in range(runs):
            warm.append(boot_once(case, env, root / f"warm{run}.log", timeout=600))
            print(f"{case.name}: warm boot {run + 1} {fmt(warm[-1], case)}", flush=True)
        return first, warm
    finally:
        shutil.rmtree(root, ignore_errors=True)  # a real runtime and its cache: ~14 GB


def fmt(timing: Timing, case: Case) -> str:
    ready = f", ready (/ping 200) {timing.ready_s:6.2f} s" if case.http else ""
    return f"serving {timing.serving_s:6.2f} s{ready}, first job {timing.first_job_s:6.2f} s"


def median(timings: list[Timing]) -> Timing:
    return Timing(
        *(statistics.median(getattr(t, f) for t in timings) for f in ("serving_s", "ready_s", "first_job_s"))
    )


def check_disk(scratch: Path) -> None:
    free_gb = shutil.disk_usage(scratch).free / 1024**3
    if free_gb - RUNTIME_INSTALL_GB < MIN_FREE_GB_AFTER:
        raise SystemExit(
            f"--first-boot installs the real runtime (~{RUNTIME_INSTALL_GB} GB with its cache, one case at a "
            f"time): {free_gb:.0f} GB free in {scratch}, {MIN_FREE_GB_AFTER} GB must stay free"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="warm restarts per case (median)")
    parser.add_argument(
        "--first-boot", action="store_true", help="install the real runtime on each first boot"
    )
    parser.add_argument("--http", action="store_true", help="also time the HTTP door (--local --http)")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()), help="where volumes go")
    args = parser.parse_args()
    cases = [Case("--local", ("--local",)), Case("--local --demo", ("--local", "--demo"))]
    if args.http:
        cases += [Case(f"{c.name} --http", c.args, http=True) for c in cases]
    with tempfile.TemporaryDirectory(prefix="serve-time-", dir=args.scratch) as tmp:
        scratch = Path(tmp)
        if args.first_boot:
            check_disk(scratch)
        build_tiny_checkpoint(scratch / "hub" / "model", scratch / "hub" / "codec")
        with HubServer(
            {MODEL_REPO: scratch / "hub" / "model", TOKENIZER_REPO: scratch / "hub" / "codec"}
        ) as hub:
            results = {case: measure(case, scratch, hub.url, args.runs, args.first_boot) for case in cases}
    first_label = "first boot (empty volume: runtime install, then models)"
    if not args.first_boot:
        first_label = "first boot on a warm runtime (models put in place; no install)"
    print(f"\nmedian of {args.runs} warm restarts; first job: {json.dumps(FIRST_JOB)}; tiny model on CPU")
    for case, (first, warm) in results.items():
        warm_m = median(warm)
        print(f"./bootstrap.sh {case.name}")
        print(f"  {first_label}: {fmt(first, case)}")
        print(f"  warm restart: {fmt(warm_m, case)}")
        print(
            f"  first / warm: serving {first.serving_s / warm_m.serving_s:.1f}x, "
            f"first job {first.first_job_s / warm_m.first_job_s:.1f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
