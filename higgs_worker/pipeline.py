"""The job pipeline: validate → plan → cache → generate → encode → deliver, for one job.

Both doors (:mod:`queue_api` for RunPod's queue, :mod:`http_api` for load-balancer endpoints) only translate
their protocol into calls here and back; nothing here knows which door a job came through. A job is planned
once (:mod:`higgs_worker.job.plan`): every stage after reads the plan. The queue and ``POST /generate``
take the JSON output of :meth:`Pipeline.run` / :meth:`Pipeline.stream`; ``/v1/audio/speech`` takes the clip
of :meth:`Pipeline.clip` or the encoded pieces of :meth:`Pipeline.stream_audio`, the one stream both doors
send.
"""

from __future__ import annotations

import base64
import functools
import logging
import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from boson_multimodal.errors import SpeechRequestError
from higgs_worker.audio.encoding import EncodedAudio, change_tempo, encode_audio
from higgs_worker.audio.stream_encoding import StreamEncoder
from higgs_worker.delivery import DeliveryPolicy, InlineBudget, deliver
from higgs_worker.errors import JobAbandoned, JobError, SpeechNotPossible
from higgs_worker.job.dry_run import dry_run
from higgs_worker.job.plan import Plan, StreamKind, plan_job
from higgs_worker.job.schema import RequestLimits, TTSRequest, parse_request
from higgs_worker.quality.captions import upload_captions
from higgs_worker.quality.finishing import finish, finished_chunks, finishing_for
from higgs_worker.quality.service import OUTPUT_KEYS, Quality, StreamWords
from higgs_worker.runtime import Models, Runtime
from higgs_worker.settings import Settings
from higgs_worker.store.result_cache import ResultCache, cache_key
from higgs_worker.timings import Timings
from higgs_worker.voices.resolve import ResolvedVoice, resolve_reference

if TYPE_CHECKING:  # torch is imported only when a job needs the engine
    from boson_multimodal.engine import HiggsAudioEngine, Speech, SpeechRequest
    from boson_multimodal.streaming import AudioChunk

logger = logging.getLogger("higgs_worker.pipeline")

Progress = Callable[[int, int], None]  # (pieces done, pieces in all) of a long-form job

NO_AUDIO = "the model ended the clip before producing any audio; try again with another seed or temperature"


@dataclass
class PreparedJob:
    """One job after everything that comes before generation."""

    job_id: str
    plan: Plan
    models: Models
    timings: Timings
    cache_key: str | None  # set for deterministic requests when the result cache is on
    budget: InlineBudget  # what the job's result may still carry inline, shared by every delivery path
    quality: dict[str, Any] = field(default_factory=dict)  # what generation found out (verification)
    # Set by a door when nobody waits for the job any more (the client left, RunPod cancelled it): checked
    # before generating, between long-form pieces and between verification attempts.
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def request(self) -> TTSRequest:
        return self.plan.request


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


@dataclass(frozen=True)
class StreamPiece:
    """One piece of a stream, encoded as the plan says (see :class:`higgs_worker.job.plan.StreamPlan`)."""

    chunk: AudioChunk
    data: bytes  # "files": this chunk as a playable file; "bytes": the next bytes of the one file
    audio: EncodedAudio | None  # "files": this chunk's file (None for an empty chunk); "bytes": None
    clip: Clip | None  # on the final piece: the whole clip, encoded once when S3 or the cache needs it
    words: list[dict[str, Any]] = field(default_factory=list)  # the words this chunk said (timestamps "word")
    quality: dict[str, Any] = field(default_factory=dict)  # on the final piece: words, captions, verification


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

    # -- validate, plan, prepare ------------------------------------------------------------------------
    def validate(self, raw_input: Any, *, openai_names: bool = False) -> TTSRequest:
        """The checked request; ``openai_names`` for OpenAI's route (errors say ``input``, ``voice``…)."""
        return parse_request(raw_input, self.limits, openai_names=openai_names)

    def plan(
        self, job_id: str, request: TTSRequest, stream: StreamKind | None = None, *, to_s3: bool = True
    ) -> Plan:
        """Everything decided before the models: voices, prompt, pieces, streaming, S3 target, identity."""
        return plan_job(request, self._references(request), job_id, self.settings, stream, to_s3=to_s3)

    def dry_run(self, request: TTSRequest) -> dict[str, Any]:
        """How the request would be read — transcript, voices, pieces, prompt — without models or a GPU."""
        return dry_run(self.plan("dry-run", request), self.settings)

    def prepare(
        self,
        job_id: str,
        request: TTSRequest,
        stream: StreamKind | None = None,
        timings: Timings | None = None,
        *,
        to_s3: bool = True,
    ) -> PreparedJob:
        """The plan, the models on the volume, the cache key: everything before generation."""
        timings = timings or Timings()
        with timings.phase("reference"):
            plan = self.plan(job_id, request, stream, to_s3=to_s3)
        with timings.phase("download"):
            models, _ = self.runtime.models()
        key = None
        if self.cache is not None and plan.identity is not None:
            key = cache_key(plan.identity, models.revisions())
        budget = InlineBudget(self.settings.max_inline_bytes)
        return PreparedJob(job_id, plan, models, timings, key, budget)

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

    def generate(self, prepared: PreparedJob, progress: Progress | None = None) -> Speech:
        """The whole clip at once (speed applied); long transcripts piece by piece.

        ``prepared.cancel`` set by a door abandons the job: checked before generating, inside the engine's
        steps and between the pieces of a long transcript (then :class:`JobAbandoned` is raised).
        """
        cancel = prepared.cancel
        engine = self.engine(prepared)
        plan = prepared.plan
        _check(cancel)
        verifier = self.quality.verifier(plan.request, prepared.timings)
        with prepared.timings.phase("generate"), _engine_refusals():
            if plan.chunking is not None:
                from boson_multimodal.longform import generate_long

                def on_progress(done: int, total: int) -> None:
                    _check(cancel)
                    if progress is not None:
                        progress(done, total)

                piece = verifier.generate(engine.generate) if verifier is not None else None
                speech = generate_long(engine, plan.speech, plan.chunking, on_progress, generate_piece=piece)
            else:
                whole = _cancellable(engine, prepared)
                one = verifier.generate(whole) if verifier is not None else whole
                speech = _abandoned_if_cancelled(lambda: one(plan.speech))
        if verifier is not None:  # checked on the clip as generated; speed and finishing keep its words
            prepared.quality["verification"] = verifier.report()
            self.quality.check_required(plan.request, prepared.quality["verification"])
        if speech.num_frames == 0:
            raise JobError(NO_AUDIO)
        if plan.request.speed != 1.0:
            with prepared.timings.phase("encode"):
                waveform = change_tempo(speech.waveform, speech.sample_rate, plan.request.speed)
            speech = replace(speech, waveform=waveform)
        finishing = finishing_for(plan.request)
        if finishing.active:  # after the tempo change: the clip as it will sound
            with prepared.timings.phase("finish"):
                speech = replace(speech, waveform=finish(speech.waveform, speech.sample_rate, finishing))
        return speech

    def _chunks(self, prepared: PreparedJob) -> Generator[AudioChunk, None, None]:
        """The clip in chunks while it is generated; closing the iterator cancels the generation.

        A long transcript streams piece by piece (the next piece starts when the previous one ends). A plan
        that is not live (a changed speed) generates the whole clip first, then sends it in chunks. An empty
        clip raises JobError.
        """
        from boson_multimodal.longform import stream_long
        from boson_multimodal.streaming import chunk_speech, stream_speech

        engine = self.engine(prepared)
        plan = prepared.plan
        assert plan.stream is not None, "only a plan that streams is streamed"
        with prepared.timings.phase("first_chunk"), _engine_refusals():
            if not plan.stream.live:  # the whole clip first; generate() finished it
                chunks = chunk_speech(self.generate(prepared), engine.frame_rate)
            elif plan.chunking is not None:  # with verify: each piece checked before any of it is sent
                verifier = self.quality.verifier(plan.request, prepared.timings)
                whole_piece = _cancellable(engine, prepared)
                piece = verifier.generate(whole_piece) if verifier is not None else None
                generated = stream_long(engine, plan.speech, plan.chunking, generate_piece=piece)
                if verifier is not None:
                    generated = self.quality.checked_pieces(
                        generated, verifier, plan.request, prepared.quality
                    )
                chunks = finished_chunks(generated, finishing_for(plan.request))
            else:
                chunks = finished_chunks(stream_speech(engine, plan.speech), finishing_for(plan.request))
        try:  # closing this generator closes the engine's stream, which stops the generation
            with prepared.timings.phase("first_chunk"), _engine_refusals():
                first = next(chunks)
            if first.final and first.end_frame == 0:
                raise JobError(NO_AUDIO)
            yield first
            if first.final:
                return
            with prepared.timings.phase("generate"), _engine_refusals():  # the rest, after the first chunk
                for chunk in chunks:
                    if chunk.final and chunk.end_frame == 0:
                        raise JobError(NO_AUDIO)
                    yield chunk
        finally:
            chunks.close()

    def stream_audio(self, prepared: PreparedJob) -> Generator[StreamPiece, None, None]:
        """The one stream both doors send: each chunk encoded as the plan says, while it is generated.

        The final piece carries the whole clip, encoded once, when the plan has an S3 target or the result
        cache is on (and it is then cached, like a one-shot clip). Closing the iterator stops the generation.
        """
        plan = prepared.plan
        assert plan.stream is not None, "only a plan that streams is streamed"
        encoder: StreamEncoder | None = None
        words: StreamWords | None = None
        waveforms: list[np.ndarray] = []
        chunks = self._chunks(prepared)
        try:
            for chunk in chunks:
                if not waveforms:
                    words = self.quality.stream_words(plan.request, chunk.sample_rate, prepared.timings)
                waveforms.append(chunk.waveform)
                said = words.chunk(chunk.waveform, chunk.final) if words is not None else []
                audio = None
                with prepared.timings.phase("encode"):
                    if plan.stream.kind == "files":
                        if chunk.waveform.size:
                            audio = self.encode(prepared, chunk.waveform, chunk.sample_rate)
                        data = audio.data if audio is not None else b""
                    else:
                        encoder = encoder or StreamEncoder(plan.request.output_format, chunk.sample_rate)
                        data = encoder.encode(chunk.waveform) + (encoder.finish() if chunk.final else b"")
                clip, quality = None, {}
                if chunk.final:  # all the words, the captions and the verification
                    quality = prepared.quality | (words.summary() if words is not None else {})
                    if plan.target is not None or prepared.cache_key is not None:
                        clip = self._whole_stream(prepared, waveforms, chunk, quality)
                said = said if plan.request.timestamps == "word" else []
                yield StreamPiece(chunk, data, audio, clip, said, quality)
        finally:
            chunks.close()

    def _whole_stream(
        self, prepared: PreparedJob, waveforms: list[np.ndarray], final: AudioChunk, quality: dict[str, Any]
    ) -> Clip:
        """The whole clip of a finished stream, encoded once (for S3 and the cache)."""
        with prepared.timings.phase("encode"):
            audio = self.encode(prepared, np.concatenate(waveforms), final.sample_rate)
        clip = Clip(audio, final.end_frame, not final.finished, cache_hit=False, quality=quality)
        self.remember(prepared, clip)
        return clip

    # -- encode -----------------------------------------------------------------------------------------
    def encode(self, prepared: PreparedJob, waveform: np.ndarray, sample_rate: int) -> EncodedAudio:
        request = prepared.request
        return encode_audio(
            waveform, sample_rate, request.output_format, target_sample_rate=request.sample_rate
        )

    def clip(self, prepared: PreparedJob, progress: Progress | None = None) -> Clip:
        """cache → generate → encode (→ cache): the finished clip in the requested format."""
        hit = self.cached(prepared)
        if hit is not None:
            return hit
        speech = self.generate(prepared, progress)
        annotations = self.quality.annotate(
            prepared.request, speech.waveform, speech.sample_rate, prepared.timings
        )
        quality = prepared.quality | annotations
        with prepared.timings.phase("encode"):
            audio = self.encode(prepared, speech.waveform, speech.sample_rate)
        clip = Clip(audio, speech.num_frames, not speech.finished, cache_hit=False, quality=quality)
        self.remember(prepared, clip)
        return clip

    # -- deliver ----------------------------------------------------------------------------------------
    def output(self, prepared: PreparedJob, clip: Clip, *, delivered_inline: bool = False) -> dict[str, Any]:
        """The job's JSON output: where the audio is (S3 and/or inline), what it is, how it was made.

        ``delivered_inline``: the client already has the audio (a stream's chunks): nothing goes inline again.
        """
        target = prepared.plan.target
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

    def stream(
        self, job_id: str, raw_input: Any, cancel: threading.Event | None = None
    ) -> Iterator[dict[str, Any]]:
        """A job's output as chunks while they are generated, each a playable file; the final one carries
        the summary (and the S3 location of the whole clip when there is a target). A cached result is one
        final chunk.

        Every chunk draws on the job's inline budget: ``/run`` and ``/runsync`` return all chunks in one
        result, which RunPod drops when it is too large. Past the budget, the whole clip goes to S3 if there
        is a target; otherwise the job fails saying so (the chunks already sent have reached ``/stream``).
        """
        request = self.validate(raw_input)
        if request.dry_run:  # before the models: a dry run never downloads, loads or generates
            yield self.dry_run(request)
            return
        prepared = self.prepare(job_id, request, stream="files")
        if cancel is not None:
            prepared.cancel = cancel
        hit = self.cached(prepared)
        if hit is not None:
            output = self.output(prepared, hit)
            facts = {
                key: output.pop(key)
                for key in ("num_frames", "truncated", "cache_hit", "timings_ms", "model", *OUTPUT_KEYS)
                if key in output
            }
            yield {"index": 0, "final": True, "start_s": 0.0, **output, "summary": facts}
            return
        all_inline = True
        with closing(self.stream_audio(prepared)) as pieces:  # closed at once, also on a failure
            for piece in pieces:
                item, inline = self._stream_item(prepared, piece)
                all_inline = all_inline and inline
                chunk = piece.chunk
                if not chunk.final:
                    yield item
                    continue
                summary: dict[str, Any] = {"num_frames": chunk.end_frame, "truncated": not chunk.finished}
                summary |= piece.quality
                if prepared.plan.target is not None and piece.clip is not None:
                    summary |= self.output(prepared, piece.clip, delivered_inline=all_inline)
                yield item | {"summary": summary | self.summary(prepared)}

    def _stream_item(self, prepared: PreparedJob, piece: StreamPiece) -> tuple[dict[str, Any], bool]:
        """One stream chunk as a playable file; False when its audio could not go inline."""
        chunk = piece.chunk
        item: dict[str, Any] = {
            "index": chunk.index,
            "final": chunk.final,
            "start_s": round(chunk.start_s, 3),
        }
        if prepared.request.timestamps == "word":
            item["words"] = piece.words
        if piece.audio is None:
            return item, True
        encoded = base64.b64encode(piece.audio.data).decode()
        if prepared.budget.spend(len(encoded)):
            return item | {"audio_base64": encoded, **describe_audio(piece.audio)}, True
        if prepared.plan.target is not None:
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


@contextmanager
def _engine_refusals() -> Iterator[None]:
    """The engine's refusals (``boson_multimodal.errors``, which knows nothing of doors) as the worker's."""
    try:
        yield
    except SpeechRequestError as error:
        raise SpeechNotPossible(str(error)) from error


def _cancellable(engine: HiggsAudioEngine, prepared: PreparedJob) -> Callable[[SpeechRequest], Speech]:
    """The engine's whole-clip generation, stopped when nobody waits for the job any more."""
    return functools.partial(engine.generate, cancel=prepared.cancel)


def _abandoned_if_cancelled(generate: Callable[[], Speech]) -> Speech:
    """The engine's cancellation, as the pipeline's: the client went away and nobody waits for the clip."""
    from boson_multimodal.engine import GenerationCancelled

    try:
        return generate()
    except GenerationCancelled as error:
        raise JobAbandoned("the client went away") from error
