"""A stream's rows while a prompt with 50 s of reference audio is admitted beside it (shared by the CPU
benchmark, ``benchmarks/scheduler.py --only reference``, and the GPU check).

The long prompt is encoded before the stream starts, so that only its admission (the prefill, in pieces or
in one forward) is timed, not the codec's encoding of the reference. The stream's rows are timed as its
consumer sees them (``SequenceHandle.wait_rows``); the long job is submitted at its 120th row, and, when
asked, a short job right after it, which is admitted whole between the long one's pieces.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from boson_multimodal.engine import HiggsAudioEngine, SamplingConfig, SpeechRequest
from boson_multimodal.prompt import Voice
from boson_multimodal.scheduler import SequenceHandle, SequenceInput

REFERENCE_SECONDS = 50
CHUNK_ROWS = 12  # a stream's first chunk (``ChunkSchedule.first_frames``)
ADMITTED_AT_ROW = 120
STREAM_ROWS = 400


def long_reference_input(engine: HiggsAudioEngine, sample_rate: int = 24000) -> SequenceInput:
    """A short text spoken like 50 s of reference audio (noise: the prompt's length is what matters)."""
    waveform = 0.1 * np.random.default_rng(0).standard_normal(sample_rate * REFERENCE_SECONDS)
    voice = Voice(waveform=waveform.astype(np.float32), sample_rate=sample_rate, transcript="A long clip.")
    request = SpeechRequest("Speak like this.", voices=(voice,), sampling=SamplingConfig(max_new_tokens=20))
    return engine._sequence_input(request)


def short_input(engine: HiggsAudioEngine) -> SequenceInput:
    """A prompt of one short sentence, without reference audio: one piece."""
    return engine._sequence_input(SpeechRequest("A short one.", sampling=SamplingConfig(max_new_tokens=20)))


def stream_beside_admission(
    engine: HiggsAudioEngine, long_input: SequenceInput, short: SequenceInput | None = None
) -> dict:
    """One stream of ``STREAM_ROWS`` rows with the long prompt submitted at its ``ADMITTED_AT_ROW``-th row
    (and ``short`` right after it): the stream's median pause between rows and chunk interval before, the
    longest of each from the submission until the long job's first row, and how long that first row (and
    the short job's) took from the submission, in ms."""
    stream = SpeechRequest("A stream that keeps going.", sampling=SamplingConfig(max_new_tokens=STREAM_ROWS))
    handle = engine.submit(stream)
    arrived: list[float] = []  # when row i + 1 was first seen
    admitted: list[float] = []  # when the long job's first row was
    short_admitted: list[float] = []  # when the short job's was
    until = None  # the stream's rows by then
    job: SequenceHandle | None = None
    short_job: SequenceHandle | None = None
    watchers: list[threading.Thread] = []
    submitted = 0.0  # when it was submitted
    while True:
        rows, result = handle.wait_rows(len(arrived) + 1)
        now = time.perf_counter()
        assert rows is not None  # the stream's first row comes before its result
        arrived.extend([now] * (rows.shape[0] - len(arrived)))
        if job is None and len(arrived) >= ADMITTED_AT_ROW:
            submitted, job = now, engine._runner.submit(long_input)
            watchers.append(threading.Thread(target=_first_row, args=(job, admitted), daemon=True))
            if short is not None:
                short_job = engine._runner.submit(short)
                watchers.append(
                    threading.Thread(target=_first_row, args=(short_job, short_admitted), daemon=True)
                )
            for watcher in watchers:
                watcher.start()
        if until is None and admitted:
            until = len(arrived)
        if result is not None:
            break
    assert job is not None and until is not None, "the stream ended before the long job was admitted"
    job.result()
    if short_job is not None:
        short_job.result()
    for watcher in watchers:  # their first rows are recorded
        watcher.join()
    gaps = np.diff(arrived) * 1000
    chunks = np.diff(arrived[::CHUNK_ROWS]) * 1000
    first, last = (ADMITTED_AT_ROW - 1) // CHUNK_ROWS, until // CHUNK_ROWS + 1
    return {
        "prompt_tokens": long_input.prompt_tokens,
        "pause_ms": round(float(np.median(gaps[: ADMITTED_AT_ROW - 1])), 2),
        "longest_pause_ms": round(float(gaps[ADMITTED_AT_ROW - 1 : until].max()), 2),
        "chunk_ms": round(float(np.median(chunks[:first])), 2),
        "longest_chunk_ms": round(float(chunks[first:last].max()), 2),
        "first_row_ms": round((admitted[0] - submitted) * 1000, 2),
    } | ({"short_first_row_ms": round((short_admitted[0] - submitted) * 1000, 2)} if short else {})


def _first_row(job: SequenceHandle, admitted: list[float]) -> None:
    job.wait_rows(1)
    admitted.append(time.perf_counter())
