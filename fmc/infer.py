"""The platform entry point's logic: every TIFF in an input folder -> a fused TIFF in the output folder.

``inference.py`` at the repository root is a thin wrapper around :func:`main`. One bad
file never stops the others: it gets one error line naming it, and the exit code is
non-zero only at the end, so every good case still has its output.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from fmc.acceleration import COMPILE_MODES, PRECISIONS, KernelOptions
from fmc.io import CaseError, list_cases, read_case, write_prediction
from fmc.pipeline import FusionPipeline, PipelineConfig, trained_settings
from fmc.planner import DEFAULT_BUDGET_SECONDS, SAFETY_MARGIN_SECONDS
from fmc.tiling import TilingConfig
from fmc.weights import ModelSet, WeightsError, WeightsNotFoundError, discover_models

log = logging.getLogger("fmc")

PLATFORM_INPUT = Path("/input/images/fluorescence-lightsheet-3D-microscopy")
DEFAULT_PATCH = 128
PLATFORM_OUTPUT = Path("/output/images/fused-fluorescence-lightsheet-3D-microscopy")


@dataclass
class InferenceOptions:
    """Everything a run needs; the CLI fills it, tests and the sample runner build it directly."""

    input: Path = PLATFORM_INPUT
    output: Path = PLATFORM_OUTPUT
    weights: Path | None = None
    device: str = "auto"
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    preview: bool = False
    patch: int | None = None  # None: the model card's training patch, else DEFAULT_PATCH
    budget_seconds: float | None = DEFAULT_BUDGET_SECONDS - SAFETY_MARGIN_SECONDS
    gpu_memory_gib: float | None = None


SAFE_KERNELS = KernelOptions(precision="fp32", channels_last=False, cudnn_benchmark=False, compile=None)


@dataclass(frozen=True)
class Attempt:
    """One way to run a case: the kernels and the device. Later attempts trade speed for safety."""

    kernels: KernelOptions
    device: torch.device

    def describe(self) -> str:
        k = self.kernels
        compiled = f" compile={k.compile}" if k.compile else ""
        return f"{self.device.type} precision={k.precision} channels_last={k.channels_last}{compiled}"


def fallback_attempts(kernels: KernelOptions, device: torch.device) -> list[Attempt]:
    """The requested kernels first, then plain fp32 eager on the same device, then (from CUDA) the CPU.

    The CUDA paths (fp16 weights, compile, cuDNN autotuning) are the fast ones and the least
    proven on a given driver; a case must still get an output if one of them breaks. The CPU
    is last because a sticky CUDA error (e.g. an illegal memory access) poisons the context.
    """
    attempts = [Attempt(kernels, device)]
    if kernels != SAFE_KERNELS:
        attempts.append(Attempt(SAFE_KERNELS, device))
    if device.type != "cpu":
        attempts.append(Attempt(SAFE_KERNELS, torch.device("cpu")))
    return attempts


class FusionFailedError(Exception):
    """Every attempt at one case failed; carries the last failure's one-line reason."""


@dataclass
class CaseResult:
    """What happened to one input file."""

    name: str
    ok: bool
    message: str = ""
    seconds: float = 0.0


def select_device(requested: str) -> torch.device:
    """``auto`` takes CUDA when present and says so either way; ``cuda`` without CUDA falls back to CPU."""
    if requested not in ("auto", "cuda", "cpu"):
        raise ValueError(f"unknown device {requested!r}: use auto, cuda or cpu")
    if requested == "cpu":
        log.info("device: cpu (requested)")
        return torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda")
        try:  # start the context now: a driver that cannot run fails here, not in the middle of a case
            name = torch.cuda.get_device_name(device)
            torch.ones(1, device=device).add_(1).cpu()
        except Exception as error:
            log.warning("device: CUDA is present but unusable (%s); running on CPU (much slower)", error)
            return torch.device("cpu")
        log.info("device: cuda (%s)", name)
        return device
    log.warning("device: CUDA is not available, running on CPU (this is much slower)")
    return torch.device("cpu")


def process_age_seconds() -> float:
    """Seconds since this process started (Linux /proc), so the budget counts start-up and imports too."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def cap_gpu_memory(device: torch.device, gib: float | None) -> None:
    """Limit this process to ``gib`` GiB of the device (e.g. 15 to mimic a 16 GB T4)."""
    if gib is None or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, gib * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    log.info("GPU memory capped at %.1f GiB (%.0f%% of %.1f GiB)", gib, 100 * fraction, total / 2**30)


def run_inference(options: InferenceOptions) -> list[CaseResult]:
    """Fuse every case of ``options.input`` into ``options.output``; returns one result per input file."""
    cases = list_cases(options.input) if options.input.is_dir() else []
    if not cases:
        log.error("no .tif/.tiff files in %s: nothing to fuse", options.input)
        return []
    options.output.mkdir(parents=True, exist_ok=True)
    device = select_device(options.device)
    cap_gpu_memory(device, options.gpu_memory_gib)
    log.info("%d case(s) in %s -> %s", len(cases), options.input, options.output)
    pipelines: dict[tuple[str, int | None, Attempt], FusionPipeline] = {}
    attempts = fallback_attempts(options.pipeline.kernels, device)
    results = []
    already_spent = process_age_seconds()
    for path in cases:
        start = time.perf_counter()
        deadline = None
        if options.budget_seconds is not None:
            deadline = start + options.budget_seconds - already_spent
            already_spent = 0.0  # only the first case pays for process start-up
        try:
            message, worked = _fuse_with_fallbacks(path, options, attempts, pipelines, deadline)
            if worked:  # later cases start with what worked, not with what broke
                attempts = attempts[worked:]
                log.warning("later cases run with %s", attempts[0].describe())
            results.append(CaseResult(path.name, True, message, time.perf_counter() - start))
        except (WeightsNotFoundError, WeightsError) as error:
            log.error("%s: no usable model: %s", path.name, error)
            results.append(CaseResult(path.name, False, str(error)))
        except CaseError as error:
            log.error("%s", error)
            results.append(CaseResult(path.name, False, error.reason))
        except FusionFailedError as error:
            results.append(CaseResult(path.name, False, str(error)))
    return results


def _fuse_with_fallbacks(
    path: Path,
    options: InferenceOptions,
    attempts: list[Attempt],
    pipelines: dict[tuple[str, int | None, Attempt], FusionPipeline],
    deadline: float | None,
) -> tuple[str, int]:
    """Fuse one case, retrying unexpected failures with the next attempt; returns (summary, attempt index).

    Bad input and missing weights are not retried: no setting fixes them. Each retry re-reads
    the file, since a failed run may have written part of its prediction into the input array,
    and shares the case's deadline, so the planner fits what is left of the budget.
    """
    reason = "no attempt was made"
    for index, attempt in enumerate(attempts):
        if index:
            log.warning("%s: retrying with %s", path.name, attempt.describe())
        try:
            return _fuse_one(path, options, attempt, pipelines, deadline), index
        except (WeightsNotFoundError, WeightsError, CaseError):
            raise
        except Exception as error:
            log.exception("%s: failed while fusing (%s): %s", path.name, attempt.describe(), error)
            reason = f"{type(error).__name__}: {error}"
        for key in [key for key in pipelines if key[2] == attempt]:
            del pipelines[key]  # later cases skip this attempt; its models need not stay loaded
        _release_memory(attempt.device)  # outside the handler: the traceback no longer pins tensors
    raise FusionFailedError(reason)


def _release_memory(device: torch.device) -> None:
    """Give a failed attempt's memory back before the next one; never raise (the context may be broken)."""
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except Exception as error:  # a sticky CUDA error: the CPU attempt does not need the context
            log.warning("could not free CUDA memory after the failure: %s", error)


def _fuse_one(
    path: Path,
    options: InferenceOptions,
    attempt: Attempt,
    pipelines: dict[tuple[str, int | None, Attempt], FusionPipeline],
    deadline: float | None,
) -> str:
    """Read, fuse, write one case; returns its one-line summary (also logged)."""
    device = attempt.device
    read_start = time.perf_counter()
    case = read_case(path)
    read_seconds = time.perf_counter() - read_start
    meta = case.meta
    key = (meta.channel, meta.study, attempt)
    if key not in pipelines:
        models: ModelSet = discover_models(options.weights, meta.channel, meta.study, device=device)
        config = replace(options.pipeline, kernels=attempt.kernels)
        if options.patch is None:  # the patch the model was trained and validated with
            edge = int(trained_settings(models).get("patch", DEFAULT_PATCH))
            config = replace(config, tiling=replace(config.tiling, patch=(edge,) * 3))
        pipelines[key] = FusionPipeline(models, config, device)
    pipeline = pipelines[key]
    input_projection = _projection(case.volume) if options.preview else None
    # A writeable uint16 input takes the prediction in place: one volume on the host, not two.
    reuse = case.volume.dtype == np.uint16 and case.volume.flags.writeable
    fused, timings = pipeline.run(
        case.volume, meta.spacing, deadline=deadline, out=case.volume if reuse else None
    )
    write_start = time.perf_counter()
    target = options.output / path.name
    write_prediction(target, fused, meta)
    timings = {
        "read": round(read_seconds, 3),
        **timings,
        "write": round(time.perf_counter() - write_start, 3),
    }
    if input_projection is not None:
        _write_preview(options.output / f"{path.stem}_preview.png", input_projection, fused)
    spacing = "x".join(f"{s:g}" for s in meta.spacing)
    steps = " ".join(f"{name}={seconds:.2f}s" for name, seconds in timings.items())
    summary = (
        f"{path.name}: shape={'x'.join(map(str, case.volume.shape))} spacing={spacing}um "
        f"channel={meta.channel} study={meta.study} model={pipeline.describe()} device={device.type} "
        f"total={sum(timings.values()):.2f}s [{steps}]"
    )
    log.info("%s", summary)
    if pipeline.memory_high_water_gib:
        marks = " ".join(f"{name}={gib:.2f}" for name, gib in pipeline.memory_high_water_gib.items())
        kind = "CUDA allocator" if device.type == "cuda" else "process RSS"
        log.info("%s: memory high-water (%s, GiB) after each step: %s", path.name, kind, marks)
    return summary


def _projection(volume: np.ndarray) -> np.ndarray:
    """Maximum-intensity projection along z, contrast-stretched to uint8 (2nd-99.8th percentile)."""
    projection = volume.max(axis=0).astype(np.float32)
    low, high = np.percentile(projection, (2, 99.8))
    scaled = np.clip((projection - low) / (high - low if high > low else 1.0), 0, 1)
    return (scaled * 255).astype(np.uint8)


def _write_preview(path: Path, input_projection: np.ndarray, fused: np.ndarray) -> None:
    """Maximum-intensity projections (input | output) so a person can eyeball the result."""
    from PIL import Image

    Image.fromarray(np.concatenate([input_projection, _projection(fused)], axis=1)).save(path)


def build_parser() -> argparse.ArgumentParser:
    """The documented command line of inference.py."""
    parser = argparse.ArgumentParser(
        prog="inference.py",
        description=(
            "Predict the multiview-fused volume from one lightsheet view (FuseMyCells). "
            "Reads every .tif/.tiff in --input with its metadata (spacing, channel, study), "
            "resamples to 0.6 um isotropic, runs the two-step RUNet (global 224^3 pass, then "
            "Hann-blended high-resolution patches, then difference weighting), and writes a "
            "uint16 BigTIFF of the same shape and metadata to --output. Exit code 0 only if "
            "every input produced an output."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--input", type=Path, default=PLATFORM_INPUT, help="folder of input TIFFs")
    parser.add_argument("--output", type=Path, default=PLATFORM_OUTPUT, help="folder for the fused TIFFs")
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="model folder (searched first; then /opt/ml/model, then resources/weights)",
    )
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="where to run")
    parser.add_argument("--overlap", type=float, default=0.5, help="patch overlap fraction in [0, 1)")
    parser.add_argument(
        "--patch",
        type=int,
        default=None,
        help=f"step-2 patch edge in voxels (default: the model's training patch, else {DEFAULT_PATCH})",
    )
    parser.add_argument("--batch", type=int, default=2, help="patches per forward pass")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="network arithmetic: fp32 (cuDNN may use TF32), bf16/fp16 autocast, fp16-weights "
        "(whole network in float16; fp16 needs CUDA), or auto: fp16-weights on CUDA, else fp32",
    )
    parser.add_argument(
        "--autocast", choices=("none", "bf16", "fp16"), default="none", help="same as --precision bf16|fp16"
    )
    parser.add_argument(
        "--channels-last",
        choices=("auto", "on", "off"),
        default="auto",
        help="channels_last_3d memory format for the networks (auto: on for CPU, off for CUDA)",
    )
    parser.add_argument(
        "--cudnn-benchmark", action="store_true", help="let cuDNN time its algorithms for each input shape"
    )
    parser.add_argument(
        "--compile",
        choices=("none", *COMPILE_MODES),
        default="none",
        help="torch.compile the networks with this mode (compile time counts against the budget)",
    )
    parser.add_argument(
        "--global-size",
        type=int,
        default=None,
        help="step-1 cube edge (default: the size the step-1 model was trained at, else 224)",
    )
    parser.add_argument("--tta", action="store_true", help="average test-time flips along z, y and x")
    parser.add_argument("--max-filter", type=int, default=3, help="max-filter size before DW (odd; 1 = off)")
    parser.add_argument("--no-step1", action="store_true", help="skip the global 224^3 step (ablation)")
    parser.add_argument("--no-step2", action="store_true", help="skip the patch step (ablation)")
    parser.add_argument("--no-dw", action="store_true", help="skip difference weighting (ablation)")
    parser.add_argument(
        "--budget-seconds",
        type=float,
        default=DEFAULT_BUDGET_SECONDS - SAFETY_MARGIN_SECONDS,
        help="per-case time budget; the planner lowers overlap, drops flips or skips step 2 to fit (0 = off)",
    )
    parser.add_argument(
        "--gpu-memory-gib", type=float, default=None, help="cap this process's GPU memory (e.g. 15 for a T4)"
    )
    parser.add_argument(
        "--preview", action="store_true", help="also write <name>_preview.png (input | output MIPs)"
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging level"
    )
    return parser


def options_from_args(args: argparse.Namespace) -> InferenceOptions:
    """Turn parsed flags into typed options, refusing values that cannot work."""
    if not 0 <= args.overlap < 1:
        raise SystemExit(f"--overlap must be in [0, 1), got {args.overlap}")
    if (args.patch is not None and args.patch < 8) or args.batch < 1:
        raise SystemExit("--patch must be >= 8 and --batch >= 1")
    if args.max_filter < 1 or args.max_filter % 2 == 0:
        raise SystemExit(f"--max-filter must be odd and >= 1, got {args.max_filter}")
    if args.autocast != "none" and args.precision not in ("auto", args.autocast):
        raise SystemExit(f"--autocast {args.autocast} contradicts --precision {args.precision}")
    tiling = TilingConfig(patch=(args.patch or DEFAULT_PATCH,) * 3, overlap=args.overlap, batch=args.batch)
    kernels = KernelOptions(
        precision=args.autocast if args.autocast != "none" else args.precision,
        channels_last={"auto": None, "on": True, "off": False}[args.channels_last],
        cudnn_benchmark=args.cudnn_benchmark,
        compile=None if args.compile == "none" else args.compile,
    )
    pipeline = PipelineConfig(
        step1=not args.no_step1,
        step2=not args.no_step2,
        difference_weighting=not args.no_dw,
        max_filter=args.max_filter,
        tta=args.tta,
        global_size=args.global_size,
        tiling=tiling,
        kernels=kernels,
    )
    return InferenceOptions(
        input=args.input,
        output=args.output,
        weights=args.weights,
        device=args.device,
        pipeline=pipeline,
        preview=args.preview,
        patch=args.patch,
        budget_seconds=args.budget_seconds if args.budget_seconds > 0 else None,
        gpu_memory_gib=args.gpu_memory_gib,
    )


def configure_logging(level: str) -> None:
    """Timestamped lines on stderr; the platform keeps them as the job log.

    Leaves handlers that are already installed (a test harness, an embedding program) alone.
    """
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(getattr(logging, level))


def main(argv: list[str] | None = None) -> int:
    """Run inference.py; returns the process exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    options = options_from_args(args)
    start = time.perf_counter()
    results = run_inference(options)
    failed = [r for r in results if not r.ok]
    log.info(
        "done: %d/%d case(s) fused in %.1fs",
        len(results) - len(failed),
        len(results),
        time.perf_counter() - start,
    )
    for result in failed:
        log.error("FAILED %s: %s", result.name, result.message)
    _report_peak_memory(os.environ.get("FMC_REPORT_PEAK_MEMORY"))
    return 0 if results and not failed else 1


def _report_peak_memory(path: str | None) -> None:
    """For benchmarks: the CUDA allocator's peaks can only be read inside this process."""
    if not path:
        return
    peaks = {"cuda_max_allocated": 0, "cuda_max_reserved": 0}
    if torch.cuda.is_available():
        peaks = {
            "cuda_max_allocated": torch.cuda.max_memory_allocated(),
            "cuda_max_reserved": torch.cuda.max_memory_reserved(),
        }
    Path(path).write_text(json.dumps(peaks))
