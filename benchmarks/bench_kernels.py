"""Throughput of one RUNet forward under each kernel option, in one process, against float32 eager.

Usage (from the repository root)::

    python -m benchmarks.bench_kernels --preset paper --patch 128 --batch 2 --device cuda
    python -m benchmarks.bench_kernels --preset small --patch 64 --device cpu --variants bf16 channels_last

Each variant gets a fresh copy of the same random network, built with
``fmc.acceleration.build_forward`` exactly as inference builds it. Reported per variant:
the first call's seconds (compilation, cuDNN autotuning), seconds per batch over the timed
calls, M voxels/s, the speed-up over ``fp32`` eager in this run, the largest difference from
the ``fp32`` output (what a faster option costs in accuracy) and the CUDA allocator's peak.
A figure, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import replace

import torch

from benchmarks.common import host_info, log, print_json, require_device, setup_logging
from fmc.acceleration import KernelOptions, build_forward
from fmc.network import RUNet, count_parameters, preset
from fmc.signals import Interrupted, install_signal_handlers, restore_signal_handlers

PROG = "python -m benchmarks.bench_kernels"

_EAGER = KernelOptions(precision="fp32", channels_last=False)  # explicit: unset means "per device"
VARIANTS: dict[str, KernelOptions] = {
    "fp32": _EAGER,
    "bf16": replace(_EAGER, precision="bf16"),
    "fp16": replace(_EAGER, precision="fp16"),
    "fp16-weights": replace(_EAGER, precision="fp16-weights"),
    "channels_last": replace(_EAGER, channels_last=True),
    "fp16-weights+channels_last": replace(_EAGER, precision="fp16-weights", channels_last=True),
    "cudnn_benchmark": replace(_EAGER, cudnn_benchmark=True),
    "fp16-weights+cudnn_benchmark": replace(_EAGER, precision="fp16-weights", cudnn_benchmark=True),
    "compile": replace(_EAGER, compile="default"),
    "fp16-weights+compile": replace(_EAGER, precision="fp16-weights", compile="default"),
    "compile-max-autotune": replace(_EAGER, compile="max-autotune-no-cudagraphs"),
}
DEFAULT_VARIANTS = [
    name for name in VARIANTS if name != "compile-max-autotune"
]  # that one compiles for minutes


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    base: RUNet, options: KernelOptions, batch: torch.Tensor, iterations: int, reference: torch.Tensor | None
) -> tuple[dict, torch.Tensor]:
    """Time ``base`` (a copy of it) under ``options`` on ``batch``; compare with ``reference``."""
    device = batch.device
    network = copy.deepcopy(base)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        forward = build_forward(network, options, device)
        start = time.perf_counter()
        out = forward(batch)
        _synchronize(device)
        first_call = time.perf_counter() - start
        forward(batch)  # warm-up after the first call
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(iterations):
            out = forward(batch)
        _synchronize(device)
        per_batch = (time.perf_counter() - start) / iterations
    torch.backends.cudnn.benchmark = False  # process-wide: do not leak into the next variant
    row = {
        "options": options,
        "first_call_seconds": round(first_call, 3),
        "seconds_per_batch": round(per_batch, 4),
        "mvoxels_per_second": round(math.prod(batch.shape[2:]) * batch.shape[0] / per_batch / 1e6, 2),
        "max_abs_diff_vs_fp32": None if reference is None else round((out - reference).abs().max().item(), 5),
        "peak_gpu_allocated_gib": (
            round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None
        ),
    }
    return row, out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="RUNet forward throughput per kernel option vs float32 eager (JSON on stdout).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", choices=("paper", "small", "tiny"), default="paper", help="RUNet size")
    parser.add_argument("--in-channels", type=int, default=2, help="input channels (step 2 takes 2)")
    parser.add_argument("--patch", type=int, default=128, help="cube edge of the input")
    parser.add_argument("--batch", type=int, default=2, help="patches per forward")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where to run")
    parser.add_argument("--iterations", type=int, default=5, help="timed calls per variant")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=sorted(VARIANTS),
        default=DEFAULT_VARIANTS,
        help="which options to measure; fp32 always runs first as the reference",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the input")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Refuses --device cuda without CUDA in one line; a stop signal is one line and 128 + N, as in
    inference.py (nothing to remove: every variant runs in this process)."""
    args = build_parser().parse_args(argv)
    setup_logging()
    require_device(args.device, PROG)
    previous = install_signal_handlers()
    try:
        return _measure_all(args)
    except Interrupted as stop:
        log.error("%s: stopped by %s; exit code %d", PROG, stop, stop.exit_code)
        return stop.exit_code
    finally:
        restore_signal_handlers(previous)


def _measure_all(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    base = RUNet(preset(args.preset, in_channels=args.in_channels)).eval()
    generator = torch.Generator().manual_seed(args.seed)
    batch = torch.rand(args.batch, args.in_channels, *(args.patch,) * 3, generator=generator).to(device)
    names = ["fp32", *(name for name in args.variants if name != "fp32")]
    rows: dict[str, dict] = {}
    reference = None
    for index, name in enumerate(names, 1):
        log.info("variant %d/%d: %s (%d timed calls)", index, len(names), name, args.iterations)
        options = VARIANTS[name]
        if options.needs_cuda and device.type != "cuda":
            rows[name] = {"options": options, "skipped": "needs CUDA"}
            continue
        try:
            row, out = measure(base, options, batch, args.iterations, reference)
        except Exception as error:  # a variant that cannot run here (no compiler, ...) is a result too
            rows[name] = {"options": options, "failed": f"{type(error).__name__}: {error}"[:500]}
            continue
        if reference is None:
            reference = out
        rows[name] = row
    baseline = rows["fp32"]["seconds_per_batch"]
    for row in rows.values():
        if "seconds_per_batch" in row:
            row["speedup_vs_fp32"] = round(baseline / row["seconds_per_batch"], 3)
    print_json(
        {
            "benchmark": "RUNet forward per kernel option",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "preset": args.preset,
            "parameters": count_parameters(base),
            "input_shape": list(batch.shape),
            "iterations": args.iterations,
            "host": host_info(),
            "variants": rows,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
