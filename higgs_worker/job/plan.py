"""The plan of a job: everything decided about a validated request before the models, computed once.

Every later stage reads the plan and decides nothing again: generation reads the prompt and the pieces, the
doors read whether and how the job streams, delivery reads the S3 target, the cache reads the identity. A
dry run shows the same plan, so it shows what generation would do. Nothing here imports torch.

* what the model reads: the normalised text, the scene and one voice per speaker (the prompt), and how a long
  text is cut into pieces;
* whether the audio streams, and how: each chunk a playable file (the queue), or one file sent as it grows
  (HTTP: only formats whose encoder never goes back to the header);
* where the audio goes (an S3 target, from the job or the default bucket, with a checked key);
* what identifies the result for the cache: only for deterministic requests, with the reference audio itself
  (its hash), not the URL or name that pointed at it, and with the prompt's version.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from boson_multimodal.longform import Chunking
from boson_multimodal.prompt import PROMPT_VERSION
from boson_multimodal.speech_request import SAMPLER_VERSION, SamplingConfig, SpeechRequest
from higgs_worker.audio.stream_encoding import STREAMABLE
from higgs_worker.delivery import S3Target, default_s3_key, validate_bucket_name, validate_s3_key
from higgs_worker.errors import RequestPlanError
from higgs_worker.job.rendering import chunking_for, prompt_request
from higgs_worker.job.schema import TTSRequest
from higgs_worker.settings import Settings
from higgs_worker.voices.resolve import DescribedVoice, ResolvedVoice

# "files": every chunk is a playable file of its own (the queue's /stream); "bytes": one file whose bytes
# are sent as they are encoded (an HTTP response body).
StreamKind = Literal["files", "bytes"]


@dataclass(frozen=True)
class StreamPlan:
    kind: StreamKind
    live: bool  # chunks leave while the clip is generated; False: the whole clip first (speed, verify)


@dataclass(frozen=True)
class Plan:
    request: TTSRequest
    references: list[ResolvedVoice]  # the ref_audio entries, resolved, in order
    speech: SpeechRequest  # what the model reads (normalised text, scene, voices) and how it samples
    chunking: Chunking | None  # how a long text is cut into pieces; None: one generation
    stream: StreamPlan | None  # None: the clip is delivered whole
    target: S3Target | None
    identity: dict[str, Any] | None  # the result's identity for the cache; None: not deterministic


def plan_job(
    request: TTSRequest,
    references: list[ResolvedVoice],
    job_id: str,
    settings: Settings,
    stream: StreamKind | None = None,
    *,
    to_s3: bool = True,
) -> Plan:
    """The plan for ``request`` whose voices are resolved; ``stream``: how the door would stream it;
    ``to_s3`` False for a door that answers with the audio itself (the S3 fields are then refused)."""
    if not to_s3:
        sent = [field for field in ("s3_bucket", "s3_key") if getattr(request, field) is not None]
        if sent:
            raise RequestPlanError(
                f"{sent[0]}: this route answers with the audio itself; for delivery to S3 send the job to "
                "POST /generate (or the queue endpoint)"
            )
    prompt = prompt_request(request, references)
    sampling = sampling_of(request)
    chunking = chunking_for(request, prompt.text, settings.longform_chunk_chars)
    streams = stream_plan(request, stream, long=chunking is not None)
    quality_models = {
        "aligner": f"{settings.aligner_repo}@{settings.aligner_revision}",
        "recogniser": f"{settings.recogniser_repo}@{settings.recogniser_revision}",
    }
    return Plan(
        request=request,
        references=references,
        speech=SpeechRequest(**vars(prompt), sampling=sampling),
        chunking=chunking,
        stream=streams,
        target=s3_target_for(request, job_id, settings) if to_s3 else None,
        identity=cache_identity(
            request,
            references,
            chunking,
            quality_models=quality_models,
            live_stream=streams is not None and streams.live,
            backend=settings.generation_backend,
            compiled_step=settings.compile_step,
        ),
    )


def sampling_of(request: TTSRequest) -> SamplingConfig:
    """How the request samples, in the engine's terms (which also say whether it is deterministic)."""
    return SamplingConfig(
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        max_new_tokens=request.max_new_tokens,
        seed=request.seed,
    )


def stream_plan(request: TTSRequest, kind: StreamKind | None, *, long: bool = False) -> StreamPlan | None:
    """How the job streams through a door that streams ``kind``, or None when it is sent whole.

    One growing file streams only where its encoder never rewrites the header (see
    :mod:`higgs_worker.audio.stream_encoding`) and at the model's own rate; chunks as files stream in any
    format.
    """
    if kind is None:
        return None
    if kind == "bytes" and (request.output_format not in STREAMABLE or request.sample_rate is not None):
        return None
    # A tempo change needs the whole clip. Verification checks a clip before it is sent: a long text's pieces
    # are each checked before they leave (the stream goes on piece by piece); a short text is one piece.
    return StreamPlan(kind, live=request.speed == 1.0 and (long or not request.verify))


def s3_target_for(request: TTSRequest, job_id: str, settings: Settings) -> S3Target | None:
    bucket = request.s3_bucket or settings.s3_default_bucket
    if bucket is None:
        if request.s3_key is not None:
            raise RequestPlanError(
                "s3_key: needs s3_bucket (or a default bucket in the S3_BUCKET environment)"
            )
        return None
    try:
        bucket = validate_bucket_name(bucket)
    except ValueError as error:
        raise RequestPlanError(f"s3_bucket: {error}") from None
    try:
        key = (
            validate_s3_key(request.s3_key)
            if request.s3_key
            else default_s3_key(job_id, request.output_format)
        )
    except ValueError as error:
        raise RequestPlanError(f"s3_key: {error}") from None
    return S3Target(bucket=bucket, key=key)


def _reference_identity(reference: ResolvedVoice) -> dict[str, Any]:
    if isinstance(reference, DescribedVoice):
        return {"described": reference.text}
    samples = np.ascontiguousarray(reference.waveform, dtype=np.float32)
    return {
        "sha256": hashlib.sha256(samples.tobytes()).hexdigest(),
        "sample_rate": reference.sample_rate,
        "text": reference.text,
    }


def cache_identity(
    request: TTSRequest,
    references: Sequence[ResolvedVoice],
    chunking: Chunking | None = None,
    *,
    quality_models: Mapping[str, str] | None = None,
    live_stream: bool = False,
    backend: str = "scheduler",
    compiled_step: bool = False,
) -> dict[str, Any] | None:
    """Everything that shapes the result, or None when the request is not deterministic (sampling, no seed).

    ``chunking`` is how a long transcript is cut (it changes the audio), or None for one generation.
    ``quality_models`` names the aligner and the recogniser (``repo@revision``): another one gives other
    words, captions or verification. ``live_stream``: the clip leaves while it is generated, so loudness is
    set from its start and words are aligned chunk by chunk, which a clip finished whole does not share.
    ``backend``: the scheduler and transformers' ``generate()`` draw other codes from the same seed.
    ``compiled_step``: the scheduler's decode forward (and, with CUDA graphs, its sampler) runs through
    torch.compile (``COMPILE_STEP``), whose fused kernels round otherwise, so even greedy codes may differ
    from the eager step's. It follows the setting: a worker where compiling failed (no C compiler) serves
    the eager step under this identity.
    Prompts prefilled together (``PREFILL_TOGETHER``) are not part of it: what they change, by rounding,
    depends on which prompts arrived beside this one, not on a setting, like a GPU's batch-sized kernels,
    so no identity could make those codes repeat; the cache then keeps the first result.
    """
    sampling = sampling_of(request)
    if not sampling.deterministic:
        return None
    identity: dict[str, Any] = {
        "prompt_version": PROMPT_VERSION,
        "transcript": request.transcript,
        "scene_prompt": request.scene_prompt,
        "references": [_reference_identity(r) for r in references],
        "max_new_tokens": request.max_new_tokens,
        "output_format": request.output_format,
        "sample_rate": request.sample_rate,
        "speed": request.speed,
        "pieces": None if chunking is None else dataclasses.asdict(chunking),
        "voice_description": request.voice_descriptions,
        "ref_audio_in_system_message": request.ref_audio_in_system_message,
    }
    # The quality fields (finishing changes the audio; words, captions and verification the result), only
    # when asked for: a request without them keeps the identity, and the cache entry, it had before them.
    quality: dict[str, list[Any]] = {
        "finishing": [request.loudness_lufs, request.trim_silence],
        "annotations": [request.timestamps, request.captions],
        "verification": [request.verify, request.max_wer, request.max_attempts, request.require_verified],
    }
    asked = {
        name: values
        for name, values in quality.items()
        if any(v not in (None, False, "none") for v in values)
    }
    models = quality_models or {}
    if "annotations" in asked:
        asked["annotations"].append(models.get("aligner"))
    if "verification" in asked:
        asked["verification"].append(models.get("recogniser"))
    if live_stream and ("finishing" in asked or "annotations" in asked):
        asked["finished_live"] = [True]
    identity |= asked
    if compiled_step and backend == "scheduler":
        identity["decode_step"] = "compiled"  # only when on: eager results keep the identity they had
    if not sampling.greedy:
        identity |= {"temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k}
        identity["seed"] = request.seed
        # how the seed becomes codes
        identity["sampler"] = SAMPLER_VERSION if backend == "scheduler" else "transformers generate()"
    return identity
