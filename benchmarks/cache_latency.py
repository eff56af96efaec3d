"""Latency of a result-cache hit next to a generation, through the runpod SDK's local API.

Starts a real worker process on a temporary volume with the tiny random-weight model (served by the hub
stand-in, so the real download path runs), sends the same deterministic job several times and prints the
client-side latency of the first (generation) and of the later ones (cache hits), and their ratio.

    python benchmarks/cache_latency.py [--max-new-tokens 200] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from boson_multimodal.tiny_model import build_tiny_checkpoint
from tests.conftest import MODEL_REPO, TOKENIZER_REPO
from tests.support.hub_server import HubServer
from tests.support.worker_process import LocalWorker, worker_env


def timed(worker: LocalWorker, job: dict) -> tuple[float, dict]:
    started = time.perf_counter()
    result = worker.runsync(job)
    elapsed = time.perf_counter() - started
    if result.get("status") != "COMPLETED":
        raise SystemExit(f"job failed: {result}")
    return elapsed, result["output"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        build_tiny_checkpoint(root / "model", root / "codec")
        hub = HubServer({MODEL_REPO: root / "model", TOKENIZER_REPO: root / "codec"})
        with hub, LocalWorker(worker_env(root / "volume", hub.url), root / "worker.log") as worker:
            timed(worker, {"transcript": "Warm-up.", "max_new_tokens": 16})  # download + load
            job = {"transcript": "The cache benchmark.", "max_new_tokens": args.max_new_tokens, "seed": 1}
            generation, output = timed(worker, job)
            assert not output["cache_hit"]
            hits = []
            for _ in range(args.repeats):
                elapsed, output = timed(worker, job)
                assert output["cache_hit"]
                hits.append(elapsed)
    hit = statistics.median(hits)
    print(f"audio: {output['duration_s']:.2f} s ({args.max_new_tokens} decode steps, tiny model on CPU)")
    print(f"generation through /runsync: {generation * 1000:.1f} ms")
    print(f"cache hit through /runsync:  {hit * 1000:.1f} ms (median of {args.repeats})")
    print(f"ratio generation / hit: {generation / hit:.1f}x")


if __name__ == "__main__":
    main()
