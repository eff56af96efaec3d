"""The job pipeline: validate → plan → references → cache → generate → encode → deliver, for one job.

Both doors (``serverless_handler.py`` for RunPod's queue, ``http_api`` for load-balancer endpoints) only
translate their protocol into calls here and back; nothing here knows which door a job came through. The
stages are public so a door can stop where its protocol needs to: the queue and ``POST /generate`` take the
JSON output of :meth:`Pipeline.run` / :meth:`Pipeline.stream`, while ``/v1/audio/speech`` takes the audio of
:meth:`Pipeline.clip` or the chunks of :meth:`Pipeline.chunks` and encodes them as they come.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from boson_multimodal.errors import SpeechRequestError
from boson_multimodal.transcript import normalize_transcript
from higgs_worker.audio_encoding import EncodedAudio, change_tempo, encode_audio
from higgs_worker.delivery import DeliveryError, DeliveryPolicy, InlineBudget, S3Target, deliver
from higgs_worker.dry_run import dry_run
from higgs_worker.model_store import ModelStoreError
from higgs_worker.quality.captions import upload_captions
from higgs_worker.quality.finishing import finish, finished_chunks, finishing_for
from higgs_worker.quality.service import OUTPUT_KEYS, NotVerified, Quality, StreamWords
from higgs_worker.references import ReferenceAudioError, ResolvedVoice, resolve_reference
from higgs_worker.rendering import chunking_for, prompt_request
from higgs_worker.request_plan import RequestPlanError, cache_identity, s3_target_for
from higgs_worker.result_cache import ResultCache, cache_key
from higgs_worker.runtime import Models, Runtime, RuntimeConfigError
from higgs_worker.schema import RequestError, RequestLimits, TTSRequest, parse_request
from higgs_worker.settings import Settings
from higgs_worker.timings import Timings

if TYPE_CHECKING:  # torch is imported only when a job needs the engine
    from boson_multimodal.engine import HiggsAudioEngine, Speech, SpeechRequest
    from boson_multimodal.longform import Chunking
    from boson_multimodal.streaming import AudioChunk

logger = logging.getLogger("higgs_worker.pipeline")

Progress = Callable[[int, int], None]  # (pieces done, pieces in all) of a long-form job

NO_AUDIO = "the model ended the clip before producing any audio; try again with another seed or temperature"


class JobError(Exception):
    """A job that cannot complete; the message goes to the client as the job's error."""


class JobAbandoned(Exception):
    """The client went away; the generation was stopped and nobody is waiting for an answer."""


# Errors the client can act on: their message is the answer. Anything else is an internal error.
USER_ERRORS = (
    RequestError,
    ReferenceAudioError,
    RequestPlanError,
    ModelStoreError,
    DeliveryError,
    JobError,
    SpeechRequestError,
    RuntimeConfigError,
    NotVerified,
)


@dataclass
class PreparedJob:
    """One job after everything that comes before generation."""

    job_id: str
    request: TTSRequest
    target: S3Target | None
    references: list[ResolvedVoice]
    models: Models
    timings: Timings
    cache_key: str | None  # set for deterministic requests when the result cache is on
    budget: InlineBudget  # what the job's result may still carry inline, shared by every delivery path
    quality: dict[str, Any] = field(default_factory=dict)  # what generation found out (verification)


@dataclass(frozen=True)
class Clip:
    """A finished, encoded clip and the facts the output reports about how it was made."""

    audio: EncodedAudio
    num_frames: int
    truncated: bool  # the clip hit max_new_tokens instead of ending by itself
    cache_hit: bool
    quality: dict[str, Any] = field(default_factory=dict)  # words, captions, verification (when asked)

    def facts(self) -> dict[str, Any]:
        return {"num_frames": self.num_frames, "truncated": self.truncated, **self.quality}


class Pipeline:
    """One per process; every method may be called from any number of job threads at once."""

    def __init__(self, settings: Settings, runtime: Runtime | None = None) -> None:
        self.settings = settings
        self.runtime = runtime or Runtime(settings)
        self.limits = RequestLimits(settings.max_transcript_chars, settings.max_new_tokens_limit)
        self.cache = (
            ResultCache(settings.result_cache_dir, settings.cache_max_bytes)
            if settings.result_cache
            else None
        )
        self.quality = Quality(settings)

    # -- validate, plan, references, cache key ------------------------------------------------------------
    def validate(self, raw_input: Any) -> TTSRequest:
        return parse_request(raw_input, self.limits)

    def dry_run(self, request: TTSRequest) -> dict[str, Any]:
        """How the request would be read — transcript, voices, pieces, prompt — without models or a GPU."""
        return dry_run(request, self._references(request), self.settings)

    def prepare(self, job_id: str, request: TTSRequest, timings: Timings | None = None) -> PreparedJob:
        """Everything before generation: delivery target, references, models on the volume, cache key."""
        timings = timings or Timings()
        target = s3_target_for(request, job_id, self.settings)
        with timings.phase("reference"):
            references = self._references(request)
        with timings.phase("download"):
            models, _ = self.runtime.models()
        key = None
        if self.cache is not None:
            long_pieces = self.is_long(request) and self.settings.longform_chunk_chars
            identity = cache_identity(request, references, long_pieces)
            key = cache_key(identity, models.revisions()) if identity is not None else None
        budget = InlineBudget(self.settings.max_inline_bytes)
        return PreparedJob(job_id, request, target, references, models, timings, key, budget)

    def chunking(self, request: TTSRequest) -> Chunking | None:
        """How the transcript is cut into pieces, or None for one generation (see higgs_worker.rendering)."""
        text = normalize_transcript(request.transcript)
        return chunking_for(request, text, self.settings.longform_chunk_chars)

    def is_long(self, request: TTSRequest) -> bool:
        """Long transcripts are generated piece by piece, then joined."""
        return self.chunking(request) is not None

    def _references(self, request: TTSRequest) -> list[ResolvedVoice]:
        many, name = len(request.references) > 1, request.sent_name("ref_audio")
        return [
            resolve_reference(value, text, field=f"{name}[{index}]" if many else name, settings=self.settings)
            for index, (value, text) in enumerate(
                zip(request.references, request.reference_texts, strict=True)
            )
        ]

    # -- cache ------------------------------------------------------------------------------------------
    def cached(self, prepared: PreparedJob) -> Clip | None:
        if prepared.cache_key is None or self.cache is None:
            return None
        hit = self.cache.get(prepared.cache_key)
        if hit is None:
            return None
        audio = EncodedAudio.from_metadata(hit.audio, hit.metadata)
        quality = {key: hit.metadata[key] for key in OUTPUT_KEYS if key in hit.metadata}
        frames, truncated = int(hit.metadata["num_frames"]), bool(hit.metadata["truncated"])
        return Clip(audio, frames, truncated, cache_hit=True, quality=quality)

    def remember(self, prepared: PreparedJob, clip: Clip) -> None:
        if prepared.cache_key is not None and self.cache is not None and not clip.cache_hit:
            self.cache.put(prepared.cache_key, clip.audio.data, clip.audio.metadata() | clip.facts())

    # -- generate ---------------------------------------------------------------------------------------
    def engine(self, prepared: PreparedJob) -> HiggsAudioEngine:
        with prepared.timings.phase("load"):
            engine, _ = self.runtime.engine()
        return engine

    def generate(
        self, prepared: PreparedJob, progress: Progress | None = None, cancel: threading.Event | None = None
    ) -> Speech:
        """The whole clip at once (speed applied); long transcripts piece by piece.

        ``cancel`` set by the caller abandons the job: checked before generating and between the pieces of
        a long transcript (then :class:`JobAbandoned` is raised).
        """
        engine = self.engine(prepared)
        speech_request = _speech_request(prepared.request, prepared.references)
        _check(cancel)
        chunking = self.chunking(prepared.request)  # the check and the pieces from one computation
        verifier = self.quality.verifier(prepared.request, prepared.timings)
        with prepared.timings.phase("generate"):
            if chunking is not None:
                from boson_multimodal.longform import generate_long

                def on_progress(done: int, total: int) -> None:
                    _check(cancel)
                    if progress is not None:
                        progress(done, total)

                piece = verifier.generate(engine.generate) if verifier is not None else None
                speech = generate_long(engine, speech_request, chunking, on_progress, generate_piece=piece)
            else:

                def whole(request: SpeechRequest) -> Speech:
                    return engine.generate(request, cancel=cancel)

                one = verifier.generate(whole) if verifier is not None else whole
                speech = _abandoned_if_cancelled(lambda: one(speech_request))
        if verifier is not None:  # checked on the clip as generated; speed and finishing keep its words
            prepared.quality["verification"] = verifier.report()
            self.quality.check_required(prepared.request, prepared.quality["verification"])
        if speech.num_frames == 0:
            raise JobError(NO_AUDIO)
        if prepared.request.speed != 1.0:
            with prepared.timings.phase("encode"):
                waveform = change_tempo(speech.waveform, speech.sample_rate, prepared.request.speed)
            speech = replace(speech, waveform=waveform)
        finishing = finishing_for(prepared.request)
        if finishing.active:  # after the tempo change: the clip as it will sound
            with prepared.timings.phase("finish"):
                speech = replace(speech, waveform=finish(speech.waveform, speech.sample_rate, finishing))
        return speech

    def chunks(self, prepared: PreparedJob) -> Generator[AudioChunk, None, None]:
        """The clip in chunks while it is generated; closing the iterator cancels the generation.

        A long transcript streams piece by piece (the next piece starts when the previous one ends). A changed
        speed needs the whole clip first: it is generated whole, then sent in chunks, so its first audio
        arrives only when the clip is done. An empty clip raises JobError.
        """
        from boson_multimodal.longform import stream_long
        from boson_multimodal.streaming import chunk_speech, stream_speech

        engine = self.engine(prepared)
        request = prepared.request
        speech_request = _speech_request(request, prepared.references)
        chunking = self.chunking(request)
        with prepared.timings.phase("first_chunk"):
            whole = request.speed != 1.0 or (request.verify and chunking is None)
            if whole:  # the whole clip first (a tempo change, a check); generate() finished it
                chunks = chunk_speech(self.generate(prepared), engine.frame_rate)
            elif chunking is not None:  # with verify: each piece checked before any of it is sent
                verifier = self.quality.verifier(request, prepared.timings)
                piece = verifier.generate(engine.generate) if verifier is not None else None
                generated = stream_long(engine, speech_request, chunking, generate_piece=piece)
                if verifier is not None:
                    generated = self.quality.checked_pieces(
                        generated, verifier, prepared.request, prepared.quality
                    )
                chunks = finished_chunks(generated, finishing_for(request))
            else:
                chunks = finished_chunks(stream_speech(engine, speech_request), finishing_for(request))
        try:  # closing this generator closes the engine's stream, which stops the generation
            with prepared.timings.phase("first_chunk"):
                first = next(chunks)
            if first.final and first.end_frame == 0:
                raise JobError(NO_AUDIO)
            yield first
            if first.final:
                return
            with prepared.timings.phase("generate"):  # the rest of the clip, after the first chunk
                for chunk in chunks:
                    if chunk.final and chunk.end_frame == 0:
                        raise JobError(NO_AUDIO)
                    yield chunk
        finally:
            chunks.close()

    # -- encode -----------------------------------------------------------------------------------------
    def encode(self, prepared: PreparedJob, waveform: np.ndarray, sample_rate: int) -> EncodedAudio:
        request = prepared.request
        return encode_audio(
            waveform, sample_rate, request.output_format, target_sample_rate=request.sample_rate
        )

    def clip(
        self, prepared: PreparedJob, progress: Progress | None = None, cancel: threading.Event | None = None
    ) -> Clip:
        """cache → generate → encode (→ cache): the finished clip in the requested format."""
        hit = self.cached(prepared)
        if hit is not None:
            return hit
        speech = self.generate(prepared, progress, cancel)
        annotations = self.quality.annotate(
            prepared.request, speech.waveform, speech.sample_rate, prepared.timings
        )
        quality = prepared.quality | annotations
        with prepared.timings.phase("encode"):
            audio = self.encode(prepared, speech.waveform, speech.sample_rate)
        clip = Clip(audio, speech.num_frames, not speech.finished, cache_hit=False, quality=quality)
        self.remember(prepared, clip)
        return clip

    def streamed_clip(
        self, prepared: PreparedJob, pieces: list[np.ndarray], final: AudioChunk, quality: dict[str, Any]
    ) -> Clip:
        """The whole clip of a finished stream, encoded once (for S3 and the cache)."""
        with prepared.timings.phase("encode"):
            audio = self.encode(prepared, np.concatenate(pieces), final.sample_rate)
        clip = Clip(audio, final.end_frame, not final.finished, cache_hit=False, quality=quality)
        self.remember(prepared, clip)
        return clip

    # -- deliver ----------------------------------------------------------------------------------------
    def output(self, prepared: PreparedJob, clip: Clip, *, delivered_inline: bool = False) -> dict[str, Any]:
        """The job's JSON output: where the audio is (S3 and/or inline), what it is, how it was made.

        ``delivered_inline``: the client already has the audio (a stream's chunks): nothing goes inline again.
        """
        target = prepared.target
        policy = DeliveryPolicy(
            max_inline_bytes=self.settings.max_inline_bytes,
            presign_expiry_s=self.settings.s3_presign_expiry_s,
            inline_requested=not delivered_inline and (prepared.request.return_base64 or target is None),
            delivered_inline=delivered_inline,
        )
        with prepared.timings.phase("upload") if target is not None else nullcontext():
            delivered = deliver(clip.audio, target, policy, budget=prepared.budget)
            if target is not None and "captions" in clip.quality:  # beside the audio, as <key>.srt/.vtt
                captions, fmt = clip.quality["captions"], clip.quality["captions_format"]
                delivered |= upload_captions(captions, fmt, target, self.settings.s3_presign_expiry_s)
        return {
            **delivered,
            **describe_audio(clip.audio),
            **clip.facts(),
            "cache_hit": clip.cache_hit,
            **self.summary(prepared),
        }

    def summary(self, prepared: PreparedJob) -> dict[str, Any]:
        return {"timings_ms": prepared.timings.as_ms(), "model": prepared.models.describe()}

    # -- whole jobs -------------------------------------------------------------------------------------
    def run(self, job_id: str, raw_input: Any, progress: Progress | None = None) -> dict[str, Any]:
        """One job to its JSON output (what a queue job and ``POST /generate`` return)."""
        request = self.validate(raw_input)
        if request.dry_run:  # before the models: a dry run never downloads, loads or generates
            return self.dry_run(request)
        prepared = self.prepare(job_id, request)
        return self.output(prepared, self.clip(prepared, progress))

    def stream(self, job_id: str, raw_input: Any) -> Iterator[dict[str, Any]]:
        """A job's output as chunks while they are generated, each a playable file; the final one carries
        the summary (and the S3 location of the whole clip when there is a target).

        Every chunk draws on the job's inline budget: ``/run`` and ``/runsync`` return all chunks in one
        result, which RunPod drops when it is too large. Past the budget, the whole clip goes to S3 if there
        is a target; otherwise the job fails saying so (the chunks already sent have reached ``/stream``).
        """
        request = self.validate(raw_input)
        if request.dry_run:  # before the models: a dry run never downloads, loads or generates
            yield self.dry_run(request)
            return
        prepared = self.prepare(job_id, request)
        pieces: list[np.ndarray] = []
        all_inline = True
        words: StreamWords | None = None
        for chunk in self.chunks(prepared):
            if not pieces:
                words = self.quality.stream_words(request, chunk.sample_rate, prepared.timings)
            pieces.append(chunk.waveform)
            item, inline = self._stream_item(prepared, chunk)
            all_inline = all_inline and inline
            if words is not None:
                said = words.chunk(chunk.waveform, chunk.final)
                if request.timestamps == "word":
                    item["words"] = said
            if not chunk.final:
                yield item
                continue
            quality = self.streamed_quality(prepared, words)
            summary: dict[str, Any] = {"num_frames": chunk.end_frame, "truncated": not chunk.finished}
            summary |= quality
            if prepared.target is not None or prepared.cache_key is not None:
                clip = self.streamed_clip(prepared, pieces, chunk, quality)
                if prepared.target is not None:
                    summary |= self.output(prepared, clip, delivered_inline=all_inline)
            yield item | {"summary": summary | self.summary(prepared)}

    def streamed_quality(self, prepared: PreparedJob, words: StreamWords | None) -> dict[str, Any]:
        """What a finished stream's summary adds: all its words, its captions, its verification."""
        return prepared.quality | (words.summary() if words is not None else {})

    def _stream_item(self, prepared: PreparedJob, chunk: AudioChunk) -> tuple[dict[str, Any], bool]:
        """One stream chunk as a playable file; False when its audio could not go inline."""
        item: dict[str, Any] = {
            "index": chunk.index,
            "final": chunk.final,
            "start_s": round(chunk.start_s, 3),
        }
        if not chunk.waveform.size:
            return item, True
        with prepared.timings.phase("encode"):
            audio = self.encode(prepared, chunk.waveform, chunk.sample_rate)
        encoded = base64.b64encode(audio.data).decode()
        if prepared.budget.spend(len(encoded)):
            return item | {"audio_base64": encoded, **describe_audio(audio)}, True
        if prepared.target is not None:
            return item | {"audio_omitted": "over the inline result limit: the whole clip goes to S3"}, False
        raise JobError(
            f"the streamed audio passed the {self.settings.max_inline_bytes / 1e6:.1f} MB result limit at "
            f"{chunk.start_s:.1f} s (RunPod drops larger results; the chunks sent so far reached /stream); "
            "set s3_bucket, or use output_format mp3 or opus for long streams"
        )


def describe_audio(audio: EncodedAudio) -> dict[str, Any]:
    return {
        "format": audio.format,
        "mimetype": audio.mimetype,
        "sample_rate": audio.sample_rate,
        "duration_s": round(audio.duration_s, 3),
    }


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise JobAbandoned("the client went away")


def _abandoned_if_cancelled(generate: Callable[[], Speech]) -> Speech:
    """The engine's cancellation, as the pipeline's: the client went away and nobody waits for the clip."""
    from boson_multimodal.engine import GenerationCancelled

    try:
        return generate()
    except GenerationCancelled as error:
        raise JobAbandoned("the client went away") from error


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
