"""benchmarks.gpu_check: the plan fits the issue's 8 minutes, and the tiny CPU rehearsal runs every part.

The rehearsal is what keeps the one-shot GPU script from rotting between the rare sessions
that are lent a GPU: every part runs end to end at tiny scale on the CPU and writes its JSON.
No timing is checked, only that each part ran and reported what the GPU run will be read for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_kernels
from benchmarks.cuda_tests import candidate_files
from benchmarks.gpu_check import (
    KERNEL_VARIANTS,
    LOG_NAME,
    PARTS,
    PLAN_CEILING_SECONDS,
    SUMMARY_NAME,
    _decisions,
    main,
    parse_junit,
    plan_total_seconds,
)

REPO = Path(__file__).resolve().parent.parent


def test_the_plan_fits_eight_minutes_on_an_h200(capsys: pytest.CaptureFixture[str]) -> None:
    assert plan_total_seconds() <= PLAN_CEILING_SECONDS == 480
    assert [part.number for part in PARTS] == list(range(1, 8))
    assert main(["--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"expected total on an H200: {plan_total_seconds():.0f} s" in printed
    for part in PARTS:
        assert part.title in printed


def test_kernel_variants_exist_and_cuda_tests_are_found() -> None:
    assert set(KERNEL_VARIANTS) <= set(bench_kernels.VARIANTS)
    assert any("compile" in name for name in KERNEL_VARIANTS)
    names = {path.name for path in candidate_files(REPO / "tests")}
    assert {"test_resample.py", "test_tiling.py", "test_upload.py", "test_infer.py"} <= names


def test_planner_decisions_compare_without_timings() -> None:
    a = ["predicted 2.4s for step 2 (2.7s with the 15% margin) fits the 534.1s left (74 batches x 0.032s)"]
    b = ["predicted 1.8s for step 2 (2.0s with the 15% margin) fits the 533.1s left (74 batches x 0.024s)"]
    assert _decisions(a) == _decisions(b)
    assert _decisions(a) != _decisions([a[0].replace("74 batches", "26 batches")])


def test_junit_counts(tmp_path: Path) -> None:
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="a" name="ok"/>'
        '<testcase classname="a" name="bad"><failure message="x"/></testcase>'
        '<testcase classname="a" name="gpu"><skipped message="needs CUDA"/></testcase>'
        "</testsuite></testsuites>"
    )
    counts = parse_junit(xml)
    assert (counts["tests"], counts["passed"], counts["failed"], counts["skipped"]) == (3, 1, 1, 1)
    assert counts["failed_tests"] == ["a::bad"]


def test_quick_cpu_rehearsal_runs_every_part(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--quick", "--device", "cpu"]
    command += ["--out", str(out), "--work", str(work)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stderr[-5000:] + done.stdout[-2000:]

    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert [p["status"] for p in summary["parts"]] == ["ok"] * len(PARTS), summary["parts"]
    assert (out / LOG_NAME).stat().st_size > 0
    parts = {p.number: json.loads((out / p.filename).read_text()) for p in PARTS}
    assert all(report["ok"] is True for report in parts.values())

    tests = parts[1]["tests"]  # on a CPU every selected CUDA test is collected and skipped
    assert tests["tests"] >= 7 and tests["skipped"] == tests["tests"] and tests["failed"] == 0
    agreement = parts[1]["pipeline_vs_cpu"]["cpu-default"]["vs_cpu"]
    assert agreement["within_tolerance"] and agreement["identical"]  # CPU against CPU
    assert parts[2]["result"]["total_seconds"] > 0 and "step2" in parts[2]["result"]["steps"]
    assert set(parts[2]["targets"]) >= {"total_seconds_le_20", "peak_rss_le_8_gib"}
    assert parts[3]["comparison_with_part2"]["same_bytes"] is True
    assert parts[4]["ratios_published_over_fmc"]["study1_scale0.05"] > 0
    assert parts[5]["result"]["variants"]["fp16-weights"]["skipped"] == "needs CUDA"
    for stage in ("step1", "step2"):
        assert parts[6]["stages"][stage]["exit_code"] == 0
        assert parts[6]["stages"][stage]["validation_ran"] is True
    assert parts[7]["overlap_meeting_target"] == 0.5  # a tiny CPU case is well inside 20 s
    assert "quality_cost_vs_0.5" in parts[7]
