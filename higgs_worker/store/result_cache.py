"""A byte-capped, least-recently-used cache of encoded results, shared by workers on the network volume.

Why: a deterministic request (seed given, or sampling off) repeated by a client should cost no GPU time. The
handler decides when a request is deterministic and what identifies it; this module only stores and finds.

Layout: one file per entry, ``<dir>/<key[:2]>/<key>.entry``, holding a header line, the metadata as JSON, a
SHA-256 of the audio and the audio itself. One file per entry makes a write a single ``os.replace`` of a
fully written temp file from the same directory, so a reader on any worker sees either the old entry, the new
one, or none, never half of one; the checksum catches what the file system got wrong anyway, and such an
entry is removed and counted as a miss. Recency is the file's mtime, touched on every hit (atime is often
disabled on network file systems). The cache is an optimisation: no ``OSError`` ever leaves it, only warnings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from higgs_worker.store.atomic_file import write_atomic

log = logging.getLogger(__name__)

# Bump when the entry layout or the meaning of a key changes: old entries then simply stop matching.
CACHE_FORMAT = "higgs-result-cache-v1"
_MAGIC = (CACHE_FORMAT + "\n").encode()
_SUFFIX = ".entry"
_TEMP_PREFIX = ".tmp-"
# A temp file this old belongs to a writer that died mid-write; nothing will ever rename it.
STALE_TEMP_S = 3600.0
_KEY_SHAPE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class CachedResult:
    audio: bytes
    metadata: dict[str, Any]


def cache_key(normalised_request: Mapping[str, Any], model_revisions: Mapping[str, str]) -> str:
    """SHA-256 hex of the canonical JSON (sorted keys, no whitespace) of the request and the model revisions.

    The revisions are part of the key so that a new model never answers with an old model's audio.
    """
    payload = {"format": CACHE_FORMAT, "request": normalised_request, "models": model_revisions}
    canonical = json.dumps(
        payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _pack(audio: bytes, metadata: dict[str, Any]) -> bytes:
    meta = json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode()
    return b"".join(
        (_MAGIC, str(len(meta)).encode(), b"\n", meta, hashlib.sha256(audio).hexdigest().encode(), audio)
    )


def _unpack(blob: bytes) -> CachedResult | None:
    """The entry in ``blob``, or ``None`` if it is not a complete, intact entry."""
    if not blob.startswith(_MAGIC):
        return None
    rest = blob[len(_MAGIC) :]
    length_text, newline, rest = rest.partition(b"\n")
    if not newline or not length_text.isdigit():
        return None
    meta_len = int(length_text)
    meta_bytes, digest, audio = rest[:meta_len], rest[meta_len : meta_len + 64], rest[meta_len + 64 :]
    if len(digest) != 64 or hashlib.sha256(audio).hexdigest().encode() != digest:
        return None
    try:
        metadata = json.loads(meta_bytes)
    except ValueError:
        return None
    return CachedResult(audio=audio, metadata=metadata) if isinstance(metadata, dict) else None


class ResultCache:
    """Entries under ``directory``, evicted least-recently-used first to stay within ``max_bytes``."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes

    def _path(self, key: str) -> Path:
        if not _KEY_SHAPE.fullmatch(key):
            raise ValueError(f"cache key must be 64 lowercase hex characters (from cache_key), got {key!r}")
        return self.directory / key[:2] / f"{key}{_SUFFIX}"

    def get(self, key: str) -> CachedResult | None:
        """The entry for ``key``, marked as just used; ``None`` on a miss or a damaged entry (removed)."""
        path = self._path(key)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("result cache: cannot read %s (%s); treating it as a miss", path, exc)
            return None
        entry = _unpack(blob)
        if entry is None:
            log.warning("result cache: %s is damaged; removing it", path)
            _remove(path)
            return None
        try:
            os.utime(path)
        except OSError as exc:  # another worker evicted it a moment ago: the data we hold is still good
            log.debug("result cache: cannot touch %s (%s)", path, exc)
        return entry

    def put(self, key: str, audio: bytes, metadata: dict[str, Any]) -> None:
        """Store the entry atomically, then evict least-recently-used entries down to ``max_bytes``."""
        path = self._path(key)
        blob = _pack(audio, metadata)
        if len(blob) > self.max_bytes:
            log.info(
                "result cache: entry of %d bytes exceeds the %d-byte cap; not cached",
                len(blob),
                self.max_bytes,
            )
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, blob, temp_prefix=_TEMP_PREFIX)
        except OSError as exc:
            log.warning("result cache: cannot write %s (%s); result not cached", path, exc)
            return
        self._evict()

    def _evict(self) -> None:
        """Delete the least recently used entries until the total fits; also clear abandoned temp files."""
        entries: list[tuple[float, int, Path]] = []
        now = time.time()
        try:
            for shard in os.scandir(self.directory):
                if not shard.is_dir(follow_symlinks=False):
                    continue
                for item in os.scandir(shard.path):
                    try:
                        stat = item.stat(follow_symlinks=False)
                    except OSError:  # removed by another worker while we listed it
                        continue
                    if item.name.startswith(_TEMP_PREFIX):
                        if now - stat.st_mtime > STALE_TEMP_S:
                            _remove(Path(item.path))
                    elif item.name.endswith(_SUFFIX):
                        entries.append((stat.st_mtime, stat.st_size, Path(item.path)))
        except OSError as exc:
            log.warning("result cache: cannot list %s (%s); skipping eviction", self.directory, exc)
            return
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries, key=lambda entry: entry[0]):
            if total <= self.max_bytes:
                break
            _remove(path)
            total -= size


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("result cache: cannot remove %s (%s)", path, exc)
