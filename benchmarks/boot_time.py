"""Time to ready of bootstrap.sh: a first boot on an empty volume (installs the runtime) against a warm boot
(reuses it), measured until the handler starts, with their ratio. That is bootstrap's own share; what a user
waits for (the local API answering, the first job's result) is measured by benchmarks/serve_time.py.

By default the runtime lock is the tests' two tiny local wheels (no network), which measures bootstrap's own
overhead. `--runtime-lock requirements/runtime.lock` measures the real thing from the package index
(minutes and ~7 GB; the uv cache starts empty, as on a fresh worker).

    python benchmarks/boot_time.py [--runs 3] [--runtime-lock FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_bootstrap import Rig, build_wheelhouse  # the tests' harness, so both measure the same

STARTED = "import time; print('HANDLER {\"started\": %r}' % time.time(), flush=True)\n"


def time_to_ready(rig: Rig, **env: str | None) -> float:
    """Seconds from launching bootstrap.sh to the first statement of the handler."""
    launched = time.time()
    boot = rig.boot(timeout=3600, **env)
    if boot.returncode != 0 or boot.handler is None:
        raise SystemExit(f"boot failed:\n{boot.log}")
    return boot.handler["started"] - launched


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--runtime-lock", type=Path, help="a real hashed lock, installed from the index")
    args = parser.parse_args()
    first, warm = [], []
    with tempfile.TemporaryDirectory(prefix="boot-time-") as tmp:
        wheels = build_wheelhouse(Path(tmp) / "wheels")
        for run in range(args.runs):
            root = Path(tmp) / f"run{run}"
            root.mkdir()
            rig = Rig(root, wheels)
            rig.handler.write_text(STARTED)
            env: dict[str, str | None] = {}
            if args.runtime_lock:
                env = {"UV_NO_INDEX": None, "UV_FIND_LINKS": None}
                env["RUNTIME_LOCK"] = str(args.runtime_lock.resolve())
                env["RUNTIME_REQUIREMENTS"] = str(args.runtime_lock.resolve().with_suffix(".txt"))
            first.append(time_to_ready(rig, **env))
            warm.append(time_to_ready(rig, **env))
            print(f"run {run + 1}: first boot {first[-1]:.2f} s, warm boot {warm[-1]:.2f} s", flush=True)
    source = args.runtime_lock or "two tiny local wheels"
    first_s, warm_s = statistics.median(first), statistics.median(warm)
    print(f"runtime lock: {source}; median of {args.runs}")
    print(f"first boot (install) to ready: {first_s:.2f} s")
    print(f"warm boot (reuse) to ready:    {warm_s:.2f} s")
    print(f"first / warm: {first_s / warm_s:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
