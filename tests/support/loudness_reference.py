"""An independent integrated-loudness meter for tests: ITU-R BS.1770-4 written out from the standard.

The worker measures with ``torchaudio.functional.loudness``; tests check its results with this one, which
shares no code with it: the standard's published 48 kHz K-weighting coefficients (the clip is resampled to
48 kHz first), 400 ms blocks with 75 % overlap, the absolute gate at −70 LUFS and the relative gate 10 LU
below the absolutely gated loudness.
"""

from __future__ import annotations

import numpy as np
import torch
import torchaudio.functional as audio_functional

_SHELF = ([1.53512485958697, -2.69169618940638, 1.19839281085285], [1.0, -1.69065929318241, 0.73248077421585])
_HIGH_PASS = ([1.0, -2.0, 1.0], [1.0, -1.99004745483398, 0.99007225036621])


def integrated_loudness(waveform: np.ndarray, sample_rate: int) -> float:
    wave = torch.from_numpy(np.asarray(waveform, dtype=np.float64)).unsqueeze(0)
    wave = audio_functional.resample(wave, sample_rate, 48_000)
    for b, a in (_SHELF, _HIGH_PASS):
        wave = audio_functional.lfilter(
            wave, torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), clamp=False
        )
    samples = wave[0].numpy()
    block, step = 19_200, 4_800  # 400 ms and 100 ms at 48 kHz
    starts = range(0, len(samples) - block + 1, step)
    powers = np.array([np.mean(samples[i : i + block] ** 2) for i in starts])
    gated = powers[-0.691 + 10 * np.log10(powers + 1e-20) > -70]
    relative = -0.691 + 10 * np.log10(np.mean(gated)) - 10
    gated = gated[-0.691 + 10 * np.log10(gated) > relative]
    return float(-0.691 + 10 * np.log10(np.mean(gated)))
