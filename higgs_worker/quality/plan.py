"""What ``dry_run`` says about the quality layer: which steps would run, with which models and settings."""

from __future__ import annotations

from typing import Any

from higgs_worker.job.schema import TTSRequest
from higgs_worker.quality.service import Quality
from higgs_worker.quality.verification import VerifyOptions, language_of
from higgs_worker.quality.words import transcript_words
from higgs_worker.settings import Settings


def quality_plan(request: TTSRequest, settings: Settings, pieces: int) -> dict[str, Any]:
    """``finishing``, ``alignment`` and ``verification``: each null when the request does not ask for it."""
    aligned = Quality.wants_alignment(request)
    options = VerifyOptions.of(request.max_wer, request.max_attempts, request.temperature)
    words = transcript_words(request.transcript)
    language = language_of(" ".join(word.text for word in words))
    finishing = {"loudness_lufs": request.loudness_lufs, "trim_silence": request.trim_silence}
    return {
        "finishing": finishing if request.loudness_lufs is not None or request.trim_silence else None,
        "alignment": {
            "words": len(words),
            "timestamps": request.timestamps == "word",
            "captions": request.captions,
            "model": {"repo": settings.aligner_repo, "revision": settings.aligner_revision},
        }
        if aligned
        else None,
        "verification": {
            "metric": "cer" if language in ("zh", "ja") else "wer",
            "language": language or "detected by the recogniser",
            "max_wer": options.max_wer,
            "max_attempts": options.attempts,
            "checked": "each piece" if pieces > 1 else "the clip",
            "require_verified": request.require_verified,
            "model": {"repo": settings.recogniser_repo, "revision": settings.recogniser_revision},
        }
        if request.verify
        else None,
    }
