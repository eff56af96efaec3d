"""Write a file so that readers see either nothing or all of it, even across workers on a network volume.

Why: several workers share the volume (voices, result cache, store markers) and any of them can be killed
mid-write. Content goes to a temporary file in the same directory, is flushed to disk, and is renamed over
the final name, which is atomic on POSIX file systems. A failed write leaves no temporary file behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, *, temp_prefix: str, sync_directory: bool = False) -> None:
    """Replace ``path`` with ``data``; ``sync_directory`` also makes the rename itself durable."""
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix)
    try:
        with os.fdopen(handle, "wb") as temp:
            temp.write(data)
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    if sync_directory:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def publish(path: Path, data: bytes) -> None:
    """``write_atomic`` with a hidden temporary name (``.<name>.…``), so a folder listing (voices, presets)
    never shows a file that is still being written."""
    write_atomic(path, data, temp_prefix=f".{path.name}.")
