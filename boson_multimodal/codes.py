"""From the generated audio-code stream to frames and waveforms.

``generate()`` returns every audio row of the conversation: reference audio, padding, and the generated
stream, which starts with an all-BOS row and ends at the first all-EOS row. Codebook k lags k steps behind
codebook 0 (the delay pattern), so after R generated rows only R − (K − 1) frames are complete. These helpers
are shared by the one-shot path and by streaming, which feeds a growing stream to ``FrameStream``.
"""

from __future__ import annotations

import torch

from boson_multimodal.cpu_threads import one_thread_per_op_on_cpu


class FrameStream:
    """A sequence's rows ``(R, K)`` (delay pattern applied), fed as they grow, made into frames incrementally.

    The generated stream starts after the last all-BOS row and ends at the first all-EOS row; frame t takes
    codebook k from stream row t + k. Why incremental: a streaming consumer that re-derived every frame of
    the clip at each wake did work quadratic in the clip's length; here each ``update`` looks only at the rows
    it has not seen, plus the last K − 1 rows that complete the frames they open.
    """

    def __init__(self, stream_bos: int, stream_eos: int, codebook_size: int, num_codebooks: int) -> None:
        self._bos, self._eos, self._codebook_size = stream_bos, stream_eos, codebook_size
        self._k = num_codebooks
        self._seen = 0  # rows looked at
        self._start = 0  # the first stream row (after the last all-BOS row so far)
        self._end: int | None = None  # the first all-EOS row, once there is one
        self._frames = torch.empty(64, num_codebooks, dtype=torch.long)
        self._count = 0

    @property
    def frames(self) -> torch.Tensor:
        """``(F, K)`` complete frames so far, clipped to the codec's codes (a view: copy to keep)."""
        return self._frames[: self._count]

    @property
    def finished(self) -> bool:
        """The model closed the stream itself (an all-EOS row) rather than running out of steps."""
        return self._end is not None

    def rows_for(self, frames: int) -> int:
        """How many rows of the sequence make ``frames`` complete frames (so far as is known)."""
        return self._start + frames + self._k - 1

    def update(self, sequence: torch.Tensor) -> None:
        """Take the sequence's rows so far (those already seen must be unchanged)."""
        if self._end is not None:
            return
        new = sequence[self._seen :]
        bos_rows = (new == self._bos).all(dim=-1).nonzero()
        if len(bos_rows):  # a (new) opening row: the stream starts after it
            self._start, self._count = self._seen + int(bos_rows[-1, 0]) + 1, 0
        eos_rows = (new == self._eos).all(dim=-1).nonzero()
        eos_rows = eos_rows[eos_rows[:, 0] + self._seen >= self._start]
        if len(eos_rows):
            self._end = self._seen + int(eos_rows[0, 0])
        self._seen = sequence.shape[0]
        stop = self._seen if self._end is None else self._end
        total = max(stop - self._start - self._k + 1, 0)
        if total <= self._count:
            return
        rows = sequence[self._start + self._count : self._start + total + self._k - 1]
        added = total - self._count
        frames = torch.stack([rows[k : k + added, k] for k in range(self._k)], dim=1)
        if total > self._frames.shape[0]:
            grown = torch.empty(max(total, 2 * self._frames.shape[0]), self._k, dtype=torch.long)
            grown[: self._count] = self._frames[: self._count]
            self._frames = grown
        # BOS/EOS ids (codebook_size, codebook_size + 1) can still sit in the lagging codebooks of edge frames
        self._frames[self._count : total] = frames.clamp(0, self._codebook_size - 1)
        self._count = total


@torch.no_grad()
def decode_frames(codec, frames: torch.Tensor) -> torch.Tensor:
    """``(T, K)`` codes → a mono float32 waveform of T × hop samples on the CPU."""
    if frames.shape[0] == 0:
        return torch.zeros(0)
    one_thread_per_op_on_cpu(codec.device)  # the same samples whichever thread decodes
    codes = frames.t().unsqueeze(0).to(codec.device)  # (1, K, T)
    return codec.decode(codes).audio_values.reshape(-1).float().cpu()
