"""The GPU check runs its whole path on a CPU with the tiny geometry and writes every figure it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_check import Report

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_check_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    command = [sys.executable, "benchmarks/gpu_check.py", "--tiny", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(
        [*command, "--steps", "16", "--batches", "1,2"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["complete"] is True and report["failed"] == []
    assert report["steps_per_sequence"] == 16
    for name in ("generate", "scheduler_eager"):
        for batch in ("batch_1", "batch_2"):
            figures = report[name][batch]
            assert figures["frames_per_s"] > 0
            assert figures["real_time_factor"] == pytest.approx(figures["frames_per_s"] / 25, rel=0.02)
    first_chunk = report["scheduler_eager"]["first_chunk"]
    assert first_chunk["prefill_together"] is False  # a CPU's default
    both_ways = first_chunk["streams_2_prefill"]
    assert set(both_ways) == {"together", "alone"}
    latencies = [first_chunk["streams_1"], first_chunk["streams_2"], *both_ways.values()]
    for latency in latencies:
        assert 0 < latency["mean_ms"] <= latency["max_ms"]
    for batch in ("batch_1", "batch_2"):
        step = report["scheduler_eager"]["per_step"][batch]
        assert step["host_ops"] > 0 and step["ms"] > 0
        assert step["gpu_kernels"] == 0 and step["blocking_syncs"] == 0  # a CPU has neither
    admission = report["scheduler_eager"]["long_reference"]
    assert admission["prompt_tokens"] > 1250  # 50 s of reference audio at 25 frames/s, and the text
    assert 0 < admission["pause_ms"] <= admission["longest_pause_ms"]
    assert admission["chunk_ms"] > 0 and admission["first_row_ms"] > 0
    assert 0 < admission["short_first_row_ms"] < admission["first_row_ms"]  # it did not wait for the pieces
    assert "scheduler_cuda_graphs" not in report and "graph_vs_eager_greedy" not in report  # only on CUDA
    # the eager step shaped as a replay (masked over the span bucket) chooses the rows it serves
    shaped = report["eager_like_replay_vs_served"]
    assert shaped["rows"] == [16, 16] and shaped["equal"] and shaped["first_differing_row"] is None
    assert min(shaped["steps_each_way"]) >= 15  # the prefill chose the first row, the steps the rest
    quality = report["quality_models"]
    assert quality["geometry"] == "tiny" and quality["clip_s"] == 10
    assert quality["align_ms"] > 0 and quality["transcribe_ms"] > 0 and quality["recogniser_tokens"] == 116


def test_the_gpu_check_compiles_the_step_when_asked(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    command = [sys.executable, "benchmarks/gpu_check.py", "--tiny", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(
        [*command, "--compile-step", "--steps", "8", "--batches", "1,2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["compile_step"] is True and report["complete"] is True and report["failed"] == []
    assert "compiling the decode step failed" not in done.stderr
    assert report["scheduler_eager"]["compiled_at_end"] is True
    assert report["scheduler_eager"]["compiles_while_serving"] == 0
    assert "generate" not in report and "quality_models" not in report  # they do not use the step
    assert (
        report["scheduler_eager"]["start_s"] > 0 and report["scheduler_eager"]["batch_2"]["frames_per_s"] > 0
    )


def test_a_figure_that_fails_is_recorded_and_the_rest_still_measured(tmp_path: Path) -> None:
    """A GPU run is one short try: each figure is in the file as soon as it is measured, and one that raises
    leaves its error there, not a lost run."""
    out = tmp_path / "gpu.json"
    report = Report(out, {"device": "test"})
    assert json.loads(out.read_text()) == {"device": "test", "complete": False, "failed": []}

    def broken(batch: int) -> dict:
        raise RuntimeError(f"no kernel for batch {batch}")

    figures: dict = {}
    report.data["scheduler"] = figures
    assert report.measure(figures, "batch_1", "scheduler batch 1", broken, 1) is None
    assert report.measure(figures, "batch_2", "scheduler batch 2", lambda batch: {"fps": batch}, 2) == {
        "fps": 2
    }
    saved = json.loads(out.read_text())
    assert saved["scheduler"] == {
        "batch_1": {"error": "RuntimeError: no kernel for batch 1"},
        "batch_2": {"fps": 2},
    }
    assert saved["failed"] == ["scheduler batch 1"] and saved["complete"] is False
    assert not list(tmp_path.glob("*.partial"))  # written beside, then renamed over
