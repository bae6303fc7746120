"""The platform entry point's logic: every TIFF in an input folder -> a fused TIFF in the output folder.

``inference.py`` at the repository root is a thin wrapper around :func:`main`. One bad
file never stops the others: it gets one error line naming it, and the exit code is
non-zero only at the end, so every good case still has its output.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import os
import sys
import time
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from fmc.acceleration import COMPILE_MODES, PRECISIONS, KernelOptions
from fmc.atomic import atomic_write, remove_stale_partials
from fmc.cli_help import DefaultsHelpFormatter, OneLineErrorParser, from_flags
from fmc.device import select_device
from fmc.io import (
    CaseError,
    OutputError,
    check_output_target,
    check_writable_folder,
    fit_uint16_range,
    read_case,
    write_prediction,
)
from fmc.memory_plan import check_case, fusion_spacing, plan_for
from fmc.method import DW_FORMS, OUTPUT_SETTING_HELP, OUTPUT_SETTING_LIMITS, MethodSettings
from fmc.pipeline import FusionPipeline, PipelineConfig, card_settings
from fmc.preflight import (
    PreflightError,
    check_output_outside_input,
    list_inputs,
    prepare_side_file,
    preview_paths,
    side_file_problem,
)
from fmc.projections import mip_projections, preview_image
from fmc.safeguards import (
    DEFAULT_BUDGET_SECONDS,
    SAFETY_MARGIN_SECONDS,
    TTA_FLIPS,
    Attempt,
    count_patches,
    fallback_attempts,
)
from fmc.signals import Interrupted, install_signal_handlers, restore_signal_handlers
from fmc.tiling import TilingConfig
from fmc.weights import (
    CARD_SUFFIX,
    HOW_TO_GET_WEIGHTS,
    REPO_WEIGHTS,
    STEPS,
    WEIGHTS_SUFFIX,
    ModelSet,
    WeightsError,
    WeightsNotFoundError,
    discover_models,
)

log = logging.getLogger("fmc")

#: inference.py's tiling flags (``--overlap``, ``--batch``): the TilingConfig fields they set, with
#: their help; each flag's type and default are the field's, its limits TilingConfig's own checks.
TILING_FLAG_HELP = {
    "overlap": "patch overlap fraction in [0, 1)",
    "batch": "patches per forward pass",
}

PLATFORM_INPUT = Path("/input/images/fluorescence-lightsheet-3D-microscopy")
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
    patch: int | None = None  # --patch; None: the model card's (MethodSettings.tile_patch)
    budget_seconds: float | None = DEFAULT_BUDGET_SECONDS - SAFETY_MARGIN_SECONDS
    gpu_memory_gib: float | None = None
    report: Path | None = None  # --report FILE: checked before fusing, written by main
    allow_output_in_input: bool = False  # --allow-output-in-input: outputs may replace the inputs


class FusionFailedError(Exception):
    """Every attempt at one case failed; carries the last failure's one-line reason."""


MODEL_SUBFOLDERS = ("any", "nucleus", "membrane")


def _has_model(folder: Path) -> bool:
    return any(
        (folder / f"{step}{WEIGHTS_SUFFIX}").is_file() and (folder / f"{step}{CARD_SUFFIX}").is_file()
        for step in ("step1", "step2")
    )


def explicit_weights_problem(root: Path) -> str | None:
    """Why an explicit ``--weights`` folder holds no usable model (saying what is there), or None.

    Why: discovery would otherwise fall through to /opt/ml/model or the baked-in weights, and a
    user who named a folder would get another model without noticing.
    """
    if not root.is_dir():  # once for the run, not once per case from discover_models
        return f"--weights {root}: {_not_a_folder(root)}. {HOW_TO_GET_WEIGHTS}"
    folders = [root]
    for sub in MODEL_SUBFOLDERS:
        folders.append(root / sub)
        if (root / sub).is_dir():
            folders.extend(sorted((root / sub).glob("study_*")))
    if any(_has_model(folder) for folder in folders if folder.is_dir()):
        return None
    try:
        entries = sorted(root.iterdir())
    except OSError as error:
        return f"--weights {root}: cannot list the folder ({error.strerror or error})"
    shown = [entry.name + ("/" if entry.is_dir() else "") for entry in entries[:10]]
    found = ", ".join(shown) + (f" and {len(entries) - 10} more" if len(entries) > 10 else "")
    return (
        f"--weights {root}: no usable model there (found: {found or 'nothing, the folder is empty'}); "
        f"expected step1{WEIGHTS_SUFFIX} + step1{CARD_SUFFIX} and/or step2{WEIGHTS_SUFFIX} + "
        f"step2{CARD_SUFFIX}, directly or in any/, nucleus/ or membrane/ (optionally study_<N>/), "
        "as train.py export writes them"
    )


@dataclass
class CaseResult:
    """What happened to one input file."""

    name: str
    ok: bool
    message: str = ""
    seconds: float = 0.0
    # for --report: stages (seconds), memory_high_water_gib, memory_counter, step2_decisions (prose),
    # step2 (the same as data, see _step2_figures), attempt (device and kernels), model; empty when
    # the case failed
    figures: dict = field(default_factory=dict)


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
    """Fuse every case of ``options.input`` into ``options.output``; returns one result per input file.

    Each fault is logged once, where it is found: a fault of the whole run (input or output folder,
    ``--weights``) as one line before any fusing, a case's fault as one line naming the case."""
    if not options.input.is_dir():
        log.error("--input %s: %s", options.input, _not_a_folder(options.input))
        return []
    try:
        cases = list_inputs(options.input)
    except PreflightError as error:
        log.error("%s", error)
        return []
    if not cases:
        log.error("no .tif/.tiff files in %s: nothing to fuse", options.input)
        return []
    targets = [p.name for p in cases if "_fused" in p.stem]
    if targets:
        log.warning(
            "%d input(s) named *_fused* (%s%s): those look like ground truth (e.g. an fmc.simulate "
            "folder), not single views; they are fused too",
            len(targets),
            ", ".join(targets[:3]),
            ", ..." if len(targets) > 3 else "",
        )
    problem = run_problem(options)
    if problem is not None:
        log.error("%s", problem)
        return [CaseResult(path.name, False, problem) for path in cases]
    previews = usable_previews(cases, options.output) if options.preview else {}
    remove_stale_partials(options.output)
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
            (message, figures), attempt_index = _fuse_with_fallbacks(
                path, options, attempts, pipelines, deadline, previews.get(path)
            )
            if attempt_index:  # later cases start with the attempt that worked, not with what broke
                attempts = attempts[attempt_index:]
                log.warning("later cases run with %s", attempts[0].describe())
            results.append(CaseResult(path.name, True, message, time.perf_counter() - start, figures))
        except (WeightsNotFoundError, WeightsError) as error:
            log.error("%s: no usable model: %s", path.name, error)
            results.append(CaseResult(path.name, False, str(error)))
        except CaseError as error:
            log.error("%s", error)
            results.append(CaseResult(path.name, False, error.reason))
        except OutputError as error:
            log.error("%s", error)
            results.append(CaseResult(path.name, False, str(error)))
        except FusionFailedError as error:
            log.error("FAILED %s: %s", path.name, error)  # its attempts' tracebacks are above
            results.append(CaseResult(path.name, False, str(error)))
    return results


def run_problem(options: InferenceOptions) -> str | None:
    """Why the run cannot start, checked before any fusing, or None: outputs that would land in the
    input folder, a folder that cannot take them, a report path that cannot take the report, or a
    named model folder without a model."""
    try:
        if not options.allow_output_in_input:
            check_output_outside_input(options.input, options.output)
        check_writable_folder(options.output)
        if options.report is not None:
            prepare_side_file(options.report, "--report")
    except (PreflightError, OutputError) as error:
        return str(error)
    if options.weights is not None:
        return explicit_weights_problem(Path(options.weights))
    return None


def usable_previews(cases: list[Path], output: Path) -> dict[Path, Path]:
    """Each case's preview path, without those that something other than a file blocks (warned now,
    before fusing: a preview is a side file, so its case still fuses and its TIFF stands)."""
    previews = {}
    for case, preview in preview_paths(cases, output).items():
        problem = side_file_problem(preview)
        if problem is None:
            previews[case] = preview
        else:
            log.warning("%s: %s: no preview for %s (its TIFF is still written)", preview, problem, case.name)
    return previews


def _fuse_with_fallbacks(
    path: Path,
    options: InferenceOptions,
    attempts: list[Attempt],
    pipelines: dict[tuple[str, int | None, Attempt], FusionPipeline],
    deadline: float | None,
    preview: Path | None = None,
) -> tuple[tuple[str, dict], int]:
    """Fuse one case, retrying unexpected failures with the next attempt; returns
    ((summary, figures), attempt index).

    Bad input, missing weights and an output that cannot be written are not retried: no setting
    fixes them. Each retry re-reads
    the file, since a failed run may have written part of its prediction into the input array,
    and shares the case's deadline, so the planner fits what is left of the budget.
    """
    reason = "no attempt was made"
    for index, attempt in enumerate(attempts):
        if index:
            log.warning("%s: retrying with %s", path.name, attempt.describe())
        try:
            return _fuse_one(path, options, attempt, pipelines, deadline, preview), index
        except (WeightsNotFoundError, WeightsError, CaseError, OutputError):
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
    preview: Path | None = None,
) -> tuple[str, dict]:
    """Read, fuse, write one case (and its ``preview`` when given); returns its one-line summary
    (also logged) and its figures."""
    device = attempt.device
    target = options.output / path.name
    check_output_target(target)  # before minutes of fusing, not after
    read_start = time.perf_counter()
    case = read_case(path)
    fit_uint16_range(case)  # negatives / values above 65535 survive the uint16 output
    read_seconds = time.perf_counter() - read_start
    meta = case.meta
    key = (meta.channel, meta.study, attempt)
    if key not in pipelines:
        # A step left out by --no-stepN has its card checked, its tensors not read.
        steps = {"step1": options.pipeline.step1, "step2": options.pipeline.step2}
        skip = [step for step, wanted in steps.items() if not wanted]
        models: ModelSet = discover_models(
            options.weights, meta.channel, meta.study, device=device, skip=skip
        )
        _check_explicit_choice(options.weights, models, meta.channel, meta.study)
        config = replace(options.pipeline, kernels=attempt.kernels)
        # --patch when given, else the patch the model was trained and validated with (its card's)
        patch = card_settings(models).tile_patch(options.patch)
        config = replace(config, tiling=replace(config.tiling, patch=patch))
        pipelines[key] = FusionPipeline(models, config, device)
    pipeline = pipelines[key]
    # Before the big buffers: the grid the spacing implies, and whether the memory is there for it.
    shape = tuple(case.volume.shape)
    spacing = fusion_spacing(path.name, shape, meta.spacing, pipeline.config.target_spacing)
    plan = plan_for(pipeline, shape, case.volume.dtype == np.uint16, spacing)
    check_case(path, shape, spacing, plan, device, options.gpu_memory_gib)
    input_projection = mip_projections(case.volume) if preview is not None else None
    # A writeable uint16 input takes the prediction in place: one volume on the host, not two.
    reuse = case.volume.dtype == np.uint16 and case.volume.flags.writeable
    fused, timings = pipeline.run(case.volume, spacing, deadline=deadline, out=case.volume if reuse else None)
    write_start = time.perf_counter()
    write_prediction(target, fused, meta)
    timings = {
        "read": round(read_seconds, 3),
        **timings,
        "write": round(time.perf_counter() - write_start, 3),
    }
    if preview is not None and input_projection is not None:
        _write_preview_safely(preview, input_projection, fused, meta.spacing)
    spacing = "x".join(f"{s:g}" for s in meta.spacing)
    steps = " ".join(f"{name}={seconds:.2f}s" for name, seconds in timings.items())
    summary = (
        f"{path.name}: shape={'x'.join(map(str, case.volume.shape))} spacing={spacing}um "
        f"channel={meta.channel} study={meta.study} model={pipeline.describe()} device={device.type} "
        f"total={sum(timings.values()):.2f}s [{steps}]"
    )
    log.info("%s", summary)
    kind = "CUDA allocator" if device.type == "cuda" else "process RSS"
    if pipeline.memory_high_water_gib:
        marks = " ".join(f"{name}={gib:.2f}" for name, gib in pipeline.memory_high_water_gib.items())
        log.info("%s: memory high-water (%s, GiB) after each step: %s", path.name, kind, marks)
    figures = {
        "shape": list(case.volume.shape),
        "spacing_um": list(meta.spacing),
        "channel": meta.channel,
        "study": meta.study,
        "model": pipeline.describe(),
        "attempt": {"device": device.type, "kernels": dataclasses.asdict(attempt.kernels)},
        "stages": timings,
        "total_seconds": round(sum(timings.values()), 3),
        "memory_counter": kind,
        "memory_high_water_gib": dict(pipeline.memory_high_water_gib),
        "step2_decisions": list(pipeline.step2_decisions),
        "step2": _step2_figures(pipeline, plan.grid),
        # the safeguard's choice (fmc.change_gate): closeness None when the card has no gate
        "safeguard": {"closeness": pipeline.gate.closeness, "change_strength": pipeline.gate.strength},
        "native_detail_kept": pipeline.native_detail.gain,
    }
    return summary, figures


def _step2_figures(pipeline: FusionPipeline, grid: tuple[int, int, int]) -> dict | None:
    """What step 2 did on the case, as data (``step2_decisions`` says it in words); None: no step 2.

    Why: a benchmark comparing two runs (with and without a memory cap, say) must tell "the planner
    chose another setting" from "same setting, other bytes" without parsing prose. ``patch`` and
    ``batch`` are the configured ones: an out-of-memory retry with smaller ones is in the log only.
    """
    if pipeline.step2_model is None:
        return None
    tiling, plan = pipeline.config.tiling, pipeline.step2_plan
    ran = plan is None or plan.run
    overlap = tiling.overlap if plan is None else plan.overlap
    tta = pipeline.config.tta if plan is None else plan.tta
    patches = count_patches(grid, tuple(tiling.patch), overlap) if ran else 0
    return {
        "ran": ran,  # False: the time planner skipped step 2 (the step-1 output stands in)
        "planned": plan is not None,  # the time planner chose overlap and flips (a budget was set)
        "grid": list(grid),  # the 0.6 um volume the patches tile
        "patch": list(tiling.patch),
        "batch": tiling.batch,
        "overlap": overlap,
        "tta": tta,
        "patches": patches,
        "forward_passes": math.ceil(patches / tiling.batch) * (TTA_FLIPS if tta else 1),
        "predicted_seconds": round(plan.predicted_seconds, 3) if plan is not None and ran else None,
        "stand_ins": pipeline.step2_stand_ins,  # patches the deadline gave the fallback; None: no deadline
    }


def _check_explicit_choice(explicit: Path | None, models: ModelSet, channel: str, study: int | None) -> None:
    """A model found outside an explicit ``--weights`` folder is an error, not a silent fallback."""
    if explicit is None or models.folder is None:
        return
    root = Path(explicit).expanduser().resolve()
    if not Path(models.folder).resolve().is_relative_to(root):
        raise WeightsNotFoundError(
            f"--weights {explicit}: no model for channel {channel!r}"
            + (f" (study {study})" if study is not None else "")
            + f" there (add {channel}/ or any/); the search would have fallen back to {models.folder}"
        )


def _write_preview(
    path: Path,
    input_projection: tuple[np.ndarray, np.ndarray],
    fused: np.ndarray,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> None:
    """Labelled input | fused projections (XY and XZ) so a person can eyeball the result."""
    from PIL import Image

    image = Image.fromarray(preview_image(input_projection, fused, spacing))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def default_weights_phrase() -> str:
    """``"; the default weights: a 64^3 cube, difference_weighting none"`` from their cards, or "".

    Why read the cards: a help text that stated the paper's 224^3 cube and DW told users what the
    default weights do not do. Plain JSON, no validation: help must never fail on a card.
    """
    stored: dict = {}
    try:
        for step in STEPS:  # step 2's record wins, as in the pipeline
            card = json.loads((REPO_WEIGHTS / "any" / f"{step}{CARD_SUFFIX}").read_text(encoding="utf-8"))
            stored.update(card.get("training", {}).get("pipeline", {}))
        settings = MethodSettings.from_card(stored)
    except (OSError, ValueError, TypeError, AttributeError):
        return ""
    return (
        f"; the default weights: a {settings.global_size}^3 cube, "
        f"difference_weighting {settings.difference_weighting}"
    )


def _write_preview_safely(
    path: Path,
    input_projection: tuple[np.ndarray, np.ndarray],
    fused: np.ndarray,
    spacing: tuple[float, float, float],
) -> None:
    """The preview, or one warning: a failed preview never fails its case nor has it fused again."""
    problem = side_file_problem(path)
    if problem is None:
        try:
            _write_preview(path, input_projection, fused, spacing)
            return
        except Exception as error:  # a side file: whatever broke it, the TIFF is already written
            problem = _one_line(error)
    log.warning("%s: cannot write the preview (%s); the case's TIFF stands", path, problem)


def _not_a_folder(path: Path) -> str:
    """Why ``path``, which is no folder, cannot be used as one."""
    return "not a folder" if path.exists() else "no such folder"


def _one_line(error: BaseException) -> str:
    text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return " ".join((text or type(error).__name__).split())


def build_parser() -> argparse.ArgumentParser:
    """The documented command line of inference.py."""
    parser = OneLineErrorParser(
        prog="inference.py",
        description=(
            "Predict the multiview-fused volume from one lightsheet view (FuseMyCells). "
            "Reads every .tif/.tiff in --input with its metadata (spacing, channel, study), "
            "resamples to 0.6 um isotropic, runs the two-step RUNet (a global pass at the step-1 "
            "cube, then Hann-blended high-resolution patches, then difference weighting if the card "
            "asks for it; cube, DW form and patch come from the model card"
            f"{default_weights_phrase()}), and writes a uint16 BigTIFF of the same shape and "
            "metadata to --output. Exit code 0 only if every input produced an output."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--input", type=Path, default=PLATFORM_INPUT, help="folder of input TIFFs")
    parser.add_argument("--output", type=Path, default=PLATFORM_OUTPUT, help="folder for the fused TIFFs")
    parser.add_argument(
        "--allow-output-in-input",
        action="store_true",
        help="let --output be the input folder or inside it (same file names: outputs replace inputs)",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="model folder (searched first; then /opt/ml/model, then resources/weights)",
    )
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="where to run")
    defaults = MethodSettings()
    tiling = TilingConfig()
    for name, described in TILING_FLAG_HELP.items():  # defaults and checks: TilingConfig's
        default = getattr(tiling, name)
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=type(default), default=default, help=described)
    parser.add_argument(
        "--patch",
        type=int,
        default=None,
        help=f"step-2 patch edge in voxels (default: the model's training patch, else {defaults.patch})",
    )
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
        help="step-1 cube edge (default: the size the step-1 model was trained at, "
        f"else {defaults.global_size})",
    )
    parser.add_argument("--tta", action="store_true", help="average test-time flips along z, y and x")
    parser.add_argument(
        "--dw",
        choices=DW_FORMS,
        default=None,
        help="difference weighting form: paper (eq. 2 as the paper reads), released (the authors' code), "
        "none (default: the model card's setting)",
    )
    parser.add_argument(
        "--max-filter",
        type=int,
        default=None,
        help="max-filter size of the paper DW form (odd; 1 = off; default: the model card's, else 3)",
    )
    for name, top in OUTPUT_SETTING_LIMITS.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=float,
            default=None,
            help=f"{OUTPUT_SETTING_HELP[name]} (0-{top:g}; default: the model card's, "
            f"else {getattr(defaults, name):g})",
        )
    parser.add_argument("--no-step1", action="store_true", help="skip step 1, the global pass (ablation)")
    parser.add_argument("--no-step2", action="store_true", help="skip the patch step (ablation)")
    parser.add_argument("--no-dw", action="store_true", help="skip difference weighting (same as --dw none)")
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
        "--report",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write a JSON run report: per case the seconds per stage, memory high-water marks, "
        "the planner's decisions, device and kernels (what benchmarks read; the log's wording may change)",
    )
    parser.add_argument(
        "--preview",
        action="store_true",
        help="also write <name>_preview.png: input | fused maximum projections, XY and XZ, labelled",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging level"
    )
    return parser


def _flag_error(error: ValueError, names: typing.Iterable[str]) -> SystemExit:
    """A setting's own error (``max_filter must be odd ...``) as the flag's (``--max-filter must ...``)."""
    text = str(error)
    name = next((n for n in names if text.startswith(n + " ")), None)
    return SystemExit(text if name is None else "--" + name.replace("_", "-") + text[len(name) :])


def _check_method_flags(flags: dict[str, object]) -> None:
    """Refuse method-setting flags with the settings' own checks (:class:`MethodSettings`), so a
    limit is written once; the error names the flag (``--max-filter must be odd ...``)."""
    try:
        MethodSettings().override(**flags)
    except ValueError as error:
        raise _flag_error(error, flags) from None


def _tiling_from_flags(args: argparse.Namespace) -> TilingConfig:
    """The tiling flags as a :class:`TilingConfig`, refused by its own checks (the line names the flag).
    The patch stays TilingConfig's until the model is known (MethodSettings.tile_patch)."""
    try:
        return TilingConfig(**{name: getattr(args, name) for name in TILING_FLAG_HELP})
    except ValueError as error:
        raise _flag_error(error, TILING_FLAG_HELP) from None


def options_from_args(args: argparse.Namespace) -> InferenceOptions:
    """Turn parsed flags into typed options, refusing values that cannot work."""
    tiling = _tiling_from_flags(args)
    if args.no_dw and args.dw not in (None, "none"):
        raise SystemExit(f"--no-dw contradicts --dw {args.dw}")
    _check_method_flags(
        {
            "max_filter": args.max_filter,
            "global_size": args.global_size,
            "patch": args.patch,
            **{n: getattr(args, n) for n in OUTPUT_SETTING_LIMITS},
        }
    )
    if args.autocast != "none" and args.precision not in ("auto", args.autocast):
        raise SystemExit(f"--autocast {args.autocast} contradicts --precision {args.precision}")
    kernels = KernelOptions(
        precision=args.autocast if args.autocast != "none" else args.precision,
        channels_last={"auto": None, "on": True, "off": False}[args.channels_last],
        cudnn_benchmark=args.cudnn_benchmark,
        compile=None if args.compile == "none" else args.compile,
    )
    pipeline = PipelineConfig(
        step1=not args.no_step1,
        step2=not args.no_step2,
        difference_weighting="none" if args.no_dw else args.dw,
        max_filter=args.max_filter,
        **{name: getattr(args, name) for name in OUTPUT_SETTING_LIMITS},
        tta=args.tta,
        global_size=args.global_size,
        tiling=tiling,
        kernels=kernels,
    )
    return from_flags(
        InferenceOptions,
        args,
        pipeline=pipeline,
        budget_seconds=args.budget_seconds if args.budget_seconds > 0 else None,
    )


def configure_logging(level: str) -> None:
    """Timestamped lines on stderr; the platform keeps them as the job log.

    Leaves handlers that are already installed (a test harness, an embedding program) alone.
    """
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(getattr(logging, level))


def main(argv: list[str] | None = None) -> int:
    """Run inference.py; returns the process exit code.

    The stop-signal handlers are installed first and put back at the end (an embedding program or a
    test harness keeps its own); ``inference.py`` has installed them before the heavy imports.
    """
    previous = install_signal_handlers()
    try:
        args = build_parser().parse_args(argv)
        configure_logging(args.log_level)
        options = options_from_args(args)
        return _run(options, time.perf_counter())
    finally:
        restore_signal_handlers(previous)


def _run(options: InferenceOptions, start: float) -> int:
    """Fuse, summarize, write the report; a stop signal anywhere in it is one line and 128 + N."""
    try:
        results = run_inference(options)
        failed = [r for r in results if not r.ok]
        if results:  # each failure was logged once where it happened; this line only counts them
            log.info(
                "done: %d/%d case(s) fused in %.1fs",
                len(results) - len(failed),
                len(results),
                time.perf_counter() - start,
            )
        report_problem = None
        if options.report is not None:
            report_problem = write_report(options.report, results, time.perf_counter() - start)
            if report_problem is not None and all(r.message != report_problem for r in results):
                log.error("%s", report_problem)
    except Interrupted as stop:
        log.error(
            "stopped by %s after %.1fs: the output being written was removed, finished outputs in %s are "
            "complete; exit code %d",
            stop,
            time.perf_counter() - start,
            options.output,
            stop.exit_code,
        )
        return stop.exit_code
    return 0 if results and not failed and report_problem is None else 1


def write_report(path: Path, results: list[CaseResult], seconds: float) -> str | None:
    """The machine-readable run report (``--report``): what benchmarks parse instead of the log.
    Returns None, or the one line saying why it could not be written (naming the report, never
    the temporary; only a regular file is ever replaced).

    Why here: the CUDA allocator's peaks can only be read inside this process."""
    cuda = torch.cuda.is_available()
    report = {
        "format_version": 1,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "seconds": round(seconds, 3),
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "cuda_max_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
        "cases": [dataclasses.asdict(result) for result in results],
    }
    text = json.dumps(report, indent=1)
    try:
        prepare_side_file(path, "--report")
        atomic_write(Path(path), lambda tmp: tmp.write_text(text))
    except PreflightError as error:
        return str(error)
    except OSError as error:
        return f"--report {path}: cannot write it: {_one_line(error)}"
    return None
