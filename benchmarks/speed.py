"""Generation speed of one clip: frames per second, real-time factor, time to the first audio row, and the
handler's overhead over a bare ``generate`` call, for each decode loop: the scheduler (with and without CUDA
graphs on a GPU) and transformers' own ``generate()`` (``EngineOptions(backend="transformers")``).

``--model tiny`` builds the tiny random model (runs on this CPU). ``--model real-size-random`` builds the real
3B backbone geometry (28 layers, d=3072, 24/8 heads, codebook_size 1026, 8 codebooks at 25 frames/s) with
random weights, in bf16 on CUDA; it refuses to run without a GPU rather than thrash. Its text vocabulary and
codec widths are the tiny ones, so its decode steps read slightly fewer bytes than the real checkpoint's.

    python benchmarks/speed.py --model tiny [--steps 200] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REAL_SIZE = {
    "hidden_size": 3072,
    "num_layers": 28,
    "num_heads": 24,
    "num_kv_heads": 8,
    "intermediate_size": 8192,
}
TEXT = "The quick brown fox jumps over the lazy dog, and then it runs far away into the quiet forest."


def measure(engine, steps: int, runs: int) -> dict[str, float]:
    """Median figures over ``runs`` greedy generations of ``steps`` decode steps (after one warm-up)."""
    from boson_multimodal.engine import SamplingConfig, SpeechRequest

    request = SpeechRequest(TEXT, sampling=SamplingConfig(temperature=0, max_new_tokens=steps))
    engine.generate(request)  # warm-up: captures the CUDA graphs the run needs
    walls, first_rows, frames, audio_s = [], [], 0, 0.0
    for _ in range(runs):
        started = time.perf_counter()
        speech = engine.generate(request)
        walls.append(time.perf_counter() - started)
        frames, audio_s = speech.num_frames, len(speech.waveform) / speech.sample_rate
        started = time.perf_counter()
        handle = engine.submit(request)
        handle.wait_newer(0)  # the first row: the prompt prefilled and its first audio row chosen
        first_rows.append(time.perf_counter() - started)
        handle.result()
    wall = statistics.median(walls)
    return {
        "wall_s": wall,
        "frames_per_s": frames / wall,
        "real_time_factor": audio_s / wall,
        "first_row_s": statistics.median(first_rows),
    }


def handler_overhead(checkpoint: Path, steps: int, runs: int) -> tuple[float, float]:
    """(handler job, bare generate) median seconds for the same request, in this process."""
    from higgs_worker import pipeline as job_pipeline
    from higgs_worker.settings import load_settings
    from higgs_worker.store.model_store import RepoSpec, ensure_repo
    from queue_api.worker import run_job
    from tests.conftest import MODEL_REPO, TOKENIZER_REPO
    from tests.support.hub_server import HubServer

    repos = {MODEL_REPO: checkpoint / "model", TOKENIZER_REPO: checkpoint / "codec"}
    with HubServer(repos) as hub, tempfile.TemporaryDirectory() as volume:
        settings = load_settings({"RUNPOD_VOLUME_PATH": volume, "RESULT_CACHE": "off", "DEVICE": "cpu"})
        for repo, path in ((MODEL_REPO, settings.model_path), (TOKENIZER_REPO, settings.tokenizer_path)):
            spec = RepoSpec(repo, "main", path)  # the store, filled from the stand-in as on a first job
            ensure_repo(spec, lock_dir=settings.lock_dir, runpod_cache_hub_dir=None, endpoint=hub.url)
        worker = job_pipeline.Pipeline(settings)
        job = {"id": "bench", "input": {"transcript": TEXT, "max_new_tokens": steps, "temperature": 0}}
        run_job(worker, job)  # loads the engine once
        engine, _ = worker.runtime.engine()
        request = worker.plan("bench", worker.validate(job["input"])).speech
        jobs, bare = [], []
        for _ in range(runs):
            started = time.perf_counter()
            output = run_job(worker, job)
            jobs.append(time.perf_counter() - started)
            if "error" in output:
                raise SystemExit(f"handler job failed: {output['error']}")
            started = time.perf_counter()
            engine.generate(request)
            bare.append(time.perf_counter() - started)
    return statistics.median(jobs), statistics.median(bare)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "real-size-random"], default="tiny")
    parser.add_argument("--steps", type=int, default=200, help="decode steps (steps − 8 frames of 40 ms)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    import torch

    from boson_multimodal.engine import EngineOptions, HiggsAudioEngine
    from boson_multimodal.tiny_model import TinyModelSpec, build_tiny_checkpoint

    if args.model == "real-size-random" and not torch.cuda.is_available():
        raise SystemExit(
            "--model real-size-random needs a CUDA GPU: the 3B model in bf16 is ~11 GB of weights"
        )
    device = "cuda" if args.model == "real-size-random" else "cpu"
    spec = TinyModelSpec(**REAL_SIZE) if args.model == "real-size-random" else TinyModelSpec()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp)
        build_tiny_checkpoint(checkpoint / "model", checkpoint / "codec", spec)
        print(f"model {args.model} on {device}, {args.steps} decode steps, median of {args.runs}")
        loops = {"scheduler": EngineOptions(cuda_graphs=False)}
        if device == "cuda":
            loops["scheduler + CUDA graphs"] = EngineOptions(cuda_graphs=True)
        loops["transformers generate()"] = EngineOptions(backend="transformers")
        width = max(len(name) for name in loops)
        rates = {}
        for name, options in loops.items():
            engine = HiggsAudioEngine.load(
                checkpoint / "model", checkpoint / "codec", device=device, options=options
            )
            try:
                figures = measure(engine, args.steps, args.runs)
            finally:
                engine.close()
            print(
                f"  {name:<{width}}: {figures['frames_per_s']:.1f} frames/s, "
                f"real-time factor {figures['real_time_factor']:.2f}, first audio row "
                f"{figures['first_row_s'] * 1000:.0f} ms, wall {figures['wall_s']:.2f} s"
            )
            rates[name] = figures["frames_per_s"]
            del engine
            if device == "cuda":
                torch.cuda.empty_cache()
        reference = rates.pop("transformers generate()")
        for name, rate in rates.items():
            print(f"  {name} / transformers generate(): {rate / reference:.2f}x frames/s")
        if device == "cpu":
            job, bare = handler_overhead(checkpoint, args.steps, args.runs)
            print(
                f"  handler job {job:.3f} s vs bare generate {bare:.3f} s: "
                f"overhead {(job - bare) * 1000:.0f} ms"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
