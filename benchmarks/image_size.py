"""Measure the Python layer of the thin image without Docker.

Installs the image's lock into an empty directory exactly as Dockerfile.runpod.ultra does (hashes checked,
same Python minor, same platform, bytecode compiled) and sums the bytes that would land in the layer.

Why not build the image: there is no Docker engine on the development machine, and the base image
(python:3.11-slim-bookworm) is a fixed cost we do not control. The part we choose is this layer, so it is the
part that has a budget. Exit status 1 when the layer is over budget, so CI can run this as a check.

    python benchmarks/image_size.py [--budget-mb 250] [--lock requirements/image.lock]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The image is python:3.11 on Debian bookworm (glibc 2.36), x86_64: resolve wheels for it, whatever the host.
IMAGE_PLATFORM = "x86_64-manylinux_2_36"
IMAGE_PYTHON = (3, 11)


def tree_bytes(root: Path) -> int:
    """Apparent size of every regular file (what a layer tarball stores), links counted once as links."""
    total = 0
    for directory, _dirs, files in os.walk(root):
        for name in files:
            total += os.lstat(os.path.join(directory, name)).st_size
    return total


def largest_entries(root: Path, count: int) -> list[tuple[int, str]]:
    sizes = [(tree_bytes(p) if p.is_dir() else p.lstat().st_size, p.name) for p in root.iterdir()]
    return sorted(sizes, reverse=True)[:count]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-mb", type=float, default=250.0)
    parser.add_argument("--lock", type=Path, default=REPO / "requirements" / "image.lock")
    args = parser.parse_args()
    if sys.version_info[:2] != IMAGE_PYTHON:
        wanted = ".".join(map(str, IMAGE_PYTHON))
        print(f"run this with Python {wanted} (the image's), not {sys.version.split()[0]}")
        return 2
    uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    with tempfile.TemporaryDirectory(prefix="image-layer-") as tmp:
        target = Path(tmp) / "site-packages"
        command = [
            uv, "pip", "install", "--quiet", "--no-cache", "--compile-bytecode",
            "--python", sys.executable, "--python-platform", IMAGE_PLATFORM,
            "--target", str(target), "--require-hashes", "-r", str(args.lock),
        ]  # fmt: skip
        subprocess.run(command, check=True)
        size_mb = tree_bytes(target) / 1e6
        print(f"lock: {args.lock.resolve().relative_to(REPO)} ({IMAGE_PLATFORM}, bytecode compiled)")
        print("largest entries:")
        for size, name in largest_entries(target, 8):
            print(f"  {size / 1e6:8.1f} MB  {name}")
    within = size_mb <= args.budget_mb
    verdict = "within" if within else "OVER"
    print(f"image Python layer: {size_mb:.1f} MB ({verdict} the {args.budget_mb:.0f} MB budget)")
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
