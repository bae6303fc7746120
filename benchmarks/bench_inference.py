"""Time ``inference.py`` end to end on a synthetic case of one study's shape and spacing.

Usage (from the repository root)::

    python -m benchmarks.bench_inference --study 5 --preset paper --device cuda
    python -m benchmarks.bench_inference --study 1 --device cpu --scale 0.5 --extra-args "--tta"

Prints one JSON object: the settings, the device, total seconds from process start
to the output file written, seconds per pipeline step (from inference.py's per-case
log line), peak host RSS of the process, and peak GPU memory (allocator and driver).
A figure, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys

from benchmarks.common import (
    PreparedCase,
    add_case_arguments,
    host_info,
    parse_high_water,
    parse_step_seconds,
    prepare_from_args,
    print_json,
    python,
    read_peak_memory,
    run_child,
    tail,
)

_DEVICE_LINE = re.compile(r"device: (.+)$", re.MULTILINE)
_PLANNER_LINE = re.compile(r"planner: (.+)$|(time is up after .+)$", re.MULTILINE)


def planner_decisions(log: str) -> list[str]:
    """The time planner's lines from inference.py's log (its messages start with "planner: " too),
    and step 2's own stop when it runs late ("time is up after N of M patches ...")."""
    return [
        (planned or late).strip().removeprefix("planner: ") for planned, late in _PLANNER_LINE.findall(log)
    ]


def inference_command(prepared: PreparedCase, device: str, extra_args: list[str]) -> list[str]:
    """The exact ``inference.py`` command line that is timed."""
    return [
        python(),
        "inference.py",
        "--input",
        str(prepared.input_dir),
        "--output",
        str(prepared.output_dir),
        "--weights",
        str(prepared.weights_dir),
        "--device",
        device,
        *extra_args,
    ]


def run_fmc(prepared: PreparedCase, device: str, extra_args: list[str], timeout: float = 0) -> dict:
    """Run inference.py once on the prepared case and return its figures as a dict."""
    peak_file = prepared.workdir / "fmc_peak_memory.json"
    peak_file.unlink(missing_ok=True)
    env = {**os.environ, "FMC_REPORT_PEAK_MEMORY": str(peak_file)}
    command = inference_command(prepared, device, extra_args)
    output = prepared.output_dir / prepared.case_path.name
    child = run_child(command, output=output, env=env, timeout=timeout)
    steps, case_seconds = parse_step_seconds(child.stderr)
    devices = _DEVICE_LINE.findall(child.stderr)
    report = {
        "benchmark": "fmc inference.py",
        "settings": {"extra_args": extra_args, "command": shlex.join(command)},
        "device": {"requested": device, "used": devices[-1].strip() if devices else None},
        "ok": child.returncode == 0 and child.seconds_to_output is not None,
        "timed_out": child.timed_out,
        "total_seconds": child.seconds_to_output,
        "process_seconds": child.seconds_to_exit,
        "case_seconds": case_seconds,
        "steps": steps,
        "planner": planner_decisions(child.stderr),
        "peak_rss_gib": child.peak_rss_gib,
        "memory_high_water_gib": parse_high_water(child.stderr),
        **read_peak_memory(peak_file),
        "peak_gpu_driver_gib": child.peak_gpu_driver_gib,
        "gpu_driver_baseline_gib": child.gpu_driver_baseline_gib,
        "output": str(output) if output.exists() else None,
        "returncode": child.returncode,
    }
    if not report["ok"]:
        report["log_tail"] = tail(child.stderr)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_inference",
        description="Time inference.py end to end on a synthetic case of a study's shape (JSON on stdout).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_case_arguments(parser)
    parser.add_argument(
        "--extra-args", default="", help='more inference.py flags, one string, e.g. "--tta --batch 4"'
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prepared, holder = prepare_from_args(args)
    host = host_info()  # before the runs: the load average says what else was running
    try:
        result = run_fmc(prepared, args.device, shlex.split(args.extra_args), args.timeout)
        print_json(
            {
                **prepared.describe(),
                "host": host,
                "case_prepared_seconds": prepared.seconds_to_prepare,
                "case_reused": prepared.reused,
                **result,
            }
        )
        return 0 if result["ok"] else 1
    finally:
        if holder is not None:
            holder.cleanup()


if __name__ == "__main__":
    sys.exit(main())
