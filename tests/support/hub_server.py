"""A Hugging Face Hub stand-in on 127.0.0.1, so the real huggingface_hub download code runs in tests.

Why it exists: the Hub is unreachable from CI and from this machine, and mocking huggingface_hub would test
our assumptions about it instead of its behaviour. This server answers exactly the calls that huggingface_hub
2.4's ``snapshot_download`` and ``HfApi.model_info(files_metadata=True)`` make:

* ``GET /api/models/{repo}/revision/{rev}`` (``?blobs=true`` adds sizes, git blob ids and LFS sha256),
* ``GET /api/models/{repo}/tree/{rev}`` paginated with a ``Link: <...>; rel="next"`` header,
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag`` and ``Content-Length``.

Files larger than ``lfs_threshold`` (and every ``*.safetensors``) behave like LFS files on the real Hub: the
resolve call answers ``302`` to a second server standing in for the CDN (another origin, so the client neither
follows the HEAD redirect nor sends the token there), with ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``.
Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``, ``GatedRepo``).

Tests read ``requests`` (every request, in order) and ``file_gets`` (file bodies served, per repo file), may
set ``throttle_bps`` to slow file bodies down (to kill a downloader mid-file), and call ``stop()`` to make the
hub unreachable.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

_CHUNK = 16 * 1024


@dataclass(frozen=True)
class HubFile:
    path: str
    data_path: Path
    size: int
    blob_id: str  # git blob sha1 of what git stores: the content, or the LFS pointer for LFS files
    sha256: str | None  # set for LFS files only

    @property
    def etag(self) -> str:
        return self.sha256 or self.blob_id


@dataclass(frozen=True)
class HubRevision:
    commit: str
    files: dict[str, HubFile]


@dataclass
class HubRepo:
    """One repository: revision name -> directory of that revision's files; optionally gated by a token."""

    revisions: dict[str, Path]
    token: str | None = None
    _resolved: dict[str, HubRevision] = field(default_factory=dict, repr=False)


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _index_revision(root: Path, lfs_threshold: int) -> HubRevision:
    files: dict[str, HubFile] = {}
    for data_path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = data_path.relative_to(root).as_posix()
        data = data_path.read_bytes()
        is_lfs = len(data) > lfs_threshold or rel.endswith(".safetensors")
        sha256 = hashlib.sha256(data).hexdigest() if is_lfs else None
        blob_id = git_blob_sha1(_lfs_pointer(sha256, len(data)) if sha256 else data)
        files[rel] = HubFile(rel, data_path, len(data), blob_id, sha256)
    manifest = "".join(f"{f.path}\0{f.blob_id}\n" for f in files.values())
    return HubRevision(hashlib.sha1(manifest.encode()).hexdigest(), files)


class HubServer:
    """``with HubServer({"org/name": Path(dir)}) as hub: ...`` — serves ``hub.url`` until ``stop()``."""

    def __init__(
        self,
        repos: Mapping[str, Path | HubRepo],
        *,
        lfs_threshold: int = 1024,
        page_size: int = 2,
        throttle_bps: int | None = None,
    ) -> None:
        self.repos = {
            repo_id: spec if isinstance(spec, HubRepo) else HubRepo({"main": spec})
            for repo_id, spec in repos.items()
        }
        for repo in self.repos.values():
            repo._resolved = {
                name: _index_revision(root, lfs_threshold) for name, root in repo.revisions.items()
            }
        self.page_size = page_size
        self.throttle_bps = throttle_bps
        self.requests: list[tuple[str, str]] = []
        self.file_gets: Counter[str] = Counter()  # "org/name/path" -> file bodies served (resolve or CDN)
        self._lock = threading.Lock()
        self._hub = self._serve()
        self._cdn = self._serve()
        self.url = f"http://127.0.0.1:{self._hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def _serve(self) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.hub = self  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def commit(self, repo_id: str, revision: str = "main") -> str:
        return self.repos[repo_id]._resolved[revision].commit

    def resolve(self, repo_id: str, revision: str) -> HubRevision | None:
        resolved = self.repos[repo_id]._resolved
        if revision in resolved:
            return resolved[revision]
        return next((r for r in resolved.values() if r.commit == revision), None)

    def find_lfs(self, sha256: str) -> tuple[str, HubFile] | None:
        for repo_id, repo in self.repos.items():
            for rev in repo._resolved.values():
                for f in rev.files.values():
                    if f.sha256 == sha256:
                        return repo_id, f
        return None

    def record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def count_get(self, repo_id: str, path: str) -> None:
        with self._lock:
            self.file_gets[f"{repo_id}/{path}"] += 1

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.file_gets.clear()

    def stop(self) -> None:
        """Close both listening sockets: from now on every connection is refused, like an unreachable hub."""
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._hub.socket.fileno() != -1:
            self.stop()


_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<kind>revision|tree)/(?P<rev>[^/]+)$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_CDN = re.compile(r"^/lfs/(?P<sha256>[0-9a-f]{64})$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def _dispatch(self, head: bool) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        self.hub.record(self.command, path)
        if self.server is self.hub._cdn:
            match = _CDN.match(path)
            found = self.hub.find_lfs(match["sha256"]) if match else None
            if found is None:
                return self._error(404, "EntryNotFound", "no such blob")
            return self._send_file(found[0], found[1], None, head)
        api, resolve = _API.match(path), _RESOLVE.match(path)
        match = api or resolve
        if match is None:
            return self._error(404, None, "unknown route")
        repo = self.hub.repos.get(match["repo"])
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository {match['repo']} not found")
        if repo.token is not None and not self._authorized(repo.token, match["repo"]):
            return
        rev = self.hub.resolve(match["repo"], match["rev"])
        if rev is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {match['rev']}")
        if api and api["kind"] == "revision":
            return self._send_json(self._model_info(api["repo"], rev, "blobs" in parse_qs(url.query)))
        if api:
            return self._send_tree_page(rev, int(parse_qs(url.query).get("cursor", ["0"])[0]))
        assert resolve is not None  # `match` is one of the two, and it is not `api`
        hub_file = rev.files.get(resolve["path"])
        if hub_file is None:
            return self._error(404, "EntryNotFound", f"{resolve['path']} does not exist", rev.commit)
        if hub_file.sha256 is not None:
            self.send_response(302)
            self.send_header("Location", f"{self.hub.cdn_url}/lfs/{hub_file.sha256}")
            self.send_header("X-Linked-Etag", f'"{hub_file.sha256}"')
            self.send_header("X-Linked-Size", str(hub_file.size))
            self.send_header("X-Repo-Commit", rev.commit)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return self._send_file(match["repo"], hub_file, rev.commit, head)

    def _authorized(self, token: str, repo_id: str) -> bool:
        given = self.headers.get("Authorization", "")
        if given == f"Bearer {token}":
            return True
        if given:
            self._error(401, None, "Invalid credentials in Authorization header")
        else:
            self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. Please log in.")
        return False

    def _model_info(self, repo_id: str, rev: HubRevision, blobs: bool) -> dict:
        siblings = []
        for f in rev.files.values():
            sibling: dict = {"rfilename": f.path}
            if blobs:
                sibling.update(size=f.size, blobId=f.blob_id)
                if f.sha256:
                    pointer_size = len(_lfs_pointer(f.sha256, f.size))
                    sibling["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": pointer_size}
            siblings.append(sibling)
        return {"id": repo_id, "modelId": repo_id, "sha": rev.commit, "private": False, "siblings": siblings}

    def _send_tree_page(self, rev: HubRevision, cursor: int) -> None:
        files = list(rev.files.values())[cursor : cursor + self.hub.page_size]
        entries = []
        for f in files:
            entry: dict = {"type": "file", "path": f.path, "size": f.size, "oid": f.blob_id}
            if f.sha256:
                entry["lfs"] = {
                    "oid": f.sha256,
                    "size": f.size,
                    "pointerSize": len(_lfs_pointer(f.sha256, f.size)),
                }
            entries.append(entry)
        link = None
        if cursor + self.hub.page_size < len(rev.files):
            link = (
                f'<{self.hub.url}{urlsplit(self.path).path}?cursor={cursor + self.hub.page_size}>; rel="next"'
            )
        self._send_json(entries, link)

    def _send_json(self, payload: object, link: str | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if link:
            self.send_header("Link", link)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_file(self, repo_id: str, hub_file: HubFile, commit: str | None, head: bool) -> None:
        start = 0
        range_match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if range_match:
            start = min(int(range_match[1]), hub_file.size)
        self.send_response(206 if range_match else 200)
        if range_match:
            self.send_header("Content-Range", f"bytes {start}-{hub_file.size - 1}/{hub_file.size}")
        self.send_header("Content-Length", str(hub_file.size - start))
        self.send_header("ETag", f'"{hub_file.etag}"')
        self.send_header("Accept-Ranges", "bytes")
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.end_headers()
        if head:
            return
        self.hub.count_get(repo_id, hub_file.path)
        with hub_file.data_path.open("rb") as source:
            source.seek(start)
            while chunk := source.read(_CHUNK):
                self.wfile.write(chunk)
                self.wfile.flush()
                if self.hub.throttle_bps:
                    time.sleep(len(chunk) / self.hub.throttle_bps)

    def _error(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
