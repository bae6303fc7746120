"""The pair writers' shared command line: defaults, and the one-line refusals (exit 2)."""

from __future__ import annotations

import pytest

from fmc.pair_cli import pair_parser, parse_pair_args


def _parser():
    return pair_parser("prog", "a writer", shape=(4, 5, 6), regimes=("calibrated", "harsh"))


def test_defaults_come_from_the_caller(tmp_path):
    args = parse_pair_args(_parser(), ["--out", str(tmp_path)])
    assert tuple(args.shape) == (4, 5, 6)
    assert (args.n, args.seed, args.regime, args.first_id) == (8, 0, "calibrated", 0)


def test_a_writer_adds_its_own_flags_after_the_shared_ones(tmp_path):
    parser = _parser()
    parser.add_argument("--channel", default="nucleus")
    args = parse_pair_args(parser, ["--out", str(tmp_path), "--channel", "membrane"])
    assert args.channel == "membrane"


@pytest.mark.parametrize(
    ("argv", "min_side", "message"),
    [
        (["--n", "0"], 1, "--n must be >= 1"),
        (["--shape", "0", "4", "4"], 1, "--shape must be at least 1 voxel(s) a side"),
        (["--shape", "7", "64", "64"], 8, "--shape must be at least 8 voxel(s) a side"),
        (["--regime", "gentle"], 1, "invalid choice"),
    ],
)
def test_refusals_are_one_line_and_exit_2(tmp_path, capsys, argv, min_side, message):
    with pytest.raises(SystemExit) as stop:
        parse_pair_args(_parser(), ["--out", str(tmp_path), *argv], min_side=min_side)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_the_smallest_allowed_shape_passes(tmp_path):
    args = parse_pair_args(_parser(), ["--out", str(tmp_path), "--shape", "8", "8", "8"], min_side=8)
    assert tuple(args.shape) == (8, 8, 8)
