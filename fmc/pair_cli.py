"""The command line the pair writers share (fmc.simulate, fmc.simulate_heldout, fmc.real_structures).

Why one place: the three write the same file layout from the same kind of draw, so each takes
the same --out / --n / --seed / --shape / --regime / --first-id / --log-level flags, checked and
logged alike; each adds its own (channel, source) after them.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from fmc.cli_help import DefaultsHelpFormatter


def pair_parser(
    prog: str,
    description: str,
    *,
    shape: tuple[int, int, int],
    regimes: Sequence[str],
    shape_help: str = "voxels per pair",
) -> argparse.ArgumentParser:
    """A pair writer's parser with the shared flags; ``shape`` is the default --shape."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--n", type=int, default=8, help="number of pairs")
    parser.add_argument("--seed", type=int, default=0, help="base seed; pair i uses (seed, i)")
    parser.add_argument("--shape", type=int, nargs=3, default=shape, metavar=("Z", "Y", "X"), help=shape_help)
    parser.add_argument(
        "--regime",
        choices=tuple(regimes),
        default="calibrated",
        help="calibrated: views as close to the truth as the real data; harsh: dim, deep, blurred views",
    )
    parser.add_argument(
        "--first-id", type=int, default=0, help="image id of the first pair (file names only)"
    )
    parser.add_argument("--log-level", default="INFO", help="logging level")
    return parser


def parse_pair_args(
    parser: argparse.ArgumentParser, argv: list[str] | None, min_side: int = 1
) -> argparse.Namespace:
    """Parse, refuse a count or shape that writes nothing (one line, exit 2), set up logging."""
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be >= 1")
    if min(args.shape) < min_side:
        parser.error(f"--shape must be at least {min_side} voxel(s) a side")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return args
