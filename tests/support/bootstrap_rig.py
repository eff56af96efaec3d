"""The bootstrap rig: a temporary volume, a runtime set of tiny local wheels with its lock, a stand-in
handler, and a shim in front of ``uv`` that records each call, for running the real ``bash bootstrap.sh``."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
BOOTSTRAP = REPO / "bootstrap.sh"
REAL_UV = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
HANDLER_SOURCE = """\
import json, os, sys
import tinydep_alpha
print("HANDLER " + json.dumps({"python": sys.executable, "prefix": sys.prefix, "argv": sys.argv[1:],
      "volume": os.environ.get("RUNPOD_VOLUME_PATH"), "alpha": tinydep_alpha.VALUE}), flush=True)
"""
# Records every installer call; UV_SHIM_HOLD makes `uv pip install` announce itself and then wait for that
# many seconds after installing, so a test can kill a boot mid-install or make a second boot queue behind it.
UV_SHIM = """\
#!/usr/bin/env bash
echo "$*" >>"$UV_CALLS"
if [[ "$1 $2" == "pip install" && -n "${UV_SHIM_HOLD:-}" ]]; then
  "$REAL_UV" "$@" || exit
  touch "$UV_CALLS.holding"
  sleep "$UV_SHIM_HOLD"
  exit 0
fi
exec "$REAL_UV" "$@"
"""


def build_wheel(
    directory: Path, name: str, version: str, source: str, requires: tuple[str, ...] = ()
) -> Path:
    """A valid pure-Python wheel written by hand: no build backend, no index, milliseconds."""
    module = name.replace("-", "_")
    dist_info = f"{module}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {requirement}\n" for requirement in requires)
    files = {
        f"{module}/__init__.py": source,
        f"{dist_info}/METADATA": metadata,
        f"{dist_info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist_info}/RECORD"] = "\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n"
    wheel = directory / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def build_wheelhouse(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    build_wheel(directory, "tinydep-beta", "1.0", "VALUE = 'beta'\n")
    build_wheel(directory, "tinydep-beta", "1.1", "VALUE = 'beta 1.1'\n")
    alpha = "import tinydep_beta\nVALUE = 'alpha'\n"
    build_wheel(directory, "tinydep-alpha", "1.0", alpha, requires=("tinydep-beta",))
    return directory


def write_lock(path: Path, wheels: Path, *pins: str) -> None:
    """A lock as scripts/lock.sh writes one: each `name==version` with the sha256 of its wheel (a made-up one
    for a wheel the wheelhouse lacks)."""
    lines = []
    for pin in pins:
        name, version = pin.split("==")
        wheel = wheels / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest() if wheel.exists() else "0" * 64
        lines.append(f"{pin} \\\n    --hash=sha256:{digest}\n")
    path.write_text("# the test's lock\n" + "".join(lines))


@dataclass(frozen=True)
class Boot:
    """One finished bootstrap run."""

    returncode: int
    log: str
    handler: dict | None

    @property
    def installed(self) -> bool:
        return "installing the runtime" in self.log


@dataclass
class Rig:
    """A temporary volume, a runtime set and its lock, a stand-in handler, a recording installer shim."""

    root: Path
    wheels: Path
    script: Path = BOOTSTRAP

    def __post_init__(self) -> None:
        self.volume = self.root / "volume"
        self.requirements = self.root / "runtime.txt"
        self.lock = self.root / "runtime.lock"
        self.pin(["tinydep-alpha==1.0"], "tinydep-alpha==1.0", "tinydep-beta==1.0")
        self.handler = self.root / "handler.py"
        self.handler.write_text(HANDLER_SOURCE)
        self.shim_dir = self.root / "shim"
        self.shim_dir.mkdir()
        (self.shim_dir / "uv").write_text(UV_SHIM)
        (self.shim_dir / "uv").chmod(0o755)
        self.calls = self.root / "uv-calls.log"

    def pin(self, requirements: list[str], *locked: str, wheels: Path | None = None) -> None:
        """The runtime set's top-level requirements, and its lock of every package they need."""
        self.requirements.write_text("# the test's runtime set\n" + "".join(f"{r}\n" for r in requirements))
        write_lock(self.lock, wheels or self.wheels, *locked)

    def env(self, **overrides: str | None) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("UV_", "RUNPOD_", "VIRTUAL_ENV")) and key not in {"PORT", "HANDLER"}
        }
        env.update(
            PATH=f"{self.shim_dir}{os.pathsep}{env.get('PATH', '')}",
            REAL_UV=REAL_UV,
            UV_CALLS=str(self.calls),
            UV_FIND_LINKS=str(self.wheels),
            UV_NO_INDEX="1",
            UV_CACHE_DIR=str(self.root / "uv-cache"),
            RUNPOD_VOLUME_PATH=str(self.volume),
            RUNTIME_REQUIREMENTS=str(self.requirements),
            RUNTIME_LOCK=str(self.lock),
            HANDLER=str(self.handler),
            BOOTSTRAP_PYTHON=sys.executable,
        )
        for key, value in overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def start(self, *args: str, **env: str | None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["bash", str(self.script), *args],
            env=self.env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def boot(self, *args: str, timeout: float = 120, **env: str | None) -> Boot:
        return finish(self.start(*args, **env), timeout)

    def install_calls(self) -> list[str]:
        if not self.calls.exists():
            return []
        return [line for line in self.calls.read_text().splitlines() if line.startswith("pip install")]

    def runtime_envs(self) -> list[Path]:
        return sorted(path for path in (self.volume / "runtime").iterdir() if not path.name.startswith("."))


def finish(process: subprocess.Popen[str], timeout: float = 120) -> Boot:
    stdout, stderr = process.communicate(timeout=timeout)
    handler = None
    for line in stdout.splitlines():
        if line.startswith("HANDLER "):
            handler = json.loads(line.removeprefix("HANDLER "))
    return Boot(process.returncode, stderr + stdout, handler)
