"""Time ``inference.py`` end to end on a synthetic case of one study's shape and spacing.

Usage (from the repository root)::

    python -m benchmarks.bench_inference --study 5 --preset paper --device cuda
    python -m benchmarks.bench_inference --study 1 --device cpu --scale 0.5 --extra-args "--tta"

Prints one JSON object: the settings, the device, total seconds from process start
to the output file written, seconds per pipeline step, the planner's decisions and the memory
high-water marks (from inference.py's ``--report`` JSON, not its log), peak host RSS of the
process, and peak GPU memory (allocator from the report, driver from nvidia-smi).
A figure, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from benchmarks.common import (
    GIB,
    PreparedCase,
    case_parser,
    child_report,
    print_json,
    python,
    run_benchmark,
    run_child,
    setup_logging,
)

PROG = "python -m benchmarks.bench_inference"


def report_figures(report: dict) -> dict:
    """The benchmark's fields from inference.py's ``--report`` JSON (its last case; None where absent)."""
    cases = report.get("cases") or [{}]
    figures = cases[-1].get("figures") or {}

    def gib(key: str) -> float | None:
        value = report.get(key)
        return round(value / GIB, 3) if isinstance(value, (int, float)) else None

    return {
        "device_used": report.get("device"),
        "case_seconds": figures.get("total_seconds"),
        "steps": figures.get("stages", {}),
        "planner": figures.get("step2_decisions", []),
        "memory_high_water_gib": (
            {"counter": figures["memory_counter"], "after_step": figures["memory_high_water_gib"]}
            if "memory_counter" in figures
            else {}
        ),
        "peak_gpu_allocated_gib": gib("cuda_max_allocated_bytes"),
        "peak_gpu_reserved_gib": gib("cuda_max_reserved_bytes"),
    }


def read_report(path: Path) -> dict:
    """The run report, or {} when the child wrote none (it failed before the end)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def inference_command(
    prepared: PreparedCase, device: str, extra_args: list[str], report: Path | None = None
) -> list[str]:
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
        *(["--report", str(report)] if report is not None else []),
        *extra_args,
    ]


def run_fmc(prepared: PreparedCase, device: str, extra_args: list[str], timeout: float = 0) -> dict:
    """Run inference.py once on the prepared case and return its figures as a dict."""
    report_file = prepared.workdir / "fmc_report.json"
    report_file.unlink(missing_ok=True)
    command = inference_command(prepared, device, extra_args, report_file)
    output = prepared.output_dir / prepared.case_path.name
    child = run_child(command, output=output, timeout=timeout, label="fmc inference.py")
    figures = report_figures(read_report(report_file))
    head = {
        "benchmark": "fmc inference.py",
        "settings": {"extra_args": extra_args, "command": shlex.join(command)},
        "device": {"requested": device, "used": figures["device_used"]},
    }
    timing = {key: figures[key] for key in ("case_seconds", "steps", "planner")}
    memory = {
        key: figures[key]
        for key in ("memory_high_water_gib", "peak_gpu_allocated_gib", "peak_gpu_reserved_gib")
    }
    return child_report(child, output, head, timing, memory)


def build_parser() -> argparse.ArgumentParser:
    parser = case_parser(
        PROG, "Time inference.py end to end on a synthetic case of a study's shape (JSON on stdout)."
    )
    parser.add_argument(
        "--extra-args", default="", help='more inference.py flags, one string, e.g. "--tta --batch 4"'
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()

    def bench(prepared: PreparedCase, host: dict) -> int:
        result = run_fmc(prepared, args.device, shlex.split(args.extra_args), args.timeout)
        print_json(prepared.report(host, **result))
        return 0 if result["ok"] else 1

    return run_benchmark(args, PROG, bench)


if __name__ == "__main__":
    sys.exit(main())
