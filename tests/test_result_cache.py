"""The result cache on a real directory: keys, LRU under a byte cap, atomic writes, damaged entries."""

from __future__ import annotations

import errno
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from higgs_worker.audio.encoding import EncodedAudio, encode_audio
from higgs_worker.delivery import DeliveryPolicy, deliver
from higgs_worker.store.result_cache import STALE_TEMP_S, CachedResult, ResultCache, cache_key

REPO_ROOT = Path(__file__).resolve().parents[1]
REVISIONS = {"model": "abc123", "tokenizer": "def456"}


def key(n: int) -> str:
    return cache_key({"transcript": f"clip {n}", "seed": n}, REVISIONS)


def entry_path(cache: ResultCache, k: str) -> Path:
    (path,) = cache.directory.glob(f"*/{k}.entry")
    return path


def set_age(path: Path, seconds_ago: float) -> None:
    stamp = time.time() - seconds_ago
    os.utime(path, (stamp, stamp))


# --- keys ------------------------------------------------------------------------------------------------


def test_key_is_canonical_sha256() -> None:
    a = cache_key({"transcript": "Hello", "seed": 7, "voice": {"name": "belinda", "speed": 1.0}}, REVISIONS)
    b = cache_key({"voice": {"speed": 1.0, "name": "belinda"}, "seed": 7, "transcript": "Hello"}, REVISIONS)
    assert a == b
    assert re.fullmatch(r"[0-9a-f]{64}", a), a


@pytest.mark.parametrize(
    ("request_", "revisions"),
    [
        ({"transcript": "Hello", "seed": 8}, REVISIONS),
        ({"transcript": "Hello ", "seed": 7}, REVISIONS),
        ({"transcript": "Hello", "seed": 7}, {"model": "abc124", "tokenizer": "def456"}),
        ({"transcript": "Hello", "seed": 7}, {"model": "abc123", "tokenizer": "other"}),
    ],
)
def test_key_changes_with_request_or_model(request_: dict, revisions: dict) -> None:
    assert cache_key(request_, revisions) != cache_key({"transcript": "Hello", "seed": 7}, REVISIONS)


def test_bad_keys_are_programming_errors(tmp_path: Path) -> None:
    cache = ResultCache(tmp_path, 10_000)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        cache.get("../../etc/passwd")


# --- put / get / LRU -------------------------------------------------------------------------------------


def test_put_then_get_returns_the_entry(tmp_path: Path) -> None:
    cache = ResultCache(tmp_path / "cache", 1_000_000)
    meta = {"format": "mp3", "sample_rate": 24000, "duration_s": 1.5, "text": "naïve ✓"}
    assert cache.get(key(1)) is None
    cache.put(key(1), b"\x00\x01audio bytes\xff", meta)
    assert cache.get(key(1)) == CachedResult(audio=b"\x00\x01audio bytes\xff", metadata=meta)
    assert cache.get(key(2)) is None


def test_get_marks_the_entry_recently_used(tmp_path: Path) -> None:
    cache = ResultCache(tmp_path, 1_000_000)
    cache.put(key(1), b"x" * 100, {})
    path = entry_path(cache, key(1))
    set_age(path, 3600)
    before = path.stat().st_mtime
    assert cache.get(key(1)) is not None
    assert path.stat().st_mtime > before + 3000


def test_least_recently_used_entries_go_first_and_total_stays_under_cap(tmp_path: Path) -> None:
    audio = b"a" * 10_000
    cache = ResultCache(tmp_path, 35_000)  # room for three entries (each ~10.2 kB with header and metadata)
    for n in (1, 2, 3):
        cache.put(key(n), audio, {"n": n})
        set_age(entry_path(cache, key(n)), 100 - n)  # 1 oldest, 3 newest
    assert cache.get(key(1)) is not None  # 1 is now the most recently used, 2 the least

    cache.put(key(4), audio, {"n": 4})

    assert cache.get(key(2)) is None
    assert {n for n in (1, 3, 4) if cache.get(key(n)) is not None} == {1, 3, 4}
    assert sum(p.stat().st_size for p in tmp_path.glob("*/*.entry")) <= 35_000


def test_entry_bigger_than_the_cap_is_not_cached(tmp_path: Path) -> None:
    cache = ResultCache(tmp_path, 1_000)
    cache.put(key(1), b"small", {})
    cache.put(key(2), b"z" * 5_000, {})
    assert cache.get(key(2)) is None
    assert cache.get(key(1)) is not None  # a rejected newcomer does not flush the others


def test_zero_cap_caches_nothing(tmp_path: Path) -> None:
    cache = ResultCache(tmp_path, 0)
    cache.put(key(1), b"x", {})
    assert cache.get(key(1)) is None


def test_abandoned_temp_files_are_cleared_fresh_ones_kept(tmp_path: Path) -> None:
    cache = ResultCache(tmp_path, 1_000_000)
    cache.put(key(1), b"x", {})
    shard = entry_path(cache, key(1)).parent
    stale, fresh = shard / ".tmp-dead-writer", shard / ".tmp-live-writer"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    set_age(stale, STALE_TEMP_S + 60)
    cache.put(key(2), b"y", {})
    assert not stale.exists()
    assert fresh.exists()


# --- damage and failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    [
        lambda blob: blob[: len(blob) // 2],  # truncated
        lambda blob: blob[:-1] + bytes([blob[-1] ^ 0x01]),  # one audio bit flipped
        lambda blob: b"garbage" + blob,  # foreign file
        lambda blob: b"",  # empty
        lambda blob: blob.replace(b'"format"', b'"form\xffat"'),  # metadata not JSON
    ],
)
def test_damaged_entry_is_a_miss_and_is_removed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage
) -> None:
    cache = ResultCache(tmp_path, 1_000_000)
    cache.put(key(1), b"audio" * 100, {"format": "wav"})
    path = entry_path(cache, key(1))
    path.write_bytes(damage(path.read_bytes()))

    assert cache.get(key(1)) is None
    assert not path.exists()
    assert "damaged" in caplog.text


def test_unwritable_directory_warns_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cache = ResultCache(blocker / "cache", 1_000_000)  # mkdir fails even for root
    with caplog.at_level(logging.WARNING):
        cache.put(key(1), b"x", {})
    assert cache.get(key(1)) is None
    assert "result not cached" in caplog.text


def test_full_disk_during_write_warns_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """ENOSPC cannot be produced on demand without root-only mounts, so the failing syscall is injected."""

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    cache = ResultCache(tmp_path, 1_000_000)
    monkeypatch.setattr(os, "fsync", no_space)
    cache.put(key(1), b"x" * 1000, {})
    assert cache.get(key(1)) is None
    assert "No space left on device" in caplog.text
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


# --- several workers at once -----------------------------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from higgs_worker.store.result_cache import ResultCache

    directory, key, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    cache = ResultCache(directory, 1 << 30)
    for i in range(rounds):
        size = 200_000 + 37_000 * (i % 5)
        cache.put(key, bytes([i % 251]) * size, {"round": i, "size": size})
    """
)


def test_concurrent_readers_never_see_a_partial_entry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two writer processes keep replacing one entry while this process reads it: every read is whole."""
    k = key(99)
    cache = ResultCache(tmp_path, 1 << 30)
    cache.put(k, b"\x00" * 200_000, {"round": -1, "size": 200_000})
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), k, "150"], cwd=REPO_ROOT)
        for _ in range(2)
    ]
    reads = 0
    try:
        while any(w.poll() is None for w in writers) or reads < 50:
            entry = cache.get(k)
            assert entry is not None, "an entry vanished while being replaced"
            size = entry.metadata["size"]
            assert len(entry.audio) == size
            assert entry.audio == entry.audio[:1] * size
            reads += 1
    finally:
        for w in writers:
            w.wait(timeout=60)
    assert all(w.returncode == 0 for w in writers)
    assert "damaged" not in caplog.text
    assert reads > 50
    assert not list(tmp_path.glob("*/.tmp-*"))


# --- a hit is delivered like a fresh clip ----------------------------------------------------------------


def test_cache_hit_is_delivered_like_a_fresh_clip(tmp_path: Path) -> None:
    wave = (0.4 * np.sin(2 * np.pi * 330 * np.arange(12_000) / 24_000)).astype(np.float32)
    audio = encode_audio(wave, 24_000, "ogg")
    cache = ResultCache(tmp_path, 10_000_000)
    k = cache_key({"transcript": "hi", "seed": 1, "output_format": "ogg"}, REVISIONS)
    cache.put(k, audio.data, audio.metadata())

    hit = cache.get(k)
    assert hit is not None
    replayed = EncodedAudio.from_metadata(hit.audio, hit.metadata)
    assert replayed == audio
    policy = DeliveryPolicy(max_inline_bytes=1_000_000, presign_expiry_s=60, inline_requested=False)
    assert deliver(replayed, None, policy) == deliver(audio, None, policy)
