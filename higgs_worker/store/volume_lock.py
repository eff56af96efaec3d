"""An exclusive lock that works across workers sharing a network volume, and survives a dead holder.

Why not ``fcntl``/``filelock``: advisory locks are unreliable on network file systems (NFS, the RunPod
network volume), where they may silently succeed for every caller. What *is* atomic there is creating a file
with ``O_CREAT | O_EXCL`` and renaming a file. So the lock is a file created exclusively, holding its owner
(host, pid, time, a random token). While held, a daemon thread touches it every ``heartbeat_s`` seconds. A
waiter that sees the file unchanged (same inode, size and mtime) for ``stale_after_s`` seconds, measured on
its *own* monotonic clock (so clock skew between hosts does not matter), treats the holder as dead: it renames
the file away (only one waiter wins the rename), checks that it took the very file it judged stale, and
retries.

Attributes are read through a fresh ``open()`` + ``fstat()``: NFS close-to-open consistency revalidates them
on open, whereas a plain ``stat()`` may be answered from the attribute cache for up to a minute.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock, as written into the lock file (for the waiting workers' log lines)."""

    host: str
    pid: int
    since: float  # wall-clock time the lock was taken
    token: str

    def describe(self) -> str:
        return f"{self.host}:{self.pid}"


@dataclass(frozen=True)
class _Seen:
    """What a waiter observed of the lock file; any change means the holder is alive."""

    inode: int
    size: int
    mtime_ns: int
    owner: LockOwner | None


class VolumeLock:
    """``with VolumeLock(lock_dir / "name.lock"): ...`` — blocks until this process holds the lock.

    ``stale_after_s`` must comfortably exceed ``heartbeat_s`` (default a quarter of it), because a holder
    whose heartbeat is delayed that long loses the lock to a waiter.
    """

    def __init__(
        self,
        path: Path,
        *,
        stale_after_s: float = 60.0,
        heartbeat_s: float | None = None,
        poll_s: float | None = None,
        purpose: str = "",
    ) -> None:
        self.path = path
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else stale_after_s / 4
        self.poll_s = poll_s if poll_s is not None else min(1.0, stale_after_s / 10)
        self.purpose = purpose or path.name
        self.owner = LockOwner(socket.gethostname(), os.getpid(), time.time(), uuid.uuid4().hex)
        self.broke_stale_lock = False
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __enter__(self) -> VolumeLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        last_seen: _Seen | None = None
        unchanged_since = time.monotonic()
        last_report = 0.0
        while not self._try_create():
            seen = self._observe()
            now = time.monotonic()
            if seen is None:  # released between our create and our look: try again at once
                continue
            if seen != last_seen:
                last_seen, unchanged_since = seen, now
            holder = seen.owner.describe() if seen.owner else "an unknown holder"
            if now - unchanged_since >= self.stale_after_s:
                self._break(seen, holder)
                continue
            if now - last_report >= 30.0:
                logger.info("waiting for the %s lock held by %s (%s)", self.purpose, holder, self.path)
                last_report = now
            time.sleep(self.poll_s)
        self._stop.clear()
        self._heartbeat = threading.Thread(
            target=self._beat, name=f"lock-heartbeat:{self.path.name}", daemon=True
        )
        self._heartbeat.start()

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        seen = self._observe()
        if seen is not None and seen.owner is not None and seen.owner.token == self.owner.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        else:
            logger.warning(
                "the %s lock %s was taken over while held; leaving it alone", self.purpose, self.path
            )

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, json.dumps(self.owner.__dict__).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _observe(self) -> _Seen | None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            raw = os.read(fd, 4096)
        finally:
            os.close(fd)
        try:
            owner: LockOwner | None = LockOwner(**json.loads(raw))
        except (ValueError, TypeError):  # being written right now, or written by something else
            owner = None
        return _Seen(st.st_ino, st.st_size, st.st_mtime_ns, owner)

    def _break(self, stale: _Seen, holder: str) -> None:
        """Move a dead holder's lock aside; put it back if, in a race, we moved a live one instead."""
        aside = self.path.with_name(f"{self.path.name}.stale-{self.owner.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another waiter broke it first
        moved = os.stat(aside)
        if moved.st_ino != stale.inode or moved.st_mtime_ns != stale.mtime_ns:
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            os.unlink(aside)
            return
        os.unlink(aside)
        self.broke_stale_lock = True
        logger.warning(
            "broke the stale %s lock held by %s: no heartbeat for %.0f s (%s)",
            self.purpose,
            holder,
            self.stale_after_s,
            self.path,
        )

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                seen = self._observe()
                if seen is None or seen.owner is None or seen.owner.token != self.owner.token:
                    logger.error("lost the %s lock %s to another worker", self.purpose, self.path)
                    return
                os.utime(self.path)
            except OSError as error:  # a network file system hiccup: the next beat may succeed
                logger.warning("could not refresh the %s lock %s: %s", self.purpose, self.path, error)
