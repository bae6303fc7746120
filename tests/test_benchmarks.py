"""The benchmark scripts run and report: a tiny case on CPU through compare, plus their parsers.

Benchmarks are figures, not tests: nothing here checks a timing, only that the JSON
carries every documented field and that both pipelines wrote a valid output.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile

from benchmarks.bench_inference import report_figures
from benchmarks.bench_published_style import window_starts
from benchmarks.common import (
    ChildRun,
    child_report,
    isotropic_shape,
    scaled_shape,
    synthetic_volume,
)

REPO = Path(__file__).resolve().parent.parent
PIPELINE_KEYS = {
    "ok",
    "device",
    "settings",
    "total_seconds",
    "process_seconds",
    "case_seconds",
    "steps",
    "peak_rss_gib",
    "peak_gpu_allocated_gib",
    "peak_gpu_reserved_gib",
    "peak_gpu_driver_gib",
    "output",
}


def test_compare_runs_both_pipelines_on_a_tiny_cpu_case(tmp_path: Path) -> None:
    work = tmp_path / "work"
    command = [
        sys.executable,
        "-m",
        "benchmarks.compare",
        "--study",
        "1",
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--scale",
        "0.05",
        "--keep",
        str(work),
        "--window",
        "8",
        "--global-size",
        "16",
        "--extra-args",
        "--patch 16 --overlap 0.25 --budget-seconds 0 --no-step1",  # fmc's 224^3 step 1 is slow on 2 cores
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    report = json.loads(done.stdout)

    assert report["study"] == 1
    assert report["shape"] == [11, 37, 43]
    assert report["spacing"] == [1.0, 0.195, 0.195]
    ratio = report["published_style"]["total_seconds"] / report["fmc"]["total_seconds"]
    assert report["ratio_published_over_fmc"] == round(ratio, 3)
    for name in ("fmc", "published_style"):
        result = report[name]
        assert result.keys() >= PIPELINE_KEYS, PIPELINE_KEYS - result.keys()
        assert result["ok"] is True
        assert 0 < result["total_seconds"] <= result["process_seconds"]
        assert result["peak_rss_gib"] > 0.05  # a Python process with torch loaded
        output = Path(result["output"])
        assert output.exists()
        fused = tifffile.imread(output)
        assert fused.shape == tuple(report["shape"])
        assert fused.dtype == np.uint16
    assert {"read", "resample_in", "step2", "resample_out", "write"} <= report["fmc"]["steps"].keys()
    high_water = report["fmc"]["memory_high_water_gib"]
    assert high_water["counter"] == "process RSS"
    marks = list(high_water["after_step"].values())
    assert marks == sorted(marks) and 0.05 < marks[-1] <= report["fmc"]["peak_rss_gib"] + 1e-3
    published = report["published_style"]
    assert {"resize_in", "step1", "step2", "resize_out", "normalize_write"} <= published["steps"].keys()
    assert published["windows"] > 1  # --window 8 on an 18x12x14 grid: the stitching loop really ran


def test_kernel_options_benchmark_compares_every_variant_with_fp32() -> None:
    command = [sys.executable, "-m", "benchmarks.bench_kernels", "--preset", "tiny", "--patch", "16"]
    command += ["--device", "cpu", "--iterations", "1", "--variants", "bf16", "channels_last", "fp16-weights"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    variants = report["variants"]
    assert list(variants) == ["fp32", "bf16", "channels_last", "fp16-weights"]
    assert variants["fp32"]["speedup_vs_fp32"] == 1.0 and variants["fp32"]["max_abs_diff_vs_fp32"] is None
    assert variants["fp16-weights"] == {
        "options": variants["fp16-weights"]["options"],
        "skipped": "needs CUDA",
    }
    assert variants["channels_last"]["max_abs_diff_vs_fp32"] < 1e-4  # same arithmetic, other layout
    assert variants["bf16"]["max_abs_diff_vs_fp32"] > 0  # autocast really changed the arithmetic
    for name in ("fp32", "bf16", "channels_last"):
        row = variants[name]
        assert row["mvoxels_per_second"] > 0 and row["seconds_per_batch"] > 0
    assert report["input_shape"] == [2, 2, 16, 16, 16]


def test_benchmark_fields_come_from_the_run_report() -> None:
    report = {
        "device": "NVIDIA H200",
        "cuda_max_allocated_bytes": 3 * 2**30,
        "cuda_max_reserved_bytes": None,
        "cases": [
            {
                "figures": {
                    "total_seconds": 1.75,
                    "stages": {"read": 0.01, "step2": 1.2, "write": 0.54},
                    "step2_decisions": ["even the cheapest step 2 exceeds the 327.5s left: step 1 only"],
                    "memory_counter": "CUDA allocator",
                    "memory_high_water_gib": {"to_device": 4.25, "step2": 9.12},
                }
            }
        ],
    }
    figures = report_figures(report)
    assert figures == {
        "device_used": "NVIDIA H200",
        "case_seconds": 1.75,
        "steps": {"read": 0.01, "step2": 1.2, "write": 0.54},
        "planner": ["even the cheapest step 2 exceeds the 327.5s left: step 1 only"],
        "memory_high_water_gib": {
            "counter": "CUDA allocator",
            "after_step": {"to_device": 4.25, "step2": 9.12},
        },
        "peak_gpu_allocated_gib": 3.0,
        "peak_gpu_reserved_gib": None,
    }
    assert report_figures({})["steps"] == {} and report_figures({})["case_seconds"] is None


def test_window_starts_cover_the_axis_with_the_last_window_flush() -> None:
    assert window_starts(100, 224, 0.25) == [0]
    assert window_starts(224, 224, 0.25) == [0]
    starts = window_starts(500, 224, 0.25)
    assert starts == [0, 168, 276]
    covered = np.zeros(500, bool)
    for start in starts:
        covered[start : start + 224] = True
    assert covered.all()


def test_case_shapes_and_synthetic_volume() -> None:
    assert scaled_shape((309, 1920, 1920), 0.5) == (154, 960, 960)  # round half to even
    assert isotropic_shape((309, 1920, 1920), (1.01, 0.388, 0.388)) == (520, 1242, 1242)
    volume = synthetic_volume((9, 20, 30), seed=3)
    assert volume.shape == (9, 20, 30) and volume.dtype == np.uint16
    assert volume.std() > 10  # not constant
    assert np.array_equal(volume, synthetic_volume((9, 20, 30), seed=3))
    assert not np.array_equal(volume, synthetic_volume((9, 20, 30), seed=4))


def test_native_output_benchmark_times_both_end_steps(capsys) -> None:
    from benchmarks.bench_native_output import main

    assert main(["--study", "1", "--scale", "0.08", "--repeats", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["seconds"]) == {"round_trip", "native"} and report["native_over_round_trip"] > 0
    assert 0.0 <= report["native_detail_gain"] <= 1.0 and report["shape"] == list(
        scaled_shape((222, 731, 860), 0.08)
    )


def test_a_child_report_orders_the_pipelines_fields_among_the_childs_and_keeps_a_failures_log(tmp_path):
    child = ChildRun(["x"], 1, None, 2.0, 0.5, None, None, stderr="first\nlast")
    report = child_report(child, tmp_path / "absent.tif", {"benchmark": "b"}, {"steps": {}}, {"peak": 1})
    assert list(report)[:7] == [
        "benchmark",
        "ok",
        "timed_out",
        "total_seconds",
        "process_seconds",
        "steps",
        "peak_rss_gib",
    ]
    assert list(report)[7] == "peak"
    assert report["ok"] is False and report["output"] is None and report["log_tail"] == "first\nlast"
    finished = ChildRun(["x"], 0, 1.0, 2.0, 0.5, None, None, stderr="log")
    assert "log_tail" not in child_report(finished, tmp_path, {}, {}, {})
