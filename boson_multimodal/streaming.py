"""Streaming speech: audio chunks while the frames are still being generated.

The sequence runs on the engine's generation thread beside every other sequence in flight; its handle
publishes the rows after every step, and the consumer (the caller's thread) sleeps until the rows of its next
chunk are there, reverts the delay pattern of the new rows only (``FrameStream``) and decodes the frames in
chunks. Two facts shape the decoding:

* The codec decoder is non-causal: each output sample depends on the frames up to ``decoder_reach(codec)``
  frames either side (12 for Higgs Audio V2's DAC decoder). Decoding a chunk alone would differ from the
  one-shot decode near its edges, so every chunk ``[a, b)`` is decoded from ``[a − reach, b + lookahead)``
  and only the samples of ``[a, b)`` are kept. With the full reach on both sides the chunks concatenate to
  the one-shot decode up to float rounding.
* The first chunk is small (low latency to first audio), later ones grow (fewer decoder calls and less
  re-decoded context), up to a cap that keeps each chunk well under RunPod's 1 MB stream-message limit.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from boson_multimodal.codes import decode_frames
from boson_multimodal.engine import HiggsAudioEngine, Speech, SpeechRequest


@dataclass(frozen=True)
class ChunkSchedule:
    """How many frames (40 ms each) each chunk holds, and how far ahead of a chunk decoding must see."""

    first_frames: int = 12  # ≈ 0.5 s: the first audio leaves early
    growth: float = 2.0  # each later chunk is this many times the previous one...
    max_frames: int = 100  # ...up to this size (4 s)
    # Frames generated past a chunk before it is decoded. None = the codec decoder's full reach, which makes
    # the stream equal the one-shot decode; fewer lowers the latency at a small cost at chunk edges.
    lookahead_frames: int | None = None

    def __post_init__(self) -> None:
        if self.first_frames < 1:
            raise ValueError(f"first_frames must be at least 1, got {self.first_frames}")
        if self.max_frames < self.first_frames:
            raise ValueError(
                f"max_frames must be at least first_frames ({self.first_frames}), got {self.max_frames}"
            )
        if not self.growth >= 1:
            raise ValueError(f"growth must be at least 1, got {self.growth}")
        if self.lookahead_frames is not None and self.lookahead_frames < 0:
            raise ValueError(f"lookahead_frames must be 0 or more (or None), got {self.lookahead_frames}")

    def sizes(self) -> Iterator[int]:
        """Chunk sizes in frames, forever: first, first × growth, … capped at max_frames."""
        size = float(self.first_frames)
        while True:
            yield min(int(size), self.max_frames)
            size = min(size * self.growth, self.max_frames)


@dataclass(frozen=True)
class AudioChunk:
    """Consecutive chunks concatenate to the whole clip; the final one also says how the clip ended."""

    waveform: np.ndarray  # mono float32: num_frames × hop samples, less crossfades between long-form pieces
    sample_rate: int
    index: int
    start_frame: int  # frames generated before this chunk's (the pieces of a long text all count)
    num_frames: int
    frame_rate: int
    final: bool
    finished: bool  # on the final chunk: the model ended the clip itself (else it hit max_new_tokens)
    start_sample: int  # where the waveform starts in the clip: the frames' samples less earlier crossfades

    @property
    def start_s(self) -> float:
        return self.start_sample / self.sample_rate

    @property
    def end_frame(self) -> int:
        """On the final chunk, the number of frames in the whole clip."""
        return self.start_frame + self.num_frames


def decoder_reach(codec: torch.nn.Module) -> int:
    """Frames either side of a frame that can change the codec decoder's output for it (an upper bound).

    Why computed rather than hard-coded: it follows from the loaded decoder's convolutions. The quantizer
    lookup and projection act frame by frame; the DAC decoder is a chain (its residual skips add no reach)
    of convolutions, registered in the order they run. A convolution with kernel k and dilation d reaches
    (k − 1)·d / 2 of its input samples each side; a transposed convolution with stride s reaches at most
    ⌈k / s⌉ input samples and multiplies the rate by s. Dividing by the samples per frame at each stage and
    summing gives ≈ 11.6 → 12 frames for the real geometry (upsampling 8·5·4·2·3 = 960, kernel 7 with
    dilations 1, 3, 9): it depends on kernels, dilations and strides, not on widths, so the tiny test codec
    and the real one agree. Measured on the tiny codec, a changed frame moves the output up to ~10 frames
    away.
    """
    reach, samples_per_frame = 0.0, 1
    decoder = codec.acoustic_decoder
    assert isinstance(decoder, torch.nn.Module)
    for module in decoder.modules():
        if isinstance(module, torch.nn.ConvTranspose1d):
            stride = module.stride[0]
            reach += math.ceil(module.kernel_size[0] / stride) / samples_per_frame
            samples_per_frame *= stride
        elif isinstance(module, torch.nn.Conv1d):
            reach += (module.kernel_size[0] - 1) * module.dilation[0] / 2 / samples_per_frame
    return math.ceil(reach)


class _ChunkDecoder:
    """Decodes frame ranges of a growing clip with enough context to match the one-shot decode."""

    def __init__(self, engine: HiggsAudioEngine) -> None:
        self._engine = engine
        self.reach = decoder_reach(engine.codec)
        self._hop = int(engine.codec.config.hop_length)

    def chunk(
        self, frames: torch.Tensor, index: int, start: int, stop: int, *, final: bool, finished: bool
    ) -> AudioChunk:
        low, high = max(start - self.reach, 0), min(stop + self.reach, frames.shape[0])
        waveform = decode_frames(self._engine.codec, frames[low:high])
        return AudioChunk(
            waveform=waveform[(start - low) * self._hop : (stop - low) * self._hop].numpy(),
            sample_rate=self._engine.sample_rate,
            index=index,
            start_frame=start,
            num_frames=stop - start,
            frame_rate=self._engine.frame_rate,
            final=final,
            finished=finished,
            start_sample=start * self._hop,
        )


def stream_speech(
    engine: HiggsAudioEngine, request: SpeechRequest, schedule: ChunkSchedule | None = None
) -> Generator[AudioChunk, None, None]:
    """Yield the clip's audio in chunks while it is generated; the last chunk has ``final=True``.

    Closing the iterator early cancels the generation at its next step (which frees its slot), and an
    error in the generation is raised here as the same exception.
    """
    schedule = schedule or ChunkSchedule()
    decoder = _ChunkDecoder(engine)
    lookahead = decoder.reach if schedule.lookahead_frames is None else schedule.lookahead_frames
    sizes = schedule.sizes()
    handle = engine.submit(request)
    stream = engine.frame_stream()
    index, emitted, size = 0, 0, next(sizes)
    try:
        while True:
            # Sleep until the rows that complete the next chunk and its lookahead are there (or the end).
            rows, result = handle.wait_rows(stream.rows_for(emitted + size + lookahead))
            if result is not None:
                stream.update(result.rows)
            else:
                assert rows is not None  # a sequence still running always has rows to publish
                stream.update(rows)
            frames = stream.frames
            # While generating, a chunk waits for `lookahead` frames after it; at the end the last is final.
            ready = frames.shape[0] - (lookahead if result is None else 1)
            while emitted + size <= ready:
                yield decoder.chunk(frames, index, emitted, emitted + size, final=False, finished=False)
                index, emitted, size = index + 1, emitted + size, next(sizes)
            if result is not None:
                break
        end = int(frames.shape[0])
        yield decoder.chunk(frames, index, emitted, end, final=True, finished=stream.finished)
    finally:
        handle.cancel()  # a no-op once finished; otherwise frees the slot at the next step


def chunk_speech(
    speech: Speech, frame_rate: int, max_frames: int = ChunkSchedule.max_frames
) -> Generator[AudioChunk, None, None]:
    """A finished clip as stream chunks, each at most ``max_frames`` long (a clip whose tempo was changed,
    which needs the whole clip first). The frame count follows the waveform."""
    hop = speech.sample_rate // frame_rate
    total = -(-speech.waveform.size // hop)
    starts = list(range(0, max(total, 1), max_frames))
    for index, start in enumerate(starts):
        final = index == len(starts) - 1
        end = total if final else start + max_frames
        yield AudioChunk(
            waveform=speech.waveform[start * hop : end * hop],
            sample_rate=speech.sample_rate,
            index=index,
            start_frame=start,
            num_frames=end - start,
            frame_rate=frame_rate,
            final=final,
            finished=speech.finished,
            start_sample=start * hop,
        )
