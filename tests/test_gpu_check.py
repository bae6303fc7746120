"""benchmarks.gpu_check: the plan fits the issue's 8 minutes, and the tiny CPU rehearsal runs every part.

The rehearsal is what keeps the one-shot GPU script from rotting between the rare sessions
that are lent a GPU: every part runs end to end at tiny scale on the CPU and writes its JSON.
No timing is checked, only that each part ran and reported what the GPU run will be read for.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from benchmarks import bench_kernels
from benchmarks.common import write_json
from benchmarks.cuda_tests import candidate_files
from benchmarks.gpu_check import LOG_NAME, SUMMARY_NAME, main
from benchmarks.gpu_check_parts import KERNEL_VARIANTS
from benchmarks.gpu_check_plan import PARTS, PLAN_CEILING_SECONDS, plan_total_seconds
from benchmarks.gpu_check_report import parse_junit, step2_differences
from benchmarks.gpu_check_runner import run_in_own_group

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
    assert {"test_resample.py", "test_tiling.py", "test_host_to_device.py", "test_infer.py"} <= names


def test_step2_settings_compare_without_timings() -> None:
    a = {"ran": True, "overlap": 0.5, "tta": False, "patches": 148, "predicted_seconds": 2.4, "stand_ins": 0}
    assert step2_differences(a, {**a, "predicted_seconds": 1.8}) == {}
    assert step2_differences(a, {**a, "overlap": 0.25, "patches": 52}) == {
        "overlap": [0.5, 0.25],
        "patches": [148, 52],
    }
    assert step2_differences(a, None) == {key: [a[key], None] for key in a if key != "predicted_seconds"}


def test_the_json_files_are_strict_json(tmp_path: Path) -> None:
    """A throughput over no timed batch is NaN: the file says null, which every JSON reader takes."""
    write_json(tmp_path / "p.json", {"rate": math.nan, "rows": [(1, math.inf)], "where": tmp_path})
    text = (tmp_path / "p.json").read_text()
    assert json.loads(text) == {"rate": None, "rows": [[1, None]], "where": str(tmp_path)}
    assert "NaN" not in text and [p.name for p in tmp_path.iterdir()] == ["p.json"]


def test_a_command_past_its_time_is_killed_with_its_children(tmp_path: Path) -> None:
    """The whole process group goes: a grandchild left running would hold the GPU for the next part."""
    marker = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(marker)!r}, 'w').write(str(child.pid)); print('started', flush=True); time.sleep(60)"
    )
    log = tmp_path / "log.txt"
    with open(log, "w") as sink:
        run = run_in_own_group(
            [sys.executable, "-c", script], label="sleeper", cwd=tmp_path, timeout=5, sinks=[sink],
            lock=threading.Lock(),
        )  # fmt: skip
    assert run.timed_out and run.returncode is not None and run.returncode < 0
    assert "started" in log.read_text()
    grandchild = int(marker.read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone: it holds no memory)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


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
    comparison = parts[3]["comparison_with_part2"]
    assert comparison["same_bytes"] is True
    assert comparison["uncapped_step2"]["ran"] is True  # read from the run reports, not the log
    assert step2_differences(comparison["uncapped_step2"], comparison["capped_step2"]) == {}
    assert parts[4]["ratios_published_over_fmc"]["study1_scale0.05"] > 0
    assert parts[5]["result"]["variants"]["fp16-weights"]["skipped"] == "needs CUDA"
    for stage in ("step1", "step2"):
        assert parts[6]["stages"][stage]["exit_code"] == 0
        assert parts[6]["stages"][stage]["validation_ran"] is True
    assert parts[7]["overlap_meeting_target"] == 0.5  # a tiny CPU case is well inside 20 s
    assert parts[7]["runs"]["0.5"]["from"] == "part 2" and parts[7]["runs"]["0.5"]["meets_target"]
    assert parts[7]["runs"]["0.5"]["step2"]["overlap"] == 0.5
