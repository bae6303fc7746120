"""What the native-grid output costs against the 0.6 um round trip it replaced, in one run.

Both end steps take the same 0.6 um prediction of a study-shaped synthetic volume and write the
uint16 output on the native grid: ``round_trip`` resamples the prediction itself (the
``resample`` baseline's path); ``native`` adds the resampled change to the native input, with
the default card's native detail (its noise estimate and in-plane smoothing) planned first.
Prints JSON: seconds of each (best of ``--repeats``), their ratio, the shapes and the device.

``python -m benchmarks.bench_native_output --study 5 --scale 0.25 --device cpu``
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from benchmarks.common import (
    STUDIES,
    host_info,
    isotropic_shape,
    print_json,
    require_device,
    scaled_shape,
    setup_logging,
    synthetic_volume,
)
from fmc.native_detail import plan_native_detail
from fmc.normalization import percentile_bounds
from fmc.pipeline import add_change_on_native_grid, round_trip_uint16
from fmc.resample import resample_to_shape

log = logging.getLogger("benchmarks")


def main(argv: list[str] | None = None) -> int:
    """Time both end steps on one case and print the JSON report."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_native_output", description=__doc__)
    parser.add_argument(
        "--study", type=int, choices=sorted(STUDIES), default=5, help="study whose shape and spacing to use"
    )
    parser.add_argument(
        "--scale", type=float, default=0.25, help="scale of the study's shape (1 = full size)"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the end steps run")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each; the fastest counts")
    parser.add_argument("--noise-weight", type=float, default=1.0, help="the card's detail_noise_weight")
    parser.add_argument("--sigma", type=float, default=0.8, help="the card's detail_sigma (voxels)")
    args = parser.parse_args(argv)
    setup_logging()
    require_device(args.device, parser.prog)
    device = torch.device(args.device)
    study = STUDIES[args.study]
    shape = scaled_shape(study.shape, args.scale)
    spacing = study.spacing
    log.info("making a %s volume (study %d at scale %g)", shape, args.study, args.scale)
    volume = synthetic_volume(shape)
    bounds = percentile_bounds(volume)
    iso_shape = isotropic_shape(shape, spacing, 0.6)
    with torch.inference_mode():
        raw = torch.from_numpy(volume.astype("float32")).to(device)
        iso = resample_to_shape(raw, iso_shape).sub_(bounds[0]).div_(bounds[1] - bounds[0])
        del raw
        prediction = iso * 1.05  # any prediction: the cost does not depend on its values
        seconds: dict[str, float] = {"round_trip": float("inf"), "native": float("inf")}
        for repeat in range(args.repeats):
            start = time.perf_counter()
            round_trip_uint16(prediction.clone(), shape, bounds)
            seconds["round_trip"] = min(seconds["round_trip"], time.perf_counter() - start)
            start = time.perf_counter()
            detail = plan_native_detail(volume, iso, bounds, spacing, 0.6, 1.0, args.noise_weight, args.sigma)
            add_change_on_native_grid(volume, iso, prediction.clone(), bounds, detail, 0.5)
            seconds["native"] = min(seconds["native"], time.perf_counter() - start)
            log.info("repeat %d/%d: %s", repeat + 1, args.repeats, seconds)
    print_json(
        {
            "benchmark": "native_output",
            "study": args.study,
            "scale": args.scale,
            "shape": list(shape),
            "iso_shape": list(iso_shape),
            "device": args.device,
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "native_over_round_trip": round(seconds["native"] / seconds["round_trip"], 2),
            "native_detail_gain": round(detail.gain, 3),
            "host": host_info(),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
