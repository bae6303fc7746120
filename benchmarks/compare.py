"""fmc's inference.py against the published-style pipeline, on one case, in one invocation.

Usage (from the repository root)::

    python -m benchmarks.compare --study 5 --preset paper --device cuda
    python -m benchmarks.compare --study 1 --device cpu --scale 0.5

The case and the random-weight model are made once; each pipeline then runs as its
own timed process on them (fmc first, then the published style). Prints one JSON
object with both reports and ``ratio_published_over_fmc`` = published total seconds / fmc total seconds
(process start to output file written, for both).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from benchmarks.bench_inference import run_fmc
from benchmarks.bench_published_style import PublishedSettings, run_published_child
from benchmarks.common import PreparedCase, case_parser, print_json, run_benchmark, setup_logging

PROG = "python -m benchmarks.compare"


def build_parser() -> argparse.ArgumentParser:
    parser = case_parser(
        PROG, "Run inference.py and the published-style pipeline on one case; JSON with the ratio."
    )
    parser.add_argument("--extra-args", default="", help="more inference.py flags, one string")
    PublishedSettings.add_arguments(parser, prefix="published style: ")
    return parser


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 3)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()

    def bench(prepared: PreparedCase, host: dict) -> int:
        fmc = run_fmc(prepared, args.device, shlex.split(args.extra_args), args.timeout)
        published = run_published_child(
            prepared, args.device, PublishedSettings.from_args(args), args.timeout
        )
        print_json(
            prepared.report(
                host,
                fmc=fmc,
                published_style=published,
                ratio_published_over_fmc=_ratio(published["total_seconds"], fmc["total_seconds"]),
                ratio_published_over_fmc_case_seconds=_ratio(published["case_seconds"], fmc["case_seconds"]),
            )
        )
        return 0 if fmc["ok"] and published["ok"] else 1

    return run_benchmark(args, PROG, bench)


if __name__ == "__main__":
    sys.exit(main())
