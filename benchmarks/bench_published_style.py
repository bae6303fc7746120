"""The published-style pipeline (docs/performance.md, Anchors), timed on the same case with the same weights.

This is the reference the speed-up targets are measured against, built the way the
published code works: the whole volume on the CPU in float64, ``skimage.transform.resize``
(order 1, anti-aliasing) to 0.6 um and back, the step-1 global pass at 224^3 resized the
same way, fp32 windows of 224^3 at overlap 0.25 with constant (mean) blending
accumulated in numpy, difference weighting with a 3^3 maximum filter (scipy), then
percentile normalization and a tifffile write. Only the network forwards run on
``--device``. It is a baseline to time, not a second implementation to use.

Usage (from the repository root)::

    python -m benchmarks.bench_published_style --study 5 --preset paper --device cuda

The parent prepares the case and the model, then times a child process (``--worker``)
from process start to file written, like ``bench_inference``; the JSON holds the
child's per-stage seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

from benchmarks.common import (
    PreparedCase,
    case_parser,
    child_report,
    isotropic_shape,
    print_json,
    python,
    run_benchmark,
    run_child,
    setup_logging,
)

PROG = "python -m benchmarks.bench_published_style"

MAX_FILTER = 3
PERCENTILES = (2.0, 99.8)


@dataclasses.dataclass(frozen=True)
class PublishedSettings:
    """What the published style is run with: its three flags, in the parent and in the worker."""

    window: int = 224  # window edge (voxels)
    overlap: float = 0.25  # window overlap fraction
    global_size: int = 224  # step-1 cube edge (voxels)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
        """``--window``, ``--overlap`` and ``--global-size``; help texts start with ``prefix``."""
        for field in dataclasses.fields(PublishedSettings):
            parser.add_argument(
                "--" + field.name.replace("_", "-"),
                type=type(field.default),
                default=field.default,
                help=prefix + _FLAG_HELP[field.name],
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PublishedSettings:
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})

    def flags(self) -> list[str]:
        """The worker's command-line flags for these settings."""
        return [
            item
            for field in dataclasses.fields(self)
            for item in ("--" + field.name.replace("_", "-"), str(getattr(self, field.name)))
        ]


_FLAG_HELP = {
    "window": "window edge (voxels)",
    "overlap": "window overlap fraction",
    "global_size": "step-1 cube edge (voxels)",
}


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Window origins along one axis: regular steps, the last one flush with the edge."""
    if size <= window:
        return [0]
    step = max(1, int(window * (1 - overlap)))
    starts = list(range(0, size - window + 1, step))
    if starts[-1] + window < size:
        starts.append(size - window)
    return starts


@contextmanager
def _timed(timings: dict[str, float], name: str, device: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    timings[name] = round(time.perf_counter() - start, 3)


def _resize(volume: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The published resampling: skimage, float64, linear, Gaussian anti-aliasing when shrinking."""
    from skimage.transform import resize

    return resize(volume, shape, order=1, anti_aliasing=True, preserve_range=True, mode="edge")


def _forward(network, array: np.ndarray, device: str) -> np.ndarray:
    """One fp32 forward of a (C, Z, Y, X) array; the result back on the host as (Z, Y, X) float32."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None].to(device)
    return network(tensor)[0, 0].float().cpu().numpy()


def _windows(
    network, stacked: np.ndarray, device: str, window: int, overlap: float
) -> tuple[np.ndarray, int]:
    """Constant-weight sliding windows stitched on the CPU: sum and count arrays, then their ratio."""
    spatial = stacked.shape[1:]
    total = np.zeros(spatial, dtype=np.float32)
    count = np.zeros(spatial, dtype=np.float32)
    origins = [window_starts(size, window, overlap) for size in spatial]
    n = 0
    for z in origins[0]:
        for y in origins[1]:
            for x in origins[2]:
                region = (
                    slice(z, z + window),
                    slice(y, y + window),
                    slice(x, x + window),
                )
                total[region] += _forward(network, stacked[(slice(None), *region)], device)
                count[region] += 1
                n += 1
    return total / count, n


def run_published(
    case_path: Path,
    weights_dir: Path,
    output_path: Path,
    device: str,
    settings: PublishedSettings = PublishedSettings(),
) -> dict:
    """Fuse one case the published way; returns per-stage seconds and what was run."""
    import tifffile
    import torch
    from scipy.ndimage import maximum_filter

    from fmc.io import read_case
    from fmc.weights import load_model

    if device == "cuda" and not torch.cuda.is_available():
        device = "cpu"
    timings: dict[str, float] = {}
    with torch.inference_mode():
        with _timed(timings, "load_model", device):
            step1 = load_model(weights_dir / "any" / "step1", device=device)
            step2 = load_model(weights_dir / "any" / "step2", device=device)
            step1.network.eval()
            step2.network.eval()
        with _timed(timings, "read", device):
            case = read_case(case_path)
        meta = case.meta
        with _timed(timings, "normalize_in", device):
            image = case.volume.astype(np.float64)
            p_low, p_high = np.percentile(image, PERCENTILES)
            image -= p_low
            image /= p_high - p_low if p_high > p_low else 1.0
        iso_shape = isotropic_shape(image.shape, meta.spacing)
        with _timed(timings, "resize_in", device):
            iso = _resize(image, iso_shape)
            del image
        with _timed(timings, "step1", device):
            small = _resize(iso, (settings.global_size,) * 3)
            initial = _resize(_forward(step1.network, small[None], device).astype(np.float64), iso_shape)
            del small
        with _timed(timings, "step2", device):
            channels = int(step2.card.config.get("in_channels", 2))
            stacked = np.stack([iso, initial][:channels]).astype(np.float32)
            del initial
            prediction, n_windows = _windows(
                step2.network, stacked, device, settings.window, settings.overlap
            )
            del stacked
        with _timed(timings, "dw", device):
            smoothed = maximum_filter(prediction, size=MAX_FILTER)
            del prediction
            diff = np.abs(iso - smoothed)
            span = diff.max() - diff.min()
            weight = (diff - diff.min()) / (span if span > 0 else 1.0)
            del diff
            fused = (1 - weight) * iso + weight * smoothed
            del weight, smoothed, iso
        with _timed(timings, "resize_out", device):
            back = _resize(fused, case.volume.shape)
            del fused
        with _timed(timings, "normalize_write", device):
            low, high = np.percentile(back, PERCENTILES)
            back = (back - low) / (high - low if high > low else 1.0)
            out = np.clip(np.rint(back * (p_high - p_low) + p_low), 0, 65535).astype(np.uint16)
            del back
            z_size, y_size, x_size = meta.spacing
            temporary = output_path.with_name(f".{output_path.name}.part")
            tifffile.imwrite(
                temporary,
                out,
                bigtiff=True,
                metadata={
                    "axes": "ZYX",
                    "PhysicalSizeX": x_size,
                    "PhysicalSizeY": y_size,
                    "PhysicalSizeZ": z_size,
                    "unit": "um",
                    "channel": meta.channel,
                    "study": meta.study,
                },
                resolution=(1 / x_size, 1 / y_size),
            )
            os.replace(temporary, output_path)
    peaks = {}
    if device == "cuda":
        peaks = {
            "cuda_max_allocated": torch.cuda.max_memory_allocated(),
            "cuda_max_reserved": torch.cuda.max_memory_reserved(),
        }
    return {
        "device": device if device == "cpu" else f"cuda ({torch.cuda.get_device_name()})",
        "isotropic_shape": list(iso_shape),
        "windows": n_windows,
        "steps": timings,
        "case_seconds": round(sum(timings.values()), 3),
        "self_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        **peaks,
    }


def published_command(prepared: PreparedCase, device: str, settings: PublishedSettings) -> list[str]:
    """The worker command line that is timed."""
    return [
        python(),
        "-m",
        "benchmarks.bench_published_style",
        "--worker",
        "--case",
        str(prepared.case_path),
        "--weights",
        str(prepared.weights_dir),
        "--output",
        str(prepared.published_dir / prepared.case_path.name),
        "--device",
        device,
        *settings.flags(),
    ]


def run_published_child(
    prepared: PreparedCase, device: str, settings: PublishedSettings, timeout: float = 0
) -> dict:
    """Time the published-style worker as its own process and return its figures."""
    prepared.published_dir.mkdir(parents=True, exist_ok=True)
    command = published_command(prepared, device, settings)
    output = prepared.published_dir / prepared.case_path.name
    child = run_child(command, output=output, timeout=timeout, label="published-style worker")
    worker: dict = {}
    with suppress(ValueError):
        worker = json.loads(child.stdout)
    gib = 2**30
    head = {
        "benchmark": "published-style",
        "settings": {
            **dataclasses.asdict(settings),
            "blending": "constant",
            "resize": "skimage order=1 anti_aliasing float64",
            "precision": "fp32",
            "command": shlex.join(command),
        },
        "device": {"requested": device, "used": worker.get("device")},
    }
    timing = {
        "case_seconds": worker.get("case_seconds"),
        "steps": worker.get("steps", {}),
        "windows": worker.get("windows"),
    }
    memory = {
        "peak_gpu_allocated_gib": round(worker["cuda_max_allocated"] / gib, 3)
        if "cuda_max_allocated" in worker
        else None,
        "peak_gpu_reserved_gib": round(worker["cuda_max_reserved"] / gib, 3)
        if "cuda_max_reserved" in worker
        else None,
    }
    return child_report(child, output, head, timing, memory)


def build_parser() -> argparse.ArgumentParser:
    parser = case_parser(
        PROG, "Time the published-style pipeline (CPU skimage resize, 224^3 fp32 windows) as JSON."
    )
    PublishedSettings.add_arguments(parser)
    return parser


def _worker(argv: list[str]) -> int:
    """The timed child: fuse one prepared case and print the stage figures as JSON."""
    parser = argparse.ArgumentParser(prog="bench_published_style --worker")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--case", type=Path, required=True)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    PublishedSettings.add_arguments(parser)
    args = parser.parse_args(argv)
    result = run_published(
        args.case, args.weights, args.output, args.device, PublishedSettings.from_args(args)
    )
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" in argv:
        return _worker(argv)
    args = build_parser().parse_args(argv)
    setup_logging()

    def bench(prepared: PreparedCase, host: dict) -> int:
        result = run_published_child(prepared, args.device, PublishedSettings.from_args(args), args.timeout)
        print_json(prepared.report(host, **result))
        return 0 if result["ok"] else 1

    return run_benchmark(args, PROG, bench)


if __name__ == "__main__":
    sys.exit(main())
