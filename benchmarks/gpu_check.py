"""Every owed CUDA figure in one command (issue 14): one JSON per part, a summary JSON and the full log.

Usage (from the repository root)::

    python -m benchmarks.gpu_check --out gpu-check                  # the real run, on a CUDA GPU
    python -m benchmarks.gpu_check --dry-run                        # the plan with expected H200 seconds
    python -m benchmarks.gpu_check --quick --device cpu --out /tmp/r  # tiny rehearsal (in the test suite)

Why one script: a GPU machine is lent to this project only by chance and for at most 15
minutes, start-up included, so every figure must come from one rehearsed command. The parts
run in order of value, each as its own process group with its own time limit, under one
deadline for the whole run (``--total-seconds``): a part that runs out of time is killed with
its children, and the parts before it have already written their JSON. The summary is
rewritten after every part for the same reason.

This module is the command line and the orchestration; the plan is
:mod:`benchmarks.gpu_check_plan`, the parts :mod:`benchmarks.gpu_check_parts`, the process
groups :mod:`benchmarks.gpu_check_runner` and the JSON and its readers
:mod:`benchmarks.gpu_check_report`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from benchmarks.common import REPO, host_info, require_device, write_json
from benchmarks.gpu_check_plan import (
    DEFAULT_TOTAL_SECONDS,
    PARTS,
    PARTS_BY_NUMBER,
    Part,
    Settings,
    plan_lines,
    plan_total_seconds,
)
from benchmarks.gpu_check_report import load_part
from benchmarks.gpu_check_runner import GroupRun, run_in_own_group
from fmc.signals import Interrupted, install_signal_handlers

log = logging.getLogger("gpu_check")

PROG = "python -m benchmarks.gpu_check"
LOG_NAME = "gpu_check.log"
SUMMARY_NAME = "summary.json"
#: Seconds a part needs at the least; with less left of the deadline it is skipped.
MIN_PART_SECONDS = 10.0
#: A rehearsal's parts each get at least this long (2 CPU cores, shared).
QUICK_PART_SECONDS = 120.0


def gpu_description() -> dict | None:
    """The GPU as nvidia-smi names it (the orchestrator does not import torch), or None."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = "--query-gpu=name,driver_version,memory.total"
    done = subprocess.run(
        ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True, check=False
    )
    first = done.stdout.strip().splitlines()[:1]
    if done.returncode != 0 or not first:
        return None
    name, driver, memory = (field.strip() for field in first[0].split(",", 2))
    return {"name": name, "driver": driver, "memory_total": memory}


def launch_part(
    part: Part, settings: Settings, timeout: float, log_file: TextIO, lock: threading.Lock
) -> GroupRun:
    """Run one part as ``--run-part N`` in a process group of its own, killed at ``timeout``."""
    command = [sys.executable, "-m", "benchmarks.gpu_check", *settings.part_argv(part.number)]
    return run_in_own_group(
        command,
        label=f"part {part.number}",
        cwd=REPO,
        timeout=timeout,
        sinks=[log_file, sys.stderr],
        lock=lock,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def run_one(
    part: Part, settings: Settings, left: float, total: float, log_file: TextIO, lock: threading.Lock
) -> dict:
    """Run ``part`` with the smaller of its limit and the ``left`` of ``total`` seconds; its summary entry."""
    entry: dict[str, Any] = {**asdict(part), "file": part.filename}
    if left < MIN_PART_SECONDS:
        entry.update(status="skipped", reason=f"only {left:.0f} s left of {total:.0f} s")
        log.warning("part %d skipped: %s", part.number, entry["reason"])
        return entry
    limit = max(part.limit_seconds, QUICK_PART_SECONDS) if settings.quick else part.limit_seconds
    timeout = min(limit, left)
    log.info("part %d (%s) starts, limit %.0f s", part.number, part.title, timeout)
    launched = launch_part(part, settings, timeout, log_file, lock)
    result = load_part(settings.out, part.number) or {}
    if launched.timed_out:
        result.update(timed_out=True, ok=False)
        write_json(settings.out / part.filename, {**result, "part": part.number})
    ok = bool(result.get("ok")) and launched.returncode == 0
    status = "timed_out" if launched.timed_out else ("ok" if ok else "failed")
    entry.update(status=status, limit_used_seconds=round(timeout, 1), **asdict(launched), result=result)
    log.info("part %d: %s after %.1f s", part.number, status, launched.seconds)
    return entry


def orchestrate(parts: tuple[Part, ...], settings: Settings, total_seconds: float, keep_work: bool) -> int:
    """Run ``parts`` in order under one deadline; the summary is rewritten after each."""
    settings.out.mkdir(parents=True, exist_ok=True)
    settings.work.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    log_file = open(settings.out / LOG_NAME, "a", encoding="utf-8")  # noqa: SIM115 -- closed below
    handler = logging.StreamHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    start = time.perf_counter()
    summary: dict[str, Any] = {
        "benchmark": "gpu_check (issue 14)",
        "device_requested": settings.device,
        "quick": settings.quick,
        "preset": settings.preset,
        "gpu": gpu_description(),
        "host": host_info(),
        "total_seconds_allowed": total_seconds,
        "plan_expected_h200_seconds": plan_total_seconds(parts),
        "parts": [],
    }
    for line in plan_lines(parts, total_seconds):
        log.info("plan: %s", line)
    try:
        for part in parts:
            left = total_seconds - (time.perf_counter() - start)
            summary["parts"].append(run_one(part, settings, left, total_seconds, log_file, lock))
            summary["seconds"] = round(time.perf_counter() - start, 3)
            summary["ok"] = all(p["status"] == "ok" for p in summary["parts"])
            write_json(settings.out / SUMMARY_NAME, summary)
    finally:
        if not keep_work:
            shutil.rmtree(settings.work, ignore_errors=True)
        logging.getLogger().removeHandler(handler)
        log_file.close()
    statuses = ", ".join(f"{p['number']}:{p['status']}" for p in summary["parts"])
    print(json.dumps({"summary": str(settings.out / SUMMARY_NAME), "ok": summary["ok"], "parts": statuses}))
    return 0 if summary["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Take every owed CUDA figure in one run (issue 14): the CUDA tests and a CUDA-vs-CPU "
            "inference check, study 5 end to end, the same under a 15 GiB cap, compare, kernel options, "
            "training throughput and the overlap that meets 20 s. Writes one JSON per part, "
            f"{SUMMARY_NAME} and {LOG_NAME} to --out."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--out", type=Path, default=Path("gpu-check"), help="folder for the JSON files and the log"
    )
    parser.add_argument(
        "--work", type=Path, default=None,
        help="folder for cases, models and outputs (several GiB at full size; default: a temporary folder)",
    )  # fmt: skip
    parser.add_argument("--keep-work", action="store_true", help="do not delete --work at the end")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where the networks run")
    parser.add_argument("--preset", choices=("paper", "small", "tiny"), default="paper", help="RUNet size")
    parser.add_argument(
        "--quick", action="store_true", help="tiny cases and networks: a rehearsal of every part in seconds"
    )
    parser.add_argument(
        "--parts", type=int, nargs="+", choices=sorted(PARTS_BY_NUMBER), default=None,
        help="run only these parts (in plan order; parts 3 and 7 read part 2's JSON from --out)",
    )  # fmt: skip
    parser.add_argument(
        "--total-seconds", type=float, default=DEFAULT_TOTAL_SECONDS,
        help="deadline of the whole run; a part gets the smaller of its own limit and what is left",
    )  # fmt: skip
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan and expected H200 seconds; run nothing"
    )
    parser.add_argument(
        "--run-part", type=int, default=None, help=argparse.SUPPRESS
    )  # internal: one part's process
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    parts = tuple(p for p in PARTS if args.parts is None or p.number in args.parts)
    if args.dry_run:
        print("\n".join(plan_lines(parts, args.total_seconds)))
        return 0
    out = args.out.resolve()
    if args.run_part is not None:
        from benchmarks.gpu_check_parts import run_part

        settings = Settings(out, args.work.resolve(), args.device, args.quick, args.preset)
        return run_part(args.run_part, settings)
    require_device(args.device, PROG)
    # SIGTERM (e.g. from `timeout`) and SIGINT as an exception, as in inference.py, so the running
    # part's process group is killed too (each part runs in a session of its own, which a signal
    # to this one misses) and the temporary work folder is removed.
    install_signal_handlers()
    try:
        work = (args.work or Path(tempfile.mkdtemp(prefix="fmc-gpu-check-"))).resolve()
        settings = Settings(out, work, args.device, args.quick, args.preset)
        return orchestrate(parts, settings, args.total_seconds, args.keep_work or args.work is not None)
    except Interrupted as stop:
        log.error("stopped by %s: the parts done so far are in %s; exit code %d", stop, out, stop.exit_code)
        return stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
