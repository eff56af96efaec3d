"""The model store: hub repositories kept on the (network) volume, downloaded once, checked cheaply on boot.

Why it is more than ``snapshot_download``: several workers share one volume and cold-start together, workers
get killed mid-download, and a boot must not touch the network when the files are already there. So:

* a store is *complete* only when its marker ``.higgs-store.json`` exists (written last, atomically) and names
  the requested repo and revision; it records every file's size, mtime and hub hash;
* on boot every recorded file is ``stat``-ed; only files whose size or mtime changed are hashed, and damaged
  or missing files are fetched again (the rest stays);
* a RunPod "cached models" snapshot of the repo, when present, is used in place;
* otherwise exactly one worker per repo downloads (``VolumeLock``, which survives a killed holder), cleaning
  up what a killed downloader left behind first; the others wait and then find the marker.

Errors become ``ModelStoreError``, whose message says what failed and what to do; the token never appears.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import re
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

from higgs_worker.errors import ModelStoreError
from higgs_worker.store.atomic_file import write_atomic
from higgs_worker.store.volume_lock import VolumeLock

# huggingface_hub is imported where the hub is asked, never at import: it costs about half a second of every
# worker start (and of `demo_model.py`) before the worker serves; a store already complete never needs it.

logger = logging.getLogger(__name__)

MARKER_NAME = ".higgs-store.json"
LOCAL_BUILD = "local-build"  # the commit recorded for checkpoints built on this machine (publish_local)
_MARKER_FORMAT = 1
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
_HASH_CHUNK = 8 * 1024 * 1024

Verify = Literal["cheap", "full"]
Source = Literal["store", "download", "runpod-cache"]


@dataclass(frozen=True)
class RepoSpec:
    repo_id: str  # "org/name"
    revision: str  # branch, tag or commit sha
    local_dir: Path  # where the store lives, e.g. /runpod-volume/bosonai/higgs-audio-v2-tokenizer


@dataclass(frozen=True)
class StoredRepo:
    repo_id: str
    revision: str  # as requested
    commit: str  # the commit sha the files come from
    path: Path  # the directory to load from
    source: Source
    seconds: float  # time spent in ensure_repo


@dataclass(frozen=True)
class FileRecord:
    """One file of a complete store: what it looked like when verified, and the hub's hash of its content."""

    path: str
    size: int
    mtime_ns: int
    algo: Literal["sha256", "git-sha1"]  # sha256 for LFS files, the git blob id otherwise
    digest: str


@dataclass(frozen=True)
class StoreMarker:
    repo_id: str
    revision: str
    commit: str
    files: tuple[FileRecord, ...]

    def to_json(self) -> str:
        return json.dumps({"format": _MARKER_FORMAT, **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> StoreMarker:
        data = json.loads(text)
        if data.pop("format", None) != _MARKER_FORMAT:
            raise ValueError("unknown marker format")
        return cls(**{**data, "files": tuple(FileRecord(**f) for f in data["files"])})


def ensure_repo(
    spec: RepoSpec,
    *,
    lock_dir: Path,
    runpod_cache_hub_dir: Path | None,
    token: str | None = None,
    endpoint: str | None = None,
    verify: Verify = "cheap",
    stale_lock_s: float = 60.0,
    accept_local: bool = False,
) -> StoredRepo:
    """Make ``spec`` loadable from local disk and say from where; download only what is missing or damaged.

    ``token`` and ``endpoint`` default to huggingface_hub's own ``HF_TOKEN`` / ``HF_ENDPOINT``.
    ``verify="full"`` hashes every file instead of trusting unchanged size and mtime. ``stale_lock_s`` is how
    long a download lock may go without a heartbeat before a waiting worker takes it over. A checkpoint built
    on this machine (``publish_local``, the demo model) counts as the repo only with ``accept_local``;
    otherwise the hub's files replace it.
    """
    started = time.monotonic()
    _check_spec(spec)

    def done(commit: str, path: Path, source: Source) -> StoredRepo:
        return StoredRepo(spec.repo_id, spec.revision, commit, path, source, time.monotonic() - started)

    marker = read_store(spec, accept_local=accept_local) if verify == "cheap" else None
    if marker is not None:
        logger.info(
            "found complete store of %s (commit %s) in %s", _name(spec), marker.commit, spec.local_dir
        )
        return done(marker.commit, spec.local_dir, "store")

    cached = _runpod_cached_snapshot(spec, runpod_cache_hub_dir)
    if cached is not None:
        commit, snapshot = cached
        logger.info("using RunPod's cached snapshot of %s (commit %s) in %s", _name(spec), commit, snapshot)
        return done(commit, snapshot, "runpod-cache")

    lock_name = spec.repo_id.replace("/", "--") + ".lock"
    try:
        with VolumeLock(
            lock_dir / lock_name, stale_after_s=stale_lock_s, purpose=f"download of {spec.repo_id}"
        ):
            local = read_marker(spec)
            if local is not None and local.commit == LOCAL_BUILD and not accept_local:
                marker = _replace_local_build(spec, token, endpoint)
                return done(marker.commit, spec.local_dir, "download")
            marker = _read_marker(spec)  # another worker may have completed the store while we waited
            if marker is not None:
                marker, damaged = _audit(spec.local_dir, marker, full=verify == "full")
                if not damaged:
                    # records the new mtimes of files that were touched but proved intact
                    _write_marker(spec.local_dir, marker)
                    logger.info(
                        "store of %s (commit %s) is complete in %s",
                        _name(spec),
                        marker.commit,
                        spec.local_dir,
                    )
                    return done(marker.commit, spec.local_dir, "store")
                logger.warning(
                    "%d damaged files in %s: %s; fetching them again", len(damaged), spec.local_dir, damaged
                )
                for path in damaged:
                    (spec.local_dir / path).unlink(missing_ok=True)
            # a repair fetches the commit the store holds, even if the branch has moved on since
            marker = _download(spec, marker.commit if marker else spec.revision, token, endpoint)
    except ModelStoreError:
        raise
    except Exception as error:
        raise _explain(error, spec, token, endpoint) from None
    return done(marker.commit, spec.local_dir, "download")


def read_store(spec: RepoSpec, *, accept_local: bool = False) -> StoreMarker | None:
    """The marker of a complete store of ``spec`` with unchanged files, else None; no network, no lock."""
    marker = _read_marker(spec)
    if marker is None or (marker.commit == LOCAL_BUILD and not accept_local):
        return None
    if all(_stat_matches(spec.local_dir, f) for f in marker.files):
        return marker
    return None


def read_marker(spec: RepoSpec) -> StoreMarker | None:
    """Whatever marker ``spec.local_dir`` holds, complete or not, hub download or local build."""
    try:
        return StoreMarker.from_json((spec.local_dir / MARKER_NAME).read_text())
    except (OSError, ValueError, TypeError, KeyError):
        return None


def publish_local(spec: RepoSpec) -> StoreMarker:
    """Record the files already in ``spec.local_dir`` as a complete store, built here (``LOCAL_BUILD``).

    For checkpoints made on this machine (the tiny demo model): no hub hashes exist, so each file's sha256
    is recorded, and the integrity audit treats them like LFS files.
    """
    records = []
    for path in sorted(p for p in spec.local_dir.rglob("*") if p.is_file() and p.name != MARKER_NAME):
        st = path.stat()
        relative = path.relative_to(spec.local_dir).as_posix()
        records.append(FileRecord(relative, st.st_size, st.st_mtime_ns, "sha256", _digest(path, "sha256")))
    marker = StoreMarker(spec.repo_id, spec.revision, LOCAL_BUILD, tuple(records))
    _write_marker(spec.local_dir, marker)
    return marker


def _replace_local_build(spec: RepoSpec, token: str | None, endpoint: str | None) -> StoreMarker:
    """The hub's files for a store that holds a local build (the demo model), the caller holding the lock.

    The old is never removed before the new is complete: the hub's files are fetched into a folder beside
    the store, and only once its marker is written do the two swap, so a hub that is down or a download cut
    short leaves the local build as it was.
    """
    logger.info(
        "%s holds a checkpoint built locally (the demo model): fetching the hub's beside it", spec.local_dir
    )
    incoming = spec.local_dir.with_name(f".{spec.local_dir.name}.incoming")
    marker = _download(replace(spec, local_dir=incoming), spec.revision, token, endpoint)
    retired = spec.local_dir.with_name(f".{spec.local_dir.name}.retired")
    shutil.rmtree(retired, ignore_errors=True)
    spec.local_dir.rename(retired)
    incoming.rename(spec.local_dir)  # a reader between the two renames finds no store and waits for the lock
    shutil.rmtree(retired, ignore_errors=True)
    return marker


def _check_spec(spec: RepoSpec) -> None:
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", spec.repo_id):
        raise ModelStoreError(f"repo id {spec.repo_id!r} is not valid: use the hub's 'org/name' form")
    if not spec.revision or ".." in spec.revision.split("/"):
        raise ModelStoreError(
            f"revision {spec.revision!r} of {spec.repo_id} is not valid: use a branch, tag or sha"
        )


def _name(spec: RepoSpec) -> str:
    return f"{spec.repo_id}@{spec.revision}"


def _read_marker(spec: RepoSpec) -> StoreMarker | None:
    """The store's marker if it describes this repo and revision, else None (the store must be (re)built)."""
    try:
        marker = StoreMarker.from_json((spec.local_dir / MARKER_NAME).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as error:
        logger.warning("ignoring unreadable store marker in %s: %s", spec.local_dir, error)
        return None
    if (marker.repo_id, marker.revision) != (spec.repo_id, spec.revision):
        logger.info(
            "%s holds %s@%s, not %s: downloading",
            spec.local_dir,
            marker.repo_id,
            marker.revision,
            _name(spec),
        )
        return None
    return marker


def _stat_matches(local_dir: Path, record: FileRecord) -> bool:
    try:
        st = (local_dir / record.path).stat()
    except OSError:
        return False
    return st.st_size == record.size and st.st_mtime_ns == record.mtime_ns


def _audit(local_dir: Path, marker: StoreMarker, *, full: bool) -> tuple[StoreMarker, list[str]]:
    """Check every recorded file; hash those whose size/mtime changed (or all if ``full``).

    Returns the marker with refreshed mtimes for files whose content proved intact, and the damaged paths.
    """
    records, damaged = [], []
    for record in marker.files:
        path = local_dir / record.path
        if not full and _stat_matches(local_dir, record):
            records.append(record)
            continue
        try:
            st = path.stat()
            intact = st.st_size == record.size and _digest(path, record.algo) == record.digest
        except OSError:
            intact = False
        if intact:
            records.append(replace(record, mtime_ns=st.st_mtime_ns))
        else:
            damaged.append(record.path)
    return replace(marker, files=tuple(records)), damaged


def _digest(path: Path, algo: Literal["sha256", "git-sha1"]) -> str:
    # a git blob id is the sha1 of a "blob <size>" header and the content
    digest = hashlib.sha256() if algo == "sha256" else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as source:
        while chunk := source.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _runpod_cached_snapshot(spec: RepoSpec, hub_dir: Path | None) -> tuple[str, Path] | None:
    """RunPod's "cached models" stage a repo in the hub cache layout; use it when it holds this revision."""
    if hub_dir is None:
        return None
    repo_dir = hub_dir / f"models--{spec.repo_id.replace('/', '--')}"
    ref = repo_dir / "refs" / spec.revision
    if ref.is_file():
        commit = ref.read_text().strip()
    elif _COMMIT_SHA.fullmatch(spec.revision):
        commit = spec.revision
    else:
        return None
    snapshot = repo_dir / "snapshots" / commit
    if not (snapshot / "config.json").is_file():
        return None
    # a link whose blob is missing means the staging broke off
    if any(not entry.exists() for entry in snapshot.rglob("*")):
        logger.warning("ignoring RunPod's cached snapshot %s: some files are missing", snapshot)
        return None
    return commit, snapshot


def _download(spec: RepoSpec, revision: str, token: str | None, endpoint: str | None) -> StoreMarker:
    """Fetch what ``local_dir`` lacks of ``revision`` (the caller holds the lock); write the marker last."""
    local_dir = spec.local_dir
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi(endpoint=endpoint, token=token)
    info = api.model_info(spec.repo_id, revision=revision, files_metadata=True)  # the hub answers first
    (local_dir / MARKER_NAME).unlink(missing_ok=True)
    _remove_leftovers(local_dir)
    assert info.sha is not None and info.siblings is not None, "the hub always sends sha and siblings"
    expected = {s.rfilename: (s.lfs.size if s.lfs else s.size, s) for s in info.siblings}
    total = sum(size or 0 for size, _ in expected.values())
    logger.info(
        "downloading %s (commit %s) into %s: %d files, %.1f MB",
        _name(spec),
        info.sha,
        local_dir,
        len(expected),
        total / 1e6,
    )
    started = time.monotonic()
    local_dir.mkdir(parents=True, exist_ok=True)
    snapshot_download(spec.repo_id, revision=info.sha, local_dir=local_dir, token=token, endpoint=endpoint)
    records = []
    for path, (size, sibling) in sorted(expected.items()):
        try:
            st = (local_dir / path).stat()
        except FileNotFoundError:
            st = None
        if st is None or st.st_size != size:
            raise ModelStoreError(
                f"the download of {_name(spec)} is incomplete ({path} is missing or has the wrong size); "
                "the hub may have become unreachable during the download: start the worker again"
            )
        if sibling.lfs is not None:
            records.append(FileRecord(path, st.st_size, st.st_mtime_ns, "sha256", sibling.lfs.sha256))
        else:
            records.append(FileRecord(path, st.st_size, st.st_mtime_ns, "git-sha1", str(sibling.blob_id)))
    marker = StoreMarker(spec.repo_id, spec.revision, info.sha, tuple(records))
    _write_marker(local_dir, marker)
    logger.info(
        "downloaded %s in %.1f s: %d files, %.1f MB",
        _name(spec),
        time.monotonic() - started,
        len(records),
        total / 1e6,
    )
    return marker


def _remove_leftovers(local_dir: Path) -> None:
    """Remove what a killed downloader leaves in huggingface_hub's bookkeeping folder.

    huggingface_hub 2.x neither resumes nor deletes the partial ``*.incomplete`` file of a killed process, and
    on file systems without ``flock`` its per-file ``*.lock`` files become lock files that nobody removes. We
    hold the repo's download lock here, so nobody else is using them.
    """
    bookkeeping = local_dir / ".cache" / "huggingface" / "download"
    for pattern in ("*.incomplete", "*.lock"):
        for leftover in bookkeeping.rglob(pattern):
            logger.info("removing %s left by an earlier download", leftover)
            leftover.unlink(missing_ok=True)


def _write_marker(local_dir: Path, marker: StoreMarker) -> None:
    """A reader sees either no marker or a whole one, and a completed store survives a power cut."""
    write_atomic(
        local_dir / MARKER_NAME, marker.to_json().encode(), temp_prefix=MARKER_NAME, sync_directory=True
    )


def _explain(error: Exception, spec: RepoSpec, token: str | None, endpoint: str | None) -> ModelStoreError:
    """Turn what huggingface_hub or the file system raised into a message that says what to do."""
    import httpx2
    from huggingface_hub import constants as hf_constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = _name(spec)
    hub = (endpoint or hf_constants.ENDPOINT).rstrip("/")
    if _disk_full(error):
        free = shutil.disk_usage(_existing_parent(spec.local_dir)).free
        message = (
            f"the volume is full while storing {name} in {spec.local_dir} ({free / 1e9:.2f} GB free): "
            "free space on the volume or attach a larger one, then start the worker again"
        )
    elif isinstance(error, GatedRepoError):
        message = (
            f"{spec.repo_id} is gated on {hub}: accept its terms on the hub with your account and set "
            "HF_TOKEN to a token of that account"
        )
    elif isinstance(error, RevisionNotFoundError):
        message = (
            f"revision {spec.revision!r} of {spec.repo_id} was not found on {hub}: check MODEL_REVISION / "
            "TOKENIZER_REVISION (a branch, tag or commit sha of that repo)"
        )
    elif isinstance(error, RepositoryNotFoundError):
        message = (
            f"repository {spec.repo_id} was not found on {hub}: check MODEL_REPO / TOKENIZER_REPO; if the "
            "repo is private, set HF_TOKEN to a token that can read it"
        )
    elif isinstance(error, HfHubHTTPError) and error.response.status_code in (401, 403):
        message = (
            f"{hub} refused access to {name} (HTTP {error.response.status_code}): HF_TOKEN is missing, "
            "invalid or lacks access to this repo; set HF_TOKEN to a valid token with read access"
        )
    elif isinstance(error, (httpx2.TransportError, LocalEntryNotFoundError)):
        message = (
            f"could not reach the hub at {hub} to download {name} into {spec.local_dir} "
            f"({type(error).__name__}): check the worker's network access and HF_ENDPOINT, "
            "or put a complete copy of the repo on the volume"
        )
    elif isinstance(error, HFValidationError):
        message = f"{name} is not a valid repo id or revision: {error}"
    elif isinstance(error, HfHubHTTPError):
        message = (
            f"the hub at {hub} failed while downloading {name}: {str(error).splitlines()[0]}; try again later"
        )
    else:
        message = f"storing {name} in {spec.local_dir} failed: {type(error).__name__}: {error}"
    if token:
        message = message.replace(token, "***")
    return ModelStoreError(message)


def _disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` or an error it was raised from is "no space left" (huggingface_hub may wrap it)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path
