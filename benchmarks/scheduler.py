"""The scheduler's figures with the tiny model on this machine's CPU, each with its ratio measured in one run.

Through the runpod SDK's production loop (the real ``serverless_handler.py`` against the loopback job queue,
models served by the hub stand-in; latencies are what the platform sees: from a job becoming visible to its
first stream chunk or its result arriving):

- streams      4 concurrent streaming jobs (STREAMING=true, CONCURRENCY=4): each one's first-chunk latency
               against a lone stream's (goal: within 1.5×);
- short-long   a 40-step job submitted while a 1,000-step job runs, against the same job alone (goal: 1.5×);
- mixed        8 mixed jobs at once (lengths 40–240 steps, seeded and unseeded, half with a reference voice):
               aggregate frames/s, against the same 8 submitted one after another (each when the previous
               one's result arrived), and one after another through transformers' ``generate()``
               (GENERATION_BACKEND=transformers); CONCURRENCY=8 throughout; the median of --repeats
               rounds each way, after a warm-up round. The old fixed-batch path is gone
               from the package and is not rebuilt here (see ``FIXED_BATCHES``);
- equal        the same three ways for the issue's own set: 8 sampled jobs of 300 steps each (seeded, so
               every round draws the same codes). Mixed lengths bound what running at once can gain —
               the batch shrinks as the short jobs finish, and the longest job (240 of 1,000 steps) sets
               the wall time — so this is the figure of what batching buys, the mixed one of a real burst.

In this process:

- step         host time per decode step at batch 1 and 8, default sampling and greedy: the scheduler's
               loop against transformers' ``generate()`` on the same loaded model (batch 8: one
               ``generate()`` call over 8 copies of the prompt). A step is timed as the difference
               between runs of two lengths, so prompt prefill and start-up cancel out. With the tiny model
               a step is almost all host overhead; greedy against sampled shows what choosing rows costs.
               Then the ops per step (the profiler's top-level aten ops of one scheduler step, sampled) at
               batch 1 and 8: the host work that must not grow with the batch. Last, a sampled batch-8 step
               alone against the same with the codec decoding audio beside it, as a finished job's thread
               does: in another thread of this process, and in another process, which shares the cores but
               not the GIL.

- sampling     choosing the rows alone (``SlotSampler.next_rows``, default sampling, fixed random logits of
               the real vocabulary) at batch 1 and 8, in CPU time of this process on one thread: what the
               step's sampling costs per row, with the noise of other processes' load taken out.

- reference    a stream's rows while a job with 50 s of reference audio is admitted beside it (the prompt
               encoded beforehand, so that only the admission is timed): the longest pause between two of
               its rows and its longest 12-row chunk interval (the first chunk's size) from the submission
               until the job's first row, against its median pause and interval before, and the job's wait
               for its first row, with the prompt prefilled in paced pieces of 512 tokens (the default) and
               of 128, and in one forward.

- arrivals     a burst of ARRIVALS one-piece prompts (text only, encoded beforehand) submitted at once to an
               idle scheduler: the time from the first submission to each one's first row, the slowest and
               the median, with prompts waiting in the same step prefilled together (``PREFILL_TOGETHER``,
               on by default on a GPU) and each alone (the default on a CPU); the median of --repeats rounds
               each way, interleaved, after a warm-up round.

- compiled     the decode forward alone (``DecodeStep``, masked, over 64 positions) at batch 1 and 8, eager
               and through torch.compile (``COMPILE_STEP``), host time on one thread, the fastest of 9
               runs of 100 forwards each; and how long compiling took. Then the whole step as a CUDA graph
               holds it (``SampledStep``, every warper on, seeded default sampling) with the forward and
               the sampler eager and compiled: host time and top-level ops per step.

    python benchmarks/scheduler.py [--only streams,short-long,mixed,equal,step,sampling,
                                          reference,arrivals,compiled]
                                   [--json PATH]

Other processes on the machine move the absolute figures; the ratios are taken within one run.
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gpu_check import per_step
from boson_multimodal.tiny_model import build_tiny_checkpoint
from tests.conftest import MODEL_REPO, TOKENIZER_REPO, speak
from tests.support.hub_server import HubServer
from tests.support.runpod_queue import JobOutcome, ProductionWorker, RunPodQueue
from tests.support.worker_process import worker_env

PARTS = ("streams", "short-long", "mixed", "equal", "step", "sampling", "reference", "arrivals", "compiled")
IN_PROCESS = ("step", "sampling", "reference", "arrivals", "compiled")
# The old BatchingEngine (b6f9c25:boson_multimodal/batching.py) calls the removed engine.generate_batch.
FIXED_BATCHES = "not measured: the fixed-batch path was removed with the scheduler"
STREAM_STEPS = 200  # long enough that every stream is still generating when the others send their first chunk
SHORT_STEPS, LONG_STEPS = 40, 1000
EQUAL_JOBS, EQUAL_STEPS = 8, 300  # the equal part: the 8 sampled jobs of 300 steps
STEP_LENGTHS = (50, 200)  # decode steps of the two runs whose difference times a step
ARRIVALS = 16  # prompts in the arrivals part's burst


class Figures:
    """Named figures in the order measured, printed as a table at the end (and optionally as JSON)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []  # (part, what, value)
        self.values: dict[str, float | str | list[float]] = {}

    def add(self, part: str, what: str, shown: str, key: str, value: float | str | list[float]) -> None:
        self.rows.append((part, what, shown))
        self.values[key] = value
        print(f"  {what}: {shown}", flush=True)

    def table(self) -> str:
        width = max(len(what) for _, what, _ in self.rows)
        lines, part_now = [], None
        for part, what, shown in self.rows:
            if part != part_now:
                lines.append(f"[{part}]")
                part_now = part
            lines.append(f"  {what:<{width}}  {shown}")
        return "\n".join(lines)


# -- the production loop ------------------------------------------------------------------------------------
class Loop:
    """Workers under the SDK's production loop against one loopback queue, sharing one model volume."""

    def __init__(self, hub_url: str, root: Path, queue: RunPodQueue) -> None:
        self.hub_url, self.root, self.queue = hub_url, root, queue

    def worker(self, name: str, **env: str) -> ProductionWorker:
        settings = worker_env(self.root / "volume", self.hub_url, RESULT_CACHE="off", DEVICE="cpu", **env)
        return ProductionWorker(self.queue, settings, self.root / f"{name}.log")

    @staticmethod
    def settle() -> None:
        """Let the SDK notice that the last job ended before a burst that fills the worker.

        The SDK counts a job as in progress until its result is posted; a burst arriving in that instant is
        taken short (CONCURRENCY − 1 jobs) and the rest only after the SDK's 1 s "queue full" pause — an SDK
        artefact that would swamp what is measured here.
        """
        time.sleep(1.5)

    def run(self, inputs: list[dict]) -> list[JobOutcome]:
        """Enqueue ``inputs`` at once and wait for all; any failure stops the benchmark."""
        outcomes = [self.queue.wait(job_id) for job_id in self.queue.enqueue_many(inputs)]
        failed = [o.error for o in outcomes if o.status != "COMPLETED"]
        if failed:
            raise SystemExit(f"jobs failed: {failed}")
        return outcomes


def stream_job(index: int) -> dict:
    return {"transcript": f"Stream number {index} is speaking now.", "max_new_tokens": STREAM_STEPS}


def worker_first_chunk_s(outcome: JobOutcome) -> float:
    """The worker's own measure: from the job's generation starting to its first chunk being ready."""
    return outcome.stream[-1]["summary"]["timings_ms"]["first_chunk"] / 1000


def measure_streams(loop: Loop, figures: Figures, repeats: int) -> None:
    """A lone stream ``repeats`` times before and after ``repeats`` bursts of 4 (drift in load evens out)."""
    print("streams: STREAMING=true, CONCURRENCY=4", flush=True)
    with loop.worker("streams", STREAMING="true", CONCURRENCY="4"):
        loop.run([stream_job(0)])  # warm-up: download, load, first codec decode
        lone = [loop.run([stream_job(1)])[0] for _ in range(repeats)]
        bursts = []
        for _ in range(repeats):
            loop.settle()
            bursts.append(loop.run([stream_job(i) for i in range(4)]))
        lone += [loop.run([stream_job(1)])[0] for _ in range(repeats)]
    alone = statistics.median(o.first_chunk_s for o in lone)
    alone_worker = statistics.median(worker_first_chunk_s(o) for o in lone)
    figures.add(
        "streams",
        "lone stream, first chunk",
        f"{alone * 1000:.0f} ms (median of {len(lone)}; in the worker {alone_worker * 1000:.0f} ms)",
        "stream_first_chunk_alone_s",
        alone,
    )
    slowest = statistics.median(max(o.first_chunk_s for o in burst) for burst in bursts)
    every = [o.first_chunk_s for burst in bursts for o in burst]
    slowest_worker = statistics.median(max(worker_first_chunk_s(o) for o in burst) for burst in bursts)
    figures.add(
        "streams",
        "4 concurrent streams, first chunk",
        f"slowest {slowest * 1000:.0f} ms, median {statistics.median(every) * 1000:.0f} ms "
        f"({repeats} bursts; slowest in the worker {slowest_worker * 1000:.0f} ms)",
        "stream_first_chunk_concurrent_s",
        sorted(every),
    )
    figures.add(
        "streams",
        "slowest of 4 / lone (goal ≤ 1.5×)",
        f"{slowest / alone:.2f}×",
        "stream_first_chunk_ratio",
        slowest / alone,
    )
    figures.add(
        "streams",
        "same, in the worker",
        f"{slowest_worker / alone_worker:.2f}×",
        "stream_first_chunk_worker_ratio",
        slowest_worker / alone_worker,
    )


def measure_short_beside_long(loop: Loop, figures: Figures, repeats: int) -> None:
    """The short job alone before and after the long one (so drift in the machine's load evens out), and
    ``repeats`` times one after another while the long one runs."""
    print(f"short-long: a {SHORT_STEPS}-step job beside a {LONG_STEPS}-step one, CONCURRENCY=8", flush=True)
    short = {"transcript": "A short one.", "max_new_tokens": SHORT_STEPS}
    with loop.worker("short-long", CONCURRENCY="8"):
        loop.run([short])  # warm-up
        alone = [loop.run([short])[0] for _ in range(repeats)]
        long_id = loop.queue.enqueue({"transcript": "A long one, on and on.", "max_new_tokens": LONG_STEPS})
        time.sleep(1.0)  # taken and prefilled: the long one is generating
        beside = [loop.run([short])[0] for _ in range(repeats)]
        long = loop.queue.wait(long_id)
        alone += [loop.run([short])[0] for _ in range(repeats)]
    if long.status != "COMPLETED":
        raise SystemExit(f"the long job failed: {long.error}")
    overlapped = all(o.done_at < long.done_at for o in beside)

    def medians(outcomes: list[JobOutcome]) -> tuple[float, float]:
        """(latency, the worker's own "generate" timing: decode steps and codec decoding), seconds."""
        generate = [o.output["timings_ms"]["generate"] / 1000 for o in outcomes]
        return statistics.median(o.latency_s for o in outcomes), statistics.median(generate)

    (alone_s, alone_gen), (beside_s, beside_gen) = medians(alone), medians(beside)
    figures.add(
        "short-long",
        f"{SHORT_STEPS}-step job alone",
        f"{alone_s * 1000:.0f} ms (median of {len(alone)}; generate {alone_gen * 1000:.0f} ms)",
        "short_alone_s",
        alone_s,
    )
    figures.add(
        "short-long",
        f"same, while a {LONG_STEPS}-step job runs",
        f"{beside_s * 1000:.0f} ms (median of {repeats}; generate {beside_gen * 1000:.0f} ms; long job "
        f"{long.latency_s:.1f} s{', still running' if overlapped else ', NOT overlapping: check'})",
        "short_beside_long_s",
        beside_s,
    )
    ratio = beside_s / alone_s
    figures.add("short-long", "beside long / alone (goal ≤ 1.5×)", f"{ratio:.2f}×", "short_ratio", ratio)
    figures.add(
        "short-long",
        "same, the worker's generate timing",
        f"{beside_gen / alone_gen:.2f}×",
        "short_generate_ratio",
        beside_gen / alone_gen,
    )


def reference_uri(root: Path) -> str:
    wav = speak("The quick brown fox jumps over the lazy dog.", root / "reference.wav")
    return "data:audio/wav;base64," + base64.b64encode(wav.read_bytes()).decode()


def mixed_jobs(reference: str) -> list[dict]:
    """Eight jobs: lengths 40–240 steps, every other one seeded, every other pair with a reference voice."""
    jobs = []
    for index, steps in enumerate((40, 240, 80, 200, 120, 160, 60, 100)):
        job: dict = {"transcript": f"Mixed job {index}, a sentence to speak.", "max_new_tokens": steps}
        if index % 2 == 0:
            job["seed"] = 100 + index
        if index % 4 < 2:
            job |= {"ref_audio": reference, "ref_text": "The quick brown fox jumps over the lazy dog."}
        jobs.append(job)
    return jobs


def equal_jobs() -> list[dict]:
    """Eight sampled jobs of 300 steps, each with its own seed."""
    return [
        {
            "transcript": f"Equal job {index}, a sentence to speak.",
            "max_new_tokens": EQUAL_STEPS,
            "seed": index,
        }
        for index in range(EQUAL_JOBS)
    ]


def frames_per_second(outcomes: list[JobOutcome]) -> tuple[float, int]:
    """(frames over the wall time from the first job's arrival to the last result, frames)."""
    frames = sum(o.output["num_frames"] for o in outcomes)
    wall = max(o.done_at for o in outcomes) - min(o.enqueued_at for o in outcomes)
    return frames / wall, frames


def measure_burst(loop: Loop, figures: Figures, repeats: int, part: str, jobs: list[dict]) -> None:
    """``repeats`` rounds of the 8 ``jobs`` each way, after a round of each to warm up, the scheduler's two
    ways taking turns: the median of each way with its range, because a single round moves by up to 2×
    here."""
    rates: dict[str, float] = {}

    def together() -> tuple[float, int]:
        loop.settle()
        return frames_per_second(loop.run(jobs))

    def one_at_a_time() -> tuple[float, int]:
        return frames_per_second([loop.run([job])[0] for job in jobs])

    def rounds(ways: dict[str, Callable[[], tuple[float, int]]]) -> dict[str, list[tuple[float, int]]]:
        for measure in ways.values():
            measure()  # warm-up round
        taken: dict[str, list[tuple[float, int]]] = {key: [] for key in ways}
        for _ in range(repeats):
            for key, measure in ways.items():
                taken[key].append(measure())
        return taken

    def add(key: str, label: str, taken: list[tuple[float, int]]) -> None:
        runs = [rate for rate, _ in taken]
        frames = sorted({count for _, count in taken})  # unseeded jobs may end at other steps
        shown = str(frames[0]) if len(frames) == 1 else f"{frames[0]}–{frames[-1]}"
        rates[key] = statistics.median(runs)
        figures.add(
            part,
            f"8 jobs, {label}",
            f"{rates[key]:.0f} frames/s (median of {repeats}, {min(runs):.0f}–{max(runs):.0f}; "
            f"{shown} frames)",
            f"{part}_frames_per_s_{key}",
            runs,
        )

    print(f"{part}: 8 jobs at once and one after another, CONCURRENCY=8, {repeats} rounds", flush=True)
    with loop.worker(f"{part}-scheduler", CONCURRENCY="8"):
        loop.run([jobs[0]])  # the first job: models loaded (and the mixed jobs' reference voice)
        taken = rounds({"together": together, "one_at_a_time": one_at_a_time})
    add("together", "at once (scheduler)", taken["together"])
    add("one_at_a_time", "one after another (scheduler)", taken["one_at_a_time"])
    print(f"{part}: 8 jobs one after another, GENERATION_BACKEND=transformers", flush=True)
    with loop.worker(f"{part}-transformers", CONCURRENCY="8", GENERATION_BACKEND="transformers"):
        loop.run([jobs[0]])
        add("transformers", "one after another (transformers generate())", rounds({"t": one_at_a_time})["t"])
    for key, label in (("one_at_a_time", "one after another"), ("transformers", "transformers one by one")):
        ratio = rates["together"] / rates[key]
        figures.add(part, f"together / {label}", f"{ratio:.2f}×", f"{part}_ratio_vs_{key}", ratio)
    if part == "mixed":
        figures.add(part, "today's fixed batches", FIXED_BATCHES, "mixed_fixed_batches", FIXED_BATCHES)


# -- in-process step time -----------------------------------------------------------------------------------
def seconds_per_step(run: Callable[[int], None], repeats: int) -> float:
    """(fastest ``run(long)`` − fastest ``run(short)``) / (long − short), runs interleaved.

    The fastest rather than the median: other processes on the machine only ever add time to a run.
    """
    times: dict[int, list[float]] = {steps: [] for steps in STEP_LENGTHS}
    run(STEP_LENGTHS[0])  # warm-up
    for _ in range(repeats):
        for steps in STEP_LENGTHS:
            started = time.perf_counter()
            run(steps)
            times[steps].append(time.perf_counter() - started)
    short, long = STEP_LENGTHS
    return (min(times[long]) - min(times[short])) / (long - short)


def measure_step(checkpoint: Path, figures: Figures, repeats: int) -> None:
    import torch

    from boson_multimodal.engine import EngineOptions, HiggsAudioEngine, SamplingConfig, SpeechRequest
    from boson_multimodal.loading import load_model
    from boson_multimodal.reference import generation_config
    from boson_multimodal.scheduler import SchedulerLimits

    print("step: host time per decode step, in this process", flush=True)
    loaded = load_model(checkpoint / "model", checkpoint / "codec", device="cpu")
    options = EngineOptions(limits=SchedulerLimits(slots=8, max_tokens=1024))
    engine = HiggsAudioEngine(loaded, options)
    request = SpeechRequest("Time every decode step of this sentence.")
    prompt = engine._sequence_input(request)  # the processor's inputs, exactly as the engine makes them
    # The default sampling (temperature, top-k, top-p, repetition-aware sampling) and greedy decoding: the
    # difference is what choosing the next rows costs.
    kinds = {"sampled": SamplingConfig(), "greedy": SamplingConfig(temperature=0)}

    def scheduler_run(batch: int, sampling: SamplingConfig) -> Callable[[int], None]:
        def run(steps: int) -> None:
            configs = [replace(sampling, max_new_tokens=steps, seed=seed) for seed in range(batch)]
            handles = [engine.submit(replace(request, sampling=config)) for config in configs]
            for handle in handles:
                handle.result()

        return run

    def transformers_run(batch: int, sampling: SamplingConfig) -> Callable[[int], None]:
        inputs = {
            "input_ids": prompt.input_ids.repeat(batch, 1),
            "attention_mask": prompt.attention_mask.repeat(batch, 1),
        }

        def run(steps: int) -> None:
            config = generation_config(
                loaded.model.generation_config, replace(sampling, max_new_tokens=steps)
            )
            torch.manual_seed(0)
            with torch.inference_mode():
                loaded.model.generate(**inputs, generation_config=config)

        return run

    try:
        for kind, sampling in kinds.items():
            for batch in (1, 8):
                ours = seconds_per_step(scheduler_run(batch, sampling), repeats) * 1000
                theirs = seconds_per_step(transformers_run(batch, sampling), repeats) * 1000
                figures.add(
                    "step",
                    f"{kind}, batch {batch}: scheduler / generate()",
                    f"{ours:.2f} / {theirs:.2f} ms/step = {ours / theirs:.2f}×",
                    f"step_ms_{kind}_batch{batch}",
                    [ours, theirs],
                )
        for batch in (1, 8):
            ops = per_step(engine, batch)["host_ops"]
            figures.add("step", f"ops per step, batch {batch}", str(ops), f"ops_per_step_batch{batch}", ops)
        sampled_batch8 = scheduler_run(8, kinds["sampled"])
        alone = seconds_per_step(sampled_batch8, repeats) * 1000
        beside = {}
        for where in ("thread", "process"):
            with codec_decoding(checkpoint / "codec", where):
                beside[where] = seconds_per_step(sampled_batch8, repeats) * 1000
        alone = min(alone, seconds_per_step(sampled_batch8, repeats) * 1000)  # before and after
        figures.add(
            "step",
            "sampled, batch 8: alone / a codec decoding in another thread / in another process",
            f"{alone:.2f} / {beside['thread']:.2f} / {beside['process']:.2f} ms/step = "
            f"{beside['thread'] / alone:.2f}× / {beside['process'] / alone:.2f}×",
            "step_ms_sampled_batch8_codec_beside",
            [alone, beside["thread"], beside["process"]],
        )
    finally:
        engine.close()


def decode_until(codec_dir: Path, stop: EventType, decodes: Synchronized) -> None:
    """Decode 8 s of codes with the codec in ``codec_dir`` over and over, on one thread as a job's thread
    does, counting them in ``decodes``, until ``stop`` is set."""
    import torch
    from transformers import HiggsAudioV2TokenizerModel

    from boson_multimodal.codes import decode_frames

    torch.set_num_threads(1)
    codec = HiggsAudioV2TokenizerModel.from_pretrained(codec_dir).eval()
    frames = torch.randint(0, codec.config.codebook_size, (200, codec.config.num_quantizers))
    while not stop.is_set():
        decode_frames(codec, frames)
        with decodes.get_lock():
            decodes.value += 1


@contextmanager
def codec_decoding(codec_dir: Path, where: str) -> Iterator[None]:
    """The codec decoding beside the body, in a thread of this process (on the other core, but sharing the
    GIL, which every op of the scheduler's step gives up and takes back) or in another process (sharing only
    the cores): the difference is the GIL's share. Fails unless it decoded all through the body."""
    context = multiprocessing.get_context("spawn")
    stop, decodes = context.Event(), context.Value("i", 0)
    kind = threading.Thread if where == "thread" else context.Process
    worker = kind(target=decode_until, args=(codec_dir, stop, decodes), name=f"codec-{where}")
    worker.start()
    try:
        while decodes.value == 0:  # loaded and decoding
            if not worker.is_alive():
                raise SystemExit(f"the codec {where} stopped before decoding")
            time.sleep(0.05)
        before = decodes.value
        yield
        if decodes.value == before or not worker.is_alive():
            raise SystemExit(f"the codec {where} did not decode all through the measurement")
    finally:
        stop.set()
        worker.join()


def measure_sampling(figures: Figures, steps: int = 50, repeats: int = 9) -> None:
    import torch

    from boson_multimodal.sampling import SamplingConfig, SlotSampler, StreamTokens

    print("sampling: CPU time per step of choosing the rows, one thread", flush=True)
    k, vocab = 8, 1026
    tokens = StreamTokens(
        audio_bos_token=1, audio_delay_token=2, stream_bos=vocab - 2, stream_eos=vocab - 1,
        num_codebooks=k, codebook_size=vocab,
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    costs = {}
    try:
        for batch in (1, 8):
            sampler = SlotSampler(8, tokens, torch.device("cpu"))
            prompt = torch.tensor([7, 8, 9, 10, 11, 12, 13, tokens.audio_bos_token])
            for slot in range(batch):
                sampler.admit(slot, SamplingConfig(seed=slot, max_new_tokens=10**6), prompt, None)
            generator = torch.Generator().manual_seed(0)
            logits = [3 * torch.randn(batch, k, vocab, generator=generator) for _ in range(steps)]
            active = list(range(batch))
            with torch.inference_mode():
                for step in logits[:10]:  # warm-up, and past the delay pattern's opening rows
                    sampler.next_rows(step, 0, active)
                best = float("inf")
                for _ in range(repeats):
                    started = time.process_time()
                    for step in logits:
                        sampler.next_rows(step, 0, active)
                    best = min(best, (time.process_time() - started) / steps)
            costs[batch] = best * 1000
    finally:
        torch.set_num_threads(threads)
    figures.add(
        "sampling",
        "choosing rows, batch 1 / batch 8",
        f"{costs[1]:.2f} / {costs[8]:.2f} ms/step = {costs[8] / costs[1]:.2f}× ({costs[8] / 8:.2f} ms a row)",
        "sampling_ms_batch1_batch8",
        [costs[1], costs[8]],
    )


def measure_reference(checkpoint: Path, figures: Figures, repeats: int) -> None:
    from benchmarks.admission import (
        CHUNK_ROWS,
        REFERENCE_SECONDS,
        long_reference_input,
        short_input,
        stream_beside_admission,
    )
    from boson_multimodal.engine import EngineOptions, HiggsAudioEngine
    from boson_multimodal.loading import load_model
    from boson_multimodal.prefill import PREFILL_PIECE
    from boson_multimodal.scheduler import SchedulerLimits

    print(
        f"reference: a stream's rows while {REFERENCE_SECONDS} s of reference audio is admitted", flush=True
    )
    loaded = load_model(checkpoint / "model", checkpoint / "codec", device="cpu")
    for label, piece in (
        (f"in paced pieces of {PREFILL_PIECE}", PREFILL_PIECE),
        ("in paced pieces of 128", 128),
        ("in one forward", 4096),
    ):
        limits = SchedulerLimits(slots=4, max_tokens=4096, prefill_piece=piece)
        engine = HiggsAudioEngine(loaded, EngineOptions(limits=limits))
        try:
            long_input, short = long_reference_input(engine), short_input(engine)
            # the first run warms up
            runs = [stream_beside_admission(engine, long_input, short) for _ in range(repeats + 1)][1:]
        finally:
            engine.close()
        median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        tokens, key = long_input.prompt_tokens, label.replace(" ", "_")
        pause, stall = median["pause_ms"], median["longest_pause_ms"]
        chunk, worst = median["chunk_ms"], median["longest_chunk_ms"]
        figures.add(
            "reference",
            f"{tokens}-token prompt {label}: longest pause between rows / median",
            f"{stall:.1f} / {pause:.2f} ms = {stall / pause:.1f}×",
            f"reference_pause_ms_{key}",
            [stall, pause],
        )
        figures.add(
            "reference",
            f"{tokens}-token prompt {label}: longest {CHUNK_ROWS}-row chunk interval / median",
            f"{worst:.1f} / {chunk:.1f} ms = {worst / chunk:.2f}×",
            f"reference_chunk_ms_{key}",
            [worst, chunk],
        )
        figures.add(
            "reference",
            f"{tokens}-token prompt {label}: its wait for its first row",
            f"{median['first_row_ms']:.1f} ms",
            f"reference_first_row_ms_{key}",
            median["first_row_ms"],
        )
        figures.add(
            "reference",
            f"{tokens}-token prompt {label}: a short prompt sent just after it, its wait for its first row",
            f"{median['short_first_row_ms']:.1f} ms",
            f"reference_short_first_row_ms_{key}",
            median["short_first_row_ms"],
        )


def measure_arrivals(checkpoint: Path, figures: Figures, repeats: int) -> None:
    from boson_multimodal.engine import EngineOptions, HiggsAudioEngine, SamplingConfig, SpeechRequest
    from boson_multimodal.loading import load_model
    from boson_multimodal.scheduler import SchedulerLimits

    print(f"arrivals: {ARRIVALS} prompts at once, prefilled together and alone, in this process", flush=True)
    loaded = load_model(checkpoint / "model", checkpoint / "codec", device="cpu")
    limits = SchedulerLimits(slots=ARRIVALS, max_tokens=1024)
    engines = {
        way: HiggsAudioEngine(loaded, EngineOptions(limits=limits, prefill_together=together))
        for way, together in (("together", True), ("alone", False))
    }
    sampling = SamplingConfig(seed=0, max_new_tokens=16)
    texts = [
        f"Arrival number {i}, {'with a few more words to say ' * (i % 3)}all at once."
        for i in range(ARRIVALS)
    ]
    prompts = [engines["alone"]._sequence_input(SpeechRequest(text, sampling=sampling)) for text in texts]

    def first_rows(engine: HiggsAudioEngine) -> list[float]:
        started = time.perf_counter()
        handles = [engine._runner.submit(prompt) for prompt in prompts]
        waits = []
        for handle in handles:
            handle.wait_newer(0)
            waits.append(time.perf_counter() - started)
        for handle in handles:
            handle.result()
        return waits

    try:
        for engine in engines.values():
            first_rows(engine)  # warm-up
        rounds: dict[str, list[list[float]]] = {way: [] for way in engines}
        for _ in range(repeats):
            for way, engine in engines.items():
                rounds[way].append(first_rows(engine))
    finally:
        for engine in engines.values():
            engine.close()
    slowest = {way: statistics.median(max(waits) for waits in taken) * 1000 for way, taken in rounds.items()}
    typical = {
        way: statistics.median(statistics.median(waits) for waits in taken) * 1000
        for way, taken in rounds.items()
    }
    tokens = sorted(prompt.prompt_tokens for prompt in prompts)
    figures.add(
        "arrivals",
        f"{ARRIVALS} prompts of {tokens[0]}–{tokens[-1]} tokens at once, first row: slowest / median, "
        "prefilled together vs alone",
        f"{slowest['together']:.0f} / {typical['together']:.0f} ms vs {slowest['alone']:.0f} / "
        f"{typical['alone']:.0f} ms = {slowest['alone'] / slowest['together']:.2f}× / "
        f"{typical['alone'] / typical['together']:.2f}× sooner",
        "arrivals_first_row_ms_together_alone",
        [slowest["together"], typical["together"], slowest["alone"], typical["alone"]],
    )


def measure_compiled(checkpoint: Path, figures: Figures, runs: int = 9, forwards: int = 100) -> None:
    import torch

    from boson_multimodal.decode_step import DecodeStep, SlotCache
    from boson_multimodal.loading import load_model

    print("compiled: the decode forward, eager and through torch.compile, one thread", flush=True)
    model = load_model(checkpoint / "model", checkpoint / "codec", device="cpu").model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cache = SlotCache(model.config, 8, 1024, torch.device("cpu"), torch.float32)
        eager, compiled = DecodeStep(model, cache), DecodeStep(model, cache, compiled=True)
        compile_s = compiled.warm_up()
        with torch.inference_mode():
            for batch in (1, 8):
                rows = torch.zeros(batch, model.config.num_codebooks, dtype=torch.long)
                positions = torch.arange(batch) * 5 + 3
                best = {}
                for name, step in (("eager", eager), ("compiled", compiled)):
                    times = []
                    for _ in range(runs):
                        started = time.perf_counter()
                        for _ in range(forwards):
                            step(rows, positions, 64, True)
                        times.append((time.perf_counter() - started) / forwards * 1000)
                    best[name] = min(times)
                ours, theirs = best["eager"], best["compiled"]
                figures.add(
                    "compiled",
                    f"decode forward, batch {batch}: eager / compiled",
                    f"{ours:.3f} / {theirs:.3f} ms = {ours / theirs:.2f}×",
                    f"forward_ms_batch{batch}",
                    [ours, theirs],
                )
        measure_compiled_step(model, figures, runs, forwards // 2)
    finally:
        torch.set_num_threads(threads)
    figures.add("compiled", "compiling it (every shape family)", f"{compile_s:.1f} s", "compile_s", compile_s)


def measure_compiled_step(model, figures: Figures, runs: int, steps: int) -> None:
    """The step a CUDA graph holds (``needs`` None), eager and with ``COMPILE_STEP`` and graphs (the forward
    and the sampler compiled), on its own samplers, so both choose from the same slots' state."""
    import torch

    from boson_multimodal.decode_step import DecodeStep, SampledStep, SlotCache
    from boson_multimodal.sampling import SamplingConfig, SlotSampler, StreamTokens

    tokens = StreamTokens.from_config(model.config)
    prompt = torch.tensor([7, 8, 9, tokens.audio_bos_token])
    made = {}
    for compiled in (False, True):
        cache = SlotCache(model.config, 8, 1024, torch.device("cpu"), torch.float32)
        sampler = SlotSampler(8, tokens, torch.device("cpu"))
        for slot in range(8):
            sampler.admit(slot, SamplingConfig(seed=slot, max_new_tokens=10**6), prompt, None)
        made[compiled] = SampledStep(DecodeStep(model, cache, compiled=compiled), sampler, compiled=compiled)
    with torch.inference_mode():
        compile_s = made[True].warm_up()
        for batch in (1, 8):
            rows = torch.zeros(batch, model.config.num_codebooks, dtype=torch.long)
            positions = torch.arange(batch) * 5 + 3
            best, ops = {}, {}
            for compiled, step in made.items():
                step(rows, positions, 64, True, None)
                with torch.profiler.profile() as profiler:
                    step(rows, positions, 64, True, None)
                ops[compiled] = sum(1 for e in profiler.events() if e.cpu_parent is None)
                times = []
                for _ in range(runs):
                    started = time.perf_counter()
                    for _ in range(steps):
                        step(rows, positions, 64, True, None)
                    times.append((time.perf_counter() - started) / steps * 1000)
                best[compiled] = min(times)
            figures.add(
                "compiled",
                f"the step a graph holds, batch {batch}: eager / forward and sampler compiled",
                f"{best[False]:.3f} / {best[True]:.3f} ms = {best[False] / best[True]:.2f}×, "
                f"ops {ops[False]} / {ops[True]}",
                f"graph_step_ms_batch{batch}",
                [best[False], best[True], ops[False], ops[True]],
            )
    figures.add("compiled", "compiling that step", f"{compile_s:.1f} s", "graph_step_compile_s", compile_s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="repeats of the timed runs (median), rounds of the mixed and equal jobs",
    )
    parser.add_argument("--step-repeats", type=int, default=5, help="runs of each length in the step part")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    parts = [part.strip() for part in args.only.split(",") if part.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"--only: unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    figures = Figures()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint = root / "checkpoint"
        build_tiny_checkpoint(checkpoint / "model", checkpoint / "codec")
        if "step" in parts:
            measure_step(checkpoint, figures, args.step_repeats)
        if "sampling" in parts:
            measure_sampling(figures)
        if "reference" in parts:
            measure_reference(checkpoint, figures, args.repeats)
        if "arrivals" in parts:
            measure_arrivals(checkpoint, figures, args.repeats)
        if "compiled" in parts:
            measure_compiled(checkpoint, figures)
        loop_parts = [part for part in parts if part not in IN_PROCESS]
        if loop_parts:
            repos = {MODEL_REPO: checkpoint / "model", TOKENIZER_REPO: checkpoint / "codec"}
            with HubServer(repos) as hub, RunPodQueue() as queue:
                loop = Loop(hub.url, root, queue)
                if "streams" in parts:
                    measure_streams(loop, figures, args.repeats)
                if "short-long" in parts:
                    measure_short_beside_long(loop, figures, args.repeats)
                if "mixed" in parts:
                    measure_burst(loop, figures, args.repeats, "mixed", mixed_jobs(reference_uri(loop.root)))
                if "equal" in parts:
                    measure_burst(loop, figures, args.repeats, "equal", equal_jobs())
    print("\ntiny model, CPU (" + ", ".join(parts) + ")\n" + figures.table())
    if args.json:
        args.json.write_text(json.dumps(figures.values, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
