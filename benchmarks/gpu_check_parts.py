"""The seven parts of the GPU check, each a function of (settings, its report) that returns ok.

Why the parts reuse the benchmarks (``bench_inference``, ``compare``, ``bench_kernels``), the
suite's CUDA tests (``benchmarks.cuda_tests`` selects them) and ``train.py fit``: nothing is
measured a second way here. The study-5 case is ``benchmarks.common.synthetic_volume`` written
with ``fmc.simulated_tiff.write_volume``, not the physics simulator. Neither SimpleITK nor
imagecodecs is needed (the GPU image has neither).
"""

from __future__ import annotations

import contextlib
import filecmp
import io
import json
import logging
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.common import GIB, REPO, DriverMemoryPoller
from benchmarks.cuda_agreement import TOLERANCES
from benchmarks.gpu_check_plan import PARTS_BY_NUMBER, Settings
from benchmarks.gpu_check_report import (
    PartReport,
    compare_volumes,
    load_part,
    parse_junit,
    step2_differences,
)

log = logging.getLogger("gpu_check")

#: docs/performance.md, Anchors: the study-5 targets on an H100-class GPU.
TARGET_SECONDS = 20.0
TARGET_GPU_GIB = 12.0
TARGET_RSS_GIB = 8.0
#: Where bench_inference has inference.py write its run report, inside its ``--keep`` folder.
FMC_REPORT_NAME = "fmc_report.json"
#: bench_kernels variants: the eager options plus torch.compile once, in its default mode
#: (the cheapest that fuses GroupNorm / LeakyReLU; max-autotune compiled for 521 s), at the
#: default CUDA precision.
KERNEL_VARIANTS = (
    "fp32",
    "bf16",
    "fp16",
    "fp16-weights",
    "channels_last",
    "fp16-weights+channels_last",
    "fp16-weights+cudnn_benchmark",
    "fp16-weights+compile",
)
#: Generator steps per stage: ~40 s each on an H200 at the rates guessed from docs/performance.md, Anchors.
TRAINING_STEPS = {1: 160, 2: 160}


def run_benchmark(main: Callable[[list[str]], int], argv: list[str]) -> dict:
    """Run a benchmark's ``main`` in this process and return the JSON it prints (plus its exit code)."""
    log.info("benchmark argv: %s", shlex.join(argv))
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(argv)
    report = json.loads(buffer.getvalue())
    report["exit_code"] = code
    return report


# --------------------------------------------------------------------------------------------
# Part 1: the CUDA tests, and inference.py on CUDA against the CPU


def run_cuda_tests(settings: Settings) -> dict:
    """The suite's CUDA tests only (benchmarks.cuda_tests selects them), in a pytest child."""
    from benchmarks.cuda_tests import candidate_files

    junit = settings.work / "cuda_tests.xml"
    files = [str(path.relative_to(REPO)) for path in candidate_files(REPO / "tests")]
    command = [sys.executable, "-m", "pytest", "-p", "benchmarks.cuda_tests", "-p", "no:cacheprovider"]
    command += ["-q", "-rfEs", f"--junitxml={junit}", *files]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    log.info("pytest (CUDA tests) output:\n%s%s", done.stdout, done.stderr)
    result = {
        "command": shlex.join(command),
        "returncode": done.returncode,
        "seconds": round(time.perf_counter() - start, 3),
        **parse_junit(junit),
    }
    # 0: all passed; 5: nothing collected (no CUDA test left in the suite: worth knowing, not a failure)
    result["ok"] = done.returncode in (0, 5) and result["failed"] == 0 and result["errors"] == 0
    if not result["ok"]:
        result["output_tail"] = "\n".join(done.stdout.splitlines()[-40:])
    return result


def pipeline_agreement(settings: Settings) -> dict:
    """inference.py on the device against the CPU: same case, same (default, trained) weights.

    The default weights rather than random ones, so the output has real structure for the
    comparison to see. The planner is off (``--budget-seconds 0``) so both devices run the same
    step-2 setting; the tolerance per precision is :data:`benchmarks.cuda_agreement.TOLERANCES`.
    """
    from benchmarks.bench_inference import run_fmc
    from benchmarks.common import prepare_case

    scale = 0.1 if settings.quick else 0.4
    prepared = prepare_case(settings.work / "agreement", 1, "tiny", scale, seed=0)
    shutil.rmtree(prepared.weights_dir)
    shutil.copytree(REPO / "resources" / "weights", prepared.weights_dir)
    runs = [("cpu", "cpu", "auto"), (f"{settings.device}-default", settings.device, "auto")]
    if not settings.quick:
        runs.append((f"{settings.device}-fp32", settings.device, "fp32"))
    result: dict[str, Any] = {"case": prepared.describe(), "weights": "resources/weights (default)"}
    outputs: dict[str, Path] = {}
    precisions: dict[str, str] = {}
    for label, device, precision in runs:
        report = run_fmc(prepared, device, ["--budget-seconds", "0", "--precision", precision])
        if report["output"]:
            kept = prepared.workdir / f"{label}.tif"
            Path(report["output"]).replace(kept)
            outputs[label], precisions[label] = kept, precision
        result[label] = {key: report.get(key) for key in ("ok", "device", "total_seconds", "steps")}
        if not report["ok"]:
            result[label]["log_tail"] = report.get("log_tail")
    checks = []
    for label, path in outputs.items():
        if label == "cpu" or "cpu" not in outputs:
            continue
        comparison = compare_volumes(outputs["cpu"], path)
        tolerance = TOLERANCES[precisions[label]]
        comparison["tolerance"] = asdict(tolerance)
        comparison["within_tolerance"] = bool(comparison.get("same_shape") and tolerance.admits(comparison))
        result[label]["vs_cpu"] = comparison
        checks.append(comparison["within_tolerance"])
    result["ok"] = len(outputs) == len(runs) and all(checks)
    return result


def part_cuda_tests(settings: Settings, report: PartReport) -> bool:
    tests = run_cuda_tests(settings)
    report.set("tests", tests)
    agreement = pipeline_agreement(settings)
    report.set("pipeline_vs_cpu", agreement)
    return bool(tests["ok"] and agreement["ok"])


# --------------------------------------------------------------------------------------------
# Parts 2, 3, 7: study 5 through bench_inference


def study5_argv(settings: Settings, extra: list[str]) -> list[str]:
    """bench_inference flags for the study-5 case shared by parts 2, 3 and 7 (made once, reused)."""
    scale = 0.05 if settings.quick else 1.0
    inference_args = [*settings.quick_inference_args, *extra]
    return [
        "--study", "5",
        "--preset", settings.case_preset,
        "--device", settings.device,
        "--scale", str(scale),
        "--keep", str(settings.work / "study5"),
        "--extra-args", shlex.join(inference_args),
    ]  # fmt: skip


def run_study5(settings: Settings, extra: list[str], keep_as: str) -> dict:
    """One bench_inference run on the study-5 case, with what step 2 did (``step2``, from the run
    report); its output is renamed ``keep_as`` to outlive the next run."""
    from benchmarks import bench_inference

    result = run_benchmark(bench_inference.main, study5_argv(settings, extra))
    cases = bench_inference.read_report(settings.work / "study5" / FMC_REPORT_NAME).get("cases") or [{}]
    result["step2"] = (cases[-1].get("figures") or {}).get("step2")
    if result.get("output"):
        kept = settings.work / "study5" / keep_as
        Path(result["output"]).replace(kept)
        result["output"] = str(kept)
    return result


def against_targets(result: dict) -> dict:
    """docs/performance.md, Anchors's study-5 targets, each with the figure it was judged on."""
    gpu = result.get("peak_gpu_reserved_gib")
    driver = result.get("peak_gpu_driver_gib")
    total = result.get("total_seconds")
    return {
        "total_seconds_le_20": None if total is None else total <= TARGET_SECONDS,
        "peak_gpu_reserved_le_12_gib": None if gpu is None else gpu <= TARGET_GPU_GIB,
        "peak_gpu_driver_le_12_gib": None if driver is None else driver <= TARGET_GPU_GIB,
        "peak_rss_le_8_gib": result.get("peak_rss_gib", 99) <= TARGET_RSS_GIB,
    }


def part_study5(settings: Settings, report: PartReport) -> bool:
    result = run_study5(settings, [], "free.tif")
    report.set("result", result)
    report.set("targets", against_targets(result))
    return bool(result.get("ok"))


def part_study5_cap15(settings: Settings, report: PartReport) -> bool:
    result = run_study5(settings, ["--gpu-memory-gib", "15"], "cap15.tif")
    report.set("result", result)
    free_result = (load_part(settings.out, 2) or {}).get("result") or {}
    comparison: dict[str, Any] = {
        "uncapped_step2": free_result.get("step2"),
        "capped_step2": result.get("step2"),
    }
    if not free_result.get("output") or not result.get("output"):
        comparison["same_bytes"] = None
        comparison["reason"] = "part 2's or this run's output is missing: nothing to compare"
    else:
        same = filecmp.cmp(free_result["output"], result["output"], shallow=False)
        comparison["same_bytes"] = same
        if not same:
            comparison["difference"] = compare_volumes(Path(free_result["output"]), Path(result["output"]))
            comparison["reason"] = _why_bytes_differ(comparison["uncapped_step2"], comparison["capped_step2"])
    report.set("comparison_with_part2", comparison)
    report.set("targets", against_targets(result))
    return bool(result.get("ok")) and comparison.get("same_bytes") is not False


def _why_bytes_differ(uncapped: dict | None, capped: dict | None) -> str:
    """The likeliest reason two study-5 outputs differ, from their step-2 settings."""
    if uncapped is None or capped is None:
        return "a run report without step 2's setting: see the planner lines of both runs and the log"
    changed = step2_differences(uncapped, capped)
    if changed:
        return f"step 2 ran with another setting under the cap: {changed} ([uncapped, capped])"
    return (
        "same step-2 setting: look in the log for an out-of-memory retry (smaller batch or patch, "
        "host sums) or nondeterministic kernels"
    )


def _ran_as_asked(step2: dict | None, overlap: float) -> bool:
    """Whether step 2 ran all its patches at ``overlap`` (the planner may lower it, the deadline
    give patches a stand-in): only then does a run's time belong to that overlap."""
    return bool(step2 and step2["ran"] and step2["overlap"] == overlap and not step2["stand_ins"])


def part_overlap(settings: Settings, report: PartReport) -> bool:
    """The largest overlap whose study-5 run meets 20 s with step 2 at that overlap; part 2 is the
    run at the default 0.5. Speed only: the quality an overlap costs needs trained weights and
    held-out pairs, which this check has neither of."""
    fields = ("ok", "total_seconds", "steps", "planner", "step2", "peak_gpu_reserved_gib")
    runs: dict[str, dict] = {}
    default = (load_part(settings.out, 2) or {}).get("result") or {}
    if default.get("total_seconds") is not None:
        # (its ok is part 2's to report, not this part's)
        runs["0.5"] = {key: default.get(key) for key in fields if key != "ok"} | {"from": "part 2"}
    chosen = None
    for overlap in (0.5, 0.25, 0.125):
        if str(overlap) not in runs:
            result = run_study5(settings, ["--overlap", str(overlap)], f"overlap{overlap}.tif")
            runs[str(overlap)] = {key: result.get(key) for key in fields}
            report.set("runs", runs)
        run = runs[str(overlap)]
        meets = run.get("total_seconds") is not None and run["total_seconds"] <= TARGET_SECONDS
        run["meets_target"] = meets and _ran_as_asked(run.get("step2"), overlap)
        if run["meets_target"]:
            chosen = overlap
            break
    report.set("runs", runs)
    report.set("target_seconds", TARGET_SECONDS)
    report.set("overlap_meeting_target", chosen)
    return all(run.get("ok", True) for run in runs.values())


# --------------------------------------------------------------------------------------------
# Part 4: compare; part 5: bench_kernels


def part_compare(settings: Settings, report: PartReport) -> bool:
    from benchmarks import compare

    cases = [(1, 0.05)] if settings.quick else [(1, 1.0), (5, 0.5)]
    quick = ["--window", "8", "--global-size", "16", "--extra-args", "--patch 16 --global-size 16"]
    results: dict[str, dict] = {}
    for study, scale in cases:
        argv = ["--study", str(study), "--preset", settings.case_preset, "--device", settings.device]
        argv += ["--scale", str(scale), "--keep", str(settings.work / f"compare{study}")]
        result = run_benchmark(compare.main, argv + (quick if settings.quick else []))
        results[f"study{study}_scale{scale}"] = result
        report.set("cases", results)
        report.set(
            "ratios_published_over_fmc",
            {name: r.get("ratio_published_over_fmc") for name, r in results.items()},
        )
    return all(r["exit_code"] == 0 for r in results.values())


def part_kernels(settings: Settings, report: PartReport) -> bool:
    from benchmarks import bench_kernels

    if settings.quick:  # compiling costs ~30 s on 2 CPU cores: the rehearsal skips it
        argv = ["--preset", "tiny", "--patch", "16", "--iterations", "1"]
        variants = [name for name in KERNEL_VARIANTS if "compile" not in name]
    else:
        argv = ["--preset", settings.preset, "--patch", "128", "--batch", "2", "--iterations", "5"]
        variants = list(KERNEL_VARIANTS)
    result = run_benchmark(bench_kernels.main, [*argv, "--device", settings.device, "--variants", *variants])
    report.set("result", result)
    failed = [name for name, row in result["variants"].items() if "failed" in row]
    report.set("failed_variants", failed)
    return result["exit_code"] == 0 and not failed


# --------------------------------------------------------------------------------------------
# Part 6: training throughput through train.py fit


def _validation_ran(stage_dir: Path) -> bool:
    """Whether Lightning's CSV log of this stage holds a validation N_SSIM."""
    import csv

    for metrics in stage_dir.glob("csv/version_*/metrics.csv"):
        with open(metrics, newline="") as handle:
            if any(row.get("val/n_ssim") for row in csv.DictReader(handle)):
                return True
    return False


def prepare_training_data(settings: Settings, run_dir: Path) -> tuple[Path, Path]:
    """Simulated pairs, ``train.py prepare``d, and a split with one validation case.

    Why not ``fit --simulate``: its split is stratified by (study, channel), and the simulator
    draws a study per pair, so a handful of pairs are all singletons and all go to training:
    no validation would run. Here the last image id validates, whatever its study.
    """
    from fmc.data.split import SplitRow, write_split
    from fmc.simulate import write_dataset
    from fmc.training.cache import load_manifest
    from fmc.training.cli import main as train_main

    pairs, shape, global_size = (2, (24, 64, 64), 32) if settings.quick else (3, (64, 192, 192), 224)
    data, cache, split = run_dir / "simulated", run_dir / "cache", run_dir / "split_gpu_check.csv"
    write_dataset(data, pairs, "nucleus", seed=1000, shape=shape)
    device = "cuda" if settings.device == "cuda" else "cpu"
    argv = ["prepare", "--data", str(data), "--cache", str(cache), "--global-size", str(global_size)]
    if train_main([*argv, "--device", device, "--no-progress"]) != 0:
        raise RuntimeError("train.py prepare failed (see the log)")
    last = max(case.image_id for case in load_manifest(cache).cases)
    rows = [
        SplitRow(c.id, c.image_id, c.channel, c.study, "val" if c.image_id == last else "train")
        for c in load_manifest(cache).cases
    ]
    write_split(split, rows)
    return cache, split


def training_argv(settings: Settings, run_dir: Path, cache: Path, split: Path) -> list[str]:
    """``train.py fit`` flags shared by both stages (one prepared cache, one split)."""
    shared = ["--run-dir", str(run_dir), "--cache", str(cache), "--split-csv", str(split), "--devices", "1"]
    if settings.quick:
        return [
            *shared, "--preset", "tiny", "--global-size", "32", "--patch", "16",
            "--batch", "2", "--patches-per-case", "2", "--disc-base", "4", "--disc-levels", "2",
            "--gan-warmup-steps", "1", "--num-workers", "0", "--val-max-cases", "1", "--val-overlap", "0",
            "--val-every", "1", "--preview-cases", "1", "--log-every-n-steps", "1", "--accelerator", "cpu",
        ]  # fmt: skip
    # 3 simulated pairs (2 train, 1 val): a step-1 epoch is 2 steps, a step-2 epoch
    # 4 * 2 / 2 = 4 steps, so --val-every 40 validates twice in step 1 and once in step 2.
    # No loader workers: with epochs this short, restarting them each epoch would be timed too.
    accelerator = ["--precision", "bf16-mixed", "--accelerator", "gpu"]
    return [
        *shared, "--preset", settings.preset, "--global-size", "224",
        "--patch", "128", "--batch", "2", "--patches-per-case", "4", "--gan-warmup-steps", "10",
        "--num-workers", "0", "--val-max-cases", "1", "--val-overlap", "0",
        "--val-every", "40", "--preview-cases", "1", "--log-every-n-steps", "10",
        *(accelerator if settings.device == "cuda" else ["--accelerator", "cpu"]),
    ]  # fmt: skip


def part_training(settings: Settings, report: PartReport) -> bool:
    import torch

    from fmc.training.cli import main as train_main

    run_dir = settings.work / "train"
    start = time.perf_counter()
    cache, split = prepare_training_data(settings, run_dir)
    report.set("data_seconds", round(time.perf_counter() - start, 3))
    common = training_argv(settings, run_dir, cache, split)
    cuda = settings.device == "cuda" and torch.cuda.is_available()
    stages: dict[str, dict] = {}
    for stage in (1, 2):
        steps = 2 if settings.quick else TRAINING_STEPS[stage]
        extra = ["--step", str(stage), "--max-steps", str(steps)]
        if stage == 2:
            # DDP on one process: proves the NCCL process group and DDP's gradient all-reduce
            # on CUDA (gloo on a CPU); two ranks cannot share one GPU under NCCL.
            # (find_unused_parameters, as fmc's own DDP strategy for a GAN: D idles in G's backward)
            extra += ["--strategy", "ddp_find_unused_parameters_true"]
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with DriverMemoryPoller() as poller:
            code = train_main(["fit", *common, *extra])
        seconds = time.perf_counter() - start
        stage_dir = run_dir / f"step{stage}"
        try:
            throughput = json.loads((stage_dir / "throughput.json").read_text())
        except (OSError, ValueError):
            throughput = None
        summary = (
            json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
        )
        rows = [s for s in summary.get("stages", []) if s.get("stage") == stage]
        rate = (throughput or {}).get("samples_per_s")  # null when no batch was timed
        stages[f"step{stage}"] = {
            "exit_code": code,
            "argv": shlex.join(["fit", *common, *extra]),
            "seconds_in_fit": round(seconds, 3),
            "max_steps": steps,
            "throughput": throughput,
            "samples_per_s": None if rate is None else round(rate, 3),
            "global_step": rows[0]["global_step"] if rows else None,
            "best_val_n_ssim": rows[0]["best_score"] if rows else None,
            "validation_ran": _validation_ran(stage_dir),
            "peak_gpu_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3) if cuda else None,
            "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3) if cuda else None,
            "peak_gpu_driver_gib": poller.peak_above_baseline_gib,
        }
        report.set("stages", stages)
        if code != 0:
            return False
    return all(s["exit_code"] == 0 and s["validation_ran"] for s in stages.values())


PART_FUNCTIONS: dict[int, Callable[[Settings, PartReport], bool]] = {
    1: part_cuda_tests,
    2: part_study5,
    3: part_study5_cap15,
    4: part_compare,
    5: part_kernels,
    6: part_training,
    7: part_overlap,
}


def run_part(number: int, settings: Settings) -> int:
    """Body of one part process: run the part, record ok or the traceback in its JSON."""
    part = PARTS_BY_NUMBER[number]
    report = PartReport(settings.out / part.filename, part, settings)
    try:
        ok = PART_FUNCTIONS[number](settings, report)
    except Exception as error:  # a part that breaks is a result too: the next parts still run
        log.exception("part %d failed", number)
        report.set("error", f"{type(error).__name__}: {error}"[:2000])
        report.set("traceback", traceback.format_exc()[-6000:])
        ok = False
    report.set("ok", bool(ok))
    return 0 if ok else 1
