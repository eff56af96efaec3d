"""RunPod serverless handler for Higgs Audio V2 text-to-speech.

Composition only: ``higgs_worker`` validates the job, keeps the models on the volume, fetches reference
voices, encodes, caches and delivers the audio; ``boson_multimodal`` turns text into speech. This module wires
them together and hands the handler to ``runpod.serverless.start``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from higgs_worker.audio_encoding import EncodedAudio, change_tempo, encode_audio
from higgs_worker.delivery import DeliveryError, DeliveryPolicy, S3Target, deliver
from higgs_worker.model_store import ModelStoreError, RepoSpec, StoredRepo, ensure_repo
from higgs_worker.redaction import install_log_redaction, redact
from higgs_worker.references import ReferenceAudio, ReferenceError, resolve_reference
from higgs_worker.request_plan import RequestPlanError, cache_identity, s3_target_for
from higgs_worker.result_cache import ResultCache, cache_key
from higgs_worker.schema import RequestError, RequestLimits, TTSRequest, parse_request
from higgs_worker.settings import Settings, load_settings

logger = logging.getLogger("higgs_worker.handler")

# How long the first of several concurrent jobs waits for others to join its batch: short next to generation.
BATCH_WAIT_MS = 30.0


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


class JobError(Exception):
    """A job that cannot complete; the message goes to the client as the job's error string."""


class Worker:
    """One per process: the models are fetched and loaded once, on the first job or at start-up."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.limits = RequestLimits(settings.max_transcript_chars, settings.max_new_tokens_limit)
        self._models: Models | None = None
        self._engine = None
        self._batcher = None  # gathers concurrent jobs into batches for the engine
        self._lock = threading.Lock()
        self.cache = (
            ResultCache(settings.result_cache_dir, settings.cache_max_bytes)
            if settings.result_cache
            else None
        )

    # -- models ------------------------------------------------------------------------------------------
    def ensure_models(self) -> tuple[Models, float]:
        """The model store, complete on the volume; seconds spent (0 once this process has it)."""
        with self._lock:
            if self._models is not None:
                return self._models, 0.0
            started = time.perf_counter()
            token = os.environ.get("HF_TOKEN") or None
            repos = [
                ensure_repo(
                    RepoSpec(repo_id, revision, path),
                    lock_dir=self.settings.lock_dir,
                    runpod_cache_hub_dir=self.settings.hf_cache_hub_dir,
                    token=token,
                    stale_lock_s=self.settings.download_lock_stale_s,
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

    def ensure_engine(self):
        """The speech engine, loaded once; seconds spent loading (0 once loaded)."""
        models, _ = self.ensure_models()
        with self._lock:
            if self._engine is not None:
                return self._engine, 0.0
            started = time.perf_counter()
            # torch is imported only when a job needs it, so a cache hit or a bad input never pays for it
            from boson_multimodal.batching import BatchingEngine
            from boson_multimodal.engine import HiggsAudioEngine

            engine = HiggsAudioEngine.load(
                models.generation.path,
                models.audio_tokenizer.path,
                device=self.settings.device,
                speed_path=self.settings.speed_path,
            )
            if (models.generation.path / "TINY_RANDOM_MODEL.json").exists():
                logger.warning("serving the tiny random-weight demo model (--demo): its audio is noise")
            self._batcher = BatchingEngine(
                engine, max_batch=self.settings.concurrency, max_wait_ms=BATCH_WAIT_MS
            )
            self._engine = engine
            return self._engine, time.perf_counter() - started

    # -- one job -----------------------------------------------------------------------------------------
    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        timings: dict[str, float] = {}
        request = parse_request(job.get("input"), self.limits)
        target = s3_target_for(request, job.get("id", "job"), self.settings)
        fetch_started = time.perf_counter()
        references = self._references(request)
        timings["reference"] = time.perf_counter() - fetch_started
        models, timings["download"] = self.ensure_models()

        key = None
        if self.cache is not None and cache_identity(request, references) is not None:
            key = cache_key(cache_identity(request, references), models.revisions())
            hit = self.cache.get(key)
            if hit is not None:
                audio = EncodedAudio.from_metadata(hit.audio, hit.metadata)
                return self._output(audio, request, target, models, timings, started, cache_hit=True)

        _, timings["load"] = self.ensure_engine()
        generate_started = time.perf_counter()
        speech = self._batcher.submit(_speech_request(request, references)).result()
        timings["generate"] = time.perf_counter() - generate_started

        encode_started = time.perf_counter()
        waveform = speech.waveform
        if request.speed != 1.0:
            waveform = change_tempo(waveform, speech.sample_rate, request.speed)
        audio = encode_audio(
            waveform, speech.sample_rate, request.output_format, target_sample_rate=request.sample_rate
        )
        timings["encode"] = time.perf_counter() - encode_started
        if key is not None:
            self.cache.put(key, audio.data, audio.metadata())
        extra = {"num_frames": speech.num_frames, "truncated": not speech.finished}
        return self._output(audio, request, target, models, timings, started, cache_hit=False, extra=extra)

    def _references(self, request: TTSRequest) -> list[ReferenceAudio]:
        many, name = len(request.references) > 1, request.sent_name("ref_audio")
        return [
            resolve_reference(value, text, field=f"{name}[{index}]" if many else name, settings=self.settings)
            for index, (value, text) in enumerate(
                zip(request.references, request.reference_texts, strict=True)
            )
        ]

    def _output(
        self,
        audio: EncodedAudio,
        request: TTSRequest,
        target: S3Target | None,
        models: Models,
        timings: dict[str, float],
        started: float,
        *,
        cache_hit: bool,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        policy = DeliveryPolicy(
            max_inline_bytes=self.settings.max_inline_bytes,
            presign_expiry_s=self.settings.s3_presign_expiry_s,
            inline_requested=request.return_base64 or target is None,
        )
        upload_started = time.perf_counter()
        delivered = deliver(audio, target, policy)
        if target is not None:
            timings["upload"] = time.perf_counter() - upload_started
        timings["total"] = time.perf_counter() - started
        return {
            **delivered,
            "format": audio.format,
            "mimetype": audio.mimetype,
            "sample_rate": audio.sample_rate,
            "duration_s": round(audio.duration_s, 3),
            **(extra or {}),
            "cache_hit": cache_hit,
            "timings_ms": {name: round(seconds * 1000, 1) for name, seconds in timings.items()},
            "model": models.describe(),
        }


def _speech_request(request: TTSRequest, references: list[ReferenceAudio]):
    from boson_multimodal.engine import SamplingConfig, SpeechRequest
    from boson_multimodal.prompt import Voice

    return SpeechRequest(
        text=request.transcript,
        scene=request.scene_prompt,
        voices=tuple(Voice(r.waveform, r.sample_rate, r.text) for r in references),
        sampling=SamplingConfig(
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            max_new_tokens=request.max_new_tokens,
            seed=request.seed,
        ),
    )


USER_ERRORS = (RequestError, ReferenceError, RequestPlanError, ModelStoreError, DeliveryError, JobError)


def run_job(worker: Worker, job: dict[str, Any]) -> dict[str, Any]:
    """Run one job; every failure becomes ``{"error": "<string>"}`` and the worker keeps serving."""
    try:
        return worker.run(job)
    except USER_ERRORS as error:
        logger.warning("job %s failed: %s", job.get("id"), error)
        return {"error": redact(str(error))}
    except Exception as error:
        logger.error("job %s crashed: %s", job.get("id"), redact(traceback.format_exc()))
        return {"error": redact(f"internal error ({type(error).__name__}): {error}")}


_worker: Worker | None = None


def get_worker() -> Worker:
    global _worker
    if _worker is None:
        _worker = Worker(load_settings())
    return _worker


_job_threads: ThreadPoolExecutor | None = None


def job_threads() -> ThreadPoolExecutor:
    """One thread per concurrent job (asyncio's default pool is sized by CPU count, not by CONCURRENCY)."""
    global _job_threads
    if _job_threads is None:
        _job_threads = ThreadPoolExecutor(get_worker().settings.concurrency, thread_name_prefix="job")
    return _job_threads


async def handler(job: dict[str, Any]) -> dict[str, Any]:
    """The RunPod handler: the job runs in a thread so the SDK's event loop keeps answering heartbeats."""
    return await asyncio.get_running_loop().run_in_executor(job_threads(), run_job, get_worker(), job)


def concurrency_modifier(_current: int) -> int:
    return get_worker().settings.concurrency


def main() -> None:
    import runpod

    install_log_redaction()
    worker = get_worker()
    if worker.settings.preload_models:
        logger.info("PRELOAD_MODELS=true: fetching and loading the models before taking jobs")
        try:
            worker.ensure_engine()
        except ModelStoreError as error:
            # Keep serving: each job then reports why the models are missing, and retries the download.
            logger.error("preloading the models failed: %s", redact(str(error)))
    runpod.serverless.start({"handler": handler, "concurrency_modifier": concurrency_modifier})


if __name__ == "__main__":
    main()
