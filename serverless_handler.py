"""RunPod serverless handler for Higgs Audio V2 text-to-speech.

Composition only: ``higgs_worker`` validates the job, keeps the models on the volume, fetches reference
voices, encodes, caches and delivers the audio; ``boson_multimodal`` turns text into speech. This module wires
them together and hands the handler to ``runpod.serverless.start``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from boson_multimodal.errors import SpeechRequestError
from boson_multimodal.transcript import normalize_transcript
from higgs_worker.audio_encoding import EncodedAudio, change_tempo, encode_audio
from higgs_worker.delivery import DeliveryError, DeliveryPolicy, S3Target, deliver
from higgs_worker.dry_run import dry_run
from higgs_worker.model_store import ModelStoreError, RepoSpec, StoredRepo, ensure_repo
from higgs_worker.redaction import install_log_redaction, redact
from higgs_worker.references import ReferenceAudioError, ResolvedVoice, resolve_reference
from higgs_worker.rendering import chunking_for, prompt_request
from higgs_worker.request_plan import RequestPlanError, cache_identity, s3_target_for
from higgs_worker.result_cache import ResultCache, cache_key
from higgs_worker.schema import RequestError, RequestLimits, TTSRequest, parse_request
from higgs_worker.settings import Settings, load_settings

if TYPE_CHECKING:  # torch is imported only when a job needs the engine
    from boson_multimodal.engine import Speech, SpeechRequest
    from boson_multimodal.longform import Chunking
    from boson_multimodal.streaming import AudioChunk

logger = logging.getLogger("higgs_worker.handler")


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


Progress = Callable[[int, int], None]  # (pieces done, pieces in all) of a long-form job


_NO_AUDIO = "the model ended the clip before producing any audio; try again with another seed or temperature"


class JobError(Exception):
    """A job that cannot complete; the message goes to the client as the job's error string."""


class Worker:
    """One per process: the models are fetched and loaded once, on the first job or at start-up."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        if settings.concurrency > settings.scheduler_slots:
            logger.warning(
                "CONCURRENCY=%d is more than SCHEDULER_SLOTS=%d: jobs past the slots wait inside this worker "
                "for a free slot while other workers could take them",
                settings.concurrency,
                settings.scheduler_slots,
            )
        self.limits = RequestLimits(settings.max_transcript_chars, settings.max_new_tokens_limit)
        self._models: Models | None = None
        self._engine = None
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

    def ensure_engine(self):
        """The speech engine, loaded once; seconds spent loading (0 once loaded)."""
        models, _ = self.ensure_models()
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
            )
            try:
                directories = (models.generation.path, models.audio_tokenizer.path)
                engine = HiggsAudioEngine.load(*directories, device=settings.device, options=options)
            except SchedulerMemoryError as error:
                raise JobError(
                    f"{error} (SCHEDULER_SLOTS={settings.scheduler_slots}, "
                    f"MAX_SEQUENCE_TOKENS={settings.max_sequence_tokens})"
                ) from error
            if (models.generation.path / "TINY_RANDOM_MODEL.json").exists():
                logger.warning("serving the tiny random-weight demo model (--demo): its audio is noise")
            self._engine = engine
            return self._engine, time.perf_counter() - started

    # -- one job -----------------------------------------------------------------------------------------
    def prepare(self, job: dict[str, Any]) -> PreparedJob:
        """Everything before generation: validation, delivery target, references, models, cache key."""
        started = time.perf_counter()
        request = parse_request(job.get("input"), self.limits)
        if self.settings.streaming and request.speed != 1.0:
            raise JobError("speed: not available in streaming mode (STREAMING=true); leave it at 1")
        target = s3_target_for(request, job.get("id", "job"), self.settings)
        references = self._references(request)
        timings = {"reference": time.perf_counter() - started}
        models, timings["download"] = self.ensure_models()
        key = None
        if self.cache is not None:
            long_pieces = self._is_long(request) and self.settings.longform_chunk_chars
            identity = cache_identity(request, references, long_pieces)
            key = cache_key(identity, models.revisions()) if identity is not None else None
        return PreparedJob(request, target, references, models, timings, started, key)

    def run(self, job: dict[str, Any], progress: Progress | None = None) -> dict[str, Any]:
        request = parse_request(job.get("input"), self.limits)
        if request.dry_run:  # before the models: a dry run never downloads, loads or generates
            return dry_run(request, self._references(request), self.settings)
        prepared = self.prepare(job)
        if prepared.cache_key is not None:
            hit = self.cache.get(prepared.cache_key)
            if hit is not None:
                audio = EncodedAudio.from_metadata(hit.audio, hit.metadata)
                extra = {
                    name: hit.metadata[name] for name in ("num_frames", "truncated") if name in hit.metadata
                }
                return self._output(prepared, audio, cache_hit=True, extra=extra)
        speech = self._synthesize(prepared, progress)
        if speech.num_frames == 0:
            raise JobError(_NO_AUDIO)
        encode_started = time.perf_counter()
        waveform = speech.waveform
        if prepared.request.speed != 1.0:
            waveform = change_tempo(waveform, speech.sample_rate, prepared.request.speed)
        audio = self._encode(prepared, waveform, speech.sample_rate)
        prepared.timings["encode"] = time.perf_counter() - encode_started
        extra = {"num_frames": speech.num_frames, "truncated": not speech.finished}
        if prepared.cache_key is not None:
            self.cache.put(prepared.cache_key, audio.data, audio.metadata() | extra)
        return self._output(prepared, audio, cache_hit=False, extra=extra)

    def stream(self, job: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Chunks of audio while they are generated, each a playable file; the final one carries the summary.

        A long transcript (over LONGFORM_CHUNK_CHARS) is generated piece by piece first and then sent in
        chunks, so its first audio arrives only when the whole clip is done.
        """
        from boson_multimodal.streaming import chunk_speech, stream_speech

        request = parse_request(job.get("input"), self.limits)
        if request.dry_run:  # before the models: a dry run never downloads, loads or generates
            yield dry_run(request, self._references(request), self.settings)
            return
        prepared = self.prepare(job)
        request = prepared.request
        engine, prepared.timings["load"] = self.ensure_engine()
        generate_started = time.perf_counter()
        if self._is_long(request):
            chunks = chunk_speech(self._synthesize(prepared, None), engine.frame_rate)
        else:
            chunks = stream_speech(engine, _speech_request(request, prepared.references))
        pieces: list[np.ndarray] = []
        sent = 0  # base64 bytes in the chunks so far: /run and /runsync get all of them in one result
        for chunk in chunks:
            if chunk.index == 0:
                prepared.timings["first_chunk"] = time.perf_counter() - generate_started
            pieces.append(chunk.waveform)
            item, sent = self._stream_item(prepared, chunk, sent)
            if not chunk.final:
                yield item
                continue
            if chunk.end_frame == 0:
                raise JobError(_NO_AUDIO)
            prepared.timings["generate"] = time.perf_counter() - generate_started
            summary = {"num_frames": chunk.end_frame, "truncated": not chunk.finished}
            if prepared.target is not None:
                # The chunks already reached the client; S3 gets the whole clip as one file.
                clip = self._encode(prepared, np.concatenate(pieces), chunk.sample_rate)
                summary |= self._output(prepared, clip, cache_hit=False, inline=False)
            else:
                summary |= self._summary(prepared)
            yield item | {"summary": summary}

    def _stream_item(self, prepared: PreparedJob, chunk: AudioChunk, sent: int) -> tuple[dict[str, Any], int]:
        """One stream chunk as a playable file, while all chunks together fit the result limit.

        ``sent`` counts the base64 bytes so far: /run and /runsync return every chunk in one result, which
        RunPod drops when it is too large. Past the limit the whole clip goes to S3 if there is a bucket;
        otherwise the job fails saying so (the chunks already sent have reached /stream).
        """
        item: dict[str, Any] = {
            "index": chunk.index,
            "final": chunk.final,
            "start_s": round(chunk.start_s, 3),
        }
        if not chunk.waveform.size:
            return item, sent
        audio = self._encode(prepared, chunk.waveform, chunk.sample_rate)
        encoded = base64.b64encode(audio.data).decode()
        sent += len(encoded)
        if sent <= self.settings.max_inline_bytes:
            return item | {"audio_base64": encoded, **_describe_audio(audio)}, sent
        if prepared.target is not None:
            return item | {"audio_omitted": "over the inline result limit: the whole clip goes to S3"}, sent
        raise JobError(
            f"the streamed audio passed the {self.settings.max_inline_bytes / 1e6:.1f} MB result limit at "
            f"{chunk.start_s:.1f} s (RunPod drops larger results; the chunks sent so far reached /stream); "
            "set s3_bucket, or use output_format mp3 or opus for long streams"
        )

    def _chunking(self, request: TTSRequest) -> Chunking | None:
        """How the transcript is cut into pieces, or None for one generation (see higgs_worker.rendering)."""
        text = normalize_transcript(request.transcript)
        return chunking_for(request, text, self.settings.longform_chunk_chars)

    def _is_long(self, request: TTSRequest) -> bool:
        return self._chunking(request) is not None

    def _synthesize(self, prepared: PreparedJob, progress: Progress | None) -> Speech:
        """Generation: long transcripts piece by piece; every sequence shares the engine's decode steps with
        those of the other jobs in flight."""
        engine, prepared.timings["load"] = self.ensure_engine()
        started = time.perf_counter()
        speech_request = _speech_request(prepared.request, prepared.references)
        if self._is_long(prepared.request):
            from boson_multimodal.longform import generate_long

            speech = generate_long(engine, speech_request, self._chunking(prepared.request), progress)
        else:
            speech = engine.generate(speech_request)
        prepared.timings["generate"] = time.perf_counter() - started
        return speech

    def _encode(self, prepared: PreparedJob, waveform: np.ndarray, sample_rate: int) -> EncodedAudio:
        request = prepared.request
        return encode_audio(
            waveform, sample_rate, request.output_format, target_sample_rate=request.sample_rate
        )

    def _references(self, request: TTSRequest) -> list[ResolvedVoice]:
        many, name = len(request.references) > 1, request.sent_name("ref_audio")
        return [
            resolve_reference(value, text, field=f"{name}[{index}]" if many else name, settings=self.settings)
            for index, (value, text) in enumerate(
                zip(request.references, request.reference_texts, strict=True)
            )
        ]

    def _output(
        self,
        prepared: PreparedJob,
        audio: EncodedAudio,
        *,
        cache_hit: bool,
        extra: dict[str, Any] | None = None,
        inline: bool = True,
    ) -> dict[str, Any]:
        target = prepared.target
        policy = DeliveryPolicy(
            max_inline_bytes=self.settings.max_inline_bytes,
            presign_expiry_s=self.settings.s3_presign_expiry_s,
            inline_requested=inline and (prepared.request.return_base64 or target is None),
        )
        upload_started = time.perf_counter()
        delivered = deliver(audio, target, policy)
        if target is not None:
            prepared.timings["upload"] = time.perf_counter() - upload_started
        return {
            **delivered,
            **_describe_audio(audio),
            **(extra or {}),
            "cache_hit": cache_hit,
            **self._summary(prepared),
        }

    def _summary(self, prepared: PreparedJob) -> dict[str, Any]:
        prepared.timings["total"] = time.perf_counter() - prepared.started
        return {
            "timings_ms": {name: round(seconds * 1000, 1) for name, seconds in prepared.timings.items()},
            "model": prepared.models.describe(),
        }


@dataclass
class PreparedJob:
    request: TTSRequest
    target: S3Target | None
    references: list[ResolvedVoice]
    models: Models
    timings: dict[str, float]
    started: float
    cache_key: str | None  # set for deterministic requests when the result cache is on


def _describe_audio(audio: EncodedAudio) -> dict[str, Any]:
    return {
        "format": audio.format,
        "mimetype": audio.mimetype,
        "sample_rate": audio.sample_rate,
        "duration_s": round(audio.duration_s, 3),
    }


def _speech_request(request: TTSRequest, references: list[ResolvedVoice]) -> SpeechRequest:
    from boson_multimodal.engine import SamplingConfig, SpeechRequest

    return SpeechRequest(
        **vars(prompt_request(request, references)),
        sampling=SamplingConfig(
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            max_new_tokens=request.max_new_tokens,
            seed=request.seed,
        ),
    )


USER_ERRORS = (
    RequestError,
    ReferenceAudioError,
    RequestPlanError,
    ModelStoreError,
    DeliveryError,
    JobError,
    SpeechRequestError,
)


def _failure(job: dict[str, Any], error: Exception) -> dict[str, str]:
    """A job's error string: the reason for errors the client can act on, the type for anything else."""
    if isinstance(error, USER_ERRORS):
        logger.warning("job %s failed: %s", job.get("id"), error)
        return {"error": redact(str(error))}
    logger.error("job %s crashed: %s", job.get("id"), redact(traceback.format_exc()))
    return {"error": redact(f"internal error ({type(error).__name__}): {error}")}


def run_job(worker: Worker, job: dict[str, Any]) -> dict[str, Any]:
    """Run one job; every failure becomes ``{"error": "<string>"}`` and the worker keeps serving."""
    try:
        return worker.run(job, progress=_progress_reporter(job))
    except Exception as error:  # the worker must survive anything a job triggers
        return _failure(job, error)


def stream_job(worker: Worker, job: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``Worker.stream`` with failures as a final ``{"error": ...}`` item (the SDK then fails the job)."""
    try:
        yield from worker.stream(job)
    except Exception as error:  # the worker must survive anything a job triggers
        yield _failure(job, error)


def _progress_reporter(job: dict[str, Any]) -> Progress:
    """Long-form progress: logged, and sent to RunPod as the job's interim output when deployed."""
    deployed = bool(os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"))  # the local API has nowhere to send it

    def report(done: int, total: int) -> None:
        logger.info("job %s: piece %d of %d generated", job.get("id"), done, total)
        # progress_update posts from a thread of its own: after the last piece it could overtake the result
        # and show a finished job as in progress again, so the result itself reports the last piece.
        if deployed and done < total:
            import runpod

            runpod.serverless.progress_update(job, {"pieces_done": done, "pieces_total": total})

    return report


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


async def stream_handler(job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """The handler with STREAMING=true: each audio chunk is yielded as soon as it is encoded.

    When RunPod cancels the job, closing the generator stops the generation; the lock makes the close wait
    for a chunk still being produced on the job thread (a generator cannot be closed while it runs).
    """
    loop = asyncio.get_running_loop()
    items = stream_job(get_worker(), job)
    turn = threading.Lock()

    def advance() -> dict[str, Any] | None:
        with turn:
            return next(items, None)

    def close() -> None:
        with turn:
            items.close()

    try:
        while (item := await loop.run_in_executor(job_threads(), advance)) is not None:
            yield item
    finally:
        await loop.run_in_executor(job_threads(), close)


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
        except Exception as error:  # a crash here would restart the worker in a loop
            # Keep serving: each job then reports why the models are missing, and retries the download.
            logger.error("preloading the models failed: %s", redact(f"{type(error).__name__}: {error}"))
    if worker.settings.streaming:
        # The SDK fixes the handler's kind at start: streaming is a per-endpoint mode. /run and /runsync get
        # the aggregated list of chunks, /stream gets them as they come.
        config = {"handler": stream_handler, "return_aggregate_stream": True}
    else:
        config = {"handler": handler}
    runpod.serverless.start({**config, "concurrency_modifier": concurrency_modifier})


if __name__ == "__main__":
    main()
