"""The quality models on the volume and in memory: the aligner and the recogniser, each loaded once.

The same store discipline as the speech model (``higgs_worker.store.model_store``: one downloader per volume
under a lock, a completion marker, no network once complete), but on first use rather than at boot: a worker
whose jobs never ask for timestamps or verification never downloads them. Both run on the speech model's
device.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from higgs_worker.settings import Settings
from higgs_worker.store.model_store import RepoSpec, StoredRepo, ensure_repo

if TYPE_CHECKING:
    from higgs_worker.quality.alignment import CTCAligner
    from higgs_worker.quality.verification import Recogniser


class QualityModels:
    """The aligner and recogniser of one process; safe to call from any number of job threads."""

    def __init__(self, settings: Settings, endpoint: str | None = None) -> None:
        self.settings = settings
        self.endpoint = endpoint  # huggingface_hub's HF_ENDPOINT unless given (tests pass their hub's)
        # One lock per model: fetching the recogniser (1.6 GB) never holds up a job waiting on the aligner.
        self._locks = {"aligner": threading.Lock(), "recogniser": threading.Lock()}
        self._aligner: CTCAligner | None = None
        self._recogniser: Recogniser | None = None
        self.stored: dict[str, StoredRepo] = {}

    def specs(self) -> dict[str, RepoSpec]:
        settings = self.settings
        return {
            "aligner": RepoSpec(settings.aligner_repo, settings.aligner_revision, settings.aligner_path),
            "recogniser": RepoSpec(
                settings.recogniser_repo, settings.recogniser_revision, settings.recogniser_path
            ),
        }

    def describe(self, role: str) -> dict[str, str]:
        """The repo and revision a role uses (and the commit once it is on the volume)."""
        spec = self.specs()[role]
        stored = self.stored.get(role)
        described = {"repo": spec.repo_id, "revision": spec.revision}
        return described | ({"commit": stored.commit} if stored is not None else {})

    def aligner(self) -> CTCAligner:
        from higgs_worker.quality.alignment import CTCAligner

        with self._locks["aligner"]:
            if self._aligner is None:
                self._aligner = CTCAligner.load(self._fetch("aligner").path, self._device())
            return self._aligner

    def recogniser(self) -> Recogniser:
        from higgs_worker.quality.verification import WhisperRecogniser

        with self._locks["recogniser"]:
            if self._recogniser is None:
                self._recogniser = WhisperRecogniser.load(self._fetch("recogniser").path, self._device())
            return self._recogniser

    def use_recogniser(self, recogniser: Recogniser) -> None:
        """Serve ``recogniser`` instead of the configured model (one with the same interface)."""
        with self._locks["recogniser"]:
            self._recogniser = recogniser

    def _fetch(self, role: str) -> StoredRepo:
        settings = self.settings
        stored = ensure_repo(
            self.specs()[role],
            lock_dir=settings.lock_dir,
            runpod_cache_hub_dir=settings.hf_cache_hub_dir,
            endpoint=self.endpoint,
            stale_lock_s=settings.download_lock_stale_s,
            accept_local=settings.demo_model,
        )
        self.stored[role] = stored
        return stored

    def _device(self) -> Any:
        from boson_multimodal.loading import resolve_device

        return str(resolve_device(self.settings.device))
