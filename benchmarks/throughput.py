"""Throughput of N jobs arriving at once: one at a time against concurrently on one worker, with the ratio.

Two measurements with the tiny model (built into a temporary directory and served by the hub stand-in):

- worker: the real ``serverless_handler.py`` under the runpod SDK's production loop against the loopback job
  queue, CONCURRENCY=1 against CONCURRENCY=N, N unseeded jobs enqueued at once (after one warm-up job);
- engine: the batching front-end in-process, N submissions against N sequential ``generate`` calls.

    python benchmarks/throughput.py [--jobs 4] [--steps 40]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from boson_multimodal.batching import BatchingEngine

from boson_multimodal.engine import HiggsAudioEngine, SamplingConfig, SpeechRequest
from boson_multimodal.tiny_model import build_tiny_checkpoint
from tests.conftest import MODEL_REPO, TOKENIZER_REPO
from tests.hub_server import HubServer
from tests.runpod_queue import ProductionWorker, RunPodQueue
from tests.worker_process import worker_env


def job_inputs(count: int, steps: int) -> list[dict]:
    return [{"transcript": f"Throughput job number {i}.", "max_new_tokens": steps} for i in range(count)]


def worker_seconds(hub_url: str, root: Path, concurrency: int, jobs: int, steps: int) -> float:
    """Wall time from enqueueing ``jobs`` at once to the last result, on a warmed-up worker."""
    with RunPodQueue() as queue:
        env = worker_env(root / f"volume-{concurrency}", hub_url, CONCURRENCY=str(concurrency))
        with ProductionWorker(queue, env, root / f"worker-{concurrency}.log") as worker:
            warm = queue.wait(queue.enqueue(job_inputs(1, steps)[0]))
            if warm.status != "COMPLETED":
                raise SystemExit(f"warm-up job failed: {warm.error}\n{worker.log}")
            started = time.perf_counter()
            outcomes = [queue.wait(job_id) for job_id in queue.enqueue_many(job_inputs(jobs, steps))]
            elapsed = time.perf_counter() - started
    failed = [o.error for o in outcomes if o.status != "COMPLETED"]
    if failed:
        raise SystemExit(f"jobs failed: {failed}")
    return elapsed


def engine_seconds(checkpoint: Path, jobs: int, steps: int) -> tuple[float, float]:
    """(sequential, batched) wall times for the same unseeded requests, in this process."""
    engine = HiggsAudioEngine.load(checkpoint / "model", checkpoint / "codec", device="cpu")
    sampling = SamplingConfig(temperature=0.7, max_new_tokens=steps)
    requests = [SpeechRequest(job["transcript"], sampling=sampling) for job in job_inputs(jobs, steps)]
    engine.generate(requests[0])  # warm-up
    started = time.perf_counter()
    for request in requests:
        engine.generate(request)
    sequential = time.perf_counter() - started
    with BatchingEngine(engine, max_batch=jobs, max_wait_ms=50) as batcher:
        started = time.perf_counter()
        for future in [batcher.submit(request) for request in requests]:
            future.result()
        batched = time.perf_counter() - started
    return sequential, batched


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40, help="decode steps per job (max_new_tokens)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_tiny_checkpoint(root / "checkpoint" / "model", root / "checkpoint" / "codec")
        sequential, batched = engine_seconds(root / "checkpoint", args.jobs, args.steps)
        print(
            f"engine  {args.jobs} requests: sequential {sequential:.2f} s, batched {batched:.2f} s, "
            f"speed-up {sequential / batched:.2f}x"
        )
        repos = {MODEL_REPO: root / "checkpoint" / "model", TOKENIZER_REPO: root / "checkpoint" / "codec"}
        with HubServer(repos) as hub:
            one = worker_seconds(hub.url, root, 1, args.jobs, args.steps)
            many = worker_seconds(hub.url, root, args.jobs, args.jobs, args.steps)
        print(
            f"worker  {args.jobs} jobs: CONCURRENCY=1 {one:.2f} s, CONCURRENCY={args.jobs} {many:.2f} s, "
            f"speed-up {one / many:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
