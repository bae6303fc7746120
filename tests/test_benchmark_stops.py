"""Benchmarks on a machine without the device they ask for, and stopped half way (issue 26):
``--device cuda`` without CUDA is one line at once, progress goes to stderr, and SIGTERM leaves
no temporary behind (the same signal handling as inference.py)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import common

REPO = Path(__file__).resolve().parent.parent
TINY = ["--study", "1", "--preset", "tiny", "--device", "cpu", "--scale", "0.05"]
FAST_FMC = ["--extra-args", "--patch 16 --overlap 0.25 --budget-seconds 0 --no-step1"]


def _env(tmpdir: Path) -> dict[str, str]:
    tmpdir.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmpdir), "OMP_NUM_THREADS": "1"}


# (the reason avoids the words benchmarks.cuda_tests selects by: this is no test of the GPU path)
@pytest.mark.skipif(torch.cuda.is_available(), reason="an accelerator is here: nothing to refuse")
@pytest.mark.parametrize(
    "module", ["bench_inference", "bench_published_style", "compare", "bench_kernels", "gpu_check"]
)
def test_cuda_without_cuda_is_one_line_at_once(module: str, tmp_path: Path) -> None:
    args = {"bench_kernels": [], "gpu_check": ["--out", str(tmp_path / "out")]}.get(
        module, ["--study", "5", "--preset", "paper"]
    )
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args, "--device", "cuda"],
        cwd=REPO, env=_env(tmp_path / "tmp"), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert time.monotonic() - start < 60  # the import of torch, not a CPU run of the paper preset
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--device cuda" in lines[0] and "--device cpu" in lines[0], lines
    assert done.stdout == "" and os.listdir(tmp_path / "tmp") == []


def _start(args: list[str], tmpdir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench_inference", *args],
        cwd=REPO, env=_env(tmpdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _stop_when(process: subprocess.Popen, words: str, delay: float = 0.0) -> list[str]:
    """Read the progress lines until one holds ``words``, then SIGTERM the benchmark; all of stderr."""
    assert process.stderr is not None
    lines = []
    for line in process.stderr:
        lines.append(line)
        if words in line:
            time.sleep(delay)
            process.send_signal(signal.SIGTERM)
            break
    lines += process.stderr.read().splitlines(keepends=True)
    process.wait(timeout=120)
    return lines


def test_sigterm_while_the_child_runs_stops_it_and_removes_the_work_folder(tmp_path: Path) -> None:
    process = _start([*TINY, *FAST_FMC], tmp_path / "tmp")
    lines = _stop_when(process, "fmc inference.py: started", delay=1.0)
    assert process.returncode == 128 + signal.SIGTERM, "".join(lines)
    assert any("making the study-1 case" in line for line in lines)  # progress before the clock
    stops = [line for line in lines if "stopped by SIGTERM" in line]
    assert len(stops) == 1 and "work folder removed" in stops[0], "".join(lines)
    assert "Traceback" not in "".join(lines)
    assert os.listdir(tmp_path / "tmp") == []
    pid = int(next(line for line in lines if "started (pid" in line).split("pid ")[1].split(")")[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the child went with it


def test_sigterm_while_the_case_is_made_leaves_no_half_case_in_a_kept_folder(tmp_path: Path) -> None:
    keep = tmp_path / "keep"
    args = ["--study", "5", "--preset", "tiny", "--device", "cpu", "--scale", "0.3", "--keep", str(keep)]
    lines = _stop_when(_start([*args, *FAST_FMC], tmp_path / "tmp"), "making the study-5 case", 0.3)
    assert any("stopped by SIGTERM" in line for line in lines), "".join(lines)
    case = keep / common.INPUT_LAYOUT / common.CASE_NAME
    # Either the signal came in time and the half case went, or the case was whole and is marked so.
    assert case.exists() == (keep / "bench_case.json").exists(), "".join(lines)
    partials = [p for p in keep.rglob(".*") if common._PARTIAL.match(p.name)]
    assert partials == [] and os.listdir(tmp_path / "tmp") == []


def test_a_running_child_reports_progress_with_its_last_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(common, "PROGRESS_SECONDS", 0.2)
    caplog.set_level(logging.INFO, logger="benchmarks")
    script = "import sys, time; print('patches 3/9', file=sys.stderr, flush=True); time.sleep(1.5)"
    child = common.run_child([sys.executable, "-c", script], output=tmp_path / "none", label="sleeper")
    assert child.returncode == 0
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("sleeper: started (pid")
    assert any("sleeper: running for" in m and "its last line: patches 3/9" in m for m in messages)
    assert messages[-1].startswith("sleeper: exit code 0 after")


def test_bench_kernels_reports_each_variant() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_kernels", "--preset", "tiny", "--patch", "8",
         "--batch", "1", "--iterations", "1", "--device", "cpu", "--variants", "fp32", "channels_last"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "variant 1/2: fp32" in done.stderr and "variant 2/2: channels_last" in done.stderr
