"""From the generated audio-code stream to frames and waveforms.

``generate()`` returns every audio row of the conversation: reference audio, padding, and the generated
stream, which starts with an all-BOS row and ends at the first all-EOS row. Codebook k lags k steps behind
codebook 0 (the delay pattern), so after R generated rows only R − (K − 1) frames are complete. These helpers
are shared by the one-shot path and by streaming, which applies them to a growing stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CodeStream:
    """The generated rows of one conversation (delay pattern still applied), after the opening BOS row."""

    rows: torch.Tensor  # (rows, num_codebooks)
    finished: bool  # the model closed the stream itself (all-EOS row) rather than running out of steps


def generated_stream(sequence: torch.Tensor, stream_bos: int, stream_eos: int) -> CodeStream:
    """Cut the generated part out of one element's ``(rows, num_codebooks)`` audio sequence."""
    bos_rows = (sequence == stream_bos).all(dim=-1).nonzero()
    start = int(bos_rows[-1, 0]) + 1 if len(bos_rows) else 0
    rows = sequence[start:]
    eos_rows = (rows == stream_eos).all(dim=-1).nonzero()
    if len(eos_rows):
        return CodeStream(rows=rows[: int(eos_rows[0, 0])], finished=True)
    return CodeStream(rows=rows, finished=False)


def revert_delay(rows: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Delay-pattern rows ``(R, K)`` → complete frames ``(max(R − K + 1, 0), K)``, clipped to the codec."""
    num_rows, num_codebooks = rows.shape
    num_frames = max(num_rows - num_codebooks + 1, 0)
    frames = torch.stack([rows[k : k + num_frames, k] for k in range(num_codebooks)], dim=1)
    # BOS/EOS ids (codebook_size, codebook_size + 1) can still sit in the lagging codebooks of edge frames.
    return frames.clamp(0, codebook_size - 1)


@torch.no_grad()
def decode_frames(codec, frames: torch.Tensor) -> torch.Tensor:
    """``(T, K)`` codes → a mono float32 waveform of T × hop samples on the CPU."""
    if frames.shape[0] == 0:
        return torch.zeros(0)
    codes = frames.t().unsqueeze(0).to(codec.device)  # (1, K, T)
    return codec.decode(codes).audio_values.reshape(-1).float().cpu()
