"""On a CPU, every op of the model's work runs on one thread, on whichever thread does that work.

Why one: a decode step's tensors are small, so fanning each op out over the cores costs more than it saves
(a batch-8 step of the tiny model: 2.95 ms with 2 threads, 1.18 ms with 1, on 2 cores), and while the
scheduler's thread steps, the codec and encoders of running jobs want the other cores.

Why on every such thread, each time: a thread's torch thread count is fixed by the first parallel op it
runs, from the process's setting at that moment, so a job thread that loaded the model before any runner
started keeps two while the others get one. A codec's float sums depend on its thread count, so the same
codes would decode to samples a bit apart (by 1 in 32,768) depending on which job thread decoded them.
"""

from __future__ import annotations

import torch


def one_thread_per_op_on_cpu(device: torch.device) -> None:
    """Called by the runners' threads before their first op, and by the codec's callers before each encode
    and decode: on a CPU, this thread runs each op on one thread (and so does every thread started after)."""
    if device.type == "cpu":
        torch.set_num_threads(1)
