"""The models on the volume and the speech engine in memory: fetched and loaded once per process.

Why a module of its own: both doors need the same one-time preparation, and the HTTP door must also say how
far it has got (``GET /ping`` answers 204 while preparing, 200 once ready, an error once it failed), so the
state of the preparation lives here, beside the work it describes.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from higgs_worker.errors import RuntimeConfigError
from higgs_worker.redaction import redact
from higgs_worker.settings import Settings
from higgs_worker.store.model_store import RepoSpec, StoredRepo, ensure_repo

if TYPE_CHECKING:  # torch is imported only when a job needs the engine
    from boson_multimodal.engine import HiggsAudioEngine

logger = logging.getLogger("higgs_worker.runtime")


@dataclass(frozen=True)
class Models:
    generation: StoredRepo
    audio_tokenizer: StoredRepo

    def describe(self) -> dict[str, dict[str, str]]:
        return {
            "generation": _describe_repo(self.generation),
            "audio_tokenizer": _describe_repo(self.audio_tokenizer),
        }

    def revisions(self) -> dict[str, str]:
        return {"generation": self.generation.commit, "audio_tokenizer": self.audio_tokenizer.commit}


def _describe_repo(repo: StoredRepo) -> dict[str, str]:
    return {"repo": repo.repo_id, "revision": repo.revision, "commit": repo.commit}


class Readiness(enum.Enum):
    IDLE = "idle"  # nothing prepared yet (the queue worker prepares on its first job)
    PREPARING = "preparing"
    READY = "ready"
    FAILED = "failed"


class Runtime:
    """Models and engine for one process; every method is safe to call from any number of threads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        if settings.concurrency > settings.scheduler_slots:
            logger.warning(
                "CONCURRENCY=%d is more than SCHEDULER_SLOTS=%d: jobs past the slots wait inside this worker "
                "for a free slot while other workers could take them",
                settings.concurrency,
                settings.scheduler_slots,
            )
        self._models: Models | None = None
        self._engine: HiggsAudioEngine | None = None
        self._lock = threading.Lock()
        self.readiness = Readiness.IDLE
        self.failure: str | None = None  # why preparing failed, safe to show

    def models(self) -> tuple[Models, float]:
        """The model store, complete on the volume; seconds spent (0 once this process has it)."""
        with self._lock:
            if self._models is not None:
                return self._models, 0.0
            started = time.perf_counter()
            repos = [
                ensure_repo(  # huggingface_hub reads HF_TOKEN and HF_ENDPOINT itself
                    RepoSpec(repo_id, revision, path),
                    lock_dir=self.settings.lock_dir,
                    runpod_cache_hub_dir=self.settings.hf_cache_hub_dir,
                    stale_lock_s=self.settings.download_lock_stale_s,
                    accept_local=self.settings.demo_model,
                )
                for repo_id, revision, path in (
                    (self.settings.model_repo, self.settings.model_revision, self.settings.model_path),
                    (
                        self.settings.tokenizer_repo,
                        self.settings.tokenizer_revision,
                        self.settings.tokenizer_path,
                    ),
                )
            ]
            self._models = Models(*repos)
            return self._models, time.perf_counter() - started

    def engine(self) -> tuple[HiggsAudioEngine, float]:
        """The speech engine, loaded once; seconds spent loading (0 once loaded)."""
        models, _ = self.models()
        with self._lock:
            if self._engine is not None:
                return self._engine, 0.0
            started = time.perf_counter()
            # torch is imported only when a job needs it, so a cache hit or a bad input never pays for it
            from boson_multimodal.engine import EngineOptions, HiggsAudioEngine
            from boson_multimodal.scheduler import SchedulerLimits, SchedulerMemoryError

            settings = self.settings
            options = EngineOptions(
                backend=settings.generation_backend,
                limits=SchedulerLimits(settings.scheduler_slots, settings.max_sequence_tokens),
                cuda_graphs=settings.cuda_graphs,
                compile_step=settings.compile_step,
                prefill_together=settings.prefill_together,
                size_slots_up_to=settings.size_slots_up_to,
            )
            try:
                directories = (models.generation.path, models.audio_tokenizer.path)
                engine = HiggsAudioEngine.load(*directories, device=settings.device, options=options)
            except SchedulerMemoryError as error:
                raise RuntimeConfigError(
                    f"{error} (SCHEDULER_SLOTS={settings.scheduler_slots}, "
                    f"MAX_SEQUENCE_TOKENS={settings.max_sequence_tokens})"
                ) from error
            if (models.generation.path / "TINY_RANDOM_MODEL.json").exists():
                logger.warning("serving the tiny random-weight demo model (--demo): its audio is noise")
            self._engine = engine
            self.readiness = Readiness.READY
            return engine, time.perf_counter() - started

    def concurrency(self) -> int:
        """How many jobs to take at once: CONCURRENCY, or, when sizing from GPU memory, the slots the
        loaded engine got (CONCURRENCY's default until it is loaded)."""
        engine = self._engine
        if self.settings.size_slots_up_to is not None and engine is not None:
            return engine.slots
        return self.settings.concurrency

    def prepare(self) -> bool:
        """Fetch and load everything now; on failure log the reason and keep it (never raises)."""
        self.readiness, self.failure = Readiness.PREPARING, None
        try:
            self.engine()
        except Exception as error:  # a crash here would restart the worker in a loop
            self.failure = redact(f"{type(error).__name__}: {error}")
            self.readiness = Readiness.FAILED
            logger.error("preparing the models failed: %s", self.failure)
            return False
        logger.info("models ready")
        return True

    def prepare_in_background(self) -> threading.Thread:
        """``prepare`` on a thread of its own, so a server can answer health checks meanwhile."""
        self.readiness = Readiness.PREPARING
        thread = threading.Thread(target=self.prepare, name="prepare-models", daemon=True)
        thread.start()
        return thread
