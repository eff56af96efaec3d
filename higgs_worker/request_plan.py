"""Decisions about a validated request that need the worker's settings or resolved references.

* where the audio goes (an S3 target, from the job or the default bucket, with a checked key);
* what identifies the result for the cache — only for deterministic requests, and with the reference audio
  itself (its hash), not the URL or preset name that pointed at it, so a changed reference is a new result.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from higgs_worker.delivery import S3Target, default_s3_key, validate_bucket_name, validate_s3_key
from higgs_worker.references import DescribedVoice, ResolvedVoice
from higgs_worker.schema import TTSRequest
from higgs_worker.settings import Settings


class RequestPlanError(ValueError):
    """The request is valid JSON but cannot be carried out as asked; the message names the field."""


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
    request: TTSRequest, references: Sequence[ResolvedVoice], longform_chars: int | bool = False
) -> dict[str, Any] | None:
    """Everything that shapes the audio, or None when the request is not deterministic (sampling, no seed).

    ``longform_chars`` is the piece length a long transcript is split at (it changes the audio), or False.
    """
    greedy = request.temperature == 0
    if not greedy and request.seed is None:
        return None
    identity: dict[str, Any] = {
        "transcript": request.transcript,
        "scene_prompt": request.scene_prompt,
        "references": [_reference_identity(r) for r in references],
        "max_new_tokens": request.max_new_tokens,
        "output_format": request.output_format,
        "sample_rate": request.sample_rate,
        "speed": request.speed,
        "longform_chars": longform_chars,
        "voice_description": request.voice_descriptions,
        "ref_audio_in_system_message": request.ref_audio_in_system_message,
        "chunking": [request.chunk_method, request.chunk_max_words, request.chunk_max_turns],
        "chunk_buffer": request.chunk_buffer,
    }
    # The quality fields (finishing changes the audio; words, captions and verification the result), only
    # when asked for: a request without them keeps the identity, and the cache entry, it had before them.
    quality: dict[str, list[Any]] = {
        "finishing": [request.loudness_lufs, request.trim_silence],
        "annotations": [request.timestamps, request.captions],
        "verification": [request.verify, request.max_wer, request.max_attempts, request.require_verified],
    }
    identity |= {
        name: values
        for name, values in quality.items()
        if any(v not in (None, False, "none") for v in values)
    }
    if not greedy:
        identity |= {"temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k}
        identity["seed"] = request.seed
    return identity
