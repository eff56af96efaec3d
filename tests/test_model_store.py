"""The model store against the real huggingface_hub download code, a hub stand-in and worker processes."""

from __future__ import annotations

import errno
import filecmp
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from higgs_worker.errors import ModelStoreError
from higgs_worker.store.model_store import MARKER_NAME, RepoSpec, StoredRepo, ensure_repo
from higgs_worker.store.volume_lock import VolumeLock
from tests.support.fixtures_hub import (  # noqa: F401 (fixtures)
    TINY_REPO_ID,
    make_repo,
    tiny_filesystem,
    tiny_hub_fixture,
    tiny_repo_fixture,
)
from tests.support.hub_server import HubRepo, HubServer

REPO_ROOT = Path(__file__).resolve().parent.parent
FILES = ["audio/preprocessor_config.json", "config.json", "merges.txt", "model.safetensors", "tokenizer.json"]

# A worker process: ensures the repo (hub from HF_ENDPOINT, as in production) and prints what it got.
WORKER = """
import json, logging, sys
from pathlib import Path
from higgs_worker.store.model_store import RepoSpec, ensure_repo
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
volume, repo_id = Path(sys.argv[1]), sys.argv[2]
spec = RepoSpec(repo_id, "main", volume / repo_id)
stored = ensure_repo(spec, lock_dir=volume / ".locks", runpod_cache_hub_dir=None)
print(json.dumps({"source": stored.source, "commit": stored.commit}))
"""


def spec_for(volume: Path, revision: str = "main", repo_id: str = TINY_REPO_ID) -> RepoSpec:
    return RepoSpec(repo_id, revision, volume / repo_id)


def ensure(spec: RepoSpec, hub_url: str, **kwargs: object) -> StoredRepo:
    volume = spec.local_dir.parent.parent
    return ensure_repo(
        spec,
        lock_dir=volume / ".locks",
        runpod_cache_hub_dir=volume / "huggingface-cache" / "hub",
        endpoint=hub_url,
        **kwargs,  # type: ignore[arg-type]
    )


def start_worker(volume: Path, hub_url: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "HF_ENDPOINT": hub_url,
        "HF_HOME": str(volume.parent / "hf-home"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "PYTHONPATH": str(REPO_ROOT),
    }
    env.pop("HF_TOKEN", None)
    args = [sys.executable, "-c", WORKER, str(volume), TINY_REPO_ID]
    return subprocess.Popen(
        args, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(worker: subprocess.Popen) -> dict:
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err
    return json.loads(out)


def assert_same_files(store: Path, repo: Path) -> None:
    for name in FILES:
        assert filecmp.cmp(store / name, repo / name, shallow=False), name


def test_first_call_downloads_and_later_calls_use_the_store_without_network(
    tmp_path: Path, tiny_hub: HubServer, tiny_repo: Path
) -> None:
    volume = tmp_path / "volume"
    spec = spec_for(volume)

    first = ensure(spec, tiny_hub.url)

    assert (first.source, first.commit, first.path) == (
        "download",
        tiny_hub.commit(TINY_REPO_ID),
        spec.local_dir,
    )
    assert tiny_hub.file_gets == {f"{TINY_REPO_ID}/{name}": 1 for name in FILES}
    assert_same_files(spec.local_dir, tiny_repo)
    marker_path = spec.local_dir / MARKER_NAME
    assert marker_path.stat().st_mtime_ns >= max((spec.local_dir / n).stat().st_mtime_ns for n in FILES)
    marker = json.loads(marker_path.read_text())
    assert (marker["repo_id"], marker["revision"], marker["commit"]) == (TINY_REPO_ID, "main", first.commit)
    records = {f["path"]: f for f in marker["files"]}
    assert sorted(records) == FILES
    weights = (tiny_repo / "model.safetensors").read_bytes()
    assert records["model.safetensors"]["algo"] == "sha256"
    assert records["model.safetensors"]["digest"] == hashlib.sha256(weights).hexdigest()
    assert records["config.json"]["algo"] == "git-sha1"

    tiny_hub.reset_counts()
    assert ensure(spec, tiny_hub.url).source == "store"
    assert finish(start_worker(volume, tiny_hub.url)) == {"source": "store", "commit": first.commit}
    assert tiny_hub.requests == []

    tiny_hub.stop()
    again = ensure(spec, tiny_hub.url)
    assert (again.source, again.commit) == ("store", first.commit)


@pytest.mark.slow
def test_two_workers_cold_starting_on_one_volume_download_each_file_once(
    tmp_path: Path, tiny_hub: HubServer, tiny_repo: Path
) -> None:
    volume = tmp_path / "volume"
    tiny_hub.throttle_bps = 400 * 1024  # the download lasts about a second, so the two workers overlap

    workers = [start_worker(volume, tiny_hub.url), start_worker(volume, tiny_hub.url)]
    results = [finish(w) for w in workers]

    assert sorted(r["source"] for r in results) == ["download", "store"]
    assert {r["commit"] for r in results} == {tiny_hub.commit(TINY_REPO_ID)}
    assert tiny_hub.file_gets == {f"{TINY_REPO_ID}/{name}": 1 for name in FILES}
    assert_same_files(volume / TINY_REPO_ID, tiny_repo)


@pytest.mark.slow
def test_a_worker_killed_mid_download_is_recovered_by_the_next(
    tmp_path: Path, tiny_hub: HubServer, tiny_repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    volume = tmp_path / "volume"
    spec = spec_for(volume)
    bookkeeping = spec.local_dir / ".cache" / "huggingface" / "download"
    weights_key = f"{TINY_REPO_ID}/model.safetensors"
    tiny_hub.throttle_bps = 32 * 1024  # the weights take 8 s
    worker = start_worker(volume, tiny_hub.url)
    deadline = time.monotonic() + 30
    # huggingface_hub buffers up to 10 MB before writing, so "mid-file" is seen from the hub's side
    while not (any(bookkeeping.rglob("*.incomplete")) and tiny_hub.file_gets[weights_key]):
        assert time.monotonic() < deadline and worker.poll() is None, "the worker never started the weights"
        time.sleep(0.05)
    time.sleep(0.5)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    lock_file = volume / ".locks" / f"{TINY_REPO_ID.replace('/', '--')}.lock"
    assert lock_file.exists() and any(bookkeeping.rglob("*.incomplete"))
    assert not (spec.local_dir / MARKER_NAME).exists()

    tiny_hub.throttle_bps = None
    with caplog.at_level(logging.INFO):
        stored = ensure(spec, tiny_hub.url, stale_lock_s=1.0)

    assert (stored.source, stored.commit) == ("download", tiny_hub.commit(TINY_REPO_ID))
    assert tiny_hub.file_gets[weights_key] == 2
    assert_same_files(spec.local_dir, tiny_repo)
    assert not any(bookkeeping.rglob("*.incomplete"))
    assert not lock_file.exists()
    assert "broke the stale download of test-org/tiny-higgs lock" in caplog.text
    assert (spec.local_dir / MARKER_NAME).exists()


@pytest.mark.parametrize("damage", ["truncate", "overwrite-same-size", "delete"])
def test_a_damaged_file_in_a_complete_store_is_fetched_again_alone(
    tmp_path: Path, tiny_hub: HubServer, tiny_repo: Path, damage: str
) -> None:
    spec = spec_for(tmp_path / "volume")
    ensure(spec, tiny_hub.url)
    weights = spec.local_dir / "model.safetensors"
    if damage == "truncate":
        os.truncate(weights, weights.stat().st_size // 2)
    elif damage == "overwrite-same-size":
        with weights.open("r+b") as f:
            f.seek(1000)
            f.write(b"\0" * 100)
    else:
        weights.unlink()
    tiny_hub.reset_counts()

    stored = ensure(spec, tiny_hub.url)

    assert stored.source == "download"
    assert tiny_hub.file_gets == {f"{TINY_REPO_ID}/model.safetensors": 1}
    assert_same_files(spec.local_dir, tiny_repo)
    tiny_hub.reset_counts()
    assert ensure(spec, tiny_hub.url).source == "store"
    assert tiny_hub.requests == []


def test_a_repair_fetches_the_commit_the_store_holds_after_the_branch_moved(
    tmp_path: Path, tiny_repo: Path
) -> None:
    spec = spec_for(tmp_path / "volume")
    with HubServer({TINY_REPO_ID: tiny_repo}) as hub:
        first = ensure(spec, hub.url)
    (spec.local_dir / "model.safetensors").unlink()
    v2 = make_repo(tmp_path / "hub-files-v2", config="{}", seed=2)
    with HubServer({TINY_REPO_ID: HubRepo({"main": v2, "old": tiny_repo})}) as moved:
        repaired = ensure(spec, moved.url)
        assert moved.file_gets == {f"{TINY_REPO_ID}/model.safetensors": 1}

    assert (repaired.source, repaired.commit) == ("download", first.commit)
    assert_same_files(spec.local_dir, tiny_repo)


def test_a_touched_but_intact_file_is_hashed_once_and_kept(tmp_path: Path, tiny_hub: HubServer) -> None:
    spec = spec_for(tmp_path / "volume")
    ensure(spec, tiny_hub.url)
    weights = spec.local_dir / "model.safetensors"
    os.utime(weights, ns=(0, weights.stat().st_mtime_ns + 5_000_000_000))
    tiny_hub.reset_counts()

    assert ensure(spec, tiny_hub.url).source == "store"

    assert tiny_hub.requests == []
    records = {f["path"]: f for f in json.loads((spec.local_dir / MARKER_NAME).read_text())["files"]}
    assert records["model.safetensors"]["mtime_ns"] == weights.stat().st_mtime_ns


def test_full_verification_finds_corruption_that_kept_size_and_mtime(
    tmp_path: Path, tiny_hub: HubServer
) -> None:
    spec = spec_for(tmp_path / "volume")
    ensure(spec, tiny_hub.url)
    config = spec.local_dir / "config.json"
    before = config.stat()
    config.write_text(config.read_text().upper())
    os.utime(config, ns=(before.st_atime_ns, before.st_mtime_ns))
    tiny_hub.reset_counts()

    assert ensure(spec, tiny_hub.url).source == "store"  # the cheap check cannot see it, by design
    assert tiny_hub.requests == []
    assert ensure(spec, tiny_hub.url, verify="full").source == "download"
    assert tiny_hub.file_gets == {f"{TINY_REPO_ID}/config.json": 1}


def test_a_changed_revision_is_downloaded_reusing_identical_files(tmp_path: Path, tiny_repo: Path) -> None:
    v2 = make_repo(tmp_path / "hub-files-v2", config='{"model_type": "higgs_audio_v2", "v": 2}')
    (v2 / "extra.json").write_text("{}")
    with HubServer({TINY_REPO_ID: HubRepo({"main": tiny_repo, "v2": v2})}) as hub:
        volume = tmp_path / "volume"
        first = ensure(spec_for(volume), hub.url)
        hub.reset_counts()

        second = ensure(spec_for(volume, "v2"), hub.url)

        assert (second.source, second.commit) == ("download", hub.commit(TINY_REPO_ID, "v2"))
        assert second.commit != first.commit
        assert hub.file_gets == {f"{TINY_REPO_ID}/config.json": 1, f"{TINY_REPO_ID}/extra.json": 1}
        assert (volume / TINY_REPO_ID / "config.json").read_text() == (v2 / "config.json").read_text()
        back = ensure(spec_for(volume, "main"), hub.url)
        assert (back.source, back.commit) == ("download", first.commit)


def test_a_runpod_cached_snapshot_is_used_in_place_without_network(tmp_path: Path, tiny_repo: Path) -> None:
    volume = tmp_path / "volume"
    commit = "a" * 40
    repo_dir = volume / "huggingface-cache" / "hub" / f"models--{TINY_REPO_ID.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    for name in FILES:  # the hub cache layout: snapshot entries link to content-addressed blobs
        blob = repo_dir / "blobs" / hashlib.sha256(name.encode()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes((tiny_repo / name).read_bytes())
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(blob)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)

    with HubServer({}) as hub:
        by_branch = ensure(spec_for(volume), hub.url)
        by_sha = ensure(spec_for(volume, commit), hub.url)
        assert hub.requests == []

    assert (by_branch.source, by_branch.commit, by_branch.path) == ("runpod-cache", commit, snapshot)
    assert (by_sha.source, by_sha.path) == ("runpod-cache", snapshot)
    assert_same_files(by_branch.path, tiny_repo)


def test_a_runpod_cached_snapshot_with_missing_blobs_is_not_used(
    tmp_path: Path, tiny_hub: HubServer, tiny_repo: Path
) -> None:
    volume = tmp_path / "volume"
    repo_dir = volume / "huggingface-cache" / "hub" / "models--test-org--tiny-higgs"
    snapshot = repo_dir / "snapshots" / ("b" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").symlink_to(repo_dir / "blobs" / "missing")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("b" * 40)

    stored = ensure(spec_for(volume), tiny_hub.url)

    assert (stored.source, stored.commit) == ("download", tiny_hub.commit(TINY_REPO_ID))


def test_an_unreachable_hub_with_an_empty_store_fails_clearly(tmp_path: Path, tiny_hub: HubServer) -> None:
    tiny_hub.stop()
    with pytest.raises(
        ModelStoreError, match=r"could not reach the hub at http://127\.0\.0\.1:\d+"
    ) as caught:
        ensure(spec_for(tmp_path / "volume"), tiny_hub.url)
    assert "test-org/tiny-higgs@main" in str(caught.value)
    assert "HF_ENDPOINT" in str(caught.value)


@pytest.mark.parametrize(
    ("repo_id", "revision", "expected"),
    [
        ("test-org/no-such-repo", "main", r"repository test-org/no-such-repo was not found .*MODEL_REPO"),
        (
            TINY_REPO_ID,
            "no-such-branch",
            r"revision 'no-such-branch' of test-org/tiny-higgs .*MODEL_REVISION",
        ),
        ("not a repo id", "main", r"repo id 'not a repo id' is not valid: use the hub's 'org/name' form"),
    ],
)
def test_unknown_repos_and_revisions_name_what_to_check(
    tmp_path: Path, tiny_hub: HubServer, repo_id: str, revision: str, expected: str
) -> None:
    with pytest.raises(ModelStoreError, match=expected):
        ensure(spec_for(tmp_path / "volume", revision, repo_id), tiny_hub.url)


@pytest.mark.parametrize("given_token", [None, "hf_wrongTokenValue123"])
def test_a_gated_repo_needs_a_valid_token_and_never_leaks_it(
    tmp_path: Path, tiny_repo: Path, caplog: pytest.LogCaptureFixture, given_token: str | None
) -> None:
    secret = "hf_rightTokenValue456"
    with HubServer({TINY_REPO_ID: HubRepo({"main": tiny_repo}, token=secret)}) as hub:
        spec = spec_for(tmp_path / "volume")
        with caplog.at_level(logging.DEBUG), pytest.raises(ModelStoreError, match="HF_TOKEN") as caught:
            ensure(spec, hub.url, token=given_token)
        assert hub.file_gets == {}
        for text in (str(caught.value), caplog.text):
            assert secret not in text
            assert given_token is None or given_token not in text

        assert ensure(spec, hub.url, token=secret).source == "download"
    assert secret not in caplog.text


@pytest.mark.filterwarnings("ignore:Not enough free disk space")
def test_a_full_volume_fails_with_a_message_saying_so(
    tmp_path: Path, tiny_hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    volume = tmp_path / "volume"
    with tiny_filesystem(volume, size_kib=128) as mounted:
        if not mounted:  # no root here: make the weights' writes fail the way a full disk does
            _fail_weight_writes_with_enospc(monkeypatch)
        with pytest.raises(ModelStoreError, match=r"the volume is full .* GB free\): free space") as caught:
            ensure(spec_for(volume), tiny_hub.url)
    assert "test-org/tiny-higgs@main" in str(caught.value)


def _fail_weight_writes_with_enospc(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.file_download as file_download

    real_http_get = file_download.http_get

    class FullDisk:
        def __init__(self, target: object) -> None:
            self.target = target

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str) -> object:
            return getattr(self.target, name)

    def http_get(url: str, temp_file: object, **kwargs: object) -> None:
        real_http_get(url, FullDisk(temp_file) if "/lfs/" in url else temp_file, **kwargs)

    monkeypatch.setattr(file_download, "http_get", http_get)


def test_the_lock_is_not_taken_from_a_live_holder_past_the_stale_timeout(tmp_path: Path) -> None:
    path = tmp_path / "locks" / "repo.lock"
    events: list[str] = []
    holding = threading.Event()

    def holder() -> None:
        with VolumeLock(path, stale_after_s=0.5, heartbeat_s=0.05):
            holding.set()
            time.sleep(1.5)  # three stale timeouts: only the heartbeat keeps the lock
            events.append("holder released")

    thread = threading.Thread(target=holder)
    thread.start()
    holding.wait()
    with VolumeLock(path, stale_after_s=0.5, poll_s=0.02) as waiter:
        events.append("waiter acquired")
        assert not waiter.broke_stale_lock
    thread.join()

    assert events == ["holder released", "waiter acquired"]
    assert not path.exists()


def test_the_lock_of_a_dead_holder_is_broken_once_stale(tmp_path: Path) -> None:
    path = tmp_path / "repo.lock"
    path.write_text(json.dumps({"host": "gone", "pid": 1, "since": 0.0, "token": "x"}))

    with VolumeLock(path, stale_after_s=0.3, poll_s=0.02) as lock:
        assert lock.broke_stale_lock
        assert json.loads(path.read_text())["token"] == lock.owner.token
    assert not path.exists()
