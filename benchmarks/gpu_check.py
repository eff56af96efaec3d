"""The GPU figures in one prepared command: the real 3B architecture with random bf16 weights, no downloads.

Why random weights: a benchmark GPU machine may have torch and transformers but no internet. Speed depends on
the shapes, not the values, so the model is built from the real geometry (Llama-3.2-3B backbone: 28 layers,
d=3072, 24/8 heads, DualFFN, 8 codebooks × 1026) directly on the GPU. The code rows of the audio head are
scaled up (as in the tiny demo model) so random logits never pick the stream EOS: every clip runs exactly
``--steps`` steps and the figures compare like with like. The codec has the real DAC ratios (960 samples a
frame, 25 frames/s) but a 512-channel decoder (the real one is wider, so the codec's share of the first-chunk
latency is underestimated); the text vocabulary is the tiny byte-level one (decode steps do not read it).

Writes one JSON file, again after every figure (see ``Report``: a run cut off at the machine's time limit
keeps what it measured, and a figure that fails is recorded with its error while the rest go on; exit
status 1 then, and ``complete`` true only when the run ended):

- frames/s and real-time factor (seconds of audio per second) at batch 1, 16 and 64 for transformers'
  ``generate()`` and for the scheduler with and without CUDA graphs;
- first-chunk latency (request to first audio chunk, decoded) for 1 and 16 concurrent streams (prompts
  prefilled together, the GPU default), and the 16 with their prompts prefilled together and each alone
  (``PREFILL_TOGETHER=false``), alternately, so that what the shared prefill buys is read within one figure;
- the start-up captures: how many, how long, buckets that fell back to eager, and whether the replay check
  kept graphs on;
- per decode step of the scheduler at batch 1 and 16: host ops, GPU kernels (copies and memsets aside) and
  blocking host-device synchronisations (``cudaStreamSynchronize`` / ``cudaDeviceSynchronize`` /
  ``cudaEventSynchronize`` calls) under the profiler, and wall time without it; per graph replay: kernels
  and GPU time;
- a stream's rows while a prompt with 50 s of reference audio is admitted beside it
  (``benchmarks/admission.py``): its median and longest pause between rows and 12-row chunk interval, and the
  long job's wait for its first row, prefilled in pieces as the scheduler does it;
- graph-versus-eager agreement: the rows of the same greedy request replayed and through the eager step
  shaped as the replay is (masked over the span bucket: the same kernels, so they must be equal), and as the
  eager scheduler serves it (unmasked over its own span: bf16 kernels of another shape may part the rows);
- the word-timestamp aligner (wav2vec2-base) and the verification recogniser (Whisper large-v3 turbo) on a
  10 s clip, at their real geometries with random weights (``benchmarks/quality_cost.py``);
- peak GPU memory of each scheduler (one engine at a time, as a worker holds one), and the larger;
- with ``--compile-step``, the scheduler's figures with the decode forward (and, graphed, the sampler)
  through ``torch.compile`` (each scheduler's ``start_s`` then includes compiling it, and
  ``compiled_at_end`` and ``sampler_compiled_at_end`` say whether they stayed compiled); ``generate()`` and
  the quality models, which do not use the step, are left to the plain run.

On a GPU machine, first run the tiny geometry on the device (``--tiny --steps 8 --batches 1,2``, under a
minute): it goes through every CUDA path (captures, replays, the profiler, bf16) with the machine's torch
and transformers before the real geometry spends minutes.

It needs nothing but torch, transformers and this repository. To try a newer transformers than the machine
has, bring its wheel and put it first on the path:
``python -m pip install --no-deps --target /tmp/tf transformers-*.whl`` then ``PYTHONPATH=/tmp/tf python …``.

    python benchmarks/gpu_check.py --tiny --steps 8 --batches 1,2 --out "$OUT/tiny.json"   # first, < 1 min
    python benchmarks/gpu_check.py --out "$OUT/gpu_check.json"            # on the GPU machine, ≈ 5 min
    python benchmarks/gpu_check.py --compile-step --out "$OUT/gpu_compiled.json"   # the same, compiled
    python benchmarks/gpu_check.py --tiny --device cpu --out /tmp/x.json   # the same code path, on a CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import transformers
from torch._dynamo.utils import counters

from benchmarks.admission import long_reference_input, short_input, stream_beside_admission
from benchmarks.quality_cost import quality_models_on_clip
from boson_multimodal.decode_step import SampledStep, span_buckets
from boson_multimodal.engine import EngineOptions, HiggsAudioEngine, SamplingConfig, SpeechRequest
from boson_multimodal.loading import LoadedModel, build_processor
from boson_multimodal.prompt import CHAT_TEMPLATE
from boson_multimodal.reference import generation_config
from boson_multimodal.sampling import StepNeeds
from boson_multimodal.scheduler import Scheduler, SchedulerLimits, SequenceHandle
from boson_multimodal.streaming import ChunkSchedule, stream_speech
from boson_multimodal.tiny_model import TinyModelSpec, build_codec, build_model, build_text_tokenizer

REAL = TinyModelSpec(
    hidden_size=3072, num_layers=28, num_heads=24, num_kv_heads=8, intermediate_size=8192, codec_hidden=64
)
FRAME_RATE = 25
SCHEDULERS = ("scheduler_eager", "scheduler_cuda_graphs")
TEXT = "The quick brown fox jumps over the lazy dog, and then it runs far away into the quiet forest."


def build(spec: TinyModelSpec, device: torch.device) -> LoadedModel:
    """The model and codec made on the device in their serving precision, wrapped like ``load_model``."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = build_text_tokenizer()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = build_model(spec, tokenizer).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.ras_win_len = None  # as load_model: sampling settings come per request
    model.generation_config.ras_win_max_num_repeat = None
    with torch.device(device):
        codec = build_codec(spec).eval()
    processor = build_processor(tokenizer, codec, CHAT_TEMPLATE)
    return LoadedModel(model=model, processor=processor, device=device, dtype=dtype)


def request(steps: int, index: int = 0) -> SpeechRequest:
    # Sampling with a seed: the realistic path (temperature, top-k, top-p, RAS), and the same work each run.
    return SpeechRequest(TEXT, sampling=SamplingConfig(max_new_tokens=steps, seed=index))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_throughput(loaded: LoadedModel, batch: int, steps: int) -> dict:
    """transformers' ``generate()`` on a batch of identical prompts (no padding), sampling as we do."""
    engine = HiggsAudioEngine(loaded, EngineOptions(backend="transformers"))
    try:
        sequence = engine._sequence_input(request(steps)).to(loaded.device)
    finally:
        engine.close()
    config = generation_config(loaded.model.generation_config, sequence.sampling)
    inputs = {
        "input_ids": sequence.input_ids.repeat(batch, 1),
        "attention_mask": sequence.attention_mask.repeat(batch, 1),
    }

    def run() -> float:
        sync(loaded.device)
        started = time.perf_counter()
        with torch.inference_mode():
            loaded.model.generate(**inputs, generation_config=config)
        sync(loaded.device)
        return time.perf_counter() - started

    run()  # warm-up
    return rates(batch * steps, statistics.median(run() for _ in range(2)))


def scheduler_throughput(engine: HiggsAudioEngine, batch: int, steps: int) -> dict:
    """``batch`` sequences submitted at once to the running scheduler; wall time until the last is done."""

    def run() -> float:
        started = time.perf_counter()
        handles = [engine.submit(request(steps, i)) for i in range(batch)]
        for handle in handles:
            handle.result()
        return time.perf_counter() - started

    run()  # warm-up: captures this batch's CUDA graphs
    return rates(batch * steps, statistics.median(run() for _ in range(2)))


def rates(rows: int, seconds: float) -> dict:
    """A row per sequence per step is one 40 ms frame (the 8-step codebook delay aside)."""
    return {
        "seconds": round(seconds, 3),
        "frames_per_s": round(rows / seconds, 1),
        "real_time_factor": round(rows / seconds / FRAME_RATE, 2),
    }


def first_chunk_latency(engine: HiggsAudioEngine, streams: int, steps: int) -> dict:
    """Request to first decoded chunk for ``streams`` streams started together (default chunk schedule)."""

    def one(index: int, out: list, errors: list) -> None:
        try:
            started = time.perf_counter()
            chunks = stream_speech(engine, request(steps, index), ChunkSchedule())
            next(chunks)
            out[index] = time.perf_counter() - started
            chunks.close()
        except Exception as error:  # raised again below: a stream that failed has no latency
            errors.append(error)

    def run() -> list[float]:
        out = [0.0] * streams
        errors: list[Exception] = []
        threads = [threading.Thread(target=one, args=(i, out, errors)) for i in range(streams)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return out

    run()  # warm-up
    latencies = run()
    return {
        "mean_ms": round(1000 * statistics.mean(latencies), 1),
        "max_ms": round(1000 * max(latencies), 1),
    }


def prefill_both_ways(engine: HiggsAudioEngine, streams: int, steps: int) -> dict:
    """``first_chunk_latency`` of the same burst with its prompts prefilled together and each alone, the
    medians of two runs each way, in the order together, alone, alone, together: neither way is always the
    one measured on a warmer engine."""
    runner = engine._runner
    assert isinstance(runner, Scheduler)
    default = runner.prefill_together
    taken: dict[bool, list[dict]] = {True: [], False: []}
    try:
        for together in (True, False, False, True):
            runner.prefill_together = together
            taken[together].append(first_chunk_latency(engine, streams, steps))
    finally:
        runner.prefill_together = default
    return {
        way: {key: round(statistics.median(run[key] for run in runs), 1) for key in ("mean_ms", "max_ms")}
        for way, runs in (("together", taken[True]), ("alone", taken[False]))
    }


SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def per_step(engine: HiggsAudioEngine, batch: int, steps: int = 20) -> dict:
    """One decode step of the scheduler (``_advance``: forward, sampling, publishing): its ops, kernels and
    syncs under the profiler, and its time from as many steps again without it (the profiler's tracking of
    each launch would add to it). Kernels are the GPU's own: copies and memsets are not counted.

    The profiler records the thread that starts it, so the steps run here, on this thread, with the
    scheduler's own stream and inference mode, while the scheduler thread waits idle for submissions (it
    owns nothing then: every earlier sequence has finished).
    """
    runner = idle_scheduler(engine)
    cuda = runner.device.type == "cuda"
    stream = torch.cuda.stream(runner._stream) if cuda else nullcontext()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with stream, torch.inference_mode():
        try:
            for index in range(batch):
                runner._admit(engine._sequence_input(request(2 * steps + 40, index)), SequenceHandle())
            runner._advance()  # warm-up
            sync(runner.device)
            with torch.profiler.profile(activities=activities) as profiler:
                for _ in range(steps):
                    runner._advance()
                sync(runner.device)
            started = time.perf_counter()
            for _ in range(steps):
                runner._advance()
            sync(runner.device)
            seconds = time.perf_counter() - started
        finally:  # a failed figure leaves no sequence behind to run beside the next ones
            for slot in list(runner._active):
                runner._free(slot)
    events = profiler.events()
    return {
        "host_ops": round(
            sum(1 for e in events if e.name.startswith("aten::") and e.cpu_parent is None) / steps
        ),
        "gpu_kernels": round(sum(1 for e in events if is_kernel(e)) / steps),
        "blocking_syncs": round(sum(1 for e in events if e.name in SYNCS) / steps, 2),
        "ms": round(1000 * seconds / steps, 3),
    }


def idle_scheduler(engine: HiggsAudioEngine) -> Scheduler:
    """The engine's scheduler once its thread has retired the last sequence and waits for submissions (it
    owns nothing then), so that a figure may drive or change it from this thread."""
    runner = engine._runner
    assert isinstance(runner, Scheduler)
    time.sleep(0.2)  # let the scheduler thread retire the last sequence and block on its queue
    assert not runner._active and not runner._admissions
    return runner


def is_kernel(event) -> bool:
    """A profiler event that is a kernel on the GPU (not a copy or a memset, which it lists beside them)."""
    return event.device_type == torch.autograd.DeviceType.CUDA and not event.name.startswith(
        ("Memcpy", "Memset")
    )


def per_replay(engine: HiggsAudioEngine, batch: int, replays: int = 20) -> dict:
    """Kernels and GPU time of one replay of the captured step (forward, sampling, state update) for ``batch``
    rows (the smallest span), between jobs: a replay advances the state of the slots it covers."""
    runner = engine._runner
    assert isinstance(runner, Scheduler) and runner._graphed is not None
    graphed = runner._graphed
    bucket = next(b for b in graphed.batch_buckets if b >= batch)
    replay = graphed._graphs.get((bucket, graphed.span_buckets[0]))
    if replay is None:
        return {"captured": False}
    with torch.cuda.stream(runner._stream):
        replay()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
            for _ in range(replays):
                replay()
            torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            replay()
        end.record()
        torch.cuda.synchronize()
    kernels = sum(1 for e in profiler.events() if is_kernel(e))
    return {
        "batch_bucket": bucket,
        "kernels": round(kernels / replays),
        "ms": round(start.elapsed_time(end) / replays, 3),
    }


def captures(engine: HiggsAudioEngine) -> dict:
    runner = engine._runner
    assert isinstance(runner, Scheduler) and runner._graphed is not None
    graphed = runner._graphed
    return {
        "count": len(graphed._graphs),
        "seconds": round(graphed.capture_seconds, 2),
        "eager_buckets": sorted(graphed.eager_buckets),
        "graphs_on_after_check": graphed.enabled,
    }


def long_reference(engine: HiggsAudioEngine) -> dict:
    """A stream while a 50 s reference prompt is admitted, with a short prompt sent just after it."""
    return stream_beside_admission(engine, long_reference_input(engine), short_input(engine))


class ShapedAsReplayed(SampledStep):
    """The eager step with the shapes a graph replay has for a batch that is itself a bucket (one sequence in
    slot 0, here): masked, over the span bucket, every warper on. ``steps`` counts the steps it shaped."""

    def __init__(self, step: SampledStep, max_tokens: int) -> None:
        super().__init__(step.forward, step.sampler)
        self._buckets = span_buckets(max_tokens)
        self.steps = 0

    def __call__(self, rows, positions, span: int, masked: bool, needs: StepNeeds | None) -> torch.Tensor:
        self.steps += 1
        return super().__call__(rows, positions, next(b for b in self._buckets if b >= span), True, None)


def greedy_result_rows(engine: HiggsAudioEngine, greedy: SpeechRequest, way: str) -> tuple[torch.Tensor, int]:
    """The rows of a greedy request, and how many of its steps ran the way asked: ``replayed`` from the
    graphs (a bucket left eager, or graphs switched off, runs none); ``like_replay``, the eager step shaped as
    a graph replays it, so that graph and eager run the same kernels and must agree exactly; ``served``, as
    the eager scheduler runs a lone sequence, unmasked over its own span, where bf16 kernels of another shape
    may flip a near-tie and the rows part from there on."""
    runner = idle_scheduler(engine)  # so its step can be swapped: nothing runs until the submission
    served, steps, graphed = runner._step, runner.steps, runner._graphed
    replays = graphed.replays if graphed is not None else 0
    shaped = None
    if way == "like_replay":
        assert isinstance(served, SampledStep)
        runner._step = shaped = ShapedAsReplayed(served, runner.limits.max_tokens)
    try:
        rows = engine.submit(greedy).result().rows
    finally:
        runner._step = served
    if way == "replayed":
        assert graphed is not None, "replayed rows need an engine with CUDA graphs"
        return rows, graphed.replays - replays
    return rows, shaped.steps if shaped is not None else runner.steps - steps


def agreement(one: tuple[torch.Tensor, int], other: tuple[torch.Tensor, int]) -> dict:
    """Two greedy runs' rows compared, with how many of each run's steps ran the way asked."""
    (first, first_steps), (second, second_steps) = one, other
    same = min(first.shape[0], second.shape[0])
    return {
        "steps_each_way": [first_steps, second_steps],
        "rows": [int(first.shape[0]), int(second.shape[0])],
        "equal": bool(torch.equal(first, second)),
        "first_differing_row": next((i for i in range(same) if not torch.equal(first[i], second[i])), None),
    }


class Report:
    """The JSON file, written again after every figure (to a temporary file, then renamed over it).

    Why: the GPU machine is lent for minutes and a run may be cut off at its time limit, or one figure may
    fail on a machine this script has never run on. Every figure measured so far is then still in the file,
    a failed one as ``{"error": ...}`` with its name in ``failed``, and the run goes on to the next (the
    exit status is 1 when any failed); ``complete`` turns true only at the end.
    """

    def __init__(self, path: Path, head: dict) -> None:
        self.path = path
        self.data: dict = {**head, "complete": False, "failed": []}
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.data, indent=2) + "\n")
        partial.replace(self.path)

    def attempt(self, where: dict, key: str, label: str, make: Callable[..., Any], *args, **kwargs) -> Any:
        """``make(*args, **kwargs)``; when it raises, None, with the error saved as ``where[key]``."""
        try:
            return make(*args, **kwargs)
        except Exception as error:
            traceback.print_exc()
            where[key] = {"error": f"{type(error).__name__}: {error}"}
            self.data["failed"].append(label)
            self.save()
            return None

    def measure(self, where: dict, key: str, label: str, figure: Callable[..., Any], *args, **kwargs) -> Any:
        """``where[key] = figure(*args, **kwargs)``, saved and printed (or its error, see ``attempt``)."""
        value = self.attempt(where, key, label, figure, *args, **kwargs)
        if value is not None:
            where[key] = value
            self.save()
        print(label, json.dumps(where.get(key)), flush=True)
        return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where the JSON file goes")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny demo geometry (a check of the script)")
    parser.add_argument("--steps", type=int, default=None, help="decode steps per sequence")
    parser.add_argument("--batches", default="1,16,64", help="the first two also time a step and first audio")
    parser.add_argument(
        "--compile-step", action="store_true", help="the scheduler's decode step through torch.compile"
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --tiny --device cpu to check the script")
    steps = args.steps or (40 if args.tiny else 250)
    batches = [int(b) for b in args.batches.split(",")]
    report = Report(
        args.out,
        {
            "model": "tiny" if args.tiny else "real 3B geometry, random bf16 weights",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "steps_per_sequence": steps,
            "compile_step": args.compile_step,
        },
    )
    data = report.data
    started = time.perf_counter()
    loaded = build(TinyModelSpec() if args.tiny else REAL, device)
    data["build_s"] = round(time.perf_counter() - started, 1)
    report.save()

    if not args.compile_step:  # generate() does not use the scheduler's step: the plain run has it
        data["generate"] = {}
        for batch in batches:
            label = f"generate batch {batch}"
            report.measure(
                data["generate"], f"batch_{batch}", label, generate_throughput, loaded, batch, steps
            )
    # room for the 50 s reference prompt (about 1,400 tokens) beside the decode figures' sequences, and at
    # least three slots: a stream, the long prompt and a short one admitted between its pieces
    limits = SchedulerLimits(slots=max(*batches, 3), max_tokens=steps + 2048)
    graph_modes = [False, True] if device.type == "cuda" else [False]
    small = batches[:2]
    greedy = SpeechRequest(TEXT, sampling=SamplingConfig(temperature=0, max_new_tokens=steps))
    greedy_rows: dict[str, tuple[torch.Tensor, int]] = {}  # see greedy_result_rows
    for graphs in graph_modes:
        name = SCHEDULERS[graphs]
        options = EngineOptions(limits=limits, cuda_graphs=graphs, compile_step=args.compile_step)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started_engine = time.perf_counter()
        engine = report.attempt(data, name, f"{name} start", HiggsAudioEngine, loaded, options)
        if engine is None:
            continue
        figures: dict = {"start_s": round(time.perf_counter() - started_engine, 1)}
        data[name] = figures
        compiled_graphs = counters["stats"]["unique_graphs"]  # the warm-up is over: serving compiles none
        try:
            if graphs:
                report.measure(figures, "captures", f"{name} captures", captures, engine)
            for b in batches:
                report.measure(
                    figures, f"batch_{b}", f"{name} batch {b}", scheduler_throughput, engine, b, steps
                )
            latency: dict = {}
            step: dict = {}
            figures["first_chunk"], figures["per_step"] = latency, step
            latency["prefill_together"] = engine._runner.prefill_together
            for n in small:
                label = f"{name} first chunk, {n} streams"
                report.measure(latency, f"streams_{n}", label, first_chunk_latency, engine, n, steps)
            if (graphs or device.type != "cuda") and max(small) > 1:  # the same burst, each prompt alone
                n, label = max(small), f"{name} first chunk, {max(small)} streams, prefilled both ways"
                report.measure(latency, f"streams_{n}_prefill", label, prefill_both_ways, engine, n, steps)
            for b in small:
                report.measure(step, f"batch_{b}", f"{name} per step, batch {b}", per_step, engine, b)
            if graphs:
                replay: dict = {}
                figures["per_replay"] = replay
                for b in small:
                    report.measure(replay, f"batch_{b}", f"{name} replay, batch {b}", per_replay, engine, b)
            if graphs or device.type != "cuda":
                report.measure(figures, "long_reference", f"{name} long reference", long_reference, engine)
            ways = ["replayed"] if graphs else ["served", "like_replay"]
            for way in ways:
                label = f"{name} greedy rows, {way}"
                rows = report.attempt(
                    figures, f"greedy_{way}", label, greedy_result_rows, engine, greedy, way
                )
                if rows is not None:
                    greedy_rows[way] = rows
            if args.compile_step:  # a compiler that failed leaves the step eager, with a warning only
                figures["compiled_at_end"] = engine._runner._forward.compiled
                figures["compiles_while_serving"] = counters["stats"]["unique_graphs"] - compiled_graphs
                if not figures["compiled_at_end"]:
                    data["failed"].append(f"{name} compiled step (compiling failed: eager figures)")
                if graphs:
                    figures["sampler_compiled_at_end"] = engine._runner._sampled_step.compiled
                    if not figures["sampler_compiled_at_end"]:
                        data["failed"].append(f"{name} compiled sampler (compiling failed: eager sampler)")
            if device.type == "cuda":
                figures["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
            report.save()
        finally:
            engine.close()
            del engine  # its KV cache, before the next engine allocates its own
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    comparisons = {  # (rows, against rows): the second two only where graphs ran
        "eager_like_replay_vs_served": ("like_replay", "served"),
        "graph_vs_eager_greedy": ("like_replay", "replayed"),
        "graph_vs_eager_greedy_as_served": ("served", "replayed"),
    }
    for key, (one, other) in comparisons.items():
        if one in greedy_rows and other in greedy_rows:
            data[key] = agreement(greedy_rows[one], greedy_rows[other])
    report.save()
    if not args.compile_step:  # nor do the aligner and the recogniser
        label = "quality models"
        report.measure(data, "quality_models", label, quality_models_on_clip, str(device), 3, tiny=args.tiny)
    if device.type == "cuda":
        peaks = [
            data[name]["peak_gpu_memory_gb"]
            for name in SCHEDULERS
            if "peak_gpu_memory_gb" in data.get(name, {})
        ]
        data["peak_gpu_memory_gb"] = max(peaks, default=None)  # one engine at a time, as a worker runs
    data["total_s"] = round(time.perf_counter() - started, 1)
    data["complete"] = True
    report.save()
    print(json.dumps(data, indent=2))
    return 1 if data["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
