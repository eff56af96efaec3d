"""What the pipeline asks of the quality layer for one clip: its words, its captions, its verification.

Why one entry point: the pipeline calls the same few lines wherever a clip is finished (one-shot, streamed,
from the HTTP door), and the request fields that decide what runs are read here, not in every caller.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import numpy as np

from higgs_worker.errors import NotVerified
from higgs_worker.job.schema import TTSRequest
from higgs_worker.quality.alignment import WordTime
from higgs_worker.quality.captions import render
from higgs_worker.quality.models import QualityModels
from higgs_worker.quality.stream_alignment import StreamAligner
from higgs_worker.quality.verification import Verifier, VerifyOptions
from higgs_worker.quality.words import transcript_words
from higgs_worker.settings import Settings
from higgs_worker.timings import Timings

if TYPE_CHECKING:
    from boson_multimodal.streaming import AudioChunk

# What the quality layer adds to a clip's output (and keeps with it in the result cache).
OUTPUT_KEYS = ("words", "captions", "captions_format", "verification")


class Quality:
    """One per pipeline; thread-safe (the models load once)."""

    def __init__(self, settings: Settings, endpoint: str | None = None) -> None:
        self.models = QualityModels(settings, endpoint)

    @staticmethod
    def wants_alignment(request: TTSRequest) -> bool:
        return request.timestamps == "word" or request.captions is not None

    def annotate(
        self, request: TTSRequest, waveform: np.ndarray, sample_rate: int, timings: Timings
    ) -> dict[str, Any]:
        """``words`` and ``captions`` for the finished clip, as far as the request asks for them."""
        if not self.wants_alignment(request):
            return {}
        with timings.phase("align"):
            aligner = self.models.aligner()
            times = aligner.align(waveform, sample_rate, transcript_words(request.transcript))
        return annotations_for(request, times)

    def stream_words(self, request: TTSRequest, sample_rate: int, timings: Timings) -> StreamWords | None:
        """Words chunk by chunk for a stream that asks for them (see ``stream_alignment``)."""
        if not self.wants_alignment(request):
            return None
        with timings.phase("align"):
            aligner = self.models.aligner()
        words = transcript_words(request.transcript)
        return StreamWords(request, StreamAligner(aligner, words, sample_rate), timings)

    def verifier(self, request: TTSRequest, timings: Timings) -> Verifier | None:
        """A verifier for the job when it asks for ``verify`` (the recogniser is fetched and loaded once)."""
        if not request.verify:
            return None
        with timings.phase("load"):
            recogniser = self.models.recogniser()
        options = VerifyOptions.of(request.max_wer, request.max_attempts, request.temperature)
        return Verifier(recogniser, options, lambda seconds: timings.add("verify", seconds))

    def checked_pieces(
        self,
        chunks: Generator[AudioChunk, None, None],
        verifier: Verifier,
        request: TTSRequest,
        found: dict[str, Any],
    ) -> Generator[AudioChunk, None, None]:
        """A long-form stream whose pieces ``verifier`` checks as they are made: a piece that never passes
        under ``require_verified`` ends the stream before any of its audio leaves; the final chunk leaves
        with the report in ``found``. Closing this closes ``chunks``."""
        try:
            checked = 0
            for chunk in chunks:
                if len(verifier.checks) > checked:  # a piece was just made and checked
                    checked = len(verifier.checks)
                    self.check_required(request, verifier.report())
                if chunk.final:
                    found["verification"] = verifier.report()
                yield chunk
        finally:
            chunks.close()

    @staticmethod
    def check_required(request: TTSRequest, verification: dict[str, Any]) -> None:
        if request.require_verified and not verification["passed"]:
            raise NotVerified(
                f"require_verified: the clip did not say its text in {verification['attempts']} attempts "
                f"(best {verification['metric'].upper()} {verification['wer']:.2f}, max_wer "
                f"{verification['max_wer']}); without require_verified the best attempt is returned with "
                "passed: false"
            )


def annotations_for(request: TTSRequest, times: list[WordTime]) -> dict[str, Any]:
    """``words`` and ``captions`` as the request asks for them."""
    out: dict[str, Any] = {}
    if request.timestamps == "word":
        out["words"] = [time.as_json() for time in times]
    if request.captions is not None:
        out["captions"] = render(times, request.captions)
        out["captions_format"] = request.captions
    return out


class StreamWords:
    """A stream's words: each chunk's as it leaves (``chunk``), and all of them at the end (``summary``)."""

    def __init__(self, request: TTSRequest, aligner: StreamAligner, timings: Timings) -> None:
        self.request = request
        self.aligner = aligner
        self.timings = timings
        self.times: list[WordTime] = []

    def chunk(self, waveform: np.ndarray, final: bool) -> list[dict[str, Any]]:
        """The words this chunk's audio finished (every word left, on the final chunk)."""
        with self.timings.phase("align"):
            new = self.aligner.feed(waveform)
            if final:
                new += self.aligner.close()
        self.times += new
        return [time.as_json() for time in new]

    def summary(self) -> dict[str, Any]:
        return annotations_for(self.request, self.times)
